//! `eval` (strategy arms over a dataset at matched compute) and `study` (strategies
//! against the testbed's ground truth).

use anyhow::Context;

use crate::backends::{EngineBuilder, GeneratorSpec, JudgeSpec, Workload};
use crate::cli::{EvalArgs, StudyArgs};
use crate::commands::Incomplete;
use crate::error::EditError;
use crate::eval::suite::{Suite, SuiteJudge};
use crate::eval::{
    dataset, report, runner,
    store::{ArmResult, ResultStore},
};
use crate::fsio::write_atomic;
use crate::judge::testbed::TestbedJudgeConfig;
use crate::stop::StopSignal;
use crate::study::{run_study, StudyConfig, STUDY_JUDGE_CONCURRENCY};

/// Judge calls in flight for each of a suite's judges unless `--judge-concurrency` says.
const EVAL_JUDGE_CONCURRENCY: usize = 8;

/// The judge a suite names (`testbed` with its seed, or a preset file), read once.
fn suite_judge(j: &SuiteJudge, field: &str, concurrency: usize) -> anyhow::Result<JudgeSpec> {
    let mut spec = match j.judge.as_str() {
        "none" => JudgeSpec::none(),
        "testbed" => JudgeSpec::testbed(crate::judge::testbed::TestbedJudgeConfig {
            seed: j.seed,
            ..Default::default()
        }),
        preset if j.seed != 0 => {
            return Err(EditError::Invalid(format!(
                "{field}.seed {}: seeds the built-in testbed judge only; {preset} is a preset (a testbed preset sets `seed` in its file)",
                j.seed
            ))
            .into())
        }
        preset => JudgeSpec::from_file(std::path::Path::new(preset))
            .with_context(|| format!("{field} {preset}"))?,
    };
    spec.concurrency = concurrency;
    Ok(spec)
}

/// How `arms.json` names a suite's judge: `testbed` and `none` by name and seed, a preset
/// by its contents ([`crate::backends::judge::preset_identity`]), so that the same suite
/// given by another path, or run from another folder, finds its results again.
fn judge_in_settings(j: &SuiteJudge) -> anyhow::Result<serde_json::Value> {
    Ok(match j.judge.as_str() {
        "testbed" | "none" => serde_json::to_value(j)?,
        preset => serde_json::json!({
            "judge": crate::backends::judge::preset_identity(std::path::Path::new(preset))
                .with_context(|| format!("judge preset {preset}"))?,
            "seed": j.seed,
        }),
    })
}

/// `study` runs its own set of strategies (random, best-of-N, early-filter, adaptive) with
/// the shared knobs (`--seeds`, `--probe-steps`, `--keep`, `--steps`, `--wave`, `--target`,
/// `--seed`); the strategy flags it would ignore are refused by name.
fn refuse_unused_strategy_flags(flags: &crate::cli::StrategyArgs) -> Result<(), EditError> {
    let defaults = crate::engine::StrategyConfig::default();
    let unused = crate::cli::flags_given([
        ("--strategy", flags.strategy != defaults.kind),
        ("--seed-list", flags.seed_list.is_some()),
        ("--budget-nfe", flags.budget_nfe.is_some()),
        ("--refine", flags.refine.is_some()),
        ("--refine-strength", flags.refine_strength.is_some()),
        ("--refine-keep-unchanged", flags.refine_keep_unchanged),
        ("--refine-best", flags.refine_best.is_some()),
        ("--cache", flags.cache != defaults.cache),
    ]);
    if unused.is_empty() {
        return Ok(());
    }
    Err(EditError::Invalid(format!(
        "study runs its own set of strategies (random, best-of-N, early-filter, adaptive) and does not use {}; leave {} out",
        unused.join(", "),
        if unused.len() == 1 { "it" } else { "them" }
    )))
}

/// `study`: the testbed measurement quoted in docs/testbed.md.
pub async fn study(args: StudyArgs) -> anyhow::Result<()> {
    refuse_unused_strategy_flags(&args.strategy)?;
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
    let bar = crate::engine::Meter::new(
        "study",
        args.edits as u64,
        "study {bar:30} {pos}/{len} edits, ETA {eta}",
    );
    let mut judge = JudgeSpec::testbed(config.judge);
    judge.concurrency = STUDY_JUDGE_CONCURRENCY;
    let workload = Workload::new(
        (args.width as usize, args.width as usize),
        true,
        [&config.strategy],
    );
    let generator = GeneratorSpec::Testbed(config.generator());
    let engine = EngineBuilder::new(generator, judge, false, workload).build_one()?;
    let report = run_study(&config, &engine, |n| bar.set_position(n as u64)).await?;
    bar.finish();
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
    // The flag's budget replaces the suite's before its grids are expanded: grid arms are
    // named by the N it sizes them to.
    let suite =
        Suite::load_with_budget(&args.suite, args.budget_nfe_mean).map_err(|e| {
            match args.budget_nfe_mean {
                Some(budget) => EditError::Invalid(format!("--budget-nfe-mean {budget}: {e}")),
                None => e,
            }
        })?;
    if let dataset::DatasetSpec::Testbed {
        contrast: Some(contrast),
        ..
    } = &suite.dataset
    {
        match args.engine.generator.testbed_contrast {
            Some(flag) if flag != *contrast => {
                return Err(EditError::Invalid(format!(
                    "--testbed-contrast {flag}: {} sets the dataset's contrast to {contrast}; \
                     leave the flag out or change `contrast` in the suite",
                    args.suite.display()
                ))
                .into())
            }
            _ => args.engine.generator.testbed_contrast = Some(*contrast),
        }
    }
    let judge_flags = &args.engine.judge;
    if let Some(judge) = &judge_flags.judge {
        return Err(EditError::Invalid(format!(
            "--judge {judge}: eval takes its judges from the suite (selection_judge, eval_judge); edit {} instead",
            args.suite.display()
        ))
        .into());
    }
    if judge_flags.judge_seed.is_some() {
        return Err(EditError::Invalid(
            "--judge-seed: eval takes its judges' seeds from the suite (selection_judge.seed, eval_judge.seed)".into(),
        )
        .into());
    }
    let concurrency = judge_flags
        .judge_concurrency
        .unwrap_or(EVAL_JUDGE_CONCURRENCY);
    let selection_judge = suite_judge(&suite.selection_judge, "selection_judge", concurrency)?;
    if selection_judge.is_none() {
        return Err(EditError::Invalid(
            "selection_judge: \"none\" cannot select; give a judge (testbed or a preset)".into(),
        )
        .into());
    }
    let eval_judge = if suite.same_judge() {
        None
    } else {
        Some(suite_judge(suite.eval_judge(), "eval_judge", concurrency)?)
    };
    if args.report_only {
        super::refuse_report_without_records(&args.out, "results.jsonl")?;
    }
    // What can be refused without loading anything is refused before the output folder
    // (its lock, results.jsonl) is touched.
    if !args.report_only {
        selection_judge.preflight("selection_judge", true)?;
        if let Some(j) = &eval_judge {
            j.preflight("eval_judge", true)?;
        }
    }
    let generator =
        super::generator_without_live_previews(&args.engine.generator, args.engine.download)?;
    let items = dataset::load(&suite.dataset, &suite.selection)?;
    let lock = ResultStore::lock(&args.out)?;
    // What each arm's stored results were made with must be what it asks for now.
    let arm_settings = |name_judge: &dyn Fn(&SuiteJudge) -> anyhow::Result<serde_json::Value>| {
        let selection = name_judge(&suite.selection_judge)?;
        let eval = name_judge(suite.eval_judge())?;
        anyhow::Ok(
            suite
                .arms
                .iter()
                .map(|arm| {
                    let value = serde_json::json!({
                        "strategy": suite.config(arm),
                        "width": suite.width,
                        "selection_judge": selection,
                        "eval_judge": eval,
                    });
                    (arm.name.clone(), value)
                })
                .collect::<serde_json::Map<_, _>>(),
        )
    };
    let settings = arm_settings(&judge_in_settings)?;
    // arms.json written before presets were named by their contents holds the preset's
    // path as the suite joined it: the same path holding the same file now is the same
    // judge, and the file is brought up to date.
    let legacy = arm_settings(&|j| Ok(serde_json::to_value(j)?))?;
    let arms_file = args.out.join(crate::eval::store::ARM_SETTINGS_FILE);
    if legacy != settings
        && !crate::fsio::settings::changed_settings(&arms_file, &settings)?.is_empty()
        && crate::fsio::settings::changed_settings(&arms_file, &legacy)?.is_empty()
    {
        if !args.report_only {
            crate::fsio::settings::record_settings(&arms_file, &settings)?;
        }
    } else {
        crate::eval::store::check_arm_settings(&args.out, &settings, !args.report_only)?;
    }
    // What every arm shares: the generator (its weights, or the testbed's difficulty and
    // contrast).
    let shared = serde_json::json!({ "generator": generator.identity() });
    let shared = shared.as_object().expect("an object");
    crate::fsio::settings::check_settings(&args.out, shared, !args.report_only)?;
    // Opened once the settings are known to match: a refused rerun leaves results.jsonl
    // as it found it.
    let mut store = ResultStore::open(&args.out, lock)
        .with_context(|| format!("opening {}", args.out.join("results.jsonl").display()))?;
    let names = runner::arm_names(&suite);
    // Results of items whose image or instruction changed under the same id are not theirs
    // any more: run again (or, with --report-only, left out).
    let fingerprints: Vec<String> = items.iter().map(|i| i.fingerprint()).collect();
    let changed = store.set_aside_changed(&items, &fingerprints);
    if changed.results > 0 {
        println!(
            "eval: {} stored result(s) of {} item(s) whose image or instruction changed under the same id {}",
            changed.results,
            changed.items,
            if args.report_only {
                "are left out of this report; a run without --report-only runs them again"
            } else {
                "are run again, each new line superseding the old"
            }
        );
    }
    if changed.unchecked_results > 0 {
        tracing::warn!(
            "{}: {} stored result(s) of {} item(s) carry no content fingerprint (written by an older version): kept, but whether their item changed since cannot be checked; give a new --out to be sure",
            args.out.join("results.jsonl").display(),
            changed.unchecked_results,
            changed.unchecked_items,
        );
    }
    if !args.report_only {
        // The plan covers the widest refine and every step cache the arms ask for.
        let arms: Vec<_> = suite.arms.iter().map(|a| suite.config(a)).collect();
        let workload = Workload::new((suite.width as usize, suite.width as usize), true, &arms);
        // Strategies pick their result by the selection judge's VIE scores; the eval judge
        // scores the returned edits: both must give VIE scores (the builder checks).
        let mut builder =
            EngineBuilder::new(generator, selection_judge, args.engine.download, workload)
                .allowing_unused_weights(args.engine.allow_unused_weights);
        builder.judge.1 = "selection_judge";
        builder.extra_judges = eval_judge.into_iter().map(|j| (j, "eval_judge")).collect();
        let mut built = builder.build()?;
        let eval_judge = built.extra_judges.pop();
        let engine = built.engines.remove(0).1;
        let stop = StopSignal::default();
        stop.stop_on_signals("stopping after the item in progress (results so far are saved)")?;
        let total = (items.len() * names.len()) as u64;
        let done = items
            .iter()
            .map(|i| names.iter().filter(|n| store.is_done(&i.id, n)).count() as u64)
            .sum::<u64>();
        let bar = crate::engine::Meter::new(
            "eval",
            total,
            "eval {bar:30} {pos}/{len} (item, arm) results, {per_sec}, ETA {eta}",
        );
        bar.resume_from(done);
        let ctx = runner::EvalContext {
            engine,
            eval_judge,
            stop,
            testbed_difficulty: args.engine.generator.testbed_difficulty(),
        };
        runner::run_suite(&suite, &items, &fingerprints, &ctx, &mut store, |n| {
            bar.inc(n as u64)
        })
        .await?;
        bar.finish();
        // One line per (item, arm) for whoever reads the file next, not only after the
        // next start: the lines of units this run retried or redid go.
        store
            .compact()
            .with_context(|| format!("compacting {}", args.out.join("results.jsonl").display()))?;
    }
    // The report covers the suite's items as it names them now: results stored for items
    // a narrowed selection or a changed dataset no longer names stay on file, unreported.
    // Task and language are the dataset's now (names, not content: nothing is rerun).
    let current: std::collections::HashMap<&str, &dataset::EvalItem> =
        items.iter().map(|i| (i.id.as_str(), i)).collect();
    let (reported, left_out): (Vec<ArmResult>, Vec<ArmResult>) = store
        .results()
        .iter()
        .cloned()
        .map(|mut r| {
            if let Some(item) = current.get(r.item.as_str()) {
                r.task.clone_from(&item.task);
                r.language.clone_from(&item.language);
            }
            r
        })
        .partition(|r| current.contains_key(r.item.as_str()));
    let others: std::collections::BTreeSet<&str> =
        left_out.iter().map(|r| r.item.as_str()).collect();
    if let Some(example) = others.first() {
        tracing::warn!(
            "{}: {} stored result(s), for {} item(s) the suite no longer names (e.g. `{example}`), are left out of the report",
            args.out.join("results.jsonl").display(),
            left_out.len(),
            others.len(),
        );
    }
    let report = report::build(&suite, &reported, &names);
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
    // Not run, or run and not scored by the eval judge: both retried by a rerun. (A
    // failure from an earlier run that this one stopped before retrying counts as not run.)
    let failed = store.failed_this_run();
    if finished + (failed as u64) < total {
        return Err(Incomplete::Stopped {
            done: store.handled_this_run(),
            left: (total - finished) as usize - failed,
        }
        .into());
    }
    if failed > 0 {
        return Err(Incomplete::SomeFailed {
            failed,
            total: store.handled_this_run(),
            units: "(item, arm) results",
            summary: args.out.join("results.jsonl"),
        }
        .into());
    }
    Ok(())
}
