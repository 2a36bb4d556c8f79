//! The adaptive strategy: seeds in waves, a pool of passing candidates, a target that stops
//! the search, and an NFE cap.
//!
//! Round by round: a wave of `wave` new seeds is probed k steps and screened, when seeds are
//! left and the budget pays for the wave and one completion; then the `keep` best passing
//! candidates not yet completed, this wave's or pooled from earlier rounds, ranked by screen
//! score, are completed and VIE-scored. A pooled candidate keeps its step-k state, so it
//! resumes there and is never probed again. The search stops as soon as a completed
//! candidate's O reaches the target; when every seed is spent and the pool is empty; or
//! when what is left of the budget pays for nothing more.

use std::cmp::Ordering;
use std::time::Instant;

use candle_core::Tensor;

use super::EditRun;
use crate::engine::events::EditEvent;
use crate::engine::report::{AdaptiveRecord, AdaptiveRound, CandidateStatus, Pick, StopReason};
use crate::error::EngineError;
use crate::generate::CandidateState;

/// A candidate probed and screened, waiting to be completed.
struct Probed {
    index: usize,
    state: CandidateState,
}

/// The size of the next wave: at most `wave` seeds, no more than are left, and only as
/// many as the `nfe_left` pays for while keeping room for one completion.
pub fn wave_size(
    seeds_left: usize,
    wave: usize,
    nfe_left: usize,
    probe_steps: usize,
    completion: usize,
) -> usize {
    let Some(for_probes) = nfe_left.checked_sub(completion) else {
        return 0;
    };
    wave.min(seeds_left).min(for_probes / probe_steps.max(1))
}

impl EditRun<'_> {
    /// Sorts best screen first (a failed screening last), then by candidate index.
    fn rank_by_screen(&self, probed: &mut [Probed]) {
        probed.sort_by(|a, b| {
            let score = |i: usize| self.candidates[i].last_screen_score();
            let (sa, sb) = (score(a.index), score(b.index));
            match (sa, sb) {
                (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            }
            .then(a.index.cmp(&b.index))
        });
    }

    /// Completes `chosen` (best first) and scores them, recording them on `round`.
    async fn complete_chosen(
        &mut self,
        chosen: Vec<Probed>,
        round: &mut AdaptiveRound,
    ) -> Result<(), EngineError> {
        if chosen.is_empty() {
            return Ok(());
        }
        let indices: Vec<usize> = chosen.iter().map(|p| p.index).collect();
        round.from_pool = indices
            .iter()
            .filter(|i| !round.probed.contains(i))
            .copied()
            .collect();
        let states: Vec<CandidateState> = chosen.into_iter().map(|p| p.state).collect();
        round.nfe += self.complete_and_score(&indices, states).await?;
        round.completed = indices;
        Ok(())
    }

    /// `adaptive`: see the module documentation.
    pub(super) async fn adaptive(
        &mut self,
        seeds: &[u64],
        init_latents: Vec<Tensor>,
    ) -> Result<Option<Pick>, EngineError> {
        super::check_init_latents(&init_latents, seeds)?;
        let s = &self.strategy;
        let (k, keep, wave, target) = (s.probe_steps, s.keep, s.wave, s.target);
        let completion = self.schedule.steps - k;
        let budget = s.budget_nfe.unwrap_or(usize::MAX);
        let mut given = init_latents.into_iter();
        // Passed screening, not completed yet / did not pass (a last resort only).
        let mut pool: Vec<Probed> = Vec::new();
        let mut rejected: Vec<Probed> = Vec::new();
        let mut rounds: Vec<AdaptiveRound> = Vec::new();
        let spent = |rounds: &[AdaptiveRound]| rounds.iter().map(|r| r.nfe).sum::<usize>();
        let stop = loop {
            let next = self.candidates.len();
            let left = budget - spent(&rounds);
            let size = wave_size(seeds.len() - next, wave, left, k, completion);
            if size == 0 {
                let reason = if next < seeds.len() {
                    StopReason::BudgetExhausted
                } else {
                    StopReason::SeedsExhausted
                };
                break (reason, String::new());
            }
            let mut round = AdaptiveRound {
                probed: (next..next + size).collect(),
                nfe: size * k,
                ..AdaptiveRound::default()
            };
            let init: Vec<Tensor> = given.by_ref().take(size).collect();
            let states = self.spawn(&seeds[next..next + size], init).await?;
            let t = Instant::now();
            let states = self
                .advance(
                    "probe",
                    self.schedule.clone(),
                    &round.probed,
                    states,
                    k,
                    false,
                )
                .await?;
            self.timings.probe_s += t.elapsed().as_secs_f64();
            self.nfe.probe += size * k;
            self.preview_and_screen(&round.probed, &states).await?;
            for (&index, state) in round.probed.iter().zip(states) {
                let passed = self.candidates[index]
                    .screens
                    .last()
                    .and_then(|s| s.verdict.ok())
                    .is_some_and(|v| v.pass);
                let probed = Probed { index, state };
                if passed {
                    pool.push(probed);
                } else {
                    rejected.push(probed);
                }
            }
            // The best passing candidates, pooled or new, as many as M and the budget allow
            // (the wave was sized to leave room for one).
            let affordable = (left - size * k) / completion;
            self.rank_by_screen(&mut pool);
            let chosen: Vec<Probed> = pool.drain(..keep.min(affordable).min(pool.len())).collect();
            // Pooled candidates wait (neither kept nor dropped); this wave's failures stop.
            self.progress.event(EditEvent::Selected {
                step: k,
                kept: chosen.iter().map(|p| p.index).collect(),
                dropped: rejected
                    .iter()
                    .map(|p| p.index)
                    .filter(|i| round.probed.contains(i))
                    .collect(),
            });
            self.complete_chosen(chosen, &mut round).await?;
            let reached = round
                .completed
                .iter()
                .filter_map(|&i| self.candidates[i].overall().map(|o| (i, o)))
                .filter(|&(_, o)| o >= target)
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
            rounds.push(round);
            if let Some((index, overall)) = reached {
                break (
                    StopReason::TargetReached,
                    format!(
                        "candidate {index} (seed {}) reached VIE O {overall:.2} >= target {target} in round {}",
                        self.candidates[index].seed,
                        rounds.len()
                    ),
                );
            }
        };
        let nothing_completed = rounds.iter().all(|r| r.completed.is_empty());
        let (stop, detail) = match stop {
            (StopReason::TargetReached, detail) => (StopReason::TargetReached, detail),
            (reason, _) => {
                if nothing_completed && !rejected.is_empty() {
                    // As early-filter does when nothing passes: complete the best-scored one
                    // (within the budget: every wave kept room for one completion).
                    self.rank_by_screen(&mut rejected);
                    let mut round = AdaptiveRound::default();
                    let best = rejected.remove(0);
                    self.progress.event(EditEvent::Selected {
                        step: k,
                        kept: vec![best.index],
                        dropped: Vec::new(),
                    });
                    self.complete_chosen(vec![best], &mut round).await?;
                    rounds.push(round);
                    self.notes.push(
                        "no preview passed screening in any wave; completed the best-scored candidate anyway".into(),
                    );
                }
                let best = rounds
                    .iter()
                    .flat_map(|r| &r.completed)
                    .filter_map(|&i| self.candidates[i].overall())
                    .max_by(f32::total_cmp)
                    .map_or("none scored".to_string(), |o| format!("best VIE O {o:.2}"));
                let detail = match reason {
                    StopReason::BudgetExhausted => format!(
                        "{} of {budget} NFE left pays for no wave with its completion ({k} + {completion}); {best} < target {target}",
                        budget - spent(&rounds)
                    ),
                    _ => format!(
                        "all {} seeds probed; {best} < target {target}",
                        seeds.len()
                    ),
                };
                (reason, detail)
            }
        };
        for p in &pool {
            self.candidates[p.index].status = CandidateStatus::Pooled;
        }
        let completed: Vec<usize> = rounds.iter().flat_map(|r| r.completed.clone()).collect();
        self.adaptive = Some(AdaptiveRecord {
            rounds,
            stop,
            stop_detail: detail,
        });
        Ok(self.pick(&completed))
    }
}
