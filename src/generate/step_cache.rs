//! Step caching as the sampler and the engine see it: the rule ([`StepCache`], parsed
//! from `none`, `fbc:0.12`, `taylorseer:interval=4,order=1`), each candidate's cache
//! ([`CandidateCache`], carried by its [`super::CandidateState`]), what one row's forward
//! ran ([`RowWork`]) and a candidate's running count of them ([`ForwardTally`]).
//!
//! The rules themselves are model code ([`crate::models::step_cache`], re-exported here so
//! that the engine and the command line name them without reaching into `models`); what a
//! model caches is the model's (FLUX: [`crate::models::flux::step_cache`]). A generator
//! without step caching runs every row in full (the default
//! [`super::Generator::velocity_cached`]).

use serde::{Deserialize, Serialize};

pub use crate::models::step_cache::{
    CacheMemory, CandidateCache, FactorDtype, RowWork, StepCache, TaylorSeer,
};

/// A candidate's forwards so far: how many ran in full and how many were served (in part)
/// from its step cache, and the model FLOPs they ran against what full forwards would
/// have (both 0 for a generator that does not count FLOPs). One NFE in the report is one
/// forward of either kind; `cached` says how many of them were not full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardTally {
    /// Full forwards.
    pub full: usize,
    /// Forwards served from the step cache.
    pub cached: usize,
    /// Model FLOPs run.
    pub flops: u64,
    /// Model FLOPs full forwards would have run.
    pub full_flops: u64,
}

impl ForwardTally {
    /// Counts one row's forward.
    pub fn add(&mut self, work: &RowWork) {
        if work.cached {
            self.cached += 1;
        } else {
            self.full += 1;
        }
        self.flops += work.flops;
        self.full_flops += work.full_flops;
    }

    /// Forwards of either kind.
    pub fn forwards(&self) -> usize {
        self.full + self.cached
    }

    /// `self - earlier`: what was counted since `earlier` (a copy of this tally).
    pub fn since(&self, earlier: &ForwardTally) -> ForwardTally {
        ForwardTally {
            full: self.full - earlier.full,
            cached: self.cached - earlier.cached,
            flops: self.flops - earlier.flops,
            full_flops: self.full_flops - earlier.full_flops,
        }
    }

    /// The sum of two tallies.
    pub fn plus(&self, other: &ForwardTally) -> ForwardTally {
        ForwardTally {
            full: self.full + other.full,
            cached: self.cached + other.cached,
            flops: self.flops + other.flops,
            full_flops: self.full_flops + other.full_flops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_rows_by_kind() {
        let mut t = ForwardTally::default();
        t.add(&RowWork::full(10));
        let before = t;
        t.add(&RowWork::cached(1, 10));
        t.add(&RowWork::full(10));
        assert_eq!(
            t,
            ForwardTally {
                full: 2,
                cached: 1,
                flops: 21,
                full_flops: 30
            }
        );
        assert_eq!(t.forwards(), 3);
        let since = t.since(&before);
        assert_eq!((since.full, since.cached, since.flops), (1, 1, 11));
        assert_eq!(before.plus(&since), t);
    }
}
