//! `icedit-scale study`: how the strategies do on the testbed, where the truth is known.
//!
//! Per edit it runs best-of-N, early-filter and adaptive through the real engine with the
//! same seeds.
//! Random seeding is best-of-N's candidate 0 (same seed, same schedule: the identical
//! trajectory and image), so it costs nothing extra. Early-filter's step-k previews of all
//! N seeds are compared with the finals best-of-N reached from the same seeds, which
//! measures how often the preview already identifies the final outcome. The same seeds are
//! also sampled directly on the generator, decoding the x0 preview after every one of the
//! first [`IDENTIFICATION_STEPS`] steps, so the preview reliability is known per probe step
//! (the calibration of the testbed's outcome contrast).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::edit::EditContext;
use crate::engine::report::EditReport;
use crate::engine::strategy::DEFAULT_ADAPTIVE_KEEP;
use crate::engine::{EditJob, Engine, Silent, StrategyConfig, StrategyKind};
use crate::error::{EngineError, GenerateError};
use crate::generate::schedule::Schedule;
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::generate::{advance_one_step, finish, preview, CandidateState, Generator};
use crate::judge::testbed::TestbedJudgeConfig;
use crate::models::testbed::{self, OutcomeLabel};

/// Parameters of a study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudyConfig {
    /// Number of testbed edits (scene seeds `first_scene..first_scene + edits`).
    pub edits: usize,
    /// First scene seed.
    pub first_scene: u64,
    /// Panel width.
    pub width: u32,
    /// Early-filter / best-of-N parameters (N, k, M, steps).
    pub strategy: StrategyConfig,
    /// Testbed difficulty.
    pub difficulty: f32,
    /// Testbed outcome contrast (how early the outcome is decided; 1 = as always).
    #[serde(default = "full_contrast")]
    pub contrast: f32,
    /// The judge's error model.
    pub judge: TestbedJudgeConfig,
}

fn full_contrast() -> f32 {
    1.0
}

/// Judge calls in flight in a study's engine.
pub const STUDY_JUDGE_CONCURRENCY: usize = 16;

impl StudyConfig {
    /// The testbed generator a study runs (its engine's, and the one that measures how
    /// early previews name the outcome).
    pub fn generator(&self) -> TestbedConfig {
        TestbedConfig {
            difficulty: self.difficulty,
            contrast: self.contrast,
            max_batch: 8,
        }
    }
}

/// Correct-outcome rate and cost of one strategy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StrategyResult {
    /// Strategy name.
    pub strategy: String,
    /// Edits whose returned image is the correct outcome: for the strategies that select,
    /// only picks the judge scored (an unscored pick is the engine's fallback, counted as a
    /// failure as `eval` counts it); random's one candidate needs no judge.
    pub correct: usize,
    /// Edits run.
    pub edits: usize,
    /// NFE per edit.
    pub nfe_per_edit: f64,
    /// Mean VIE O of the returned edit (scored edits only).
    pub mean_overall: f64,
    /// Edits whose returned edit could not be scored.
    pub unscored: usize,
    /// Of the unscored picks of a strategy that selects, those that show the correct
    /// outcome all the same (not counted in `correct`; always 0 for random).
    #[serde(default)]
    pub unscored_correct: usize,
}

impl StrategyResult {
    /// Fraction correct.
    pub fn rate(&self) -> f64 {
        self.correct as f64 / self.edits.max(1) as f64
    }
}

/// The study's findings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudyReport {
    /// What was run.
    pub config: StudyConfig,
    /// Candidates whose step-k preview is nearest the same outcome as their final.
    pub preview_agrees: usize,
    /// Candidates compared.
    pub previews: usize,
    /// Per probe step 1, 2, ...: how often the x0 preview after that step names the
    /// candidate's final outcome.
    #[serde(default)]
    pub identification: Vec<StepIdentification>,
    /// Per strategy: random, early-filter, best-of-N, adaptive (waves of the configured
    /// size, one completion each, up to the same N).
    pub strategies: Vec<StrategyResult>,
    /// Fraction of all seeds that landed on the correct outcome (the prior, measured).
    pub seed_correct_rate: f64,
}

/// Probe steps whose preview reliability `study` measures (at least up to k).
pub const IDENTIFICATION_STEPS: usize = 10;

/// How often previews after one probe step name the final outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepIdentification {
    /// Steps run before the preview.
    pub step: usize,
    /// Candidates whose preview is nearest the outcome their final is nearest.
    pub agrees: usize,
    /// Candidates compared.
    pub candidates: usize,
}

impl StepIdentification {
    /// Fraction identified.
    pub fn rate(&self) -> f64 {
        self.agrees as f64 / self.candidates.max(1) as f64
    }
}

/// Samples `seeds` of `edit` to the end of a `steps`-step schedule on `generator`, decoding
/// the x0 preview after each of the first `probe_steps` steps, and counts per step how often
/// the preview is nearest the same outcome as the final; returns the counts (one per step)
/// and each seed's final outcome.
pub fn preview_identification(
    generator: &mut TestbedGenerator,
    edit: &EditContext,
    outcomes: &[testbed::Outcome],
    seeds: &[u64],
    steps: usize,
    probe_steps: usize,
) -> Result<(Vec<usize>, Vec<OutcomeLabel>), GenerateError> {
    let prepared = generator.prepare(edit)?;
    let schedule = Schedule::shifted(steps, prepared.mu);
    let mut states = seeds
        .iter()
        .map(|&seed| CandidateState::from_seed(generator, &prepared, seed))
        .collect::<Result<Vec<_>, _>>()?;
    let mut labels: Vec<Vec<OutcomeLabel>> = vec![Vec::new(); seeds.len()];
    for _ in 0..probe_steps.min(steps) {
        advance_one_step(generator, &prepared, &schedule, &mut states)?;
        for (state, labels) in states.iter().zip(&mut labels) {
            let image = preview(generator, &prepared, &schedule, state)?;
            labels.push(testbed::classify(outcomes, &image));
        }
    }
    while states[0].step < steps {
        advance_one_step(generator, &prepared, &schedule, &mut states)?;
    }
    let mut agrees = vec![0; labels.first().map_or(0, Vec::len)];
    let mut finals = Vec::new();
    for (state, labels) in states.iter().zip(&labels) {
        let fin = testbed::classify(outcomes, &finish(generator, &prepared, &schedule, state)?);
        for (count, label) in agrees.iter_mut().zip(labels) {
            *count += (*label == fin) as usize;
        }
        finals.push(fin);
    }
    generator.release(&prepared);
    Ok((agrees, finals))
}

impl StudyReport {
    /// A markdown table of the findings.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "Testbed study: {} edits at {} px, N={} seeds, k={} probe steps, M={} kept, {} steps, difficulty {}, outcome contrast {}, judge noise {} / position bias {} / failure rate {}.\n\n",
            c.edits, c.width, c.strategy.seeds, c.strategy.probe_steps, c.strategy.keep,
            c.strategy.steps, c.difficulty, c.contrast, c.judge.noise, c.judge.position_bias, c.judge.failure_rate
        );
        s.push_str(&format!(
            "Step-{} previews identify the final outcome for {}/{} candidates ({:.1}%). Seeds landing on the correct outcome: {:.1}%.\n\n",
            c.strategy.probe_steps,
            self.preview_agrees,
            self.previews,
            100.0 * self.preview_agrees as f64 / self.previews.max(1) as f64,
            100.0 * self.seed_correct_rate
        ));
        if !self.identification.is_empty() {
            s.push_str("| probe step | previews naming the final outcome |\n|---|---|\n");
            for step in &self.identification {
                s.push_str(&format!(
                    "| {} | {}/{} ({:.1}%) |\n",
                    step.step,
                    step.agrees,
                    step.candidates,
                    100.0 * step.rate()
                ));
            }
            s.push('\n');
        }
        s.push_str("| strategy | correct outcome | NFE per edit | mean VIE O (testbed judge) | unscored picks (showing the correct outcome) |\n|---|---|---|---|---|\n");
        for r in &self.strategies {
            s.push_str(&format!(
                "| {} | {}/{} ({:.1}%) | {:.0} | {:.2} | {} ({}) |\n",
                r.strategy,
                r.correct,
                r.edits,
                100.0 * r.rate(),
                r.nfe_per_edit,
                r.mean_overall,
                r.unscored,
                r.unscored_correct
            ));
        }
        s
    }
}

/// The true outcome of the pick's finished image, if there is one.
pub fn pick_label(report: &EditReport, outcomes: &[testbed::Outcome]) -> Option<OutcomeLabel> {
    let image = report.picked()?.images.final_image.as_ref()?;
    Some(testbed::classify(outcomes, image))
}

/// The true outcome of every finished candidate of a testbed edit, as (index, label).
pub fn finished_labels(
    report: &EditReport,
    outcomes: &[testbed::Outcome],
) -> Vec<(usize, OutcomeLabel)> {
    report
        .candidates
        .iter()
        .filter_map(|c| {
            let image = c.images.final_image.as_ref()?;
            Some((c.index, testbed::classify(outcomes, image)))
        })
        .collect()
}

/// Counts one edit of a strategy whose pick `shows_correct`; `selects` when the strategy
/// picks by the judge's scores, so that an unscored pick is its fallback (a failure).
fn add(
    result: &mut StrategyResult,
    shows_correct: bool,
    selects: bool,
    nfe: usize,
    overall: Option<f32>,
) {
    let fallback = selects && overall.is_none();
    result.edits += 1;
    result.correct += (shows_correct && !fallback) as usize;
    result.unscored_correct += (shows_correct && fallback) as usize;
    result.nfe_per_edit += nfe as f64;
    match overall {
        Some(o) => result.mean_overall += o as f64,
        None => result.unscored += 1,
    }
}

/// Runs the study; `on_edit` is called after each edit (for progress).
pub async fn run_study(
    config: &StudyConfig,
    engine: &Engine,
    mut on_edit: impl FnMut(usize),
) -> Result<StudyReport, EngineError> {
    // Its own generator: the engine's lives on the worker thread.
    let mut probe_generator = TestbedGenerator::new(config.generator());
    let probe_steps = IDENTIFICATION_STEPS
        .max(config.strategy.probe_steps)
        .min(config.strategy.steps);
    let mut identification: Vec<StepIdentification> = (1..=probe_steps)
        .map(|step| StepIdentification {
            step,
            ..StepIdentification::default()
        })
        .collect();
    let names = ["random", "early-filter", "best-of-n", "adaptive"];
    let mut results: Vec<StrategyResult> = names
        .iter()
        .map(|n| StrategyResult {
            strategy: n.to_string(),
            ..StrategyResult::default()
        })
        .collect();
    let (mut agrees, mut previews, mut seeds_correct, mut seeds) = (0, 0, 0, 0);
    for i in 0..config.edits {
        let edit = testbed::make_edit(config.first_scene.wrapping_add(i as u64), config.width);
        let outcomes = testbed::outcome_set(&edit, config.difficulty)
            .map_err(|e| EngineError::Strategy(e.to_string()))?;
        let (agreeing, _) = preview_identification(
            &mut probe_generator,
            &edit,
            &outcomes,
            &config.strategy.candidate_seeds(),
            config.strategy.steps,
            probe_steps,
        )?;
        for (step, agrees) in identification.iter_mut().zip(agreeing) {
            step.agrees += agrees;
            step.candidates += config.strategy.candidate_count();
        }
        let run = |kind| {
            let mut strategy = StrategyConfig {
                kind,
                ..config.strategy.clone()
            };
            if kind == StrategyKind::Adaptive {
                // Waves of `wave` with one completion each, up to the same N.
                strategy.keep = DEFAULT_ADAPTIVE_KEEP;
                strategy.wave = strategy.wave.min(strategy.seeds);
            }
            let job = EditJob::new(edit.clone(), strategy);
            let engine = engine.clone();
            async move { engine.run(job, Arc::new(Silent)).await }
        };
        let best = run(StrategyKind::BestOfN).await?;
        let early = run(StrategyKind::EarlyFilter).await?;
        let adaptive = run(StrategyKind::Adaptive).await?;
        let finals: Vec<Option<OutcomeLabel>> = best
            .candidates
            .iter()
            .map(|c| {
                c.images
                    .final_image
                    .as_ref()
                    .map(|img| testbed::classify(&outcomes, img))
            })
            .collect();
        for (c, fin) in early.candidates.iter().zip(&finals) {
            if let (Some(preview), Some(fin)) = (c.images.previews.first(), fin) {
                previews += 1;
                agrees += (testbed::classify(&outcomes, preview) == *fin) as usize;
            }
            seeds += 1;
            seeds_correct += (*fin == Some(OutcomeLabel::Correct)) as usize;
        }
        let random = &best.candidates[0];
        add(
            &mut results[0],
            finals[0] == Some(OutcomeLabel::Correct),
            false,
            config.strategy.steps,
            random.overall(),
        );
        for (slot, report) in [(1, &early), (2, &best), (3, &adaptive)] {
            // A pick the judge scored none of is the engine's fallback, not the strategy's
            // choice: a failure, as `eval` counts it, whatever outcome it happens to show.
            add(
                &mut results[slot],
                pick_label(report, &outcomes) == Some(OutcomeLabel::Correct),
                true,
                report.nfe.total,
                report.pick.as_ref().and_then(|p| p.overall),
            );
        }
        on_edit(i + 1);
    }
    for r in &mut results {
        let scored = (r.edits - r.unscored).max(1) as f64;
        r.mean_overall /= scored;
        r.nfe_per_edit /= r.edits.max(1) as f64;
    }
    Ok(StudyReport {
        config: config.clone(),
        preview_agrees: agrees,
        previews,
        identification,
        strategies: results,
        seed_correct_rate: seeds_correct as f64 / seeds.max(1) as f64,
    })
}
