//! `judge-eval`: a judge measured against labels whose truth is known (the testbed judge's
//! error model predicts its accuracy), an interrupted run resumed to the same report, and
//! failing judges whose failures never become preferences or scores.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use icedit_scale::edit::EditContext;
use icedit_scale::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use icedit_scale::judge::{Comparison, Judge, JudgeError, PreviewStage, ScreenVerdict, SubScores};
use icedit_scale::judge_eval::{
    run, testbed_cases, Case, HumanLabel, JudgeEvalReport, JudgementStore, Label, RunConfig,
};
use icedit_scale::models::testbed::outcomes::{mse, outcome_set};
use icedit_scale::stop::StopSignal;
use image::RgbImage;
use statrs::distribution::{ContinuousCDF, Normal};

const WIDTH: u32 = 96;

fn config(concurrency: usize) -> RunConfig {
    RunConfig {
        width: WIDTH,
        concurrency,
    }
}

async fn judge_all(
    cases: &[Case],
    judge: Arc<dyn Judge>,
    out: &std::path::Path,
) -> JudgeEvalReport {
    let mut store = JudgementStore::open(out).unwrap();
    run(
        cases,
        judge.clone(),
        &mut store,
        config(4),
        &StopSignal::default(),
        |_| {},
    )
    .await
    .unwrap();
    report(cases, judge.as_ref(), &store)
}

fn report(cases: &[Case], judge: &dyn Judge, store: &JudgementStore) -> JudgeEvalReport {
    let order: Vec<String> = cases.iter().map(|c| c.item.id.clone()).collect();
    JudgeEvalReport::build(
        judge.name(),
        vec!["testbed".into()],
        &order,
        store.records(),
        1000,
    )
}

/// The testbed judge's "instruction followed" sub-score of an edit: 10 x its progress.
fn follows(case: &Case, image: &icedit_scale::judge_eval::EditedImage) -> f64 {
    let edit = case.item.to_edit(WIDTH).unwrap();
    let target = outcome_set(&edit, 0.5).unwrap()[0].image.clone();
    let img = image.load(&edit).unwrap();
    let full = mse(&edit.source, &target).max(1.0);
    10.0 * (1.0 - mse(&img, &target) / full).clamp(0.0, 1.0) as f64
}

#[tokio::test]
async fn the_testbed_judge_scores_where_its_error_model_says() {
    let (noise, bias): (f32, f64) = (1.5, 0.2);
    let judge: Arc<dyn Judge> = Arc::new(TestbedJudge::new(TestbedJudgeConfig {
        seed: 3,
        noise,
        position_bias: bias as f32,
        failure_rate: 0.05,
    }));
    let cases = testbed_cases(300, 60, 9000, 5);
    let dir = tempfile::tempdir().unwrap();
    let report = judge_all(&cases, judge.clone(), dir.path()).await;

    // Each call: with probability `bias` it answers "first"; otherwise it compares noisy
    // scores, right with probability q = Phi(delta / (noise * sqrt 2)). A pair is right
    // when both orders name the better edit; it follows position when both name one slot.
    let phi = Normal::new(0.0, 1.0).unwrap();
    let (mut right, mut positional, mut non_tie) = (0.0, 0.0, 0.0);
    for case in cases
        .iter()
        .filter(|c| matches!(c.human, HumanLabel::Preference { .. }))
    {
        let HumanLabel::Preference { a, b, preferred } = &case.human else {
            unreachable!()
        };
        if *preferred == Label::Tie {
            // The same image in both slots: both calls are the same call, one slot twice.
            positional += 1.0;
            continue;
        }
        let delta = (follows(case, a) - follows(case, b)).abs();
        let q = phi.cdf(delta / (noise as f64 * 2f64.sqrt()));
        let better_first = bias + (1.0 - bias) * q; // the better edit shown first is picked
        let better_second = (1.0 - bias) * q; // the better edit shown second is picked
        right += better_first * better_second;
        positional += better_first * (1.0 - better_second) + (1.0 - better_first) * better_second;
        non_tie += 1.0;
    }
    let pairs = report.pairs.as_ref().unwrap();
    let expected_right = right / non_tie;
    let expected_positional = positional / 300.0;
    let acc = pairs.accuracy_without_ties.unwrap();
    let pos = pairs.position_bias.unwrap();
    println!("accuracy {acc:?} expected {expected_right:.3}; position {pos:?} expected {expected_positional:.3}");
    assert!(
        acc.lo <= expected_right && expected_right <= acc.hi,
        "{acc:?} vs {expected_right}"
    );
    assert!(
        pos.lo <= expected_positional && expected_positional <= pos.hi,
        "{pos:?} vs {expected_positional}"
    );
    // Failures: about 5% of calls, counted, and never scored.
    let fail = report.cost.failure_rate.unwrap();
    assert!(fail.lo <= 0.05 && 0.05 <= fail.hi, "{fail:?}");
    assert_eq!(report.cost.calls, 2 * 360);
    assert!(pairs.answered < 300 && pairs.answered > 240);
    // Ratings: VIE O follows the truth closely.
    let rho = report.ratings.as_ref().unwrap().spearman.unwrap();
    assert!(rho.mean > 0.8, "{rho:?}");
}

/// Sets `stop` once `after` calls have been made.
struct StopAfter {
    inner: Arc<dyn Judge>,
    calls: AtomicUsize,
    after: usize,
    stop: StopSignal,
}

impl StopAfter {
    fn tick(&self) {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            self.stop.stop();
        }
    }
}

#[async_trait]
impl Judge for StopAfter {
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn screen(
        &self,
        e: &EditContext,
        p: &RgbImage,
        s: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        self.inner.screen(e, p, s).await
    }
    async fn compare(
        &self,
        e: &EditContext,
        a: &RgbImage,
        b: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        self.tick();
        self.inner.compare(e, a, b).await
    }
    async fn semantic_consistency(
        &self,
        e: &EditContext,
        i: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.tick();
        self.inner.semantic_consistency(e, i).await
    }
    async fn perceptual_quality(
        &self,
        e: &EditContext,
        i: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.tick();
        self.inner.perceptual_quality(e, i).await
    }
}

#[tokio::test]
async fn an_interrupted_run_resumes_to_the_same_report() {
    let cases = testbed_cases(40, 20, 7000, 2);
    let judge: Arc<dyn Judge> = Arc::new(TestbedJudge::new(TestbedJudgeConfig::default()));
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = judge_all(&cases, judge.clone(), whole_dir.path()).await;
    assert!(whole.not_judged.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let stop = StopSignal::default();
    let stopping: Arc<dyn Judge> = Arc::new(StopAfter {
        inner: judge.clone(),
        calls: AtomicUsize::new(0),
        after: 30,
        stop: stop.clone(),
    });
    {
        let mut store = JudgementStore::open(dir.path()).unwrap();
        let judged = run(&cases, stopping, &mut store, config(4), &stop, |_| {})
            .await
            .unwrap()
            .judged;
        assert!((15..40).contains(&judged), "stopped after {judged} items");
        let partial = report(&cases, judge.as_ref(), &store);
        assert_eq!(partial.not_judged.len(), 60 - judged);
    }
    // A kill in the middle of a write leaves half a line behind.
    let log = dir.path().join("judgements.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"id\":\"pair39\",\"judged\":{\"kind\":\"pa");
    std::fs::write(&log, text).unwrap();

    let mut store = JudgementStore::open(dir.path()).unwrap();
    run(
        &cases,
        judge.clone(),
        &mut store,
        config(4),
        &StopSignal::default(),
        |_| {},
    )
    .await
    .unwrap();
    let resumed = report(&cases, judge.as_ref(), &store);
    assert_eq!(resumed, whole);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 60);
}

/// A judge that never answers: each kind of call fails with its own error.
struct Failing {
    compare: JudgeError,
    semantic: JudgeError,
    perceptual: JudgeError,
}

impl Failing {
    /// Fails with answers: a client error, an unparseable reply, a refusal (failures the
    /// judge is measured by).
    fn answering() -> Self {
        Self {
            // A client error is the judge's answer to this request (an outage is not: see
            // `an_unreachable_judge_is_an_outage_a_rerun_retries`).
            compare: JudgeError::Http {
                status: 400,
                body: "no reply".into(),
            },
            semantic: JudgeError::parse("no score", "I cannot tell"),
            perceptual: JudgeError::Failed("down".into()),
        }
    }

    /// An endpoint that is down: every call fails before reaching it.
    fn unreachable() -> Self {
        Self {
            compare: JudgeError::Transport("connection refused".into()),
            semantic: JudgeError::Timeout("no reply in 60 s".into()),
            perceptual: JudgeError::Http {
                status: 503,
                body: "overloaded".into(),
            },
        }
    }
}

#[async_trait]
impl Judge for Failing {
    fn name(&self) -> String {
        "failing".into()
    }
    async fn screen(
        &self,
        _: &EditContext,
        _: &RgbImage,
        _: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        Err(self.compare.clone())
    }
    async fn compare(
        &self,
        _: &EditContext,
        _: &RgbImage,
        _: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        Err(self.compare.clone())
    }
    async fn semantic_consistency(
        &self,
        _: &EditContext,
        _: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        Err(self.semantic.clone())
    }
    async fn perceptual_quality(
        &self,
        _: &EditContext,
        _: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        Err(self.perceptual.clone())
    }
}

#[tokio::test]
async fn a_failing_judge_has_failures_not_preferences_or_scores() {
    let cases = testbed_cases(10, 10, 100, 0);
    let dir = tempfile::tempdir().unwrap();
    let report = judge_all(&cases, Arc::new(Failing::answering()), dir.path()).await;
    let pairs = report.pairs.unwrap();
    assert_eq!((pairs.pairs, pairs.answered), (10, 0));
    assert_eq!(pairs.accuracy_without_ties, None);
    assert_eq!(pairs.accuracy_with_ties, None);
    assert_eq!(pairs.accuracy_per_call, None);
    let ratings = report.ratings.unwrap();
    assert_eq!((ratings.ratings, ratings.answered), (10, 0));
    assert_eq!(ratings.spearman, None);
    assert_eq!((report.cost.calls, report.cost.failed_calls), (40, 40));
    assert_eq!(report.cost.failure_rate.unwrap().mean, 1.0);
    let log = std::fs::read_to_string(dir.path().join("judgements.jsonl")).unwrap();
    assert!(
        !log.contains("\"answer\""),
        "a failed call stored an answer"
    );
    assert!(log.contains("no reply") && log.contains("I cannot tell"));
}

/// An endpoint that was down is an outage, not the judge's 100% failure rate: its items are
/// stored as not judged, and a rerun with the endpoint back judges them, ending where a run
/// that never met the outage ends.
#[tokio::test]
async fn an_unreachable_judge_is_an_outage_a_rerun_retries() {
    let cases = testbed_cases(6, 6, 900, 3);
    let dir = tempfile::tempdir().unwrap();
    let down = judge_all(&cases, Arc::new(Failing::unreachable()), dir.path()).await;
    assert_eq!(down.not_judged.len(), 12);
    assert_eq!(down.cost.calls, 0);
    let log = std::fs::read_to_string(dir.path().join("judgements.jsonl")).unwrap();
    assert!(log.contains("could not be reached"), "{log}");
    let judge: Arc<dyn Judge> = Arc::new(TestbedJudge::new(TestbedJudgeConfig::default()));
    let back = judge_all(&cases, judge.clone(), dir.path()).await;
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = judge_all(&cases, judge, fresh_dir.path()).await;
    assert!(back.not_judged.is_empty());
    assert_eq!(back, fresh);
}

/// Fails every comparison whose first image starts with an odd red value (so some pairs
/// lose one order), and every quality call.
struct OneOrder(TestbedJudge);

#[async_trait]
impl Judge for OneOrder {
    fn name(&self) -> String {
        "one order".into()
    }
    async fn screen(
        &self,
        e: &EditContext,
        p: &RgbImage,
        s: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        self.0.screen(e, p, s).await
    }
    async fn compare(
        &self,
        e: &EditContext,
        a: &RgbImage,
        b: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        if a.as_raw()[0] % 2 == 1 {
            return Err(JudgeError::Failed("odd".into()));
        }
        self.0.compare(e, a, b).await
    }
    async fn semantic_consistency(
        &self,
        e: &EditContext,
        i: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.0.semantic_consistency(e, i).await
    }
    async fn perceptual_quality(
        &self,
        _: &EditContext,
        _: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        Err(JudgeError::Failed("no quality".into()))
    }
}

#[tokio::test]
async fn a_pair_with_one_failed_order_has_no_verdict() {
    let cases = testbed_cases(30, 5, 300, 1);
    let dir = tempfile::tempdir().unwrap();
    let judge = OneOrder(TestbedJudge::new(TestbedJudgeConfig {
        failure_rate: 0.0,
        ..TestbedJudgeConfig::default()
    }));
    let report = judge_all(&cases, Arc::new(judge), dir.path()).await;
    let pairs = report.pairs.unwrap();
    let log = std::fs::read_to_string(dir.path().join("judgements.jsonl")).unwrap();
    let failed_pairs = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"pair\"") && l.contains("odd"))
        .count();
    assert!(failed_pairs > 0, "the fixture should fail some orders");
    assert_eq!(pairs.answered, 30 - failed_pairs);
    // Ratings whose quality call failed are not rated.
    assert_eq!(report.ratings.unwrap().answered, 0);
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_icedit-scale"))
}

#[test]
fn the_command_writes_its_report_and_names_bad_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("je");
    let status = Command::new(bin())
        .args([
            "judge-eval",
            "--data",
            "testbed:12",
            "--judge",
            "testbed",
            "--width",
            "96",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("accuracy without ties") && md.contains("Spearman"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["items"], 24);
    // Running again finds everything judged: same report.
    let again = Command::new(bin())
        .args([
            "judge-eval",
            "--data",
            "testbed:12",
            "--judge",
            "testbed",
            "--width",
            "96",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(again.success());
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), md);

    // A preset of the testbed judge, and data naming a file that is not there.
    let preset = dir.path().join("tb.toml");
    std::fs::write(
        &preset,
        "kind = \"testbed\"\nnoise = 2.0\nposition_bias = 0.5\n",
    )
    .unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"id\":\"p\",\"source\":\"s.png\",\"instruction\":\"x\",\"edit_a\":\"a.png\",\"edit_b\":\"b.png\",\"preference\":\"a\"}\n",
    )
    .unwrap();
    let output = Command::new(bin())
        .args(["judge-eval", "--data"])
        .arg(&data)
        .arg("--judge")
        .arg(&preset)
        .arg("--out")
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("data.jsonl") && err.contains("line 1") && err.contains("`source`"),
        "{err}"
    );
    // A bad preset field is named.
    std::fs::write(&preset, "kind = \"testbed\"\nposition_bias = 1.5\n").unwrap();
    let output = Command::new(bin())
        .args(["judge-eval", "--data", "testbed:2", "--judge"])
        .arg(&preset)
        .arg("--out")
        .arg(dir.path().join("bad2"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("position_bias") && err.contains("1.5"),
        "{err}"
    );
}

/// Judgements stored by one judge are never reported under another's name: a rerun into
/// the same folder with another judge, seed or width is refused, naming what differs; the
/// same judge, even by another path to its preset, resumes.
#[test]
fn a_rerun_with_another_judge_or_width_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("je");
    let preset = dir.path().join("tb.toml");
    std::fs::write(&preset, "kind = \"testbed\"\nnoise = 2.0\n").unwrap();
    let run = |extra: &[&str]| {
        Command::new(bin())
            .args(["judge-eval", "--data", "testbed:4", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&["--width", "64"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for (extra, needle) in [
        (vec!["--width", "64", "--judge-seed", "5"], "`judge`"),
        (vec!["--width", "96"], "`width`"),
        (
            vec!["--width", "64", "--judge", preset.to_str().unwrap()],
            "`judge`",
        ),
    ] {
        let refused = run(&extra);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(needle) && err.contains("other settings") && err.contains("je"),
            "{extra:?}: {err}"
        );
    }
    assert!(run(&["--width", "64"]).status.success());

    // A preset's judgements, resumed through another path to the same file.
    let out = dir.path().join("je2");
    let by_preset = |path: &std::path::Path| {
        Command::new(bin())
            .args([
                "judge-eval",
                "--data",
                "testbed:4",
                "--width",
                "64",
                "--out",
            ])
            .arg(&out)
            .arg("--judge")
            .arg(path)
            .output()
            .unwrap()
    };
    assert!(by_preset(&preset).status.success());
    let other_path = dir.path().join(".").join("tb.toml");
    let again = by_preset(&other_path);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// A stored pair judgement: `a_first` / `b_first` answers (None = failed).
fn pair_record(
    id: &str,
    group: &str,
    human: Label,
    a_first: Option<icedit_scale::judge::Preference>,
    b_first: Option<icedit_scale::judge::Preference>,
) -> icedit_scale::judge_eval::Judgement {
    use icedit_scale::judge_eval::store::{Called, ItemCalls};
    let called = |answer: Option<icedit_scale::judge::Preference>| Called {
        answer,
        failure: answer.is_none().then(|| "failed".to_string()),
        reasoning: String::new(),
        usage: Default::default(),
    };
    icedit_scale::judge_eval::Judgement {
        id: id.into(),
        task: None,
        group: Some(group.into()),
        content: None,
        judged: Some(ItemCalls::Pair {
            human,
            a_first: called(a_first),
            b_first: called(b_first),
        }),
        error: None,
    }
}

#[test]
fn hand_computed_accuracies_ties_position_bias_and_groups() {
    use icedit_scale::judge::Preference::{First, Second, Tie};
    let records = vec![
        // g1: both pairs right (A first then B first: "first, second" = A).
        pair_record("p1", "g1", Label::A, Some(First), Some(Second)),
        pair_record("p2", "g1", Label::B, Some(Second), Some(First)),
        // g2: wrong (the verdict is B).
        pair_record("p3", "g2", Label::A, Some(Second), Some(First)),
        // g3: position only (first both times) -> a tie verdict; one human tie.
        pair_record("p4", "g3", Label::A, Some(First), Some(First)),
        pair_record("p5", "g4", Label::Tie, Some(First), Some(First)),
        // g5: one order failed: no verdict, no group.
        pair_record("p6", "g5", Label::B, Some(Second), None),
        // A judge tie on one order, a vote on the other: the vote stands.
        pair_record("p7", "g6", Label::B, Some(Tie), Some(First)),
    ];
    let order: Vec<String> = (1..=7).map(|i| format!("p{i}")).collect();
    let r = JudgeEvalReport::build("hand".into(), vec![], &order, &records, 200);
    let p = r.pairs.unwrap();
    assert_eq!((p.pairs, p.answered), (7, 6));
    // Without ties: p1 p2 p3 p4 p7 (human non-tie, answered): right p1 p2 p7 = 3/5.
    assert_eq!(p.accuracy_without_ties.unwrap().mean, 3.0 / 5.0);
    // With ties: all six answered; right p1 p2 p5 (tie = tie) p7 = 4/6.
    assert_eq!(p.accuracy_with_ties.unwrap().mean, 4.0 / 6.0);
    // Per call over human non-tie pairs: p1 2/2, p2 2/2, p3 0/2, p4 1/2, p6 1/1
    // (the answered order), p7 1/2 (the tie call is not right) = 7/11.
    assert_eq!(p.accuracy_per_call.unwrap().mean, 7.0 / 11.0);
    // Same slot twice: p4, p5 = 2/6.
    assert_eq!(p.position_bias.unwrap().mean, 2.0 / 6.0);
    assert_eq!(p.judge_ties.unwrap().mean, 2.0 / 6.0);
    // Groups: g1 right, g2 wrong, g3 wrong (a tie verdict), g6 right; g4 (human tie) and
    // g5 (unanswered) do not count: 2/4.
    let g = p.group_accuracy.unwrap();
    assert_eq!((g.mean, g.n), (0.5, 4));
    assert_eq!(r.cost.failed_calls, 1);
    assert_eq!(r.cost.calls, 14);
}

/// The report's footnote says why items are not judged: a judge outage (every call
/// failed unreached), unreadable images, or a run stopped before them are told apart (an
/// outage was once reported as "interrupted, or their images could not be read").
#[test]
fn the_report_says_why_items_were_not_judged() {
    use icedit_scale::judge::Preference::{First, Second};
    let failed = |id: &str, reason: &str| icedit_scale::judge_eval::Judgement {
        judged: None,
        error: Some(reason.into()),
        ..pair_record(id, "g", Label::A, None, None)
    };
    let outage = |id: &str| {
        failed(
            id,
            "the judge could not be reached (HTTP 500: internal error); a rerun retries this item",
        )
    };
    let order: Vec<String> = (1..=5).map(|i| format!("p{i}")).collect();
    // An outage only: nothing was interrupted and every image could be read.
    let records = vec![
        pair_record("p1", "g1", Label::A, Some(First), Some(Second)),
        outage("p2"),
        outage("p3"),
        pair_record("p4", "g2", Label::A, Some(First), Some(Second)),
        pair_record("p5", "g3", Label::A, Some(First), Some(Second)),
    ];
    let md = JudgeEvalReport::build("hand".into(), vec![], &order, &records, 200).markdown();
    assert!(
        md.contains("2 items not judged (2: the judge could not be reached for any of their calls"),
        "{md}"
    );
    assert!(
        !md.contains("stopped") && !md.contains("interrupted") && !md.contains("could not be read"),
        "{md}"
    );
    // Each cause counted apart: p4 never tried (a stopped run), p3 unreadable.
    let records = vec![
        pair_record("p1", "g1", Label::A, Some(First), Some(Second)),
        outage("p2"),
        failed("p3", "image b.png: cannot open: No such file or directory"),
        pair_record("p5", "g3", Label::A, Some(First), Some(Second)),
    ];
    let report = JudgeEvalReport::build("hand".into(), vec![], &order, &records, 200);
    assert_eq!(report.not_judged, ["p2", "p3", "p4"]);
    let md = report.markdown();
    assert!(
        md.contains("3 items not judged (1: the judge could not be reached")
            && md.contains("1: their images could not be read")
            && md.contains("1: never tried (the run was stopped before them)"),
        "{md}"
    );
}

#[test]
fn the_public_benchmark_layouts_run_through_a_real_local_judge() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures/judge_eval");
    let dir = tempfile::tempdir().unwrap();
    // The tiny random Qwen2-VL (its preset's model_dir is relative to the preset's folder).
    let output = Command::new(bin())
        .arg("judge-eval")
        .arg("--data")
        .arg(format!(
            "editreward-bench:{}",
            fixtures.join("editreward_bench_3pair.parquet").display()
        ))
        .arg("--data")
        .arg(format!(
            "genai-bench:{}",
            fixtures.join("genai_bench_image_edition.parquet").display()
        ))
        .arg("--data")
        .arg(format!(
            "imagenhub:{}",
            fixtures.join("imagenhub_text_guided_ie").display()
        ))
        .arg("--judge")
        .arg(root.join("tests/fixtures/qwen2vl/judge-tiny.toml"))
        .args(["--width", "32", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(json["items"], 6 + 8 + 6);
    assert_eq!(json["pairs"]["pairs"], 14);
    assert_eq!(json["pairs"]["group_accuracy"]["n"], 2, "{}", json["pairs"]);
    assert_eq!(json["ratings"]["ratings"], 6);
    assert_eq!(json["cost"]["failed_calls"], 0);
    assert!(json["cost"]["prompt_tokens"].as_u64().unwrap() > 1000);
}

/// A judge refused partway (the testbed judge, which can score only testbed scenes, given
/// real benchmark images) leaves no settings behind: the corrected command into the same
/// folder runs instead of being refused as "other settings".
#[test]
fn a_judge_refused_on_its_data_does_not_block_the_corrected_command() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = format!(
        "genai-bench:{}",
        root.join("tests/fixtures/judge_eval/genai_bench_image_edition.parquet")
            .display()
    );
    let dir = tempfile::tempdir().unwrap();
    let run = |judge: &std::path::Path| {
        Command::new(bin())
            .args(["judge-eval", "--data", &data, "--width", "32", "--judge"])
            .arg(judge)
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let refused = run(std::path::Path::new("testbed"));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("testbed judge knows only"), "{err}");
    assert!(!dir.path().join("settings.json").exists());
    let fixed = run(&root.join("tests/fixtures/qwen2vl/judge-tiny.toml"));
    assert!(
        fixed.status.success(),
        "{}",
        String::from_utf8_lossy(&fixed.stderr)
    );
    assert!(dir.path().join("settings.json").is_file());
}

/// `judge-eval` over `data` into `out`, expected to succeed: its stdout.
fn judge_eval_ok(
    data: &str,
    judge: &std::path::Path,
    width: &str,
    out: &std::path::Path,
) -> String {
    let output = Command::new(bin())
        .args([
            "judge-eval",
            "--data",
            data,
            "--width",
            width,
            "--resamples",
            "200",
        ])
        .arg("--judge")
        .arg(judge)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `results.json` without the judge's wall time (it differs between any two runs).
fn results_json(out: &std::path::Path) -> serde_json::Value {
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    json["cost"]["call_seconds"].take();
    json
}

/// A stored judgement stands only for the content it was made on: `testbed:N` builds other
/// rating items under the same ids for another N, so `testbed:4` then `testbed:6` into one
/// folder judges the four changed ratings again and reports what a fresh folder does
/// (it once reported the stale ratings beside the new ones). Lines written before
/// fingerprints were stored cannot be compared and are judged again too.
#[test]
fn items_changed_under_the_same_id_are_judged_again() {
    let dir = tempfile::tempdir().unwrap();
    let testbed = std::path::Path::new("testbed");
    let (out, fresh) = (dir.path().join("je"), dir.path().join("fresh"));
    judge_eval_ok("testbed:4", testbed, "64", &out);
    let rerun = judge_eval_ok("testbed:6", testbed, "64", &out);
    // The pairs' blends are drawn first, so pair0-3 are the same items; rating0-3 are not.
    assert!(
        rerun.contains("4 stored judgement(s) do not match") && rerun.contains("judged again"),
        "{rerun}"
    );
    // Each new line superseded the old: one line per item as soon as the run ends (the
    // old lines once stayed until the next start).
    let lines = std::fs::read_to_string(out.join("judgements.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12, "{lines}");
    judge_eval_ok("testbed:6", testbed, "64", &fresh);
    assert_eq!(results_json(&out), results_json(&fresh));
    let again = judge_eval_ok("testbed:6", testbed, "64", &out);
    assert!(!again.contains("do not match"), "{again}");
    let lines = std::fs::read_to_string(out.join("judgements.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    assert_eq!(results_json(&out), results_json(&fresh));

    // Lines without a fingerprint (an older version's) are judged again, with a note.
    let stripped: String = lines
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .remove("content")
                .expect("a fingerprint");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(out.join("judgements.jsonl"), stripped).unwrap();
    let old = judge_eval_ok("testbed:6", testbed, "64", &out);
    assert!(
        old.contains("12 stored judgement(s) do not match")
            && old.contains("12 of them are lines without a content fingerprint"),
        "{old}"
    );
    assert_eq!(results_json(&out), results_json(&fresh));
}

/// Labels are the current data's: a corrected label file is reported against the corrected
/// labels without a judge call (the stored lines stay as they are), and an item whose image
/// or instruction changed under its id is judged again. Both reports equal a fresh folder's
/// on the same file (the rerun once reported the old labels, unchanged).
#[test]
fn corrected_labels_are_reported_and_changed_items_judged_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let judge = root.join("tests/fixtures/qwen2vl/judge-tiny.toml");
    let image = |name: &str, seed: u8| {
        let img = RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([
                (x as u8).wrapping_mul(seed),
                (y as u8).wrapping_mul(7),
                seed.wrapping_mul(31),
            ])
        });
        img.save(dir.path().join(name)).unwrap();
    };
    image("s.png", 1);
    image("e1.png", 2);
    image("e2.png", 3);
    image("e3.png", 4);
    let data = dir.path().join("labels.jsonl");
    let write = |preference: [&str; 2], scores: [f64; 3], first: &str| {
        let pair = |id: &str, a: &str, b: &str, p: &str, instruction: &str| {
            format!("{{\"id\":\"{id}\",\"source\":\"s.png\",\"instruction\":\"{instruction}\",\"edit_a\":\"{a}\",\"edit_b\":\"{b}\",\"preference\":\"{p}\"}}\n")
        };
        let rating = |id: &str, e: &str, s: f64| {
            format!("{{\"id\":\"{id}\",\"source\":\"s.png\",\"instruction\":\"make it red\",\"edit\":\"{e}\",\"score\":{s}}}\n")
        };
        let text = [
            pair("p1", "e1.png", "e2.png", preference[0], first),
            pair("p2", "e2.png", "e1.png", preference[1], "make it red"),
            rating("r1", "e1.png", scores[0]),
            rating("r2", "e2.png", scores[1]),
            rating("r3", "e3.png", scores[2]),
        ]
        .concat();
        std::fs::write(&data, text).unwrap();
    };
    let data_arg = data.to_str().unwrap();
    let (out, fresh) = (dir.path().join("je"), dir.path().join("fresh"));
    write(["a", "b"], [2.0, 8.0, 5.0], "make it red");
    judge_eval_ok(data_arg, &judge, "32", &out);
    let stored = std::fs::read(out.join("judgements.jsonl")).unwrap();

    // Every label corrected: reported as the data says now, nothing judged again.
    write(["b", "a"], [8.0, 2.0, 1.0], "make it red");
    let rerun = judge_eval_ok(data_arg, &judge, "32", &out);
    assert!(
        rerun.contains("5 stored judgement(s) carry a human label"),
        "{rerun}"
    );
    assert!(!rerun.contains("do not match"), "{rerun}");
    assert_eq!(std::fs::read(out.join("judgements.jsonl")).unwrap(), stored);
    judge_eval_ok(data_arg, &judge, "32", &fresh);
    let first = results_json(&fresh);
    assert_eq!(results_json(&out), first);

    // p1's instruction and r3's image (same path) changed: those two are judged again.
    write(["b", "a"], [8.0, 2.0, 1.0], "make it blue");
    image("e3.png", 9);
    let rerun = judge_eval_ok(data_arg, &judge, "32", &out);
    assert!(
        rerun.contains("2 stored judgement(s) do not match"),
        "{rerun}"
    );
    let fresh2 = dir.path().join("fresh2");
    judge_eval_ok(data_arg, &judge, "32", &fresh2);
    assert_eq!(results_json(&out), results_json(&fresh2));
    assert_ne!(
        results_json(&fresh2),
        first,
        "the changed items are judged otherwise"
    );
}
