//! The pipeline benchmark: how busy the generator stays while judges think.
//!
//! The testbed generator is wrapped in a cost model of real step times (each velocity row
//! and each decode sleeps on the worker thread, as a GPU kernel would hold it) and the
//! testbed judge in a latency model of a remote API. A batch of edits then runs at several
//! queue depths; generator busy time over makespan is the busy fraction, and the total
//! generator work is the makespan's lower bound. Times can be scaled down together
//! (`time_scale`) so the benchmark runs in seconds; ratios do not change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_core::Tensor;
use image::RgbImage;
use serde::Serialize;

use super::{run_batch, BatchOptions, Shard};
use crate::edit::EditContext;
use crate::engine::{Engine, GeneratorWorker, StrategyConfig};
use crate::error::{EngineError, GenerateError};
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::generate::{
    CandidateCache, DecodePurpose, Generator, GeneratorInfo, PreparedEdit, RowWork,
};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use crate::judge::{Comparison, Judge, JudgeError, PreviewStage, ScreenVerdict, SubScores};
use crate::models::testbed::make_edit;
use crate::stop::StopSignal;

/// A generator that takes the time a real one would.
pub struct CostModel<G> {
    /// The generator that computes.
    pub inner: G,
    /// Time per candidate row per velocity call.
    pub per_row: Duration,
    /// Time per decode.
    pub per_decode: Duration,
}

impl<G: Generator> Generator for CostModel<G> {
    fn info(&self) -> GeneratorInfo {
        let mut info = self.inner.info();
        info.detail = format!(
            "{} + cost model {:?}/row, {:?}/decode",
            info.detail, self.per_row, self.per_decode
        );
        info
    }
    fn prepare(&mut self, edit: &EditContext) -> Result<PreparedEdit, GenerateError> {
        self.inner.prepare(edit)
    }
    fn velocity(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError> {
        let rows = latents.dim(0)? as u32;
        let started = Instant::now();
        let v = self.inner.velocity(edit, latents, sigma)?;
        std::thread::sleep((self.per_row * rows).saturating_sub(started.elapsed()));
        Ok(v)
    }
    fn velocity_cached(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
        caches: &mut [CandidateCache],
    ) -> Result<(Tensor, Vec<RowWork>), GenerateError> {
        let rows = latents.dim(0)? as u32;
        let started = Instant::now();
        let out = self.inner.velocity_cached(edit, latents, sigma, caches)?;
        std::thread::sleep((self.per_row * rows).saturating_sub(started.elapsed()));
        Ok(out)
    }
    fn decode(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError> {
        let started = Instant::now();
        let image = self.inner.decode(edit, latents, purpose)?;
        std::thread::sleep(self.per_decode.saturating_sub(started.elapsed()));
        Ok(image)
    }
    fn release(&mut self, edit: &PreparedEdit) {
        self.inner.release(edit)
    }
}

/// A judge that answers after a fixed latency, like a remote API.
pub struct Latency<J> {
    /// The judge that answers.
    pub inner: J,
    /// Time before each answer.
    pub latency: Duration,
}

#[async_trait]
impl<J: Judge> Judge for Latency<J> {
    fn name(&self) -> String {
        format!("{} + {:?} latency", self.inner.name(), self.latency)
    }
    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        tokio::time::sleep(self.latency).await;
        self.inner.screen(edit, preview, stage).await
    }
    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        tokio::time::sleep(self.latency).await;
        self.inner.compare(edit, first, second).await
    }
    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        tokio::time::sleep(self.latency).await;
        self.inner.semantic_consistency(edit, edited).await
    }
    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        tokio::time::sleep(self.latency).await;
        self.inner.perceptual_quality(edit, edited).await
    }
}

/// Benchmark parameters (times in seconds, before `time_scale`).
#[derive(Debug, Clone, Serialize)]
pub struct PipelineBench {
    /// Edits per configuration.
    pub edits: usize,
    /// Queue depths to try.
    pub queues: Vec<usize>,
    /// Judge latencies to try, seconds per call.
    pub latencies: Vec<f64>,
    /// Generator time per candidate row per step, seconds.
    pub step_s: f64,
    /// Generator time per decode, seconds.
    pub decode_s: f64,
    /// Multiplies every time above.
    pub time_scale: f64,
    /// The strategy each edit runs.
    pub strategy: StrategyConfig,
    /// Panel width of the testbed edits.
    pub width: u32,
}

/// One configuration's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineRow {
    /// Edits in flight at once.
    pub queue: usize,
    /// Judge latency per call (unscaled seconds).
    pub latency_s: f64,
    /// Wall time of the batch (unscaled seconds).
    pub makespan_s: f64,
    /// Total generator work = the makespan's lower bound (unscaled seconds).
    pub generator_work_s: f64,
    /// generator_work / makespan.
    pub busy_fraction: f64,
}

impl PipelineBench {
    /// The measured rows as a markdown table (times unscaled).
    pub fn markdown(&self, rows: &[PipelineRow]) -> String {
        let mut md = format!(
            "{} edits per row, {} (NFE {}), {} s per candidate-step, {} s per decode; times unscaled (run at x{}).\n\n",
            self.edits,
            self.strategy.kind.name(),
            self.strategy.planned_nfe(),
            self.step_s,
            self.decode_s,
            self.time_scale
        );
        md.push_str("| queued edits | judge latency (s) | makespan (s) | generator work = lower bound (s) | makespan / bound | generator busy |\n|---|---|---|---|---|---|\n");
        for r in rows {
            md.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.3} | {:.1}% |\n",
                r.queue,
                r.latency_s,
                r.makespan_s,
                r.generator_work_s,
                r.makespan_s / r.generator_work_s,
                100.0 * r.busy_fraction
            ));
        }
        md
    }
}

/// Writes `n` manifest lines over one image into `dir`, returning the manifest path.
pub fn write_manifest(dir: &Path, n: usize, width: u32) -> std::io::Result<PathBuf> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let edit = make_edit(7, width);
    edit.source
        .save(dir.join("scene.png"))
        .map_err(std::io::Error::other)?;
    let path = dir.join(format!("manifest-{n}.jsonl"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..n {
        writeln!(
            f,
            "{{\"id\": \"e{i}\", \"image\": \"scene.png\", \"instruction\": \"{}\"}}",
            edit.instruction
        )?;
    }
    f.flush()?;
    Ok(path)
}

/// Runs every (queue, latency) configuration over a batch of real manifest items.
pub async fn run_pipeline_bench(
    bench: &PipelineBench,
    scratch: &Path,
) -> Result<Vec<PipelineRow>, EngineError> {
    let io = |e: std::io::Error| EngineError::Output {
        path: scratch.to_path_buf(),
        reason: e.to_string(),
    };
    let manifest = write_manifest(scratch, bench.edits, bench.width).map_err(io)?;
    let scale = bench.time_scale;
    let mut rows = Vec::new();
    for &latency_s in &bench.latencies {
        for &queue in &bench.queues {
            let testbed = TestbedGenerator::new(TestbedConfig::default());
            let judge = Latency {
                inner: TestbedJudge::knowing(TestbedJudgeConfig::default(), testbed.edits()),
                latency: Duration::from_secs_f64(latency_s * scale),
            };
            let generator = CostModel {
                inner: testbed,
                per_row: Duration::from_secs_f64(bench.step_s * scale),
                per_decode: Duration::from_secs_f64(bench.decode_s * scale),
            };
            let worker = Arc::new(GeneratorWorker::spawn(Box::new(generator)));
            let engine = Engine::new(worker.clone(), Arc::new(judge), 64);
            let out = scratch.join(format!("q{queue}-l{latency_s}"));
            let _ = std::fs::remove_dir_all(&out);
            let opts = BatchOptions {
                manifest: manifest.clone(),
                root: None,
                out,
                shard: Shard::ALL,
                strategy: bench.strategy.clone(),
                queue,
                width: bench.width,
                progress: false,
                budget_nfe_mean: None,
            };
            let busy_before = worker.busy_time();
            let started = Instant::now();
            run_batch(&engine, &opts, &StopSignal::default()).await?;
            let makespan = started.elapsed().as_secs_f64();
            let work = (worker.busy_time() - busy_before).as_secs_f64();
            rows.push(PipelineRow {
                queue,
                latency_s,
                makespan_s: makespan / scale,
                generator_work_s: work / scale,
                busy_fraction: work / makespan,
            });
        }
    }
    Ok(rows)
}

pub use crate::models::bench::peak_rss_kib;
