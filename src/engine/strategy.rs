//! Scaling strategies as plain data, with their exact NFE (model forward) accounting.
//!
//! One NFE is one transformer forward for one candidate at one step.

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// How candidates are spawned, pruned and completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// One seed, full schedule: the baseline.
    Random,
    /// N seeds, full schedule each, pick by VIE O.
    BestOfN,
    /// N seeds probed k steps, previews screened, up to M survivors completed, pick by VIE O.
    EarlyFilter,
    /// The paper's recipe: a short complete k-step run per seed, pairwise
    /// champion-vs-challenger comparisons, the winner re-run at full steps.
    Tournament,
    /// Probe k steps, keep the better half, probe k more, ... until M remain; complete them.
    SuccessiveHalving,
}

impl StrategyKind {
    /// The CLI / report name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::BestOfN => "best-of-n",
            Self::EarlyFilter => "early-filter",
            Self::Tournament => "tournament",
            Self::SuccessiveHalving => "successive-halving",
        }
    }
}

/// A strategy with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// Which strategy.
    pub kind: StrategyKind,
    /// N: number of seed candidates (ignored by `random`, which uses one).
    pub seeds: usize,
    /// k: probe steps (early-filter, successive-halving per round) or the short-run length
    /// (tournament).
    pub probe_steps: usize,
    /// M: survivors to complete (early-filter, successive-halving).
    pub keep: usize,
    /// Steps of the full schedule.
    pub steps: usize,
    /// Seed of candidate 0; candidate i uses `base_seed + i` unless `seed_list` is given.
    pub base_seed: u64,
    /// Explicit seeds, overriding `base_seed` (its length sets N).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_list: Option<Vec<u64>>,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            kind: StrategyKind::EarlyFilter,
            seeds: 8,
            probe_steps: 4,
            keep: 2,
            steps: 50,
            base_seed: 0,
            seed_list: None,
        }
    }
}

impl StrategyConfig {
    /// The seeds of the candidates, in candidate order.
    pub fn candidate_seeds(&self) -> Vec<u64> {
        if let Some(list) = &self.seed_list {
            return if self.kind == StrategyKind::Random {
                list.iter().take(1).copied().collect()
            } else {
                list.clone()
            };
        }
        let n = if self.kind == StrategyKind::Random {
            1
        } else {
            self.seeds
        };
        (0..n as u64).map(|i| self.base_seed + i).collect()
    }

    /// Number of candidates actually spawned.
    pub fn candidate_count(&self) -> usize {
        self.candidate_seeds().len()
    }

    /// Rejects parameter combinations that cannot run, naming the option.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Strategy(m));
        let n = self.candidate_count();
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if n == 0 {
            return bad("--seeds must be at least 1".into());
        }
        match self.kind {
            StrategyKind::Random | StrategyKind::BestOfN => Ok(()),
            StrategyKind::EarlyFilter | StrategyKind::SuccessiveHalving => {
                if self.probe_steps == 0 || self.probe_steps >= self.steps {
                    return bad(format!(
                        "--probe-steps {} must be between 1 and --steps - 1 ({})",
                        self.probe_steps,
                        self.steps - 1
                    ));
                }
                if self.keep == 0 || self.keep > n {
                    return bad(format!(
                        "--keep {} must be between 1 and the number of seeds ({n})",
                        self.keep
                    ));
                }
                Ok(())
            }
            StrategyKind::Tournament => {
                if self.probe_steps == 0 {
                    return bad("--probe-steps (the short-run length) must be at least 1".into());
                }
                Ok(())
            }
        }
    }

    /// The NFE this strategy spends when every screen passes as planned, i.e. with exactly
    /// `keep` survivors. Early-filter: `N*k + M*(steps-k)`; tournament: `N*k + steps`;
    /// best-of-N: `N*steps`; random: `steps`; successive halving: the sum over its rounds.
    pub fn planned_nfe(&self) -> usize {
        let n = self.candidate_count();
        let (k, m, steps) = (self.probe_steps, self.keep, self.steps);
        match self.kind {
            StrategyKind::Random => steps,
            StrategyKind::BestOfN => n * steps,
            StrategyKind::EarlyFilter => n * k + m * (steps - k),
            StrategyKind::Tournament => n * k + steps,
            StrategyKind::SuccessiveHalving => {
                let mut nfe = 0;
                let mut alive = n;
                let mut at = 0;
                for round in halving_rounds(n, m, k, steps) {
                    nfe += alive * (round.to_step - at);
                    at = round.to_step;
                    alive = round.keep;
                }
                nfe + alive * (steps - at)
            }
        }
    }
}

/// One screening round of successive halving: probe to `to_step`, then keep `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalvingRound {
    /// Step the survivors are advanced to before screening.
    pub to_step: usize,
    /// Candidates kept after screening.
    pub keep: usize,
}

/// The rounds of successive halving from `n` candidates down to `m`, probing `k` more steps
/// per round (never reaching the last step: the remainder is completion).
pub fn halving_rounds(n: usize, m: usize, k: usize, steps: usize) -> Vec<HalvingRound> {
    let mut rounds = Vec::new();
    let mut alive = n;
    let mut at = 0;
    while alive > m && at + k < steps {
        at += k;
        alive = m.max(alive.div_ceil(2));
        rounds.push(HalvingRound {
            to_step: at,
            keep: alive,
        });
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: StrategyKind) -> StrategyConfig {
        StrategyConfig {
            kind,
            ..StrategyConfig::default()
        }
    }

    #[test]
    fn nfe_formulas() {
        // N=8, k=4, M=2, steps=50.
        assert_eq!(cfg(StrategyKind::EarlyFilter).planned_nfe(), 8 * 4 + 2 * 46);
        assert_eq!(cfg(StrategyKind::BestOfN).planned_nfe(), 400);
        assert_eq!(cfg(StrategyKind::Random).planned_nfe(), 50);
        assert_eq!(cfg(StrategyKind::Tournament).planned_nfe(), 8 * 4 + 50);
        // Paper: 6 seeds, 10-step previews, 50-step winner = 110.
        let paper = StrategyConfig {
            kind: StrategyKind::Tournament,
            seeds: 6,
            probe_steps: 10,
            ..StrategyConfig::default()
        };
        assert_eq!(paper.planned_nfe(), 110);
        // Halving 8 -> 4 (step 4) -> 2 (step 8): 8*4 + 4*4 + 2*42.
        assert_eq!(
            halving_rounds(8, 2, 4, 50),
            vec![
                HalvingRound {
                    to_step: 4,
                    keep: 4
                },
                HalvingRound {
                    to_step: 8,
                    keep: 2
                }
            ]
        );
        assert_eq!(
            cfg(StrategyKind::SuccessiveHalving).planned_nfe(),
            8 * 4 + 4 * 4 + 2 * 42
        );
    }

    #[test]
    fn seeds_and_validation() {
        assert_eq!(cfg(StrategyKind::Random).candidate_seeds(), vec![0]);
        let mut c = cfg(StrategyKind::EarlyFilter);
        c.base_seed = 10;
        assert_eq!(c.candidate_seeds(), (10..18).collect::<Vec<_>>());
        c.seed_list = Some(vec![5, 9]);
        assert_eq!(c.candidate_count(), 2);
        assert!(c.validate().is_ok());
        c.keep = 3;
        assert!(c.validate().unwrap_err().to_string().contains("--keep"));
        let mut c = cfg(StrategyKind::EarlyFilter);
        c.probe_steps = 50;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--probe-steps"));
    }
}
