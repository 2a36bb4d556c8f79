//! `batch` (a manifest of edits, resumable and shardable) and `merge` (shard outputs).

use crate::backends::{EngineBuilder, JudgeSpec, Workload};
use crate::batch::{merge_shards, run_batch, BatchOptions, Shard};
use crate::cli::{BatchArgs, MergeArgs};
use crate::commands::Incomplete;
use crate::error::EditError;
use crate::stop::StopSignal;

/// `batch`: runs (or resumes) a manifest; Ctrl-C or SIGTERM stops it after the items in
/// flight are saved.
pub async fn batch(args: BatchArgs) -> anyhow::Result<()> {
    let stop = StopSignal::default();
    stop.stop_on_signals("stopping: finishing the edits in flight")?;
    batch_until(args, stop).await
}

/// `batch` that stops when `stop` is set. Exits (through [`Incomplete`]) with its own codes
/// for a batch stopped early and one where items failed.
pub async fn batch_until(args: BatchArgs, stop: StopSignal) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config()?;
    // Refused before any work: items that keep the batch's strategy could never run.
    if let Some(mean) = args.budget_nfe_mean {
        strategy
            .under_mean_budget(mean)
            .map_err(|e| EditError::Invalid(format!("--budget-nfe-mean {mean}: {e}")))?;
    }
    if let Some(root) = args.root.as_ref().filter(|r| !r.is_dir()) {
        return Err(EditError::Invalid(format!(
            "--root {}: not a folder (image paths in the manifest are read under it)",
            root.display()
        ))
        .into());
    }
    let judge = JudgeSpec::from_args(&args.engine.judge)?;
    judge.check_serves(&strategy)?;
    judge.preflight("--judge", true)?;
    let generator =
        super::generator_without_live_previews(&args.engine.generator, args.engine.download)?;
    let shard = Shard::parse(&args.shard, |k| std::env::var(k).ok()).map_err(EditError::Invalid)?;
    if !args.manifest.is_file() {
        return Err(EditError::Invalid(format!(
            "--manifest {}: {}",
            args.manifest.display(),
            if args.manifest.is_dir() {
                "a folder; give the manifest file (JSONL, one edit per line)"
            } else {
                "no such file"
            }
        ))
        .into());
    }
    if let Some(why) = crate::batch::manifest::not_a_manifest(&args.manifest) {
        return Err(
            EditError::Invalid(format!("--manifest {}: {why}", args.manifest.display())).into(),
        );
    }
    crate::fsio::prepare_output_dir(&args.out, "--out")
        .map_err(|e| EditError::Invalid(e.to_string()))?;
    // Items finished under other settings are not counted as done under these.
    let settings = serde_json::json!({
        "width": args.width,
        "strategy": strategy,
        "budget_nfe_mean": args.budget_nfe_mean,
        "judge": judge.identity(args.engine.judge.judge_seed)?,
        "generator": generator.identity(),
    });
    let settings = settings.as_object().expect("an object");
    crate::fsio::settings::check_settings(&args.out, settings, true)?;
    // Items' panels vary with their aspect ratios; the plan takes a square one, and the
    // batch's strategy (a line that sets its own cache is not planned).
    // A line may set its own seeds: forwards are planned at --batch-size.
    let workload = Workload::new(
        (args.width as usize, args.width as usize),
        true,
        [&strategy],
    )
    .with_any_candidates();
    let engine = EngineBuilder::new(generator, judge, args.engine.download, workload)
        .allowing_unused_weights(args.engine.allow_unused_weights)
        .build_one()?;
    let opts = BatchOptions {
        manifest: args.manifest,
        root: args.root,
        out: args.out.clone(),
        shard,
        strategy,
        queue: args.queue,
        width: args.width,
        progress: true,
        budget_nfe_mean: args.budget_nfe_mean,
    };
    let started = std::time::Instant::now();
    let outcome = run_batch(&engine, &opts, &stop).await?;
    let worker = engine.worker();
    if outcome.changed > 0 {
        println!(
            "shard {}: {} finished item(s) redone because their manifest line changed under the same id (image, instruction or strategy); their outputs were replaced",
            opts.shard, outcome.changed
        );
    }
    if outcome.dropped > 0 {
        println!(
            "shard {}: {} item(s) no longer in this shard's part of the manifest were dropped from the summary and its table; their folders under {} are kept",
            opts.shard,
            outcome.dropped,
            args.out.join("items").display()
        );
    }
    if outcome.unchecked > 0 {
        tracing::warn!(
            "{}: {} finished item(s) have no content fingerprint (written by an older version): kept as done, but whether their line changed since cannot be checked; give a new --out to be sure",
            args.out.join("summary.jsonl").display(),
            outcome.unchecked
        );
    }
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
    if outcome.cancelled {
        return Err(Incomplete::Stopped {
            done: outcome.done + outcome.failed + outcome.invalid,
            left: total_left(&outcome),
        }
        .into());
    }
    let total = outcome.done + outcome.failed + outcome.invalid;
    if outcome.failed + outcome.invalid > 0 {
        return Err(Incomplete::SomeFailed {
            failed: outcome.failed + outcome.invalid,
            total,
            units: "items",
            summary: args.out.join("summary.jsonl"),
        }
        .into());
    }
    Ok(())
}

/// Items the stopped batch did not reach (not counted: the manifest was not read further).
fn total_left(outcome: &crate::batch::BatchOutcome) -> usize {
    outcome.unreached
}

/// `merge`: combines shard summaries, warning when the set of shards is incomplete.
pub fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let merged = merge_shards(&args.shards, &args.out)?;
    println!("{}", crate::batch::store::table(&merged.results));
    for warning in &merged.warnings {
        tracing::warn!("{warning}");
        println!("warning: {warning}");
    }
    println!(
        "merged summary in {}",
        args.out.join("summary.jsonl").display()
    );
    Ok(())
}
