//! `eval` (strategy arms over a dataset at matched compute) and `study` (strategies
//! against the testbed's ground truth).

use anyhow::Context;

use crate::backends::{build_generator, build_judge, engine, generator_kind};
use crate::cli::GeneratorKind;
use crate::cli::{EvalArgs, JudgeArgs, StudyArgs};
use crate::commands::Incomplete;
use crate::error::EditError;
use crate::eval::suite::{JudgeSpec, Suite};
use crate::eval::{dataset, report, runner, store::ResultStore};
use crate::fsio::write_atomic;
use crate::judge::testbed::TestbedJudgeConfig;
use crate::models::testbed::TestbedEdits;
use crate::stop::StopSignal;
use crate::study::{run_study, StudyConfig};

/// `study`: the testbed measurement quoted in docs/testbed.md.
pub async fn study(args: StudyArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_config()?;
    if args.first_scene.checked_add(args.edits as u64).is_none() {
        return Err(EditError::Invalid(format!(
            "--first-scene {} + --edits {} passes the largest scene seed ({})",
            args.first_scene,
            args.edits,
            u64::MAX
        ))
        .into());
    }
    let _lock = super::claim_output(&args.out, "--out")?;
    let config = StudyConfig {
        edits: args.edits,
        first_scene: args.first_scene,
        width: args.width,
        strategy,
        difficulty: args.difficulty,
        contrast: args.contrast,
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
    let report = run_study(&config, |n| bar.set_position(n as u64)).await?;
    bar.finish_and_clear();
    let md = report.markdown();
    write_atomic(&args.out.join("study.md"), md.as_bytes())?;
    write_atomic(
        &args.out.join("study.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    println!("{md}");
    Ok(())
}

/// `eval`: runs the pending (item, arm) pairs of a suite, then writes the report.
pub async fn eval(mut args: EvalArgs) -> anyhow::Result<()> {
    let mut suite = Suite::load(&args.suite)?;
    if let Some(budget) = args.budget_nfe_mean {
        suite.budget_nfe_mean = Some(budget);
        suite
            .validate()
            .map_err(|e| EditError::Invalid(format!("--budget-nfe-mean {budget}: {e}")))?;
    }
    if let dataset::DatasetSpec::Testbed {
        contrast: Some(contrast),
        ..
    } = &suite.dataset
    {
        args.generator.testbed_contrast = *contrast;
    }
    let items = dataset::load(&suite.dataset, &suite.selection)?;
    let mut store = ResultStore::open(&args.out)
        .with_context(|| format!("opening {}", args.out.join("results.jsonl").display()))?;
    let names = runner::arm_names(&suite);
    if !args.report_only {
        let judge_args = |spec: &JudgeSpec| JudgeArgs {
            judge: spec.judge.clone(),
            judge_concurrency: Some(args.judge_concurrency),
            judge_seed: spec.seed,
        };
        let kind = generator_kind(&args.generator, args.download);
        let testbed = (kind == GeneratorKind::Testbed).then(TestbedEdits::default);
        let selection = build_judge(
            &judge_args(&suite.selection_judge),
            args.download,
            testbed.as_ref(),
        )?;
        let eval_judge = if suite.same_judge() {
            None
        } else {
            let judge = build_judge(
                &judge_args(suite.eval_judge()),
                args.download,
                testbed.as_ref(),
            )?;
            let judge = judge.judge.ok_or_else(|| {
                EditError::Invalid("eval_judge: \"none\" cannot score the returned edits".into())
            })?;
            crate::backends::require_vie(judge.as_ref(), "eval_judge")?;
            Some(judge)
        };
        if selection.judge.is_none() {
            return Err(EditError::Invalid(
                "selection_judge: \"none\" cannot select; give a judge (testbed or a preset)"
                    .into(),
            )
            .into());
        }
        if let Some(j) = &selection.judge {
            // Strategies pick their result by the selection judge's VIE scores.
            crate::backends::require_vie(j.as_ref(), "selection_judge")?;
        }
        let generator = build_generator(&args.generator, args.download, testbed)?;
        let engine = engine(generator, selection);
        let stop = StopSignal::default();
        stop.stop_on_signals("stopping after the item in progress (results so far are saved)")?;
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
    if args.report_only {
        return Ok(());
    }
    let total = (items.len() * names.len()) as u64;
    let finished = items
        .iter()
        .map(|i| names.iter().filter(|n| store.is_done(&i.id, n)).count() as u64)
        .sum::<u64>();
    let failed = store.results().iter().filter(|r| r.error.is_some()).count();
    if finished + (failed as u64) < total {
        return Err(Incomplete::Stopped {
            done: finished as usize,
            left: (total - finished) as usize - failed,
        }
        .into());
    }
    if failed > 0 {
        return Err(Incomplete::SomeFailed {
            failed,
            total: total as usize,
            summary: args.out.join("results.jsonl"),
        }
        .into());
    }
    Ok(())
}
