//! `serve`: builds one engine per device behind one judge and runs the HTTP server until
//! Ctrl-C or SIGTERM.

use std::sync::Arc;

use crate::backends::{EngineBuilder, GeneratorSpec, JudgeSpec, Workload};
use crate::cli::ServeArgs;
use crate::error::EditError;
use crate::judge::Judge;
use crate::serve::{self, Limits, MeteredJudge, Metrics, ServeOptions};
use crate::stop::StopSignal;

/// `serve`: stops taking edits on the first Ctrl-C / SIGTERM, finishes those running and
/// exits; queued edits stay journaled for the next start.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let stop = StopSignal::default();
    stop.stop_on_signals("shutting down: finishing the edits running; queued ones stay journaled")?;
    serve_until(args, stop).await
}

/// `serve` until `stop` is set.
pub async fn serve_until(args: ServeArgs, stop: StopSignal) -> anyhow::Result<()> {
    let defaults = args.strategy.to_config()?;
    let judge = JudgeSpec::from_args(&args.engine.judge)?;
    judge.check_serves(&defaults)?;
    let generator = GeneratorSpec::from_args(&args.engine.generator, args.engine.download)?;
    let token = match std::env::var(&args.token_env) {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
        _ => None,
    };
    crate::fsio::prepare_output_dir(&args.out, "--out")
        .map_err(|e| EditError::Invalid(e.to_string()))?;
    let _lock = super::claim_output(&args.out, "--out")?;
    let devices = args
        .devices
        .clone()
        .unwrap_or_else(|| vec![args.engine.generator.device.clone()]);
    if devices.is_empty() || devices.iter().any(|d| d.trim().is_empty()) {
        return Err(
            EditError::Invalid("--devices: name at least one device, none empty".into()).into(),
        );
    }
    let workload = Workload {
        panel: (
            crate::edit::DEFAULT_PANEL_WIDTH as usize,
            crate::edit::DEFAULT_PANEL_WIDTH as usize,
        ),
        many_edits: true,
        // The server's default strategy; a request that asks for a cache of its own is not
        // planned.
        step_caches: Workload::step_caches_of([&defaults]),
    };
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    let builder = EngineBuilder {
        devices: Some(devices),
        ..EngineBuilder::new(generator, judge, args.engine.download, workload)
            .allowing_unused_weights(args.engine.allow_unused_weights)
    };
    let engines = builder
        .build_wrapped(move |j| Arc::new(MeteredJudge::new(j, m.clone())) as Arc<dyn Judge>)?
        .engines;
    if token.is_some() {
        tracing::info!(
            "clients must send the bearer token from ${}",
            args.token_env
        );
    }
    let opts = ServeOptions {
        addr: args.addr,
        out: args.out.clone(),
        max_queue: args.max_queue,
        in_flight: args.in_flight,
        limits: Limits {
            max_upload_bytes: args.max_upload_mb << 20,
            max_pixels: args.max_megapixels as u64 * 1_000_000,
            max_seeds: args.max_seeds,
            max_steps: args.max_steps,
        },
        token,
        defaults,
    };
    serve::run(engines, metrics, opts, stop).await
}
