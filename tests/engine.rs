//! Engine tests through the traits, with a scripted generator and judge.
//!
//! Each candidate's latents carry a marker (its index) in element 0, which the scripted
//! generator never changes and writes into every decoded pixel, so the scripted judge knows
//! whose image it sees and the generator can log exactly which candidate was evaluated at
//! which sigma.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use icedit_scale::edit::EditContext;
use icedit_scale::engine::report::{CandidateStatus, Judged, StopReason};
use icedit_scale::engine::{
    EditJob, EditReport, Engine, GeneratorWorker, Silent, StrategyConfig, StrategyKind,
};
use icedit_scale::error::GenerateError;
use icedit_scale::generate::{DecodePurpose, Generator, GeneratorInfo, PreparedEdit, Schedule};
use icedit_scale::judge::{
    CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, ScoreKind, ScreenVerdict,
    SubScores,
};
use icedit_scale::models::flux::scheduler::DynamicShift;
use image::{Rgb, RgbImage};

/// (marker, sigma) of every velocity row evaluated.
type ForwardLog = Arc<Mutex<Vec<(u32, f64)>>>;

struct ScriptedGenerator {
    log: ForwardLog,
    max_batch: usize,
    /// Forwards of more candidates than this fail as a GPU would when out of memory.
    fits: usize,
    /// Candidates of every forward tried, failed or not.
    tried: Arc<Mutex<Vec<usize>>>,
}

impl Generator for ScriptedGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            settings: serde_json::Value::Null,
            name: "scripted".into(),
            detail: "test".into(),
            max_batch: self.max_batch,
        }
    }
    fn prepare(&mut self, _edit: &EditContext) -> Result<PreparedEdit, GenerateError> {
        Ok(PreparedEdit {
            key: 1,
            image_tokens: 2048,
            latent_shape: vec![2],
            mu: DynamicShift::FLUX.mu(2048),
        })
    }
    fn velocity(
        &mut self,
        _edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError> {
        let rows: Vec<Vec<f32>> = latents.to_vec2()?;
        self.tried.lock().unwrap().push(rows.len());
        if rows.len() > self.fits {
            return Err(GenerateError::from_forward(candle_core::Error::Msg(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
            )));
        }
        let mut out = Vec::new();
        for r in &rows {
            self.log.lock().unwrap().push((r[0].round() as u32, sigma));
            // Marker stays; element 1 flows towards 5 (x0 = 5).
            out.push(vec![0.0, (r[1] - 5.0) / sigma as f32]);
        }
        Ok(Tensor::new(out, &Device::Cpu)?)
    }
    fn decode(
        &mut self,
        _edit: &PreparedEdit,
        latents: &Tensor,
        _purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError> {
        let v: Vec<f32> = latents.to_vec1()?;
        let marker = v[0].round() as u8;
        let value = (v[1] * 10.0).round().clamp(0.0, 255.0) as u8;
        Ok(RgbImage::from_pixel(16, 16, Rgb([marker, value, 0])))
    }
    fn release(&mut self, _edit: &PreparedEdit) {}
    fn limit_batch(&mut self, max_batch: usize) {
        self.max_batch = max_batch;
    }
}

/// Per-marker script: screen (pass, score) or failure; VIE overall (as SC = PQ) or failure.
#[derive(Default)]
struct ScriptedJudge {
    screen: HashMap<u8, Option<(bool, f32)>>,
    vie: HashMap<u8, Option<f32>>,
    /// Comparisons: marker -> strength; the stronger wins; `position_bias` always says First.
    strength: HashMap<u8, f32>,
    position_bias: bool,
    /// Screen by this quantile of each round, as a reward model does.
    quantile: Option<f32>,
    calls: Mutex<Vec<String>>,
}

fn marker(image: &RgbImage) -> u8 {
    image.get_pixel(0, 0)[0]
}

fn usage() -> CallUsage {
    CallUsage {
        prompt_tokens: 10,
        completion_tokens: 2,
        ..CallUsage::default()
    }
}

#[async_trait]
impl Judge for ScriptedJudge {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn screen_quantile(&self) -> Option<f32> {
        self.quantile
    }
    fn screen_score_kind(&self) -> ScoreKind {
        if self.quantile.is_some() {
            ScoreKind::Reward
        } else {
            ScoreKind::Vie
        }
    }
    async fn screen(
        &self,
        _edit: &EditContext,
        preview: &RgbImage,
        _stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        let m = marker(preview);
        self.calls.lock().unwrap().push(format!("screen {m}"));
        match self.screen.get(&m).copied().flatten() {
            Some((pass, score)) => Ok(ScreenVerdict {
                pass,
                score,
                reasoning: format!("scripted {m}"),
                usage: usage(),
            }),
            None => Err(JudgeError::parse("scripted failure", "???")),
        }
    }
    async fn compare(
        &self,
        _edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        let (a, b) = (marker(first), marker(second));
        self.calls.lock().unwrap().push(format!("compare {a} {b}"));
        let preferred = if self.position_bias || self.strength[&a] >= self.strength[&b] {
            Preference::First
        } else {
            Preference::Second
        };
        Ok(Comparison {
            preferred,
            p_first: None,
            reasoning: String::new(),
            usage: usage(),
        })
    }
    async fn semantic_consistency(
        &self,
        _edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.sub(edited)
    }
    async fn perceptual_quality(
        &self,
        _edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.sub(edited)
    }
}

impl ScriptedJudge {
    fn sub(&self, edited: &RgbImage) -> Result<SubScores, JudgeError> {
        let m = marker(edited);
        self.calls.lock().unwrap().push(format!("vie {m}"));
        match self.vie.get(&m).copied().flatten() {
            Some(o) => Ok(SubScores {
                scores: [o, 10.0],
                passes: Vec::new(),
                reasoning: String::new(),
                usage: usage(),
            }),
            None => Err(JudgeError::Failed("scripted VIE failure".into())),
        }
    }
}

fn edit() -> EditContext {
    EditContext {
        id: "e1".into(),
        source: Arc::new(RgbImage::new(16, 16)),
        instruction: "make it blue".into(),
        meta: BTreeMap::new(),
        original: None,
    }
}

/// A run's report, the forwards evaluated and the judge's calls.
type Run = (EditReport, Vec<(u32, f64)>, Vec<String>);

/// Runs `strategy` with candidates marked 0..n via given initial latents.
fn run(strategy: StrategyConfig, judge: ScriptedJudge, max_batch: usize) -> Run {
    run_fitting(strategy, judge, max_batch, usize::MAX).0
}

/// [`run`] on a generator whose forwards of more than `fits` candidates run out of memory;
/// also returns the candidates of every forward tried.
fn run_fitting(
    strategy: StrategyConfig,
    judge: ScriptedJudge,
    max_batch: usize,
    fits: usize,
) -> (Run, Vec<usize>) {
    let log: ForwardLog = Arc::default();
    let tried: Arc<Mutex<Vec<usize>>> = Arc::default();
    let generator = ScriptedGenerator {
        log: log.clone(),
        max_batch,
        fits,
        tried: tried.clone(),
    };
    let worker = Arc::new(GeneratorWorker::spawn(Box::new(generator)));
    let judge = Arc::new(judge);
    let engine = Engine::new(worker, judge.clone(), 3);
    let n = strategy.candidate_count();
    let init_latents = (0..n)
        .map(|i| Tensor::new(&[i as f32, 0.0], &Device::Cpu).unwrap())
        .collect();
    let job = EditJob {
        init_latents,
        ..EditJob::new(edit(), strategy)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(engine.run(job, Arc::new(Silent))).unwrap();
    let forwards = log.lock().unwrap().clone();
    let calls = judge.calls.lock().unwrap().clone();
    let tried = tried.lock().unwrap().clone();
    // Every forward of every strategy is counted once per candidate, full or cached (this
    // generator has no step cache: all full), and the edit's total is their sum.
    for c in &report.candidates {
        assert_eq!(
            (c.forwards.full, c.forwards.cached),
            (c.nfe, 0),
            "candidate {}",
            c.index
        );
    }
    assert_eq!(report.forwards.full, report.nfe.total);
    assert_eq!(report.forwards.full, forwards.len());
    ((report, forwards, calls), tried)
}

fn early_filter(seeds: usize, k: usize, keep: usize, steps: usize) -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::EarlyFilter,
        seeds,
        probe_steps: k,
        keep,
        steps,
        base_seed: 100,
        ..StrategyConfig::default()
    }
}

#[test]
fn a_judge_that_screens_by_quantile_passes_the_top_of_each_round_only() {
    let mut judge = ScriptedJudge {
        quantile: Some(0.75),
        ..ScriptedJudge::default()
    };
    // Rewards on their own scale; the judge's own pass flags are ignored. 7 answer: sorted
    // -2, -1, -0.3, 0.1, 0.9, 1.5, 2.0; the 0.75 quantile (nearest rank: the 6th) is 1.5.
    for (m, s) in [
        (0, Some((true, -1.0))),
        (1, Some((false, 2.0))),
        (2, Some((true, 0.1))),
        (3, None),
        (4, Some((false, 1.5))),
        (5, Some((true, -0.3))),
        (6, Some((true, -2.0))),
        (7, Some((true, 0.9))),
    ] {
        judge.screen.insert(m, s);
    }
    for m in 0..8 {
        judge.vie.insert(m, Some(5.0 + m as f32 / 10.0));
    }
    let (report, _, _) = run(early_filter(8, 2, 3, 6), judge, 8);
    let passed: Vec<usize> = report
        .candidates
        .iter()
        .filter(|c| matches!(&c.screens[0].verdict, Judged::Ok(v) if v.pass))
        .map(|c| c.index)
        .collect();
    assert_eq!(passed, vec![1, 4], "at or above 1.5 only");
    assert!(
        matches!(report.candidates[3].screens[0].verdict, Judged::Failed(_)),
        "a failure stays one"
    );
    let completed: Vec<usize> = report
        .candidates
        .iter()
        .filter(|c| c.status == CandidateStatus::Completed)
        .map(|c| c.index)
        .collect();
    assert_eq!(completed, vec![1, 4], "M = 3 but only two passed");
    assert_eq!(report.screen_scores, ScoreKind::Reward);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["screen_scores"], "reward");
}

#[test]
fn early_filter_keeps_only_passing_up_to_m_and_resumes_without_recomputation() {
    let mut judge = ScriptedJudge::default();
    // 6 candidates: 1, 3, 4 pass with scores 5, 9, 7; 2 fails screening; 5's judge errors.
    for (m, s) in [
        (0, Some((false, 8.0))),
        (1, Some((true, 5.0))),
        (2, Some((false, 1.0))),
        (3, Some((true, 9.0))),
        (4, Some((true, 7.0))),
        (5, None),
    ] {
        judge.screen.insert(m, s);
    }
    judge.vie.insert(3, Some(6.0));
    judge.vie.insert(4, Some(8.0));
    let steps = 10;
    let (report, forwards, _) = run(early_filter(6, 3, 2, steps), judge, 4);

    // Survivors: the two best passing (3 and 4), not 0 (higher score but failed).
    let completed: Vec<usize> = report
        .candidates
        .iter()
        .filter(|c| c.status == CandidateStatus::Completed)
        .map(|c| c.index)
        .collect();
    assert_eq!(completed, vec![3, 4]);
    // Best by VIE O: 4 (O = sqrt(8 * 8) = 8) over 3 (6).
    let pick = report.pick.as_ref().unwrap();
    assert_eq!((pick.index, pick.seed), (4, 104));
    assert!((pick.overall.unwrap() - 8.0).abs() < 1e-6);

    // Exact NFE: N*k + M*(steps-k), and it matches the forwards actually run.
    assert_eq!(report.nfe.probe, 6 * 3);
    assert_eq!(report.nfe.complete, 2 * (steps - 3));
    assert_eq!(report.nfe.total, 6 * 3 + 2 * 7);
    assert_eq!(forwards.len(), report.nfe.total);
    assert_eq!(report.strategy.planned_nfe(), report.nfe.total);

    // Survivors resumed from their saved state: each sigma of the schedule evaluated exactly
    // once per candidate; pruned candidates only at the probe sigmas.
    let schedule = Schedule::shifted(steps, DynamicShift::FLUX.mu(2048));
    for m in 0..6u32 {
        let sigmas: Vec<f64> = forwards.iter().filter(|f| f.0 == m).map(|f| f.1).collect();
        let expected_len = if m == 3 || m == 4 { steps } else { 3 };
        assert_eq!(
            sigmas,
            schedule.sigmas[..expected_len].to_vec(),
            "candidate {m}"
        );
        assert_eq!(report.candidates[m as usize].nfe, expected_len);
    }

    // The judge failure is recorded as a failure, never scored.
    match &report.candidates[5].screens[0].verdict {
        Judged::Failed(JudgeError::Parse { reason, .. }) => assert_eq!(reason, "scripted failure"),
        other => panic!("expected a recorded failure, got {other:?}"),
    }
    assert_eq!(report.candidates[5].status, CandidateStatus::Pruned);
    assert!(report.candidates[5].vie.is_none());
    // 6 screens + 2 x 2 VIE calls; one failure.
    assert_eq!(report.judge_totals.calls, 10);
    assert_eq!(report.judge_totals.failures, 1);
    assert_eq!(report.judge_totals.prompt_tokens, 9 * 10);
    assert!(report.notes.is_empty(), "{:?}", report.notes);
}

#[test]
fn early_filter_previews_show_where_each_seed_is_heading() {
    let mut judge = ScriptedJudge::default();
    for m in 0..3 {
        judge.screen.insert(m, Some((true, m as f32)));
        judge.vie.insert(m, Some(5.0));
    }
    let (report, _, _) = run(early_filter(3, 2, 3, 8), judge, 8);
    // x0 = x - sigma * v = 5 exactly for this velocity field: preview pixel G = 50.
    for c in &report.candidates {
        assert_eq!(c.images.previews[0].get_pixel(3, 3)[1], 50);
        assert_eq!(
            c.images.final_image.as_ref().unwrap().get_pixel(0, 0)[1],
            50
        );
    }
    // All tied at O = sqrt(5*10)... SC = min(5,10) = 5, PQ = 5: tie broken by screen score.
    assert_eq!(report.pick.as_ref().unwrap().index, 2);
    assert!(
        report.notes.iter().any(|n| n.contains("tied")),
        "{:?}",
        report.notes
    );
}

#[test]
fn early_filter_with_no_pass_keeps_best_scored_and_says_so() {
    let mut judge = ScriptedJudge::default();
    for (m, s) in [(0, 2.0), (1, 6.0), (2, 4.0)] {
        judge.screen.insert(m, Some((false, s)));
        judge.vie.insert(m, Some(5.0));
    }
    let (report, _, _) = run(early_filter(3, 2, 2, 6), judge, 8);
    let completed: Vec<usize> = report
        .candidates
        .iter()
        .filter(|c| c.status == CandidateStatus::Completed)
        .map(|c| c.index)
        .collect();
    assert_eq!(completed, vec![1, 2]);
    assert!(
        report.notes[0].contains("no preview passed"),
        "{:?}",
        report.notes
    );
}

#[test]
fn all_judge_failures_are_recorded_never_scored() {
    // Every call fails: screening falls back to seed order, VIE fails, pick has no score.
    let (report, forwards, _) = run(early_filter(4, 2, 2, 6), ScriptedJudge::default(), 8);
    assert_eq!(forwards.len(), 4 * 2 + 2 * 4);
    // 4 failed screenings + 2 failed VIE scores (each VIE score is two calls).
    assert_eq!(report.judge_totals.failures, 6);
    assert_eq!(report.judge_totals.calls, 4 + 2 * 2);
    for c in &report.candidates {
        assert!(c.screens.iter().all(|s| s.verdict.ok().is_none()));
        assert!(c.overall().is_none());
    }
    let pick = report.pick.as_ref().unwrap();
    assert_eq!(pick.index, 0);
    assert_eq!(pick.overall, None);
    assert!(report.notes.iter().any(|n| n.contains("screening failed")));
    assert!(report
        .notes
        .iter()
        .any(|n| n.contains("VIE scoring failed")));
}

#[test]
fn best_of_n_and_random_nfe_and_pick() {
    let mut judge = ScriptedJudge::default();
    for (m, o) in [(0, 3.0), (1, 9.0), (2, 4.0)] {
        judge.vie.insert(m, Some(o));
    }
    let bon = StrategyConfig {
        kind: StrategyKind::BestOfN,
        seeds: 3,
        steps: 5,
        ..StrategyConfig::default()
    };
    let (report, forwards, _) = run(bon, judge, 2);
    assert_eq!(report.nfe.total, 15);
    assert_eq!(forwards.len(), 15);
    assert_eq!(report.pick.as_ref().unwrap().index, 1);

    let mut judge = ScriptedJudge::default();
    judge.vie.insert(0, Some(7.0));
    let random = StrategyConfig {
        kind: StrategyKind::Random,
        seeds: 8,
        steps: 5,
        ..StrategyConfig::default()
    };
    let (report, forwards, _) = run(random, judge, 2);
    assert_eq!(report.candidates.len(), 1);
    assert_eq!((report.nfe.total, forwards.len()), (5, 5));
}

#[test]
fn tournament_cancels_position_bias_and_reruns_the_winner() {
    let mut judge = ScriptedJudge::default();
    for (m, s) in [(0, 1.0), (1, 5.0), (2, 3.0), (3, 9.0)] {
        judge.strength.insert(m, s);
        judge.vie.insert(m, Some(s));
    }
    let cfg = StrategyConfig {
        kind: StrategyKind::Tournament,
        seeds: 4,
        probe_steps: 3,
        steps: 10,
        ..StrategyConfig::default()
    };
    let (report, forwards, calls) = run(cfg.clone(), judge, 8);
    assert_eq!(report.pick.as_ref().unwrap().index, 3);
    assert_eq!(report.candidates[3].status, CandidateStatus::Champion);
    assert_eq!(report.nfe.total, 4 * 3 + 10);
    assert_eq!(forwards.len(), report.nfe.total);
    // The short runs use a 3-step schedule of their own, the re-run the full one.
    let short = Schedule::shifted(3, DynamicShift::FLUX.mu(2048));
    let full = Schedule::shifted(10, DynamicShift::FLUX.mu(2048));
    let s3: Vec<f64> = forwards.iter().filter(|f| f.0 == 3).map(|f| f.1).collect();
    assert_eq!(s3[..3], short.sigmas[..3]);
    assert_eq!(s3[3..], full.sigmas[..10]);
    // Each pair asked in both orders.
    assert_eq!(calls.iter().filter(|c| c.starts_with("compare")).count(), 6);
    assert_eq!(report.comparisons.len(), 3);

    // A judge that always prefers the first image: every pair splits 1-1, the champion stays.
    let mut biased = ScriptedJudge {
        position_bias: true,
        ..ScriptedJudge::default()
    };
    biased.vie.insert(0, Some(1.0));
    let (report, _, _) = run(cfg, biased, 8);
    assert_eq!(report.pick.as_ref().unwrap().index, 0);
    assert!(report
        .comparisons
        .iter()
        .all(|c| c.decision.contains("tie")));
}

#[test]
fn successive_halving_halves_until_m_remain() {
    let mut judge = ScriptedJudge::default();
    for m in 0..8u8 {
        judge.screen.insert(m, Some((m % 2 == 1, m as f32)));
        judge.vie.insert(m, Some(m as f32));
    }
    let cfg = StrategyConfig {
        kind: StrategyKind::SuccessiveHalving,
        seeds: 8,
        probe_steps: 2,
        keep: 2,
        steps: 10,
        ..StrategyConfig::default()
    };
    let (report, forwards, _) = run(cfg.clone(), judge, 3);
    // Round 1 (step 2): keep 4 -> passing 7,5,3,1. Round 2 (step 4): keep 2 -> 7,5.
    let completed: Vec<usize> = report
        .candidates
        .iter()
        .filter(|c| c.status == CandidateStatus::Completed)
        .map(|c| c.index)
        .collect();
    assert_eq!(completed, vec![5, 7]);
    assert_eq!(report.nfe.total, 8 * 2 + 4 * 2 + 2 * 6);
    assert_eq!(report.nfe.total, cfg.planned_nfe());
    assert_eq!(forwards.len(), report.nfe.total);
    assert_eq!(report.candidates[3].screens.len(), 2);
    assert_eq!(report.pick.as_ref().unwrap().index, 7);
}

/// An early-filter edit of three candidates (seeds 100-102) whose second fails its
/// screen: two finish, the third is picked.
fn three_candidate_report() -> EditReport {
    let mut judge = ScriptedJudge::default();
    for m in 0..3 {
        judge.screen.insert(m, Some((m != 1, 5.0 + m as f32)));
        judge.vie.insert(m, Some(4.0 + m as f32));
    }
    run(early_filter(3, 2, 2, 6), judge, 8).0
}

#[test]
fn outputs_are_written_with_report_and_contact_sheet() {
    let mut report = three_candidate_report();
    let dir = tempfile::tempdir().unwrap();
    let path = icedit_scale::engine::outputs::write_outputs(&mut report, dir.path()).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(json["pick"]["index"], 2);
    assert_eq!(json["nfe"]["total"], 3 * 2 + 2 * 4);
    assert_eq!(json["pick_file"], "final.png");
    for rel in [
        "final.png",
        "contact_sheet.png",
        "previews/c01_s000101_step02.png",
        "finals/c02_s000102.png",
    ] {
        assert!(dir.path().join(rel).exists(), "{rel} missing");
    }
    assert!(!dir.path().join("finals/c01_s000101.png").exists());
    let sheet = image::open(dir.path().join("contact_sheet.png")).unwrap();
    assert!(sheet.width() >= 3 * 192);
}

/// Images the server's relay already wrote (durably, from the same images) are left as
/// they are and still named in the report; the rest are written.
#[test]
fn outputs_written_while_the_edit_ran_are_not_written_again() {
    let mut report = three_candidate_report();
    let dir = tempfile::tempdir().unwrap();
    let relayed = "previews/c01_s000101_step02.png";
    std::fs::create_dir_all(dir.path().join("previews")).unwrap();
    std::fs::write(dir.path().join(relayed), b"written by the relay").unwrap();
    let written = std::collections::HashSet::from([relayed.to_string()]);
    icedit_scale::engine::outputs::write_outputs_except(&mut report, dir.path(), &written).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join(relayed)).unwrap(),
        b"written by the relay"
    );
    assert_eq!(
        report.candidates[1].screens[0].preview_file.as_deref(),
        Some(relayed)
    );
    image::open(dir.path().join("previews/c00_s000100_step02.png")).unwrap();
}

/// A judge whose replies cost tokens even when they cannot be used, and that measures how
/// many of its calls are in flight at once.
#[derive(Default)]
struct CostlyJudge {
    in_flight: std::sync::atomic::AtomicUsize,
    most_in_flight: std::sync::atomic::AtomicUsize,
}

impl CostlyJudge {
    /// Enters a call, lets every other ready task run, and leaves.
    async fn call(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.most_in_flight.fetch_max(now, SeqCst);
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.in_flight.fetch_sub(1, SeqCst);
    }
}

fn spent(prompt_tokens: u64, completion_tokens: u64) -> CallUsage {
    CallUsage {
        prompt_tokens,
        completion_tokens,
        ..CallUsage::default()
    }
}

#[async_trait]
impl Judge for CostlyJudge {
    fn name(&self) -> String {
        "costly".into()
    }
    async fn screen(
        &self,
        _edit: &EditContext,
        _preview: &RgbImage,
        _stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        self.call().await;
        Err(JudgeError::parse("no JSON", "blah").with_usage(spent(100, 7)))
    }
    async fn compare(
        &self,
        _edit: &EditContext,
        _first: &RgbImage,
        _second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        unreachable!("no comparisons in these tests")
    }
    async fn semantic_consistency(
        &self,
        _edit: &EditContext,
        _edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.call().await;
        Ok(SubScores {
            scores: [8.0, 9.0],
            passes: Vec::new(),
            reasoning: String::new(),
            usage: spent(10, 2),
        })
    }
    async fn perceptual_quality(
        &self,
        _edit: &EditContext,
        _edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.call().await;
        Err(JudgeError::parse("scores missing", "{}").with_usage(spent(20, 3)))
    }
}

fn run_costly(strategy: StrategyConfig, concurrency: usize) -> (EditReport, Arc<CostlyJudge>) {
    let generator = ScriptedGenerator {
        log: Arc::default(),
        max_batch: 4,
        fits: usize::MAX,
        tried: Arc::default(),
    };
    let judge = Arc::new(CostlyJudge::default());
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(generator))),
        judge.clone(),
        concurrency,
    );
    let n = strategy.candidate_count();
    let job = EditJob {
        init_latents: (0..n)
            .map(|i| Tensor::new(&[i as f32, 0.0], &Device::Cpu).unwrap())
            .collect(),
        ..EditJob::new(edit(), strategy)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(engine.run(job, Arc::new(Silent))).unwrap();
    (report, judge)
}

#[test]
fn every_reply_is_counted_whether_it_parsed_or_not() {
    let best_of_2 = StrategyConfig {
        kind: StrategyKind::BestOfN,
        seeds: 2,
        steps: 3,
        ..StrategyConfig::default()
    };
    let (report, _) = run_costly(best_of_2, 4);
    let totals = &report.judge_totals;
    // Two candidates, two VIE calls each; each score fails on its perceptual half, whose
    // unusable reply still cost tokens, as did the semantic half that answered.
    assert_eq!((totals.calls, totals.failures), (4, 2));
    assert_eq!(totals.prompt_tokens, 2 * (10 + 20));
    assert_eq!(totals.completion_tokens, 2 * (2 + 3));
    // Screening replies that fail to parse count too.
    let (report, _) = run_costly(early_filter(3, 1, 1, 3), 4);
    let totals = &report.judge_totals;
    assert_eq!(totals.calls, 3 + 2);
    assert_eq!(totals.prompt_tokens, 3 * 100 + (10 + 20));
    assert_eq!(totals.completion_tokens, 3 * 7 + (2 + 3));
}

#[test]
fn a_concurrency_of_one_holds_for_the_two_halves_of_a_vie_score() {
    let best_of_2 = StrategyConfig {
        kind: StrategyKind::BestOfN,
        seeds: 2,
        steps: 3,
        ..StrategyConfig::default()
    };
    let (_, judge) = run_costly(best_of_2.clone(), 1);
    assert_eq!(
        judge
            .most_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // With room for more, the calls do overlap (so the measure can see overlap).
    let (_, judge) = run_costly(best_of_2, 8);
    assert!(
        judge
            .most_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            > 1
    );
}

#[test]
fn an_unscored_best_of_n_pick_says_it_is_the_first_in_seed_order() {
    // Best-of-n screens nothing: its fallback is seed order, and the report says so
    // (it used to call the pick "the top-screened one").
    let best_of_3 = StrategyConfig {
        kind: StrategyKind::BestOfN,
        seeds: 3,
        steps: 4,
        ..StrategyConfig::default()
    };
    let (report, _, _) = run(best_of_3, ScriptedJudge::default(), 8);
    let pick = report.pick.as_ref().unwrap();
    assert_eq!((pick.index, pick.overall), (0, None));
    assert!(
        pick.reason.contains("first in seed order"),
        "{}",
        pick.reason
    );
    assert!(!pick.reason.contains("screened one"), "{}", pick.reason);
}

#[test]
fn out_of_memory_halves_the_batch_and_the_edit_finishes_with_the_same_nfe_and_pick() {
    let script = || {
        let mut judge = ScriptedJudge::default();
        for m in 0..8 {
            judge.screen.insert(m, Some((m % 2 == 0, m as f32)));
            judge.vie.insert(m, Some(m as f32));
        }
        judge
    };
    let strategy = early_filter(8, 3, 2, 10);
    let ((plain, plain_forwards, _), _) = run_fitting(strategy.clone(), script(), 8, usize::MAX);
    // Forwards of more than 3 candidates run out of memory: 8 -> 4 -> 2.
    let ((report, forwards, _), tried) = run_fitting(strategy, script(), 8, 3);
    assert_eq!(
        &tried[..4],
        &[8, 4, 2, 2],
        "halved twice, then the rest of the step"
    );
    assert!(tried.iter().all(|&b| b <= 2 || b == 8 || b == 4));
    assert_eq!(
        tried.iter().filter(|&&b| b > 3).count(),
        2,
        "the smaller batch is kept"
    );
    // The same work: every candidate evaluated once per step, same NFE, same pick.
    assert_eq!(report.nfe, plain.nfe);
    assert_eq!(forwards.len(), plain_forwards.len());
    let mut sorted = forwards.clone();
    let mut plain_sorted = plain_forwards.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    plain_sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(sorted, plain_sorted);
    assert_eq!(
        report.pick.as_ref().map(|p| p.index),
        plain.pick.as_ref().map(|p| p.index)
    );
    // The report says what happened.
    assert_eq!(report.notes.len(), 2, "{:?}", report.notes);
    assert!(report.notes[0].contains("out of device memory at a batch of 8"));
    assert!(report.notes[1].contains("batch of 4 candidates; retried at 2"));
    assert!(plain.notes.is_empty());
}

#[test]
fn out_of_memory_at_a_batch_of_one_is_an_error() {
    let log: ForwardLog = Arc::default();
    let generator = ScriptedGenerator {
        log,
        max_batch: 2,
        fits: 0,
        tried: Arc::default(),
    };
    let worker = Arc::new(GeneratorWorker::spawn(Box::new(generator)));
    let engine = Engine::new(worker, Arc::new(ScriptedJudge::default()), 3);
    let strategy = early_filter(2, 1, 1, 4);
    let job = EditJob::new(edit(), strategy);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(engine.run(job, Arc::new(Silent))).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("out of device memory"), "{text}");
    assert!(text.contains("batch of 1"), "{text}");
}

/// Adaptive over 12 candidates, waves of 4, k = 3, one completion per round, 10 steps.
fn adaptive(budget_nfe: Option<usize>) -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::Adaptive,
        seeds: 12,
        probe_steps: 3,
        keep: 1,
        steps: 10,
        wave: 4,
        target: 8.0,
        budget_nfe,
        ..StrategyConfig::default()
    }
}

/// Wave 1: 0 passes (9) and 1 passes (6); wave 2: 4 (5) and 5 (7) pass; wave 3: none.
/// VIE O: 0 -> 5, 5 -> 6, 1 -> 9 (the target is 8), others 7.
fn pooled_judge() -> ScriptedJudge {
    let mut judge = ScriptedJudge::default();
    for m in 0..12u8 {
        let screen = match m {
            0 => (true, 9.0),
            1 => (true, 6.0),
            4 => (true, 5.0),
            5 => (true, 7.0),
            _ => (false, 2.0),
        };
        judge.screen.insert(m, Some(screen));
        let o = match m {
            0 => 5.0,
            5 => 6.0,
            1 => 9.0,
            _ => 7.0,
        };
        judge.vie.insert(m, Some(o));
    }
    judge
}

fn completed_in_rounds(report: &EditReport) -> Vec<Vec<usize>> {
    let record = report.adaptive.as_ref().expect("adaptive record");
    record.rounds.iter().map(|r| r.completed.clone()).collect()
}

#[test]
fn adaptive_stops_at_the_target_in_the_first_wave() {
    let mut judge = ScriptedJudge::default();
    for m in 0..12u8 {
        judge.screen.insert(m, Some((m < 3, 10.0 - m as f32)));
        judge.vie.insert(m, Some(9.0));
    }
    let (report, forwards, _) = run(adaptive(None), judge, 4);
    let record = report.adaptive.as_ref().unwrap();
    assert_eq!(record.stop, StopReason::TargetReached, "{record:?}");
    assert!(record.stop_detail.contains("candidate 0"), "{record:?}");
    // One wave of 4 probed 3 steps, the best passing one completed: 4*3 + 7.
    assert_eq!(report.candidates.len(), 4);
    assert_eq!((report.nfe.probe, report.nfe.complete), (12, 7));
    assert_eq!(report.nfe.total, 19);
    assert_eq!(forwards.len(), report.nfe.total);
    assert_eq!(report.pick.as_ref().unwrap().index, 0);
    // The two other passing candidates wait in the pool; 3 did not pass.
    let status: Vec<CandidateStatus> = report.candidates.iter().map(|c| c.status).collect();
    use CandidateStatus::*;
    assert_eq!(status, vec![Completed, Pooled, Pooled, Pruned]);
    assert_eq!(report.nfe.best_of_n_equivalent, 4 * 10);
}

#[test]
fn adaptive_prefers_pooled_candidates_by_screen_score_and_never_probes_them_again() {
    let (report, forwards, calls) = run(adaptive(None), pooled_judge(), 4);
    // Round 1 completes 0 (screen 9; O 5 < 8). Round 2's best passing is 5 (7) over the
    // pooled 1 (6) and the new 4 (5); O 6. Round 3 passes nothing new, so the pooled 1
    // (screen 6) is completed and reaches O 9.
    assert_eq!(
        completed_in_rounds(&report),
        vec![vec![0], vec![5], vec![1]]
    );
    let record = report.adaptive.as_ref().unwrap();
    assert_eq!(record.rounds[2].from_pool, vec![1]);
    assert!(record.rounds[1].from_pool.is_empty());
    assert_eq!(record.stop, StopReason::TargetReached);
    assert_eq!(report.pick.as_ref().unwrap().index, 1);
    assert_eq!(report.candidates[4].status, CandidateStatus::Pooled);
    // Exact NFE: 3 waves of 4 probed 3 steps, 3 completions of 7.
    assert_eq!(report.nfe.total, 12 * 3 + 3 * 7);
    assert_eq!(forwards.len(), report.nfe.total);
    let per_round: Vec<usize> = record.rounds.iter().map(|r| r.nfe).collect();
    assert_eq!(per_round, vec![19, 19, 19]);
    // Every candidate evaluated each sigma of its path once: the pooled candidate resumed
    // at step 3 instead of probing again, and each was screened once.
    let schedule = Schedule::shifted(10, DynamicShift::FLUX.mu(2048));
    for m in 0..12u32 {
        let sigmas: Vec<f64> = forwards.iter().filter(|f| f.0 == m).map(|f| f.1).collect();
        let len = if [0, 1, 5].contains(&m) { 10 } else { 3 };
        assert_eq!(sigmas, schedule.sigmas[..len].to_vec(), "candidate {m}");
        assert_eq!(report.candidates[m as usize].nfe, len);
        assert_eq!(report.candidates[m as usize].screens.len(), 1);
        let screens = calls
            .iter()
            .filter(|c| **c == format!("screen {m}"))
            .count();
        assert_eq!(screens, 1, "candidate {m}");
    }
}

#[test]
fn adaptive_never_spends_more_than_its_budget() {
    for budget in [10, 19, 25, 38, 40, 57, 200] {
        let (report, forwards, _) = run(adaptive(Some(budget)), pooled_judge(), 4);
        assert!(
            report.nfe.total <= budget,
            "budget {budget}: {:?}",
            report.nfe
        );
        assert_eq!(forwards.len(), report.nfe.total, "budget {budget}");
        let record = report.adaptive.as_ref().unwrap();
        let spent: usize = record.rounds.iter().map(|r| r.nfe).sum();
        assert_eq!(spent, report.nfe.total);
        if budget < 57 {
            // 57 NFE is what reaching the target takes (see the pooled test).
            assert_eq!(record.stop, StopReason::BudgetExhausted, "budget {budget}");
            assert!(record.stop_detail.contains("NFE left"), "{record:?}");
        } else {
            assert_eq!(record.stop, StopReason::TargetReached, "budget {budget}");
        }
    }
    // 40: wave 4 (12) + 7, wave 4 (12) + 7 = 38; the 2 left pay for nothing.
    let (report, _, _) = run(adaptive(Some(40)), pooled_judge(), 4);
    assert_eq!(report.nfe.total, 38);
    assert_eq!(completed_in_rounds(&report), vec![vec![0], vec![5]]);
    // 10: one seed probed (3) and completed (7), the least adaptive can do.
    let (report, _, _) = run(adaptive(Some(10)), pooled_judge(), 4);
    assert_eq!((report.candidates.len(), report.nfe.total), (1, 10));
}

#[test]
fn adaptive_below_the_target_stops_when_the_seeds_are_spent() {
    let mut judge = pooled_judge();
    judge.vie.insert(1, Some(7.5));
    let (report, forwards, _) = run(adaptive(None), judge, 4);
    let record = report.adaptive.as_ref().unwrap();
    assert_eq!(record.stop, StopReason::SeedsExhausted, "{record:?}");
    assert!(record.stop_detail.contains("best VIE O 7.50"), "{record:?}");
    // One completion per wave; the pooled 4 is never completed.
    assert_eq!(
        completed_in_rounds(&report),
        vec![vec![0], vec![5], vec![1]]
    );
    assert_eq!(report.candidates[4].status, CandidateStatus::Pooled);
    // Its most: every wave probed and one completion per wave.
    assert_eq!(report.nfe.total, 12 * 3 + 3 * 7);
    assert_eq!(report.nfe.total, adaptive(None).planned_nfe());
    assert_eq!(forwards.len(), report.nfe.total);
    // The best by O among the completed: 1 (7.5).
    assert_eq!(report.pick.as_ref().unwrap().index, 1);
}

#[test]
fn adaptive_with_no_passing_preview_completes_the_best_scored_and_says_so() {
    let mut judge = ScriptedJudge::default();
    for m in 0..12u8 {
        judge.screen.insert(m, Some((false, m as f32 / 2.0)));
        judge.vie.insert(m, Some(3.0));
    }
    judge.screen.insert(7, None);
    let (report, forwards, _) = run(adaptive(None), judge, 4);
    assert_eq!(completed_in_rounds(&report).concat(), vec![11]);
    assert!(
        report.notes.iter().any(|n| n.contains("no preview passed")),
        "{:?}",
        report.notes
    );
    assert_eq!(
        report.adaptive.as_ref().unwrap().stop,
        StopReason::SeedsExhausted
    );
    assert_eq!(report.nfe.total, 12 * 3 + 7);
    assert_eq!(forwards.len(), report.nfe.total);
    // The failed screening stays a failure.
    assert!(matches!(
        report.candidates[7].screens[0].verdict,
        Judged::Failed(_)
    ));
}

/// Sets the edit's cancel signal when the final decodes and scores begin.
struct CancelAtScore(icedit_scale::stop::StopSignal);

impl icedit_scale::engine::Progress for CancelAtScore {
    fn begin(&self, phase: &str, _: u64) {
        if phase == "score" {
            self.0.stop();
        }
    }
    fn inc(&self, _: u64) {}
    fn end(&self) {}
}

/// A cancel stops the final decodes queued on the generator, not only the denoising steps
/// (a best-of-32 queued 32 decodes that all ran after a cancel or the server's shutdown
/// deadline), and the edit ends cancelled rather than done.
#[test]
fn a_cancel_during_the_final_decodes_ends_the_edit_cancelled() {
    let generator = ScriptedGenerator {
        log: Arc::default(),
        max_batch: 8,
        fits: usize::MAX,
        tried: Arc::default(),
    };
    let worker = Arc::new(GeneratorWorker::spawn(Box::new(generator)));
    let judge = Arc::new(ScriptedJudge::default());
    let engine = Engine::new(worker, judge.clone(), 3);
    let strategy = StrategyConfig {
        kind: StrategyKind::BestOfN,
        seeds: 4,
        steps: 4,
        ..StrategyConfig::default()
    };
    let job = EditJob::new(edit(), strategy);
    let progress = Arc::new(CancelAtScore(job.cancel.clone()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(engine.run(job, progress));
    assert!(
        matches!(result, Err(icedit_scale::error::EngineError::Cancelled)),
        "{:?}",
        result.map(|r| r.nfe.total)
    );
    // No decode ran, so nothing was scored.
    assert!(judge.calls.lock().unwrap().is_empty());
}
