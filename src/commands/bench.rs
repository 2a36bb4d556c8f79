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
    if std::env::var_os(PROFILE_FORWARD_ENV).is_some_and(|v| v == "1") {
        return profile_forward(&bench, &args.out);
    }
    let result = crate::models::flux::bench::run(&bench)?;
    let mut md = result.markdown(&bench, &args.size, &args.device);
    md.push_str(&crate::plan::measured::markdown(&bench, &result));
    write_bench(&args.out, "flux", &result, &md)
}

/// `ICEDIT_PROFILE_FORWARD=1 bench flux ...`: the acceptance run's profile of one forward
/// (scripts/gpu-acceptance.sh, PROFILE=1). Instead of the whole bench, it runs the fused
/// kernels' check (which picks the flash attention variant and turns failing kernels off, as
/// a timed run does), builds the first format's transformer with random weights, runs
/// `--warmup` forwards at the first `--batch`, and brackets exactly one more forward with
/// `cuProfilerStart` / `cuProfilerStop`. Under `ncu --profile-from-start off` (or `nsys
/// --capture-range=cudaProfilerApi`) only that forward's launches are profiled, not the 12B
/// random init, the check or the VAE. Writes `profile-forward.json` under `--out`. Off CUDA
/// (no libcuda) the forward runs unprofiled and the file says so.
const PROFILE_FORWARD_ENV: &str = "ICEDIT_PROFILE_FORWARD";

/// Rows of each random weight quantized in a bench (the value `bench flux` uses).
const PROFILE_SAMPLE_ROWS: usize = 64;

/// What [`profile_forward`] did, for the acceptance report.
#[derive(serde::Serialize)]
struct ProfiledForward {
    format: String,
    batch: usize,
    warmup: usize,
    /// Wall time of the bracketed forward (synchronised), seconds; slower under a profiler.
    forward_s: f64,
    /// `cuProfilerStart` / `cuProfilerStop` results ("0" = CUDA_SUCCESS) or why they were
    /// not called.
    profiler: String,
    /// The fused kernels in use (after the check).
    fused_enabled: Vec<String>,
    fused_disabled: Vec<String>,
    flash_warps: Option<usize>,
}

/// `cuProfilerStart` / `cuProfilerStop` from the driver library, looked up at run time so
/// the CPU build (no `cuda` feature) compiles and runs this path too.
struct CudaProfilerApi {
    start: unsafe extern "C" fn() -> i32,
    stop: unsafe extern "C" fn() -> i32,
}

impl CudaProfilerApi {
    fn load() -> Result<Self, String> {
        // SAFETY: dlopen / dlsym with NUL-terminated names; the symbols are the CUDA driver
        // API's `CUresult cuProfilerStart(void)` / `cuProfilerStop(void)`, and the handle is
        // never closed, so the pointers stay valid for the process.
        unsafe {
            let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW);
            if handle.is_null() {
                return Err("libcuda.so.1 not loadable: no profiler range".into());
            }
            let start = libc::dlsym(handle, c"cuProfilerStart".as_ptr());
            let stop = libc::dlsym(handle, c"cuProfilerStop".as_ptr());
            if start.is_null() || stop.is_null() {
                return Err("libcuda.so.1 lacks cuProfilerStart / cuProfilerStop".into());
            }
            Ok(Self {
                start: std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn() -> i32>(
                    start,
                ),
                stop: std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn() -> i32>(stop),
            })
        }
    }
}

/// See [`PROFILE_FORWARD_ENV`].
fn profile_forward(bench: &FluxBench, out: &Path) -> anyhow::Result<()> {
    use crate::models::bench::RandomWeights;
    use crate::models::flux::embeddings::rope_tables;
    use crate::models::flux::held_weight::WeightFormat;
    use crate::models::flux::latents::joint_ids;
    use crate::models::flux::linear::Linears;
    use crate::models::flux::transformer::{FluxTransformer, StepInputs, TextConditioning};
    use candle_core::Tensor;

    let (dev, dtype, c) = (&bench.device, bench.dtype, &bench.transformer);
    crate::models::cuda::switch::from_env().map_err(anyhow::Error::msg)?;
    let check = crate::models::flux::bench::fused_check(bench)?;
    let format = *bench
        .formats
        .first()
        .context("ICEDIT_PROFILE_FORWARD: give one --formats")?;
    let batch = *bench
        .batches
        .first()
        .context("ICEDIT_PROFILE_FORWARD: give one --batch")?;
    let (quantize, fp8) = match format {
        WeightFormat::Dense => (None, false),
        WeightFormat::Quantized(t) => (Some(t), false),
        WeightFormat::Fp8 => (None, true),
    };
    let vb =
        candle_nn::VarBuilder::from_backend(Box::new(RandomWeights::default()), dtype, dev.clone());
    let linears = Linears {
        quantize,
        fp8,
        sample_rows: Some(PROFILE_SAMPLE_ROWS),
        ..Linears::default()
    };
    let transformer = FluxTransformer::new(vb, c, &linears)?;
    let f = bench.vae.downscale();
    let (lh, lw) = (bench.panel.1 / f, 2 * bench.panel.0 / f);
    let tokens = (lh / 2) * (lw / 2);
    let rope = rope_tables(
        &joint_ids(bench.t5_tokens, lh / 2, lw / 2),
        &c.axes_dims_rope,
        10000.0,
        dev,
    )?;
    let text = TextConditioning {
        t5: Tensor::randn(0f32, 1.0, (1, bench.t5_tokens, c.joint_attention_dim), dev)?
            .to_dtype(dtype)?,
        pooled: Tensor::randn(0f32, 1.0, (1, c.pooled_projection_dim), dev)?.to_dtype(dtype)?,
    };
    let img = Tensor::randn(0f32, 1.0, (batch, tokens, c.in_channels), dev)?.to_dtype(dtype)?;
    let step = StepInputs {
        img: &img,
        text: &text,
        sigma: 0.5,
        guidance: 50.0,
        rope: &rope,
    };
    for _ in 0..bench.warmup {
        transformer.forward(&step)?;
    }
    dev.synchronize()?;
    let api = CudaProfilerApi::load();
    let started = std::time::Instant::now();
    // SAFETY: see `CudaProfilerApi::load`; both calls take no arguments.
    let start_rc = api.as_ref().ok().map(|a| unsafe { (a.start)() });
    transformer.forward(&step)?;
    dev.synchronize()?;
    let forward_s = started.elapsed().as_secs_f64();
    let stop_rc = api.as_ref().ok().map(|a| unsafe { (a.stop)() });
    let profiler = match (&api, start_rc, stop_rc) {
        (Ok(_), Some(start), Some(stop)) => {
            format!("cuProfilerStart -> {start}, cuProfilerStop -> {stop} (0 = CUDA_SUCCESS)")
        }
        (Err(e), _, _) => e.clone(),
        _ => "not called".into(),
    };
    tracing::info!(forward_s, %profiler, "profiled forward");
    let result = ProfiledForward {
        format: format.name(),
        batch,
        warmup: bench.warmup,
        forward_s,
        profiler,
        fused_enabled: check.enabled.clone(),
        fused_disabled: check.disabled.clone(),
        flash_warps: check.flash_warps,
    };
    let md = format!(
        "One profiled forward ({}, batch {batch}, after {} warm-up forwards): {forward_s:.4} s; {}.\n",
        result.format, bench.warmup, result.profiler
    );
    write_bench(out, "profile-forward", &result, &md)
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
