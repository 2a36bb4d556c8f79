//! `judge-eval`: a judge's agreement with human labels.

use std::collections::{HashMap, HashSet};

use anyhow::Context;

use crate::backends::{prepare_judge, JudgeSpec};
use crate::cli::JudgeEvalArgs;
use crate::commands::Incomplete;
use crate::error::EditError;
use crate::eval::dataset::sample_units;
use crate::judge_eval::{self, Case, JudgeEvalReport, JudgementStore, RunConfig};
use crate::models::testbed::TestbedEdits;
use crate::stop::StopSignal;

/// First scene seed of `--data testbed` (apart from eval's and study's default scenes).
const TESTBED_FIRST_SCENE: u64 = 50_000;

/// Reads one `--data` value.
fn load_data(spec: &str) -> Result<Vec<Case>, EditError> {
    if let Some(rest) = spec.strip_prefix("testbed") {
        let n = match rest.strip_prefix(':') {
            None if rest.is_empty() => 100,
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| {
                    EditError::Invalid(format!(
                        "--data {spec}: N must be a whole number from 1 to 100000"
                    ))
                })?,
            None => {
                return Err(EditError::Invalid(format!(
                    "--data {spec}: expected `testbed` or `testbed:N`"
                )))
            }
        };
        return Ok(judge_eval::testbed_cases(n, n, TESTBED_FIRST_SCENE, 0));
    }
    for (prefix, load) in [
        (
            "genai-bench:",
            judge_eval::benchmarks::genai_bench as fn(&std::path::Path) -> _,
        ),
        (
            "editreward-bench:",
            judge_eval::benchmarks::editreward_bench,
        ),
        ("imagenhub:", judge_eval::benchmarks::imagenhub),
    ] {
        if let Some(path) = spec.strip_prefix(prefix) {
            return load(std::path::Path::new(path));
        }
    }
    judge_eval::load_jsonl(std::path::Path::new(spec))
}

/// Every `--data`, checked for unique ids, then sub-sampled by `--limit`.
fn load_cases(args: &JudgeEvalArgs) -> Result<Vec<Case>, EditError> {
    let mut cases = Vec::new();
    let mut seen = HashSet::new();
    for spec in &args.data {
        for case in load_data(spec)? {
            if !seen.insert(case.item.id.clone()) {
                return Err(EditError::Invalid(format!(
                    "--data {spec}: id `{}` appears twice in the data (ids name the stored judgements)",
                    case.item.id
                )));
            }
            cases.push(case);
        }
    }
    if let Some(limit) = args.limit {
        // A group of pairs (EditReward-Bench's K candidates of one edit) is kept or left
        // whole: group accuracy needs every pair of a group.
        cases = sample_units(cases, limit, 0, |c| {
            c.group.as_deref().unwrap_or(&c.item.id)
        });
        if cases.is_empty() {
            return Err(EditError::Invalid(format!(
                "--limit {limit}: every group of pairs in the data is larger; raise --limit"
            )));
        }
    }
    Ok(cases)
}

/// `judge-eval`: judges the items not yet stored, then writes the report.
pub async fn judge_eval(args: JudgeEvalArgs) -> anyhow::Result<()> {
    let mut spec = JudgeSpec::from_args(&args.judge)?;
    if spec.is_none() {
        return Err(
            EditError::Invalid("--judge none: judge-eval needs a judge to measure".into()).into(),
        );
    }
    if args.allow_unused_weights {
        tracing::warn!("--allow-unused-weights: judge weights may hold tensors the model does not read; each is logged");
        spec.allow_unused_weights();
    }
    // Refused before the output folder (its lock, judgements.jsonl) is touched.
    if args.report_only {
        super::refuse_report_without_records(&args.out, "judgements.jsonl")?;
    } else {
        spec.preflight("--judge", false)?;
    }
    let cases = load_cases(&args)?;
    let judge = prepare_judge(&spec, args.download, Some(&TestbedEdits::default()))?;
    let judge = judge.ok_or_else(|| {
        EditError::Invalid("--judge none: judge-eval needs a judge to measure".into())
    })?;
    let mut store = JudgementStore::open(&args.out)
        .with_context(|| format!("opening {}", args.out.join("judgements.jsonl").display()))?;
    // Judgements another judge (or another width) made are never reported as this one's.
    let settings = serde_json::json!({
        "judge": spec.identity(args.judge.judge_seed)?,
        "width": args.width,
    });
    let settings = settings.as_object().expect("an object");
    // Recorded with the first judgement, not before: a judge that turns out unable to judge
    // this data (the testbed judge on real images) leaves nothing that refuses the next
    // command as "other settings".
    crate::fsio::settings::check_settings(&args.out, settings, false)?;
    let changed = if args.report_only {
        // Judgements of items changed since are left out of the report, as a run would
        // leave them until it judged them again.
        let fingerprints = judge_eval::fingerprints(&cases);
        judge_eval::set_aside_changed(&cases, &fingerprints, &mut store)
    } else {
        store.record_settings_with_first_judgement(settings.clone());
        let stop = StopSignal::default();
        stop.stop_on_signals("stopping after the items in flight (judgements so far are saved)")?;
        let bar = crate::engine::Meter::new(
            "judge-eval",
            cases.len() as u64,
            "judge-eval {bar:30} {pos}/{len} items, {per_sec}, ETA {eta}",
        );
        let config = RunConfig {
            width: args.width,
            concurrency: spec.concurrency,
        };
        let counts = judge_eval::run(&cases, judge.clone(), &mut store, config, &stop, |n| {
            bar.set_position(n as u64)
        })
        .await?;
        bar.finish();
        // One line per item for whoever reads the file next, not only after the next
        // start: the lines of items this run judged again go.
        store.compact().with_context(|| {
            format!("compacting {}", args.out.join("judgements.jsonl").display())
        })?;
        counts.changed
    };
    if changed.content > 0 {
        println!(
            "judge-eval: {} stored judgement(s) do not match their item's content now (its images or instruction changed under the same id{}): {}",
            changed.content,
            match changed.unfingerprinted {
                0 => String::new(),
                n => format!(
                    "; {n} of them are lines without a content fingerprint, written by an older version, which cannot be checked"
                ),
            },
            if args.report_only {
                "left out of this report; a run without --report-only judges them again"
            } else {
                "judged again, each new line superseding the old"
            }
        );
    }
    // The human labels, tasks and groups are the current data's, whatever they were when
    // an item was judged.
    let by_id: HashMap<&str, &Case> = cases.iter().map(|c| (c.item.id.as_str(), c)).collect();
    let mut relabelled = 0;
    let records: Vec<_> = store
        .records()
        .iter()
        .cloned()
        .map(|mut r| {
            if let Some(case) = by_id.get(r.id.as_str()) {
                relabelled += r.relabel(case) as usize;
            }
            r
        })
        .collect();
    if relabelled > 0 {
        println!(
            "judge-eval: {relabelled} stored judgement(s) carry a human label, task or group the data has changed since; the report uses the data's (the judge never saw them, so nothing is judged again)"
        );
    }
    let order: Vec<String> = cases.iter().map(|c| c.item.id.clone()).collect();
    let report = JudgeEvalReport::build(
        judge.name(),
        args.data.clone(),
        &order,
        &records,
        args.resamples,
    );
    report.write(&args.out)?;
    println!("{}", report.markdown());
    if args.report_only {
        return Ok(());
    }
    // Items not judged (unreadable, or the judge unreachable) from an earlier run that this
    // one stopped before retrying count as left.
    let unreadable = store.not_judged_this_run();
    let left = report.not_judged.len().saturating_sub(unreadable);
    if left > 0 {
        return Err(Incomplete::Stopped {
            done: store.handled_this_run(),
            left,
        }
        .into());
    }
    if unreadable > 0 {
        return Err(Incomplete::SomeFailed {
            failed: unreadable,
            total: store.handled_this_run(),
            units: "items",
            summary: args.out.join("judgements.jsonl"),
        }
        .into());
    }
    Ok(())
}
