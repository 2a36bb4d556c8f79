//! Progress reporting per phase, and the events of an edit as they happen. The CLI shows
//! indicatif bars; batch runs and tests stay silent; the server streams the events.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use super::events::EditEvent;

/// Receives progress of the phases of one edit.
pub trait Progress: Send + Sync {
    /// A phase starts with `total` units of work (steps x candidates, previews, ...).
    fn begin(&self, phase: &str, total: u64);
    /// `n` units finished.
    fn inc(&self, n: u64);
    /// The current phase is over.
    fn end(&self);
    /// Something happened in the edit (see [`EditEvent`]); most receivers ignore it.
    /// Called from the generator thread as well as from async tasks: keep it cheap.
    fn event(&self, _event: EditEvent) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn inc(&self, _: u64) {}
    fn end(&self) {}
}

/// One terminal progress bar per phase (drawn on stderr; hidden when not a terminal).
#[derive(Default)]
pub struct PhaseBars {
    current: Mutex<Option<ProgressBar>>,
}

impl Progress for PhaseBars {
    fn begin(&self, phase: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(phase.to_string());
        if let Some(old) = self.current.lock().unwrap().replace(bar) {
            old.finish();
        }
    }

    fn inc(&self, n: u64) {
        if let Some(bar) = &*self.current.lock().unwrap() {
            bar.inc(n);
        }
    }

    fn end(&self) {
        if let Some(bar) = self.current.lock().unwrap().take() {
            bar.finish();
        }
    }
}
