//! Running one edit with a strategy: the orchestration over a [`GeneratorWorker`] and a
//! [`Judge`].
//!
//! Generator work is queued on the worker thread; judge calls run concurrently (bounded by
//! a semaphore), so a preview is screened while the next one decodes, and another edit's
//! probe can run while this edit waits for its judge.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use futures::future::join_all;
use image::RgbImage;
use tokio::sync::Semaphore;

use super::events::EditEvent;
use super::progress::Progress;
use super::report::*;
use super::selection::{pick_best, rank_for_halving, select_survivors, tournament_decision};
use super::strategy::{halving_rounds, StrategyConfig, StrategyKind};
use super::worker::GeneratorWorker;

mod adaptive;
use crate::edit::EditContext;
use crate::error::{EngineError, GenerateError};
use crate::generate::{
    self, CandidateCache, CandidateState, ForwardTally, GeneratorInfo, PreparedEdit, Schedule,
};
use crate::judge::{Judge, JudgeError, PreviewStage, ScoreKind, ScreenVerdict, ViePair};
use crate::stop::StopSignal;

/// One edit to run.
pub struct EditJob {
    /// The edit.
    pub edit: EditContext,
    /// The strategy and its parameters.
    pub strategy: StrategyConfig,
    /// Initial latents that replace the seeded noise of candidates `0..len` (reproduction).
    pub init_latents: Vec<Tensor>,
    /// Set to cancel the edit: the generator stops at the next step boundary and the run
    /// returns [`EngineError::Cancelled`].
    pub cancel: StopSignal,
    /// Decode a preview of every candidate at every step for watchers
    /// ([`EditEvent::LivePreview`], [`crate::generate::DecodePurpose::Live`]): costs a
    /// decode per candidate per step; judges never see these.
    pub live_previews: bool,
}

impl EditJob {
    /// A job with seeded noise, no live previews, and a cancel signal of its own.
    pub fn new(edit: EditContext, strategy: StrategyConfig) -> Self {
        Self {
            edit,
            strategy,
            init_latents: Vec::new(),
            cancel: StopSignal::default(),
            live_previews: false,
        }
    }
}

/// The engine: a generator worker and a judge with a concurrency limit. Without a judge it
/// runs `random` only (one candidate: nothing to choose), and leaves the pick unscored.
#[derive(Clone)]
pub struct Engine {
    worker: Arc<GeneratorWorker>,
    judge: Option<Arc<dyn Judge>>,
    judge_slots: Arc<Semaphore>,
}

impl Engine {
    /// An engine over `worker` and `judge`, with at most `judge_concurrency` judge calls in
    /// flight at once (shared by every edit run through this engine).
    pub fn new(
        worker: Arc<GeneratorWorker>,
        judge: Arc<dyn Judge>,
        judge_concurrency: usize,
    ) -> Self {
        Self {
            worker,
            judge: Some(judge),
            judge_slots: Arc::new(Semaphore::new(judge_concurrency.max(1))),
        }
    }

    /// An engine without a judge: it runs `random` only, its pick unscored.
    pub fn without_judge(worker: Arc<GeneratorWorker>) -> Self {
        Self {
            worker,
            judge: None,
            judge_slots: Arc::new(Semaphore::new(1)),
        }
    }

    /// The generator worker.
    pub fn worker(&self) -> &Arc<GeneratorWorker> {
        &self.worker
    }

    /// The judge, if there is one.
    pub fn judge(&self) -> Option<&Arc<dyn Judge>> {
        self.judge.as_ref()
    }

    /// The judge of a strategy that needs one (checked when the run starts).
    fn judge_for_strategy(&self) -> &Arc<dyn Judge> {
        self.judge
            .as_ref()
            .expect("Engine::run refuses strategies that need a judge when there is none")
    }

    /// Runs one edit to completion and returns its report (images included in memory).
    ///
    /// Judge failures never abort the edit: they are recorded and the strategy falls back
    /// as documented in the report's notes. Generator failures abort it.
    pub async fn run(
        &self,
        job: EditJob,
        progress: Arc<dyn Progress>,
    ) -> Result<EditReport, EngineError> {
        job.strategy.validate()?;
        if self.judge.is_none() && job.strategy.kind != StrategyKind::Random {
            return Err(EngineError::Strategy(format!(
                "{} needs a judge to choose among candidates; without one (--judge none) only random runs",
                job.strategy.kind.name()
            )));
        }
        if let Some(width) = job.strategy.refine {
            // Refused before the search, not after it (a refine no wider than the edit, a
            // portrait panel whose refine would pass the height limit).
            crate::edit::refine::refine_size(job.edit.panel_size(), width)?;
        }
        if job.cancel.is_set() {
            return Err(EngineError::Cancelled);
        }
        let started = Instant::now();
        let edit = Arc::new(job.edit);
        let t = Instant::now();
        let e = edit.clone();
        // The description is read after `prepare`: a generator may load parts of itself then.
        let (prepared, generator) = self
            .worker
            .run(move |g| g.prepare(&e).map(|p| (p, g.info())))
            .await??;
        let schedule = prepared.schedule(job.strategy.steps);
        let mut session = EditRun {
            engine: self,
            generator,
            edit: edit.clone(),
            prepared: Arc::new(prepared),
            schedule: Arc::new(schedule),
            strategy: job.strategy.clone(),
            progress,
            cancel: job.cancel.clone(),
            live_previews: job.live_previews,
            candidates: Vec::new(),
            comparisons: Vec::new(),
            adaptive: None,
            refine: None,
            runner_up_refines: Vec::new(),
            refine_error: None,
            notes: Vec::new(),
            nfe: NfeLedger::default(),
            cached_phases: ForwardTally::default(),
            judge_totals: JudgeTotals::default(),
            timings: Timings {
                prepare_s: t.elapsed().as_secs_f64(),
                ..Timings::default()
            },
        };
        let seeds = job.strategy.candidate_seeds();
        let outcome = match job.strategy.kind {
            StrategyKind::Random | StrategyKind::BestOfN => {
                session.full_runs(&seeds, job.init_latents).await
            }
            StrategyKind::EarlyFilter => session.early_filter(&seeds, job.init_latents).await,
            StrategyKind::SuccessiveHalving => {
                session.successive_halving(&seeds, job.init_latents).await
            }
            StrategyKind::Tournament => session.tournament(&seeds, job.init_latents).await,
            StrategyKind::Adaptive => session.adaptive(&seeds, job.init_latents).await,
        };
        // Free the shared conditioning whatever happened.
        let p = session.prepared.clone();
        let _ = self.worker.run(move |g| g.release(&p)).await;
        let pick = outcome?;
        if let (Some(width), Some(pick)) = (session.strategy.refine, &pick) {
            // The search is finished: a refine that fails (out of memory at its size, say)
            // is recorded, and the edit is returned at its own size with every candidate.
            match session.refine(width, pick).await {
                Ok(()) => {}
                Err(EngineError::Cancelled) => return Err(EngineError::Cancelled),
                Err(e) => {
                    tracing::warn!("the refine failed; the edit is kept at its own size: {e}");
                    session.refine_error = Some(e.to_string());
                }
            }
        }
        session.note_step_cache();
        session.timings.total_s = started.elapsed().as_secs_f64();
        Ok(session.into_report(pick))
    }
}

/// The state of one edit while it runs.
struct EditRun<'a> {
    engine: &'a Engine,
    /// The generator's description once this edit was prepared.
    generator: GeneratorInfo,
    edit: Arc<EditContext>,
    prepared: Arc<PreparedEdit>,
    schedule: Arc<Schedule>,
    strategy: StrategyConfig,
    progress: Arc<dyn Progress>,
    cancel: StopSignal,
    live_previews: bool,
    candidates: Vec<CandidateRecord>,
    comparisons: Vec<ComparisonRecord>,
    adaptive: Option<AdaptiveRecord>,
    refine: Option<RefineRecord>,
    runner_up_refines: Vec<RefineRecord>,
    /// Why a refine asked for did not finish (the search's results are kept).
    refine_error: Option<String>,
    notes: Vec<String>,
    nfe: NfeLedger,
    /// The forwards of the phases that may use the step cache.
    cached_phases: ForwardTally,
    judge_totals: JudgeTotals,
    timings: Timings,
}

impl EditRun<'_> {
    /// Creates the candidate records and their initial states.
    async fn start(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Vec<CandidateState>, EngineError> {
        check_init_latents(&init_latents, seeds)?;
        self.spawn(seeds, init_latents).await
    }

    /// Adds one candidate per seed after those already spawned (candidate
    /// `first + j` gets `seeds[j]`, and `init_latents[j]` instead of its seeded noise when
    /// given) and creates their initial states.
    async fn spawn(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Vec<CandidateState>, EngineError> {
        let first = self.candidates.len();
        self.candidates
            .extend(seeds.iter().enumerate().map(|(j, &seed)| CandidateRecord {
                index: first + j,
                seed,
                given_latents: j < init_latents.len(),
                nfe: 0,
                status: CandidateStatus::Pruned,
                screens: Vec::new(),
                short_run_file: None,
                final_file: None,
                vie: None,
                forwards: ForwardCounts::default(),
                images: CandidateImages::default(),
            }));
        self.progress.event(EditEvent::Spawned {
            candidates: seeds
                .iter()
                .enumerate()
                .map(|(j, &seed)| (first + j, seed))
                .collect(),
        });
        let seeds = seeds.to_vec();
        let prepared = self.prepared.clone();
        let states = self
            .engine
            .worker
            .run(move |g| {
                seeds
                    .iter()
                    .enumerate()
                    .map(|(i, &seed)| match init_latents.get(i) {
                        Some(given) => CandidateState::from_given(g, &prepared, seed, given),
                        None => CandidateState::from_seed(g, &prepared, seed),
                    })
                    .collect::<Result<Vec<_>, GenerateError>>()
            })
            .await??;
        Ok(states)
    }

    /// Advances `states` (all at one step) to `to_step` of `schedule`, counting NFE on the
    /// candidates `indices` (parallel to `states`), each candidate's forwards by kind on its
    /// record. With `may_cache` (completions, which run to the last step) each state's step
    /// cache is switched on, fresh, when the strategy has one, and dropped at the end;
    /// otherwise the states advance with the caches they have (none: probes are exact).
    async fn advance(
        &mut self,
        phase: &str,
        schedule: Arc<Schedule>,
        indices: &[usize],
        mut states: Vec<CandidateState>,
        to_step: usize,
        may_cache: bool,
    ) -> Result<Vec<CandidateState>, EngineError> {
        let Some(from) = states.first().map(|s| s.step) else {
            return Ok(states);
        };
        let cache = self.strategy.cache;
        if may_cache && cache.is_on() {
            for state in states.iter_mut().filter(|s| !s.cache.is_on()) {
                state.cache = CandidateCache::new(cache);
            }
        }
        let tally = |states: &[CandidateState]| {
            states
                .iter()
                .fold(ForwardTally::default(), |t, s| t.plus(&s.forwards))
        };
        let before = tally(&states);
        let each_before: Vec<ForwardTally> = states.iter().map(|s| s.forwards).collect();
        self.check_cancel()?;
        let n = states.len();
        let forwards = n * to_step.saturating_sub(from);
        self.progress.begin(phase, forwards as u64);
        let prepared = self.prepared.clone();
        let progress = self.progress.clone();
        let (cancel, live) = (self.cancel.clone(), self.live_previews);
        let (phase_name, candidates) = (phase.to_string(), indices.to_vec());
        let (mut states, halvings) = self
            .engine
            .worker
            .run(move |g| {
                let mut states = states;
                let mut halvings = Vec::new();
                // One step at a time, so a cancel takes effect at the next step boundary.
                while states.first().is_some_and(|s| s.step < to_step) {
                    if cancel.is_set() {
                        return Err(EngineError::Cancelled);
                    }
                    halvings.extend(generate::advance_one_step(
                        g,
                        &prepared,
                        &schedule,
                        &mut states,
                    )?);
                    progress.inc(n as u64);
                    let step = states[0].step;
                    progress.event(EditEvent::Step {
                        phase: phase_name.clone(),
                        candidates: candidates.clone(),
                        step,
                        to_step,
                        steps: schedule.steps,
                    });
                    if live {
                        live_previews(g, &prepared, &schedule, &candidates, &states, &*progress);
                    }
                }
                Ok((states, halvings))
            })
            .await??;
        self.progress.end();
        self.notes
            .extend(halvings.iter().map(|h| format!("{phase}: {h}")));
        for ((&i, state), earlier) in indices.iter().zip(&states).zip(&each_before) {
            let candidate = &mut self.candidates[i];
            candidate.nfe += to_step - from;
            candidate.forwards.add(&state.forwards.since(earlier));
        }
        if may_cache {
            self.cached_phases = self.cached_phases.plus(&tally(&states).since(&before));
            // A completion ends at the last step: nothing will read the caches again.
            for state in &mut states {
                state.cache = CandidateCache::default();
            }
        }
        Ok(states)
    }

    /// The hi-res refines: the pick's, then (with `refine_best` above 1) the next best
    /// finished candidates', one after the other at batch 1. The diptych `[source | masked
    /// right half]` at the refine size is prepared once (same prompt, same model: it holds
    /// no candidate's image) and serves every refine. Every forward is counted in the
    /// ledger's refine entries, apart from the edit's NFE.
    async fn refine(&mut self, width: u32, pick: &Pick) -> Result<(), EngineError> {
        self.check_cancel()?;
        let started = Instant::now();
        let size = crate::edit::refine::refine_size(self.edit.panel_size(), width)?;
        let mut refine_edit = EditContext::new(
            self.edit.id.clone(),
            self.edit.source_at(size),
            self.edit.instruction.clone(),
        );
        refine_edit.meta = self.edit.meta.clone();
        refine_edit.original = self.edit.original.clone();
        // The source at the refine size, also what a blend takes back.
        let source = refine_edit.source.clone();
        let base_tokens = self.prepared.image_tokens;
        let (prepared, step_cost) = self
            .engine
            .worker
            .run(move |g| {
                let prepared = g.prepare(&refine_edit)?;
                let cost = g.relative_step_cost(prepared.image_tokens, base_tokens);
                Ok::<_, EngineError>((Arc::new(prepared), cost))
            })
            .await??;
        let prepare_s = started.elapsed().as_secs_f64();
        let outcome = self
            .refine_each(pick, &prepared, &source, step_cost, prepare_s)
            .await;
        let p = prepared.clone();
        let _ = self.engine.worker.run(move |g| g.release(&p)).await;
        outcome
    }

    /// The refines of [`Self::refine`] over the prepared diptych.
    async fn refine_each(
        &mut self,
        pick: &Pick,
        prepared: &Arc<PreparedEdit>,
        source: &Arc<RgbImage>,
        step_cost: f64,
        prepare_s: f64,
    ) -> Result<(), EngineError> {
        let mut record = self
            .refine_one(pick.index, prepared, source, step_cost)
            .await?;
        record.seconds += prepare_s;
        self.count_refine(&record);
        self.refine = Some(record);
        let more = super::selection::runner_ups(
            &self.candidates,
            pick.index,
            self.strategy.refine_best.saturating_sub(1),
        );
        if more.len() + 1 < self.strategy.refine_best {
            self.notes.push(format!(
                "refine_best {} asked for more refines than finished candidates: {} refined",
                self.strategy.refine_best,
                more.len() + 1
            ));
        }
        for index in more {
            let record = self.refine_one(index, prepared, source, step_cost).await?;
            self.count_refine(&record);
            self.runner_up_refines.push(record);
        }
        Ok(())
    }

    fn count_refine(&mut self, record: &RefineRecord) {
        self.nfe.refine += record.nfe;
        self.nfe.refine_edit_step_equivalents += record.edit_step_equivalents;
    }

    /// The hi-res refine of candidate `index` over the `prepared` diptych: its final image
    /// upscaled to the refine size (Lanczos), its latents noised to the sigma
    /// `refine_strength` starts at (seeded by the candidate's seed) and run to the end,
    /// decoded; with `refine_keep_unchanged` the `source` (at the refine size) is blended
    /// back where the edit changed nothing.
    async fn refine_one(
        &mut self,
        index: usize,
        prepared: &Arc<PreparedEdit>,
        source: &Arc<RgbImage>,
        step_cost: f64,
    ) -> Result<RefineRecord, EngineError> {
        self.check_cancel()?;
        let started = Instant::now();
        let candidate = &self.candidates[index];
        let seed = candidate.seed;
        let edited = candidate.images.final_image.clone().ok_or_else(|| {
            EngineError::Strategy(format!("candidate {index} has no final image to refine"))
        })?;
        let size = source.dimensions();
        let init = crate::edit::refine::upscale(&edited, size);
        let (strength, steps) = (self.strategy.refine_strength, self.schedule.steps);
        let progress = self.progress.clone();
        let cancel = self.cancel.clone();
        let p = prepared.clone();
        let (refined, start_step) = self
            .engine
            .worker
            .run(move |g| -> Result<(RgbImage, usize), EngineError> {
                let schedule = p.schedule(steps);
                let start_step = schedule
                    .start_for_strength(strength)
                    .map_err(EngineError::Strategy)?;
                let start = g.encode_start(&p, &init)?;
                let mut states = vec![CandidateState::from_image(
                    g, &p, &schedule, seed, &start, start_step,
                )?];
                progress.begin("refine", (steps - start_step) as u64);
                while states[0].step < steps {
                    if cancel.is_set() {
                        return Err(EngineError::Cancelled);
                    }
                    generate::advance_one_step(g, &p, &schedule, &mut states)?;
                    progress.inc(1);
                }
                progress.end();
                Ok((generate::finish(g, &p, &schedule, &states[0])?, start_step))
            })
            .await??;
        let mut image = refined;
        let mut kept_from_source = None;
        if self.strategy.refine_keep_unchanged {
            let mask = crate::edit::refine::change_mask(&self.edit.source, &edited, size);
            image = crate::edit::refine::blend_unchanged(&image, source, &mask);
            let kept = mask.pixels().filter(|m| m[0] == 0).count();
            kept_from_source = Some(kept as f32 / (size.0 * size.1) as f32);
        }
        let nfe = steps - start_step;
        Ok(RefineRecord {
            candidate: index,
            seed,
            size,
            strength: self.strategy.refine_strength,
            start_step,
            steps,
            image_tokens: prepared.image_tokens,
            nfe,
            step_cost,
            edit_step_equivalents: nfe as f64 * step_cost,
            keep_unchanged: self.strategy.refine_keep_unchanged,
            kept_from_source,
            in_budget: false,
            seconds: started.elapsed().as_secs_f64(),
            file: None,
            image: Some(Arc::new(image)),
        })
    }

    /// Notes what the step cache did, when the strategy has one.
    fn note_step_cache(&mut self) {
        let cache = self.strategy.cache;
        if !cache.is_on() {
            return;
        }
        let t = self.cached_phases;
        let flops = if t.full_flops > 0 {
            format!(
                ", {:.1}% of the transformer FLOPs of full forwards",
                100.0 * t.flops as f64 / t.full_flops as f64
            )
        } else {
            String::new()
        };
        self.notes.push(format!(
            "step cache {cache} in completions: {} full and {} cached forwards{flops}; each counts as one NFE, in `nfe` and against budgets",
            t.full, t.cached
        ));
    }

    /// Decodes each state's x0 preview and screens it; previews are screened as soon as
    /// they are decoded. Records everything on the candidates.
    async fn preview_and_screen(
        &mut self,
        indices: &[usize],
        states: &[CandidateState],
    ) -> Result<(), EngineError> {
        self.check_cancel()?;
        let t = Instant::now();
        self.progress.begin("screen", states.len() as u64);
        let stage = PreviewStage {
            step: states.first().map_or(0, |s| s.step),
            steps: self.schedule.steps,
        };
        let jobs = states.iter().map(|state| {
            let (state, prepared, schedule) =
                (state.clone(), self.prepared.clone(), self.schedule.clone());
            let (engine, edit, progress) = (self.engine, self.edit.clone(), self.progress.clone());
            async move {
                let image = engine
                    .worker
                    .run(move |g| generate::preview(g, &prepared, &schedule, &state))
                    .await??;
                let verdict = {
                    let _slot = engine.judge_slots.acquire().await.expect("semaphore open");
                    engine
                        .judge_for_strategy()
                        .screen(&edit, &image, stage)
                        .await
                };
                progress.inc(1);
                Ok::<_, EngineError>((Arc::new(image), verdict))
            }
        });
        let results = join_all(jobs).await;
        self.progress.end();
        let mut screened = Vec::with_capacity(results.len());
        for result in results {
            screened.push(result?);
        }
        if let Some(q) = self.engine.judge_for_strategy().screen_quantile() {
            pass_by_quantile(&mut screened, q);
        }
        for (&i, (image, verdict)) in indices.iter().zip(screened) {
            self.record_screen(i, stage.step, image, verdict);
        }
        self.timings.screen_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn record_screen(
        &mut self,
        index: usize,
        step: usize,
        image: Arc<RgbImage>,
        verdict: Result<ScreenVerdict, JudgeError>,
    ) {
        self.judge_totals
            .record(&verdict, verdict.as_ref().ok().map(|v| &v.usage));
        let verdict: Judged<ScreenVerdict> = verdict.into();
        self.progress.event(EditEvent::Screened {
            candidate: index,
            step,
            image: image.clone(),
            verdict: verdict.clone(),
        });
        let candidate = &mut self.candidates[index];
        candidate.images.previews.push(image);
        candidate.screens.push(ScreenRecord {
            step,
            preview_file: None,
            verdict,
        });
    }

    /// Fails with [`EngineError::Cancelled`] once the job's cancel signal is set.
    fn check_cancel(&self) -> Result<(), EngineError> {
        if self.cancel.is_set() {
            return Err(EngineError::Cancelled);
        }
        Ok(())
    }

    /// Tells watchers which of the candidates `screened` go on at `step` (`kept`) and which
    /// stop there (the rest).
    fn selected(&self, step: usize, screened: &[usize], kept: &[usize]) {
        self.progress.event(EditEvent::Selected {
            step,
            kept: kept.to_vec(),
            dropped: screened
                .iter()
                .copied()
                .filter(|i| !kept.contains(i))
                .collect(),
        });
    }

    /// Decodes finished states and VIE-scores them concurrently.
    async fn finish_and_score(
        &mut self,
        indices: &[usize],
        states: &[CandidateState],
    ) -> Result<(), EngineError> {
        self.check_cancel()?;
        let t = Instant::now();
        self.progress.begin("score", states.len() as u64);
        let jobs = states.iter().map(|state| {
            let (state, prepared, schedule) =
                (state.clone(), self.prepared.clone(), self.schedule.clone());
            let (engine, edit, progress) = (self.engine, self.edit.clone(), self.progress.clone());
            let cancel = self.cancel.clone();
            async move {
                let image = engine
                    .worker
                    .run(move |g| {
                        // Each decode is queued on the generator thread: a cancel must stop
                        // the ones not yet run (32 finals are 32 decodes), not only steps.
                        if cancel.is_set() {
                            return Err(EngineError::Cancelled);
                        }
                        Ok(generate::finish(g, &prepared, &schedule, &state)?)
                    })
                    .await??;
                let score = score_image(engine, &edit, &image).await;
                progress.inc(1);
                Ok::<_, EngineError>((Arc::new(image), score))
            }
        });
        let results = join_all(jobs).await;
        self.progress.end();
        // A cancel during the scoring calls ends the edit as cancelled too.
        self.check_cancel()?;
        for (&i, result) in indices.iter().zip(results) {
            let (image, score) = result?;
            self.record_score(i, image, score);
        }
        self.timings.score_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn record_score(&mut self, index: usize, image: Arc<RgbImage>, pair: Option<ViePair>) {
        self.progress.event(EditEvent::Finished {
            candidate: index,
            image: image.clone(),
        });
        let candidate = &mut self.candidates[index];
        candidate.status = CandidateStatus::Completed;
        candidate.images.final_image = Some(image);
        let Some(pair) = pair else {
            self.progress.event(EditEvent::Scored {
                candidate: index,
                vie: None,
            });
            return; // no judge: the finished image stays unscored
        };
        // A VIE score is two judge calls, each counted with what it cost (a failed half
        // too); a failed score counts as one failure.
        let score = pair.score();
        self.judge_totals.add_calls(pair.usages(), 2);
        if score.is_err() {
            self.judge_totals.failures += 1;
        }
        let vie: Judged<VieRecord> = score.map(VieRecord::from).into();
        self.progress.event(EditEvent::Scored {
            candidate: index,
            vie: Some(vie.clone()),
        });
        self.candidates[index].vie = Some(vie);
    }

    /// `random` and `best-of-n`: every candidate runs the full schedule and is scored.
    async fn full_runs(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Option<Pick>, EngineError> {
        let states = self.start(seeds, init_latents).await?;
        let all: Vec<usize> = (0..states.len()).collect();
        let t = Instant::now();
        let steps = self.schedule.steps;
        let states = self
            .advance("generate", self.schedule.clone(), &all, states, steps, true)
            .await?;
        self.timings.complete_s = t.elapsed().as_secs_f64();
        self.nfe.complete = states.len() * steps;
        self.finish_and_score(&all, &states).await?;
        Ok(self.pick(&all))
    }

    /// `early-filter`: probe, screen, keep up to M passing, complete, score, pick.
    async fn early_filter(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Option<Pick>, EngineError> {
        let k = self.strategy.probe_steps;
        let states = self.start(seeds, init_latents).await?;
        let all: Vec<usize> = (0..states.len()).collect();
        let t = Instant::now();
        let states = self
            .advance("probe", self.schedule.clone(), &all, states, k, false)
            .await?;
        self.timings.probe_s = t.elapsed().as_secs_f64();
        self.nfe.probe = states.len() * k;
        self.preview_and_screen(&all, &states).await?;

        let verdicts: Vec<Option<&ScreenVerdict>> = self
            .candidates
            .iter()
            .map(|c| c.screens.last().and_then(|s| s.verdict.ok()))
            .collect();
        let (survivors, note) = select_survivors(&verdicts, self.strategy.keep);
        self.notes.extend(note);
        self.selected(k, &all, &survivors);
        self.complete(survivors, states).await
    }

    /// `successive-halving`: probe k, keep the better half, probe k more, ... until M
    /// remain, then complete them.
    async fn successive_halving(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Option<Pick>, EngineError> {
        let mut states = self.start(seeds, init_latents).await?;
        let mut alive: Vec<usize> = (0..states.len()).collect();
        let rounds = halving_rounds(
            alive.len(),
            self.strategy.keep,
            self.strategy.probe_steps,
            self.schedule.steps,
        );
        for round in rounds {
            let t = Instant::now();
            let from = states[0].step;
            states = self
                .advance(
                    "probe",
                    self.schedule.clone(),
                    &alive,
                    states,
                    round.to_step,
                    false,
                )
                .await?;
            self.timings.probe_s += t.elapsed().as_secs_f64();
            self.nfe.probe += alive.len() * (round.to_step - from);
            self.preview_and_screen(&alive, &states).await?;
            let verdicts: Vec<Option<&ScreenVerdict>> = alive
                .iter()
                .map(|&i| {
                    self.candidates[i]
                        .screens
                        .last()
                        .and_then(|s| s.verdict.ok())
                })
                .collect();
            let (kept, note) = rank_for_halving(&verdicts, round.keep);
            if let Some(note) = note {
                self.notes.push(format!("step {}: {note}", round.to_step));
            }
            let next: Vec<usize> = kept.iter().map(|&j| alive[j]).collect();
            self.selected(round.to_step, &alive, &next);
            alive = next;
            states = kept.iter().map(|&j| states[j].clone()).collect();
        }
        // `complete` takes positions into `states`; here they are all of them.
        let positions: Vec<usize> = (0..alive.len()).collect();
        let (mapped_states, indices) = (states, alive);
        self.complete_positions(&indices, positions, mapped_states)
            .await
    }

    /// Completes the survivors (positions into `states`, which covers every candidate).
    async fn complete(
        &mut self,
        survivors: Vec<usize>,
        states: Vec<CandidateState>,
    ) -> Result<Option<Pick>, EngineError> {
        let indices = survivors.clone();
        self.complete_positions(&indices, survivors, states).await
    }

    /// Completes `states[positions[j]]`, which belongs to candidate `indices[j]`, from its
    /// saved step to the end, then scores and picks.
    async fn complete_positions(
        &mut self,
        indices: &[usize],
        positions: Vec<usize>,
        states: Vec<CandidateState>,
    ) -> Result<Option<Pick>, EngineError> {
        let survivors: Vec<CandidateState> = positions.iter().map(|&p| states[p].clone()).collect();
        drop(states);
        self.complete_and_score(indices, survivors).await?;
        Ok(self.pick(indices))
    }

    /// Advances `states` (candidates `indices`, all at one step) to the end of the schedule,
    /// counting the NFE and time as completion, then decodes and VIE-scores them; returns
    /// the NFE spent.
    async fn complete_and_score(
        &mut self,
        indices: &[usize],
        states: Vec<CandidateState>,
    ) -> Result<usize, EngineError> {
        let t = Instant::now();
        let steps = self.schedule.steps;
        let from = states.first().map_or(steps, |s| s.step);
        let states = self
            .advance(
                "complete",
                self.schedule.clone(),
                indices,
                states,
                steps,
                true,
            )
            .await?;
        self.timings.complete_s += t.elapsed().as_secs_f64();
        let nfe = states.len() * (steps - from);
        self.nfe.complete += nfe;
        self.finish_and_score(indices, &states).await?;
        Ok(nfe)
    }

    /// `tournament`: the paper's recipe.
    async fn tournament(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Option<Pick>, EngineError> {
        let k = self.strategy.probe_steps;
        let given = init_latents.clone();
        let states = self.start(seeds, init_latents).await?;
        let all: Vec<usize> = (0..states.len()).collect();
        // Short complete runs on a k-step schedule of their own.
        let short = Arc::new(self.prepared.schedule(k));
        let t = Instant::now();
        let states = self
            .advance("short", short.clone(), &all, states, k, false)
            .await?;
        self.nfe.probe = states.len() * k;
        let (prepared, cancel) = (self.prepared.clone(), self.cancel.clone());
        let images = self
            .engine
            .worker
            .run(move |g| {
                states
                    .iter()
                    .map(|s| {
                        // A cancel stops the decodes too, not only the steps.
                        if cancel.is_set() {
                            return Err(EngineError::Cancelled);
                        }
                        Ok(generate::finish(g, &prepared, &short, s)?)
                    })
                    .collect::<Result<Vec<_>, EngineError>>()
            })
            .await??;
        self.timings.probe_s = t.elapsed().as_secs_f64();
        let images: Vec<Arc<RgbImage>> = images.into_iter().map(Arc::new).collect();
        for (c, image) in self.candidates.iter_mut().zip(&images) {
            c.images.short_run = Some(image.clone());
            c.status = CandidateStatus::Eliminated;
            self.progress.event(EditEvent::ShortRun {
                candidate: c.index,
                image: image.clone(),
            });
        }

        // Champion vs challenger, each pair asked in both orders to cancel position bias.
        let t = Instant::now();
        self.progress
            .begin("compare", images.len().saturating_sub(1) as u64);
        let mut champion = 0;
        for challenger in 1..images.len() {
            let ask = |a: usize, b: usize| {
                let (engine, edit) = (self.engine, self.edit.clone());
                let (first, second) = (images[a].clone(), images[b].clone());
                async move {
                    let _slot = engine.judge_slots.acquire().await.expect("semaphore open");
                    engine
                        .judge_for_strategy()
                        .compare(&edit, &first, &second)
                        .await
                }
            };
            let (champion_first, challenger_first) =
                futures::join!(ask(champion, challenger), ask(challenger, champion));
            for r in [&champion_first, &challenger_first] {
                self.judge_totals
                    .record(r, r.as_ref().ok().map(|c| &c.usage));
            }
            let (champion_wins, decision) =
                tournament_decision(champion_first.as_ref().ok(), challenger_first.as_ref().ok());
            let winner = if champion_wins { champion } else { challenger };
            self.progress.event(EditEvent::Compared {
                champion,
                challenger,
                winner,
                decision: decision.clone(),
            });
            self.comparisons.push(ComparisonRecord {
                champion,
                challenger,
                champion_first: champion_first.into(),
                challenger_first: challenger_first.into(),
                winner,
                decision,
            });
            champion = winner;
            self.progress.inc(1);
        }
        self.progress.end();
        self.timings.screen_s = t.elapsed().as_secs_f64();
        let failed = self
            .comparisons
            .iter()
            .filter(|c| c.champion_first.ok().is_none() && c.challenger_first.ok().is_none())
            .count();
        if failed > 0 {
            self.notes.push(format!(
                "{failed} comparison(s) failed in both orders; the champion was kept"
            ));
        }

        // The winner is re-run from the same initial noise at full steps.
        let seed = seeds[champion];
        let prepared = self.prepared.clone();
        let given_latents = given.get(champion).cloned();
        let state = self
            .engine
            .worker
            .run(move |g| match given_latents {
                Some(l) => CandidateState::from_given(g, &prepared, seed, &l),
                None => CandidateState::from_seed(g, &prepared, seed),
            })
            .await??;
        let t = Instant::now();
        let steps = self.schedule.steps;
        let finished = self
            .advance(
                "rerun",
                self.schedule.clone(),
                &[champion],
                vec![state],
                steps,
                true,
            )
            .await?;
        self.timings.complete_s = t.elapsed().as_secs_f64();
        self.nfe.rerun = steps;
        self.finish_and_score(&[champion], &finished).await?;
        self.candidates[champion].status = CandidateStatus::Champion;
        Ok(Some(Pick {
            index: champion,
            seed,
            overall: self.candidates[champion].overall(),
            reason: "won the pairwise tournament of short runs; re-run at full steps".into(),
        }))
    }

    fn pick(&mut self, among: &[usize]) -> Option<Pick> {
        if self.engine.judge.is_none() {
            let &index = among.first()?;
            self.notes
                .push("no judge (--judge none): the edit is not scored".into());
            return Some(Pick {
                index,
                seed: self.candidates[index].seed,
                overall: None,
                reason: "the one candidate of a random run; unscored (no judge)".into(),
            });
        }
        let (pick, note) = pick_best(&self.candidates, among);
        self.notes.extend(note);
        pick
    }

    fn into_report(mut self, pick: Option<Pick>) -> EditReport {
        self.nfe.total = self.nfe.probe + self.nfe.complete + self.nfe.rerun;
        self.nfe.best_of_n_equivalent = self.candidates.len() * self.schedule.steps;
        self.nfe.random_equivalent = self.schedule.steps;
        let forwards = self
            .candidates
            .iter()
            .fold(ForwardCounts::default(), |t, c| t.plus(&c.forwards));
        EditReport {
            schema_version: REPORT_SCHEMA_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            edit_id: self.edit.id.clone(),
            instruction: self.edit.instruction.clone(),
            prompt: self.edit.prompt(),
            panel: self.edit.panel_size(),
            generator: format!("{} ({})", self.generator.name, self.generator.detail),
            generator_settings: self.generator.settings.clone(),
            judge: self
                .engine
                .judge
                .as_ref()
                .map_or_else(|| super::report::NO_JUDGE.to_string(), |j| j.name()),
            screen_scores: self
                .engine
                .judge
                .as_ref()
                .map_or(ScoreKind::Vie, |j| j.screen_score_kind()),
            strategy: self.strategy,
            schedule: ScheduleRecord {
                steps: self.schedule.steps,
                mu: self.schedule.mu,
                image_tokens: self.prepared.image_tokens,
                sigmas: self.schedule.sigmas.clone(),
            },
            candidates: self.candidates,
            comparisons: self.comparisons,
            adaptive: self.adaptive,
            pick,
            refine: self.refine,
            runner_up_refines: self.runner_up_refines,
            refine_error: self.refine_error,
            edit_file: None,
            pick_file: None,
            forwards,
            notes: self.notes,
            nfe: self.nfe,
            judge_totals: self.judge_totals,
            timings: self.timings,
        }
    }
}

/// Decodes a live preview of every state (for watchers) and hands each to `progress`. A
/// preview that fails to decode is skipped: watching must never fail the edit.
fn live_previews(
    g: &mut dyn crate::generate::Generator,
    prepared: &PreparedEdit,
    schedule: &Schedule,
    candidates: &[usize],
    states: &[CandidateState],
    progress: &dyn Progress,
) {
    for (&candidate, state) in candidates.iter().zip(states) {
        match generate::live_preview(g, prepared, schedule, state) {
            Ok(image) => progress.event(EditEvent::LivePreview {
                candidate,
                step: state.step,
                image: Arc::new(image),
            }),
            Err(e) => tracing::warn!("live preview of candidate {candidate}: {e}"),
        }
    }
}

/// Refuses more initial latents than candidates.
fn check_init_latents(init_latents: &[Tensor], seeds: &[u64]) -> Result<(), EngineError> {
    if init_latents.len() > seeds.len() {
        return Err(EngineError::Strategy(format!(
            "{} initial latents given for {} candidates",
            init_latents.len(),
            seeds.len()
        )));
    }
    Ok(())
}

/// VIE-scores one image: two judge calls, each holding its own judge slot, so the
/// concurrency limit bounds calls, not scores. `None` without a judge.
async fn score_image(engine: &Engine, edit: &EditContext, image: &RgbImage) -> Option<ViePair> {
    let judge = engine.judge.as_ref()?;
    let slot = || async { engine.judge_slots.acquire().await.expect("semaphore open") };
    let (semantic, perceptual) = futures::join!(
        async {
            let _slot = slot().await;
            judge.semantic_consistency(edit, image).await
        },
        async {
            let _slot = slot().await;
            judge.perceptual_quality(edit, image).await
        }
    );
    Some(ViePair {
        semantic,
        perceptual,
    })
}
/// A judge that screens by quantile (a reward model's scale has no absolute pass mark):
/// a preview passes when its score is at or above the `q` quantile (nearest rank) of the
/// scores of this round's previews. Failed screenings stay failures.
fn pass_by_quantile(screened: &mut [(Arc<RgbImage>, Result<ScreenVerdict, JudgeError>)], q: f32) {
    let mut scores: Vec<f32> = screened
        .iter()
        .filter_map(|(_, v)| v.as_ref().ok().map(|v| v.score))
        .collect();
    if scores.is_empty() {
        return;
    }
    scores.sort_by(f32::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * scores.len() as f32).ceil() as usize).max(1) - 1;
    let threshold = scores[rank.min(scores.len() - 1)];
    for (_, verdict) in screened.iter_mut() {
        if let Ok(v) = verdict {
            v.pass = v.score >= threshold;
            v.reasoning.push_str(&format!(
                " [passes at the {q} quantile of this round: {threshold:.4}]"
            ));
        }
    }
}
