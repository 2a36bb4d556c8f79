//! `bench serve`: C concurrent clients submit testbed edits to a real server (HTTP on
//! 127.0.0.1, the OpenAI-compatible endpoint) whose generators take the time real ones
//! would (the cost model of `bench pipeline`) and whose judge answers after an API's
//! latency. Per client count: throughput, p50 / p95 request latency, the generators' busy
//! fraction, and a count of lost or duplicated edits from the journal (both must be 0).
//! Times scale down together (`time_scale`) so a run takes seconds; ratios do not change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;

use super::journal::{Journal, Record};
use super::{run_on, ConnLimits, Limits, MeteredJudge, Metrics, ServeOptions};
use crate::batch::bench::{CostModel, Latency};
use crate::engine::{Engine, GeneratorWorker, StrategyConfig};
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use crate::judge::Judge;
use crate::models::testbed::{make_edit, TestbedEdits};
use crate::stop::StopSignal;

/// Benchmark parameters (times in seconds, before `time_scale`).
#[derive(Debug, Clone, Serialize)]
pub struct ServeBench {
    /// Client counts to try.
    pub clients: Vec<usize>,
    /// Edits per client count.
    pub edits: usize,
    /// Generator workers (devices) behind the queue.
    pub workers: usize,
    /// Edits each worker runs at once.
    pub in_flight: usize,
    /// Generator time per candidate row per step.
    pub step_s: f64,
    /// Generator time per decode.
    pub decode_s: f64,
    /// Judge latency per call.
    pub judge_latency_s: f64,
    /// Multiplies every time above.
    pub time_scale: f64,
    /// The strategy every edit runs.
    pub strategy: StrategyConfig,
    /// Panel width of the testbed edits.
    pub width: u32,
}

/// One client count's measurement (times unscaled).
#[derive(Debug, Clone, Serialize)]
pub struct ServeRow {
    /// Concurrent clients.
    pub clients: usize,
    /// Edits finished.
    pub edits: usize,
    /// Wall time from the first request to the last answer.
    pub makespan_s: f64,
    /// Edits per minute.
    pub throughput_per_min: f64,
    /// Median request latency (submit to answer).
    pub p50_s: f64,
    /// 95th percentile request latency.
    pub p95_s: f64,
    /// Generator busy time over makespan, mean of the workers.
    pub busy_fraction: f64,
    /// Requests answered with an error.
    pub errors: usize,
    /// Submitted edits the journal does not show ending exactly once as done.
    pub lost: usize,
    /// Edits the journal shows ending more than once, or answers naming an edit twice.
    pub duplicated: usize,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl ServeBench {
    /// The rows as a markdown table.
    pub fn markdown(&self, rows: &[ServeRow]) -> String {
        let mut md = format!(
            "{} edits per row over HTTP, {} (most NFE {}), {} worker(s) x {} in flight, {} s per candidate-step, {} s per decode, {} s per judge call; times unscaled (run at x{}).\n\n",
            self.edits,
            self.strategy.kind.name(),
            self.strategy.planned_nfe(),
            self.workers,
            self.in_flight,
            self.step_s,
            self.decode_s,
            self.judge_latency_s,
            self.time_scale
        );
        md.push_str("| clients | edits | makespan (s) | edits/min | p50 latency (s) | p95 latency (s) | generator busy | errors | lost | duplicated |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for r in rows {
            md.push_str(&format!(
                "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1}% | {} | {} | {} |\n",
                r.clients,
                r.edits,
                r.makespan_s,
                r.throughput_per_min,
                r.p50_s,
                r.p95_s,
                100.0 * r.busy_fraction,
                r.errors,
                r.lost,
                r.duplicated
            ));
        }
        md
    }

    /// Runs every client count against a fresh server (its journal under `scratch`).
    pub async fn run(&self, scratch: &Path) -> anyhow::Result<Vec<ServeRow>> {
        let mut rows = Vec::new();
        for &clients in &self.clients {
            let out = scratch.join(format!("c{clients}"));
            let _ = std::fs::remove_dir_all(&out);
            rows.push(self.run_one(clients, &out).await?);
        }
        Ok(rows)
    }

    fn engines(&self, metrics: &Arc<Metrics>) -> Vec<(String, Engine)> {
        let scale = self.time_scale;
        let edits = TestbedEdits::default();
        let judge: Arc<dyn Judge> = Arc::new(MeteredJudge::new(
            Arc::new(Latency {
                inner: TestbedJudge::knowing(TestbedJudgeConfig::default(), edits.clone()),
                latency: Duration::from_secs_f64(self.judge_latency_s * scale),
            }),
            metrics.clone(),
        ));
        (0..self.workers)
            .map(|i| {
                let generator = CostModel {
                    inner: TestbedGenerator::with_edits(TestbedConfig::default(), edits.clone()),
                    per_row: Duration::from_secs_f64(self.step_s * scale),
                    per_decode: Duration::from_secs_f64(self.decode_s * scale),
                };
                let worker = Arc::new(GeneratorWorker::spawn(Box::new(generator)));
                (format!("bench#{i}"), Engine::new(worker, judge.clone(), 64))
            })
            .collect()
    }

    async fn run_one(&self, clients: usize, out: &Path) -> anyhow::Result<ServeRow> {
        let metrics = Arc::new(Metrics::default());
        let engines = self.engines(&metrics);
        let workers: Vec<Arc<GeneratorWorker>> =
            engines.iter().map(|(_, e)| e.worker().clone()).collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let opts = ServeOptions {
            addr: listener.local_addr()?,
            out: out.to_path_buf(),
            max_queue: self.edits.max(1),
            in_flight: self.in_flight,
            limits: Limits::default(),
            token: None,
            defaults: self.strategy.clone(),
            conn: ConnLimits::default(),
            public_url: None,
        };
        let stop = StopSignal::default();
        let server = tokio::spawn(run_on(listener, engines, metrics, opts, stop.clone()));

        let edit = make_edit(7, self.width);
        let mut png = Vec::new();
        edit.source
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        let body = Arc::new(serde_json::json!({
            "image": base64::engine::general_purpose::STANDARD.encode(&png),
            "prompt": edit.instruction,
            // The source's own size: a height it does not have at that width is refused.
            "size": format!("{}x{}", edit.source.width(), edit.source.height()),
        }));
        let busy_before: Vec<Duration> = workers.iter().map(|w| w.busy_time()).collect();
        let next = Arc::new(AtomicUsize::new(0));
        let client = crate::http::client_builder().build()?;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (next, client, body, edits) =
                (next.clone(), client.clone(), body.clone(), self.edits);
            let url = format!("{base}/v1/images/edits");
            tasks.spawn(async move {
                // (latency, the edit id or None for an error)
                let mut answers: Vec<(f64, Option<String>)> = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < edits {
                    let t = Instant::now();
                    let answer = match client.post(&url).json(&*body).send().await {
                        Ok(r) if r.status().is_success() => r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|v| v["icedit"]["id"].as_str().map(str::to_string)),
                        Ok(r) => {
                            tracing::warn!("bench serve: {}", r.text().await.unwrap_or_default());
                            None
                        }
                        Err(e) => {
                            tracing::warn!("bench serve: {e}");
                            None
                        }
                    };
                    answers.push((t.elapsed().as_secs_f64(), answer));
                }
                answers
            });
        }
        let mut answers = Vec::new();
        while let Some(done) = tasks.join_next().await {
            answers.extend(done?);
        }
        let makespan = started.elapsed().as_secs_f64();
        let busy: f64 = workers
            .iter()
            .zip(&busy_before)
            .map(|(w, before)| (w.busy_time() - *before).as_secs_f64() / makespan)
            .sum::<f64>()
            / workers.len().max(1) as f64;
        stop.stop();
        server.await??;

        let scale = self.time_scale;
        let mut latencies: Vec<f64> = answers.iter().map(|a| a.0 / scale).collect();
        latencies.sort_by(f64::total_cmp);
        let ids: Vec<&String> = answers.iter().filter_map(|a| a.1.as_ref()).collect();
        let (lost, duplicated) = journal_check(out, &ids)?;
        Ok(ServeRow {
            clients,
            edits: ids.len(),
            makespan_s: makespan / scale,
            throughput_per_min: ids.len() as f64 / (makespan / scale) * 60.0,
            p50_s: percentile(&latencies, 0.5),
            p95_s: percentile(&latencies, 0.95),
            busy_fraction: busy,
            errors: answers.len() - ids.len(),
            lost,
            duplicated,
        })
    }
}

/// From the journal: answered or accepted edits that did not end exactly once as done
/// (lost), and edits that ended more than once or were answered twice (duplicated).
fn journal_check(out: &Path, answered: &[&String]) -> std::io::Result<(usize, usize)> {
    let (_, accepted) = Journal::open(out)?;
    let records: Vec<Record> = crate::fsio::jsonl::read(&out.join("journal.jsonl"))?;
    let mut ended: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        if let Record::Ended { id, ending, .. } = r {
            if *ending == super::journal::Ending::Done {
                *ended.entry(id.as_str()).or_default() += 1;
            }
        }
    }
    let lost = accepted
        .iter()
        .filter(|a| ended.get(a.id.as_str()).copied().unwrap_or(0) == 0)
        .count()
        + answered.len().saturating_sub(accepted.len());
    let mut seen = std::collections::HashSet::new();
    let duplicated = ended.values().filter(|&&n| n > 1).count()
        + answered
            .iter()
            .filter(|id| !seen.insert(id.as_str()))
            .count();
    Ok((lost, duplicated))
}

/// Where `bench serve` writes serve.json and serve.md.
pub fn outputs(out: &Path) -> (PathBuf, PathBuf) {
    (out.join("serve.json"), out.join("serve.md"))
}
