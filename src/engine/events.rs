//! What happens in one edit, as it happens: the stream a watcher (the server's live page)
//! follows. The report says the same things once the edit is over; events say them while
//! it runs, so a person can see candidates appear, get screened and pruned, and the pick.
//!
//! Events are delivered through [`super::Progress::event`], in the order they happen for
//! one edit. Images are shared (`Arc`), never copied.

use std::sync::Arc;

use image::RgbImage;

use super::report::{Judged, VieRecord};
use crate::judge::ScreenVerdict;

/// One thing that happened in an edit.
#[derive(Debug, Clone)]
pub enum EditEvent {
    /// Candidates were created: `(index, seed)` each, indices ascending. Adaptive spawns
    /// one wave at a time, so this comes once per wave.
    Spawned {
        /// `(candidate index, seed)`.
        candidates: Vec<(usize, u64)>,
    },
    /// One denoising step of a batch of candidates finished.
    Step {
        /// `probe`, `complete`, `generate`, `short` or `rerun`.
        phase: String,
        /// The candidates stepped together.
        candidates: Vec<usize>,
        /// The step they are at now (1-based: after `step` forwards of the schedule).
        step: usize,
        /// The step this phase runs them to.
        to_step: usize,
        /// Steps of the schedule they run on.
        steps: usize,
    },
    /// A per-step preview for watching (decoded for people, never judged); only when the
    /// job asked for live previews.
    LivePreview {
        /// Candidate index.
        candidate: usize,
        /// The step its latents are at.
        step: usize,
        /// The decoded x0 prediction.
        image: Arc<RgbImage>,
    },
    /// A preview was decoded and screened (the verdict, or the judge's failure).
    Screened {
        /// Candidate index.
        candidate: usize,
        /// The step of the preview.
        step: usize,
        /// The preview the judge saw.
        image: Arc<RgbImage>,
        /// The judge's verdict (a failure stays a failure).
        verdict: Judged<ScreenVerdict>,
    },
    /// Screened candidates were split into those that go on (to the next round or to
    /// completion) and those that stop here. Adaptive candidates that passed but wait in
    /// its pool are in neither list.
    Selected {
        /// The step the decision was made at.
        step: usize,
        /// Go on.
        kept: Vec<usize>,
        /// Pruned here.
        dropped: Vec<usize>,
    },
    /// A candidate ran its schedule and was decoded.
    Finished {
        /// Candidate index.
        candidate: usize,
        /// The finished image.
        image: Arc<RgbImage>,
    },
    /// A finished candidate's VIE score; `None` without a judge.
    Scored {
        /// Candidate index.
        candidate: usize,
        /// SC, PQ and O, or the judge's failure.
        vie: Option<Judged<VieRecord>>,
    },
    /// Tournament: a candidate's short k-step run, decoded (what the comparisons judge).
    ShortRun {
        /// Candidate index.
        candidate: usize,
        /// The short run's image.
        image: Arc<RgbImage>,
    },
    /// Tournament: one champion-versus-challenger comparison was decided.
    Compared {
        /// The champion before this comparison.
        champion: usize,
        /// The challenger.
        challenger: usize,
        /// Who won.
        winner: usize,
        /// Why, in words (the two orders' votes, a tie, a failed call).
        decision: String,
    },
}
