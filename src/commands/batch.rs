//! `batch` (a manifest of edits, resumable and shardable) and `merge` (shard outputs).

use std::sync::Arc;

use crate::backends::{build_generator, build_judge};
use crate::batch::{merge_shards, run_batch, BatchOptions, Shard};
use crate::cli::{BatchArgs, MergeArgs};
use crate::engine::{Engine, GeneratorWorker};
use crate::error::EditError;
use crate::stop::StopSignal;

/// `batch`: runs (or resumes) a manifest; Ctrl-C stops after in-flight items are saved.
pub async fn batch(args: BatchArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config()?;
    let shard = Shard::parse(&args.shard, |k| std::env::var(k).ok()).map_err(EditError::Invalid)?;
    if !args.manifest.is_file() {
        return Err(EditError::Invalid(format!(
            "--manifest {}: no such file",
            args.manifest.display()
        ))
        .into());
    }
    let judge = build_judge(&args.judge, args.download)?;
    let generator = build_generator(&args.generator, args.download)?;
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(generator)),
        judge.judge,
        judge.concurrency,
    );
    let stop = StopSignal::default();
    stop.stop_on_ctrl_c("stopping: finishing the edits in flight");
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
