//! The benchmarks: `bench pipeline`, `bench memory`, `bench flux`, `bench judge`. Each
//! writes `NAME.json` and `NAME.md` under its `--out` and prints the table.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::batch::bench::{peak_rss_kib, run_pipeline_bench, write_manifest, PipelineBench};
use crate::batch::{run_batch, BatchOptions, Shard};
use crate::cli::{FluxBenchArgs, JudgeBenchArgs, MemoryBenchArgs, PipelineBenchArgs};
use crate::device::{parse_device, parse_dtype};
use crate::engine::{Engine, GeneratorWorker, StrategyConfig};
use crate::error::EditError;
use crate::fsio::write_atomic;
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use crate::models::flux::bench::{small_configs, CacheBench, FluxBench};
use crate::models::flux::{vae::VaeConfig, FluxConfig};
use crate::models::qwen_vl::bench::{builtin_config, JudgeBench, ReferenceTiming, MODELS};
use crate::models::qwen_vl::Qwen2VlConfig;
use crate::stop::StopSignal;

/// The device and dtype a bench's flags name.
fn device_and_dtype(
    device: &str,
    dtype: Option<&str>,
) -> Result<(candle_core::Device, candle_core::DType), EditError> {
    let dev = parse_device(device).map_err(|e| EditError::Invalid(format!("--device {e}")))?;
    let dt = parse_dtype(dtype, &dev).map_err(|e| EditError::Invalid(format!("--dtype {e}")))?;
    if dt == candle_core::DType::BF16 && dev.is_cpu() {
        // Refused before anything is timed: the run failed at its first matmul after
        // minutes of building weights, and wrote nothing.
        return Err(EditError::Invalid(
            "--dtype bf16: candle's CPU matmul has no bf16; use f32 (the CPU default) or f16, \
             or bf16 on a GPU"
                .into(),
        ));
    }
    Ok((dev, dt))
}

/// `bench pipeline`: generator busy fraction and makespan vs queue depth and judge latency.
pub async fn pipeline(args: PipelineBenchArgs) -> anyhow::Result<()> {
    let bench = PipelineBench {
        edits: args.edits,
        queues: args.queues,
        latencies: args.latencies,
        step_s: args.step_s,
        decode_s: args.decode_s,
        time_scale: args.time_scale,
        strategy: args.strategy.to_config()?,
        width: args.width,
    };
    let rows = run_pipeline_bench(&bench, &args.out).await?;
    let md = bench.markdown(&rows);
    write_atomic(&args.out.join("pipeline.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// `bench flux`: transformer step and VAE timings with random weights.
pub fn flux(args: FluxBenchArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.device, args.dtype.as_deref())?;
    let (transformer, vae) = match args.size.as_str() {
        "full" => (FluxConfig::fill_dev(), VaeConfig::flux()),
        "small" => small_configs(),
        other => {
            return Err(
                EditError::Invalid(format!("--size {other}: expected full or small")).into(),
            )
        }
    };
    if !args.width.is_multiple_of(16) || !args.height.is_multiple_of(16) {
        return Err(EditError::Invalid("--width/--height must be multiples of 16".into()).into());
    }
    let bench = FluxBench {
        transformer,
        vae,
        panel: (args.width, args.height),
        batches: args.batch.clone(),
        t5_tokens: args.t5_tokens,
        steps: args.steps,
        warmup: args.warmup,
        tiny: !args.no_tiny,
        iters: args.iters,
        dtype,
        device,
        formats: if args.vae_only {
            Vec::new()
        } else {
            args.formats.clone()
        },
        cache: args.cache.as_ref().map(|caches| CacheBench {
            caches: caches.0.clone(),
            keep: args.keep,
            probe_steps: args.probe_steps,
        }),
        graph: args.graph,
    };
    if args.cache.is_some() && args.probe_steps >= args.steps {
        return Err(EditError::Invalid(format!(
            "--probe-steps {} must be below --steps {} (the completion is the rest)",
            args.probe_steps, args.steps
        ))
        .into());
    }
    let result = crate::models::flux::bench::run(&bench)?;
    let mut md = result.markdown(&bench, &args.size, &args.device);
    md.push_str(&crate::plan::measured::markdown(&bench, &result));
    write_bench(&args.out, "flux", &result, &md)
}

/// `bench judge`: batched vs sequential prefill of the local judge, random weights.
pub fn judge(args: JudgeBenchArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.device, args.dtype.as_deref())?;
    let config = match builtin_config(&args.model) {
        Some(c) => c,
        None if args.model.ends_with(".json") => {
            let path = Path::new(&args.model);
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--model {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--model {}: invalid JSON", path.display()))?;
            Qwen2VlConfig::from_json(&value)
                .map_err(|e| EditError::Invalid(format!("--model {}: {e}", path.display())))?
        }
        None => {
            return Err(EditError::Invalid(format!(
                "--model {}: expected one of {} or a config.json",
                args.model,
                MODELS.join(", ")
            ))
            .into())
        }
    };
    if args.batch.is_empty() || args.batch.contains(&0) {
        return Err(
            EditError::Invalid("--batch: give positive batch sizes, e.g. 1,4,8".into()).into(),
        );
    }
    let bench = JudgeBench {
        config,
        image_side: args.image_side,
        text_tokens: args.text_tokens,
        batches: args.batch.clone(),
        iters: args.iters,
        dtype,
        device,
        versus: args.versus.clone(),
        rounds: args.rounds,
    };
    let reference = args
        .reference
        .as_deref()
        .map(|path| ReferenceTiming::read(path, &bench))
        .transpose()
        .map_err(|e| EditError::Invalid(format!("--reference {e}")))?;
    let result = crate::models::qwen_vl::bench::run(&bench, reference)?;
    let md = result.markdown(&bench, &args.model, &args.device);
    write_bench(&args.out, "judge", &result, &md)
}

/// `bench memory`: one batch over a long manifest, then the process's peak RSS.
pub async fn memory(args: MemoryBenchArgs) -> anyhow::Result<()> {
    let manifest = write_manifest(&args.out, args.lines, 32)?;
    let generator = TestbedGenerator::new(TestbedConfig::default());
    let judge = TestbedJudge::knowing(TestbedJudgeConfig::default(), generator.edits());
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(generator))),
        Arc::new(judge),
        8,
    );
    let out = args.out.join(format!("run-{}", args.lines));
    let _ = std::fs::remove_dir_all(&out);
    let opts = BatchOptions {
        manifest,
        root: None,
        out,
        shard: Shard {
            index: 0,
            count: (args.lines / args.items.max(1)).max(1),
        },
        strategy: StrategyConfig {
            seeds: 4,
            probe_steps: 2,
            keep: 1,
            steps: 6,
            ..Default::default()
        },
        queue: 4,
        width: 32,
        progress: false,
        budget_nfe_mean: None,
    };
    let started = std::time::Instant::now();
    let outcome = run_batch(&engine, &opts, &StopSignal::default()).await?;
    println!(
        "{} manifest lines, {} edited, {} for other shards, {:.1}s; peak RSS {} MiB",
        args.lines,
        outcome.done + outcome.failed,
        outcome.other_shards,
        started.elapsed().as_secs_f64(),
        peak_rss_kib().map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    Ok(())
}

/// Writes a benchmark's `NAME.json` and `NAME.md` into `out` and prints the table.
fn write_bench(
    out: &Path,
    name: &str,
    result: &impl serde::Serialize,
    md: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    write_atomic(
        &out.join(format!("{name}.json")),
        &serde_json::to_vec_pretty(result)?,
    )?;
    write_atomic(&out.join(format!("{name}.md")), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// `bench serve`: the server under C concurrent clients.
pub async fn serve(args: crate::cli::ServeBenchArgs) -> anyhow::Result<()> {
    let bench = crate::serve::bench::ServeBench {
        clients: args.clients,
        edits: args.edits,
        workers: args.workers,
        in_flight: args.in_flight,
        step_s: args.step_s,
        decode_s: args.decode_s,
        judge_latency_s: args.judge_latency_s,
        time_scale: args.time_scale,
        strategy: args.strategy.to_config()?,
        width: args.width,
    };
    let rows = bench.run(&args.out).await?;
    let md = bench.markdown(&rows);
    let (json, md_path) = crate::serve::bench::outputs(&args.out);
    write_atomic(
        &json,
        &serde_json::to_vec_pretty(&serde_json::json!({"bench": bench, "rows": rows}))?,
    )?;
    write_atomic(&md_path, md.as_bytes())?;
    println!("{md}");
    if rows.iter().any(|r| r.lost > 0 || r.duplicated > 0) {
        anyhow::bail!("edits were lost or duplicated (see the table)");
    }
    Ok(())
}
