//! `/metrics` in the Prometheus text format (prometheus-client): queue depth, edits by
//! status, NFE and NFE/s per worker, each generator's busy fraction, judge latency and
//! failures by call, open and refused connections, image decodes in progress. [`MeteredJudge`] times every judge call the engines make.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use image::RgbImage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::edit::EditContext;
use crate::engine::GeneratorWorker;
use crate::judge::{
    Comparison, Judge, JudgeError, PreviewStage, RewardScore, ScoreKind, ScreenVerdict, SubScores,
};

/// Label of an edit's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `accepted`, `done`, `failed`, `cancelled`.
    pub status: String,
}

/// Label of a generator worker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker's name (its device, numbered).
    pub worker: String,
}

/// Label of a judge call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    /// `screen`, `compare`, `semantic`, `perceptual`, `reward`.
    pub call: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn judge_histogram() -> Histogram {
    // 10 ms to ~5 min.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

fn edit_histogram() -> Histogram {
    // 0.1 s to ~1 h.
    Histogram::new(exponential_buckets(0.1, 2.0, 16))
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Edits waiting for a worker.
    pub queue_depth: Gauge,
    /// Edits being run.
    pub running: Gauge,
    /// Edits by what happened to them.
    pub edits: Family<StatusLabel, Counter>,
    /// Transformer forwards per worker.
    pub nfe: Family<WorkerLabel, Counter>,
    nfe_per_second: Family<WorkerLabel, Gauge<f64, AtomicU64>>,
    busy_fraction: Family<WorkerLabel, Gauge<f64, AtomicU64>>,
    /// Seconds from start to end of an edit, per worker.
    pub edit_seconds: HistogramFamily<WorkerLabel>,
    /// Judge call latency by call.
    pub judge_seconds: HistogramFamily<CallLabel>,
    /// Judge calls that failed, by call.
    pub judge_failures: Family<CallLabel, Counter>,
    /// HTTP connections open.
    pub connections: Gauge,
    /// Connections answered 503 because `--max-connections` were open.
    pub refused_connections: Counter,
    /// Uploaded images being decoded (at most `--max-decodes`).
    pub decodes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("icedit");
        let m = Self {
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            edits: Family::default(),
            nfe: Family::default(),
            nfe_per_second: Family::default(),
            busy_fraction: Family::default(),
            edit_seconds: Family::new_with_constructor(edit_histogram),
            judge_seconds: Family::new_with_constructor(judge_histogram),
            judge_failures: Family::default(),
            connections: Gauge::default(),
            refused_connections: Counter::default(),
            decodes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_depth",
            "Edits waiting for a generator worker",
            m.queue_depth.clone(),
        );
        registry.register("edits_running", "Edits being run", m.running.clone());
        registry.register(
            "edits",
            "Edits by status (accepted, done, failed, cancelled)",
            m.edits.clone(),
        );
        registry.register(
            "nfe",
            "Transformer forwards (NFE) run, per worker",
            m.nfe.clone(),
        );
        registry.register(
            "nfe_per_second",
            "NFE per second of the worker's uptime",
            m.nfe_per_second.clone(),
        );
        registry.register(
            "generator_busy_fraction",
            "Share of the worker's uptime its generator thread spent computing",
            m.busy_fraction.clone(),
        );
        registry.register(
            "edit_seconds",
            "Seconds per edit, start to end",
            m.edit_seconds.clone(),
        );
        registry.register(
            "judge_seconds",
            "Judge call latency by call",
            m.judge_seconds.clone(),
        );
        registry.register(
            "judge_failures",
            "Judge calls that failed, by call",
            m.judge_failures.clone(),
        );
        registry.register(
            "connections_open",
            "HTTP connections open",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections answered 503 at --max-connections",
            m.refused_connections.clone(),
        );
        registry.register(
            "image_decodes",
            "Uploaded images being decoded (at most --max-decodes)",
            m.decodes.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition, with the per-worker gauges read from `workers` now.
    pub fn render(&self, workers: &[(String, Arc<GeneratorWorker>)]) -> String {
        for (name, worker) in workers {
            let label = WorkerLabel {
                worker: name.clone(),
            };
            let up = worker.uptime().as_secs_f64().max(1e-9);
            let nfe = self.nfe.get_or_create(&label).get() as f64;
            self.nfe_per_second.get_or_create(&label).set(nfe / up);
            self.busy_fraction
                .get_or_create(&label)
                .set(worker.busy_time().as_secs_f64() / up);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Counts an edit's change of status.
    pub fn count(&self, status: &str) {
        self.edits
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .inc();
    }
}

/// A judge whose calls are timed and whose failures are counted in [`Metrics`].
pub struct MeteredJudge {
    inner: Arc<dyn Judge>,
    metrics: Arc<Metrics>,
}

impl MeteredJudge {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Judge>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn observe<T>(&self, call: &str, started: Instant, result: &Result<T, JudgeError>) {
        let label = CallLabel {
            call: call.to_string(),
        };
        self.metrics
            .judge_seconds
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.judge_failures.get_or_create(&label).inc();
        }
    }
}

#[async_trait]
impl Judge for MeteredJudge {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn score_kind(&self) -> ScoreKind {
        self.inner.score_kind()
    }

    fn screen_score_kind(&self) -> ScoreKind {
        self.inner.screen_score_kind()
    }

    fn screen_quantile(&self) -> Option<f32> {
        self.inner.screen_quantile()
    }

    async fn reward(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<RewardScore, JudgeError> {
        let t = Instant::now();
        let r = self.inner.reward(edit, edited).await;
        self.observe("reward", t, &r);
        r
    }

    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        let t = Instant::now();
        let r = self.inner.screen(edit, preview, stage).await;
        self.observe("screen", t, &r);
        r
    }

    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        let t = Instant::now();
        let r = self.inner.compare(edit, first, second).await;
        self.observe("compare", t, &r);
        r
    }

    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        let t = Instant::now();
        let r = self.inner.semantic_consistency(edit, edited).await;
        self.observe("semantic", t, &r);
        r
    }

    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        let t = Instant::now();
        let r = self.inner.perceptual_quality(edit, edited).await;
        self.observe("perceptual", t, &r);
        r
    }
}
