//! What each subcommand does, on top of the library. `main` only parses and maps errors.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::backends::{build_generator, build_judge};
use crate::batch::{merge_shards, run_batch, BatchOptions, Shard, StopFlag};
use crate::cli::{
    BatchArgs, BenchCommand, Cli, Command, DemoArgs, EditArgs, EvalArgs, FluxBenchArgs,
    JudgeBenchArgs, MemoryBenchArgs, MergeArgs, PipelineBenchArgs, StudyArgs,
};
use crate::edit::{load_image, resize_to_panel, EditContext, ImageLimits};
use crate::engine::outputs::write_outputs;
use crate::engine::{EditJob, EditReport, Engine, GeneratorWorker, PhaseBars};
use crate::error::{EditError, EngineError, GenerateError, JudgeError};
use crate::generate::testbed::{self, TestbedConfig, TestbedGenerator};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};

/// Process exit code for bad input (unreadable image, bad option, missing weights, bad
/// preset). Runtime failures exit with 1; clap's usage errors also use 2.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Process exit code for failures while running.
pub const EXIT_RUNTIME: i32 = 1;

/// Maps an error to the exit code that tells bad input from runtime failure.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<EditError>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return match e {
                EngineError::Edit(_) | EngineError::Strategy(_) => EXIT_BAD_INPUT,
                EngineError::Generate(GenerateError::Weights { .. }) => EXIT_BAD_INPUT,
                _ => EXIT_RUNTIME,
            };
        }
        if let Some(GenerateError::Weights { .. }) = cause.downcast_ref::<GenerateError>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(JudgeError::Config(_)) = cause.downcast_ref::<JudgeError>() {
            return EXIT_BAD_INPUT;
        }
    }
    EXIT_RUNTIME
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Edit(args)) => edit(*args).await,
        Some(Command::Demo(args)) => demo(args).await,
        Some(Command::Batch(args)) => batch(*args).await,
        Some(Command::Merge(args)) => merge(args),
        Some(Command::Study(args)) => study(args).await,
        Some(Command::Eval(args)) => eval(args).await,
        Some(Command::Bench(BenchCommand::Pipeline(args))) => bench_pipeline(args).await,
        Some(Command::Bench(BenchCommand::Memory(args))) => bench_memory(args).await,
        Some(Command::Bench(BenchCommand::Flux(args))) => bench_flux(args),
        Some(Command::Bench(BenchCommand::Judge(args))) => bench_judge(args),
        None => edit(cli.edit).await,
    }
}

/// `demo`: a generated testbed scene through the chosen strategy, with the same outputs as
/// a real edit and a summary that says whether the pick is the correct outcome.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config();
    strategy.validate()?;
    if args.width == 0 || !args.width.is_multiple_of(16) {
        return Err(
            EditError::Invalid(format!("--width {} must be a multiple of 16", args.width)).into(),
        );
    }
    let edit = testbed::make_edit(args.scene_seed, args.width);
    println!(
        "testbed scene {}: \"{}\" (a simulator, not an image editor)",
        args.scene_seed, edit.instruction
    );
    let outcomes = testbed::outcome_set(&edit, args.difficulty).map_err(EditError::Invalid)?;
    let source = edit.source.clone();
    let generator = TestbedGenerator::new(TestbedConfig {
        difficulty: args.difficulty,
        ..TestbedConfig::default()
    });
    let judge = TestbedJudge::new(TestbedJudgeConfig {
        seed: args.judge_seed,
        ..TestbedJudgeConfig::default()
    });
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(generator))),
        Arc::new(judge),
        8,
    );
    let job = EditJob {
        edit,
        strategy,
        init_latents: Vec::new(),
    };
    let report = run_and_write(&engine, job, &args.out).await?;
    source.save(args.out.join("source.png"))?;
    print_summary(&report, &args.out);
    let label = |c: &crate::engine::report::CandidateRecord| {
        c.images
            .final_image
            .as_ref()
            .map(|i| testbed::classify(&outcomes, i))
    };
    let finished: Vec<String> = report
        .candidates
        .iter()
        .filter_map(|c| label(c).map(|l| format!("#{} {l:?}", c.index)))
        .collect();
    println!("finished candidates: {}", finished.join(", "));
    match report.picked().and_then(label) {
        Some(l) => println!(
            "the pick is {}: {l:?}",
            if l == testbed::OutcomeLabel::Correct {
                "CORRECT"
            } else {
                "WRONG"
            }
        ),
        None => println!("no finished pick"),
    }
    Ok(())
}

/// `batch`: runs (or resumes) a manifest; Ctrl-C stops after in-flight items are saved.
pub async fn batch(args: BatchArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config();
    strategy.validate()?;
    let shard = Shard::parse(&args.shard, |k| std::env::var(k).ok()).map_err(EditError::Invalid)?;
    if !args.manifest.is_file() {
        return Err(EditError::Invalid(format!(
            "--manifest {}: no such file",
            args.manifest.display()
        ))
        .into());
    }
    let judge = build_judge(&args.judge)?;
    let generator = build_generator(&args.generator)?;
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(generator)),
        judge.judge,
        judge.concurrency,
    );
    let stop = StopFlag::default();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping: finishing the edits in flight (Ctrl-C again to abort)");
                stop.stop();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let opts = BatchOptions {
        manifest: args.manifest,
        root: args.root,
        out: args.out.clone(),
        shard,
        strategy,
        queue: args.queue,
        width: args.width,
        progress: true,
    };
    let started = std::time::Instant::now();
    let outcome = run_batch(&engine, &opts, &stop).await?;
    let worker = engine.worker();
    println!(
        "shard {}: {} done, {} failed, {} invalid, {} already done, {} for other shards{}",
        opts.shard,
        outcome.done,
        outcome.failed,
        outcome.invalid,
        outcome.already_done,
        outcome.other_shards,
        if outcome.cancelled {
            " (stopped early)"
        } else {
            ""
        }
    );
    println!(
        "generator busy {:.1}s of {:.1}s ({:.0}%)",
        worker.busy_time().as_secs_f64(),
        started.elapsed().as_secs_f64(),
        100.0 * worker.busy_time().as_secs_f64() / started.elapsed().as_secs_f64().max(1e-9)
    );
    println!("{}", std::fs::read_to_string(args.out.join("summary.md"))?);
    Ok(())
}

/// `study`: the testbed measurement quoted in the README.
pub async fn study(args: StudyArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config();
    strategy.validate()?;
    let config = crate::study::StudyConfig {
        edits: args.edits,
        first_scene: args.first_scene,
        width: args.width,
        strategy,
        difficulty: args.difficulty,
        judge: TestbedJudgeConfig {
            seed: args.judge_seed,
            ..TestbedJudgeConfig::default()
        },
    };
    let bar = indicatif::ProgressBar::new(args.edits as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("study {bar:30} {pos}/{len} edits, ETA {eta}")
            .expect("static template"),
    );
    let report = crate::study::run_study(&config, |n| bar.set_position(n as u64)).await?;
    bar.finish_and_clear();
    let md = report.markdown();
    crate::engine::outputs::write_atomic(&args.out.join("study.md"), md.as_bytes())?;
    crate::engine::outputs::write_atomic(
        &args.out.join("study.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    println!("{md}");
    Ok(())
}

/// `eval`: runs the pending (item, arm) pairs of a suite, then writes the report.
pub async fn eval(args: EvalArgs) -> anyhow::Result<()> {
    use crate::eval::{dataset, report, runner, store::ResultStore, suite::Suite};
    let suite = Suite::load(&args.suite)?;
    let items = dataset::load(&suite.dataset, &suite.selection)?;
    let mut store = ResultStore::open(&args.out)
        .with_context(|| format!("opening {}", args.out.join("results.jsonl").display()))?;
    let names = runner::arm_names(&suite);
    if !args.report_only {
        let judge_args = |spec: &crate::eval::suite::JudgeSpec| crate::cli::JudgeArgs {
            judge: spec.judge.clone(),
            judge_concurrency: Some(args.judge_concurrency),
            judge_seed: spec.seed,
        };
        let selection = build_judge(&judge_args(&suite.selection_judge))?;
        let eval_judge = if suite.same_judge() {
            None
        } else {
            Some(build_judge(&judge_args(suite.eval_judge()))?.judge)
        };
        let generator = build_generator(&args.generator)?;
        let engine = Engine::new(
            Arc::new(GeneratorWorker::spawn(generator)),
            selection.judge,
            selection.concurrency,
        );
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("stopping after the item in progress (results so far are saved)");
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        let total = (items.len() * names.len()) as u64;
        let done = items
            .iter()
            .map(|i| names.iter().filter(|n| store.is_done(&i.id, n)).count() as u64)
            .sum::<u64>();
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "eval {bar:30} {pos}/{len} (item, arm) results, {per_sec}, ETA {eta}",
            )
            .expect("static template"),
        );
        bar.set_position(done);
        bar.reset_eta();
        let ctx = runner::EvalContext {
            engine,
            eval_judge,
            stop,
            testbed_difficulty: args.generator.testbed_difficulty,
        };
        runner::run_suite(&suite, &items, &ctx, &mut store, |n| bar.inc(n as u64)).await?;
        bar.finish_and_clear();
    }
    let report = report::build(&suite, store.results(), &names);
    report.write(&args.out)?;
    println!("{}", report.markdown());
    Ok(())
}

/// `bench pipeline`: prints a table of busy fraction and makespan.
pub async fn bench_pipeline(args: PipelineBenchArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config();
    strategy.validate()?;
    let bench = crate::batch::bench::PipelineBench {
        edits: args.edits,
        queues: args.queues,
        latencies: args.latencies,
        step_s: args.step_s,
        decode_s: args.decode_s,
        time_scale: args.time_scale,
        strategy,
        width: args.width,
    };
    let rows = crate::batch::bench::run_pipeline_bench(&bench, &args.out).await?;
    let mut md = format!(
        "{} edits per row, {} (NFE {}), {} s per candidate-step, {} s per decode; times unscaled (run at x{}).\n\n",
        bench.edits,
        bench.strategy.kind.name(),
        bench.strategy.planned_nfe(),
        bench.step_s,
        bench.decode_s,
        bench.time_scale
    );
    md.push_str("| queued edits | judge latency (s) | makespan (s) | generator work = lower bound (s) | makespan / bound | generator busy |\n|---|---|---|---|---|---|\n");
    for r in &rows {
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
    crate::engine::outputs::write_atomic(&args.out.join("pipeline.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// `bench flux`: transformer step and VAE timings with random weights.
pub fn bench_flux(args: FluxBenchArgs) -> anyhow::Result<()> {
    use crate::generate::flux::bench::{run, small_configs, FluxBench};
    use crate::generate::flux::{vae::VaeConfig, FluxConfig};
    let device = crate::backends::parse_device(&args.device)?;
    let dtype = crate::backends::parse_dtype(args.dtype.as_deref(), &device)?;
    let (transformer, vae) = match args.size.as_str() {
        "full" => (FluxConfig::fill_dev(), VaeConfig::flux()),
        "small" => small_configs(),
        other => anyhow::bail!("--size {other}: expected full or small"),
    };
    if !args.width.is_multiple_of(16) || !args.height.is_multiple_of(16) {
        anyhow::bail!("--width/--height must be multiples of 16");
    }
    let bench = FluxBench {
        transformer,
        vae,
        panel: (args.width, args.height),
        batches: args.batch.clone(),
        t5_tokens: args.t5_tokens,
        steps: args.steps,
        iters: args.iters,
        dtype,
        device,
    };
    let result = run(&bench)?;
    let mut md = format!(
        "FLUX.1 Fill `{}` ({:.2}B parameters), {:?} on {}, diptych {}x{} ({} image + {} text tokens); random weights built in {:.1} s\n\n| batch | step (s) | per candidate (s) |\n|---|---|---|\n",
        args.size,
        result.parameters as f64 / 1e9,
        dtype,
        args.device,
        2 * args.width,
        args.height,
        result.image_tokens,
        args.t5_tokens,
        result.load_s
    );
    for s in &result.steps {
        md.push_str(&format!(
            "| {} | {:.4} | {:.4} |\n",
            s.batch, s.step_s, s.per_candidate_s
        ));
    }
    md.push_str(&format!(
        "\nVAE encode {:.4} s, decode {:.4} s; one {}-step edit of one candidate {:.2} s (text encoding excluded).\n",
        result.vae_encode_s, result.vae_decode_s, args.steps, result.full_edit_s
    ));
    write_bench(&args.out, "flux", &result, &md)
}

/// Writes a benchmark's `NAME.json` and `NAME.md` into `out` and prints the table.
fn write_bench(
    out: &Path,
    name: &str,
    result: &impl serde::Serialize,
    md: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    crate::engine::outputs::write_atomic(
        &out.join(format!("{name}.json")),
        &serde_json::to_vec_pretty(result)?,
    )?;
    crate::engine::outputs::write_atomic(&out.join(format!("{name}.md")), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// `bench judge`: batched vs sequential prefill of the local judge, random weights.
pub fn bench_judge(args: JudgeBenchArgs) -> anyhow::Result<()> {
    use crate::judge::qwen2vl::bench::{builtin_config, run, JudgeBench, MODELS};
    let device = crate::backends::parse_device(&args.device)?;
    let dtype = crate::backends::parse_dtype(args.dtype.as_deref(), &device)?;
    let config = match builtin_config(&args.model) {
        Some(c) => c,
        None if args.model.ends_with(".json") => {
            let path = std::path::Path::new(&args.model);
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--model {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--model {}: invalid JSON", path.display()))?;
            crate::judge::qwen2vl::Qwen2VlConfig::from_json(&value)
                .map_err(|e| anyhow::anyhow!("--model {}: {e}", path.display()))?
        }
        None => anyhow::bail!(
            "--model {}: expected one of {} or a config.json",
            args.model,
            MODELS.join(", ")
        ),
    };
    if args.batch.is_empty() || args.batch.contains(&0) {
        anyhow::bail!("--batch: give positive batch sizes, e.g. 1,4,8");
    }
    let bench = JudgeBench {
        config,
        image_side: args.image_side,
        text_tokens: args.text_tokens,
        batches: args.batch.clone(),
        iters: args.iters,
        dtype,
        device,
    };
    let result = run(&bench)?;
    let mut md = format!(
        "Local judge `{}` ({:.2}B parameters), {:?} on {}; screening prompts of {} tokens (two {}px images); random weights built in {:.1} s\n\n| prompts | one at a time (s) | one batched prefill (s) | speed-up |\n|---|---|---|---|\n",
        args.model,
        result.parameters as f64 / 1e9,
        dtype,
        args.device,
        result.prompt_tokens,
        args.image_side,
        result.load_s
    );
    for b in &result.batches {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.2}x |\n",
            b.batch, b.sequential_s, b.batched_s, b.speedup
        ));
    }
    md.push_str(&format!(
        "\nOne answer token after the prefill (KV cache): {:.4} s.\n",
        result.step_s
    ));
    write_bench(&args.out, "judge", &result, &md)
}

/// `bench memory`: one batch over a long manifest, then the process's peak RSS.
pub async fn bench_memory(args: MemoryBenchArgs) -> anyhow::Result<()> {
    let manifest = crate::batch::bench::write_manifest(&args.out, args.lines, 32)?;
    let generator = TestbedGenerator::new(TestbedConfig::default());
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(generator))),
        Arc::new(TestbedJudge::new(TestbedJudgeConfig::default())),
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
        strategy: crate::engine::StrategyConfig {
            seeds: 4,
            probe_steps: 2,
            keep: 1,
            steps: 6,
            ..Default::default()
        },
        queue: 4,
        width: 32,
        progress: false,
    };
    let started = std::time::Instant::now();
    let outcome = run_batch(&engine, &opts, &StopFlag::default()).await?;
    println!(
        "{} manifest lines, {} edited, {} for other shards, {:.1}s; peak RSS {} MiB",
        args.lines,
        outcome.done + outcome.failed,
        outcome.other_shards,
        started.elapsed().as_secs_f64(),
        crate::batch::bench::peak_rss_kib()
            .map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    Ok(())
}

/// `merge`: combines shard summaries.
pub fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let results = merge_shards(&args.shards, &args.out)?;
    println!("{}", crate::batch::store::table(&results));
    println!(
        "merged summary in {}",
        args.out.join("summary.jsonl").display()
    );
    Ok(())
}

/// `edit`: load, resize, run the strategy, write outputs, print where they are.
pub async fn edit(args: EditArgs) -> anyhow::Result<()> {
    let image_path = args.image.as_deref().ok_or_else(|| {
        EditError::Invalid("--image is required (the source image to edit)".into())
    })?;
    let instruction = args
        .instruction
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            EditError::Invalid("--instruction is required and must not be empty".into())
        })?;
    let strategy = args.strategy.to_config();
    strategy.validate()?;
    let source = load_image(image_path, ImageLimits::default())?;
    let panel = resize_to_panel(&source, args.width)
        .map_err(|e| EditError::Invalid(format!("{}: {e}", image_path.display())))?;
    let id = image_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "edit".into());
    let edit = EditContext::new(id, panel, instruction);
    let judge = build_judge(&args.judge)?;
    let generator = build_generator(&args.generator)?;
    let init_latents = match &args.generator.init_latents {
        Some(path) => load_init_latents(path)?,
        None => Vec::new(),
    };
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(generator)),
        judge.judge,
        judge.concurrency,
    );
    let job = EditJob {
        edit,
        strategy,
        init_latents,
    };
    let report = run_and_write(&engine, job, &args.out).await?;
    print_summary(&report, &args.out);
    Ok(())
}

/// Runs one job with progress bars and writes its outputs.
pub async fn run_and_write(
    engine: &Engine,
    job: EditJob,
    out: &Path,
) -> anyhow::Result<EditReport> {
    let mut report = engine.run(job, Arc::new(PhaseBars::default())).await?;
    write_outputs(&mut report, out)?;
    Ok(report)
}

/// Reads `latents` from a safetensors file: `[C, ..latent_shape]` (packed) or `[C, 16, h, w]`
/// (unpacked, as diffusers makes them), one row per candidate.
fn load_init_latents(path: &Path) -> anyhow::Result<Vec<candle_core::Tensor>> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| EditError::Invalid(format!("--init-latents {}: {e}", path.display())))?;
    let latents = tensors.get("latents").ok_or_else(|| {
        EditError::Invalid(format!(
            "--init-latents {}: no tensor named `latents`",
            path.display()
        ))
    })?;
    // Unpacked diffusers-style latents [C, 16, h, w] are packed into 2x2 tokens [C, S, 64].
    let latents = if latents.rank() == 4 {
        crate::generate::flux::latents::pack(latents)?
    } else {
        latents.clone()
    };
    let rows = latents.dim(0).context("latents tensor is a scalar")?;
    (0..rows)
        .map(|i| Ok(latents.get(i)?))
        .collect::<anyhow::Result<Vec<_>>>()
}

/// The short human summary printed after an edit.
pub fn print_summary(report: &EditReport, out: &Path) {
    let pruned = report
        .candidates
        .iter()
        .filter(|c| c.status == crate::engine::report::CandidateStatus::Pruned)
        .count();
    println!(
        "{}: {} candidates, {} pruned; NFE {} (best-of-N {}, random {})",
        report.strategy.kind.name(),
        report.candidates.len(),
        pruned,
        report.nfe.total,
        report.nfe.best_of_n_equivalent,
        report.nfe.random_equivalent
    );
    match &report.pick {
        Some(p) => println!(
            "pick: candidate {} (seed {}), VIE O {}; {}",
            p.index,
            p.seed,
            p.overall.map_or("n/a".into(), |o| format!("{o:.2}")),
            p.reason
        ),
        None => println!("no pick: nothing finished"),
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    println!(
        "judge: {} calls, {} failed, {} cached, {} + {} tokens; {:.1}s total",
        report.judge_totals.calls,
        report.judge_totals.failures,
        report.judge_totals.cached,
        report.judge_totals.prompt_tokens,
        report.judge_totals.completion_tokens,
        report.timings.total_s
    );
    println!("outputs in {}", out.display());
}
