//! Progress reporting per phase, and the events of an edit as they happen. The CLI shows
//! indicatif bars on a terminal and log lines elsewhere ([`Meter`]); batch runs and tests
//! stay silent; the server streams the events.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

/// Progress of one long task: an indicatif bar when stderr is a terminal; otherwise (a log
/// file, a Slurm or Kubernetes job, nohup) an info line when it starts, at each quarter with
/// the time left, and when it ends, so a log shows where a long run stands.
#[derive(Clone)]
pub struct Meter {
    bar: ProgressBar,
    /// Set when the log, not a bar, tells the progress.
    log: Option<Arc<MeterLog>>,
}

struct MeterLog {
    label: String,
    total: u64,
    started: Instant,
    tally: Mutex<Tally>,
}

/// Where a logged meter stands.
#[derive(Default)]
struct Tally {
    /// Units done.
    done: u64,
    /// Quarters of the total already logged.
    quarters: u64,
    /// Units done when it started counting (a resumed run's), for the time left.
    at_start: u64,
}

impl Meter {
    /// A meter of `total` units named `label`; `template` is the bar's indicatif template.
    pub fn new(label: &str, total: u64, template: &str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            return Self { bar, log: None };
        }
        tracing::info!("{label}: 0/{total}");
        Self {
            bar: ProgressBar::hidden(),
            log: Some(Arc::new(MeterLog {
                label: label.to_string(),
                total,
                started: Instant::now(),
                tally: Mutex::default(),
            })),
        }
    }

    /// A meter that shows nothing.
    pub fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
            log: None,
        }
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if let Some(log) = &self.log {
            log.advance(|done| done + n);
        }
    }

    /// `done` units done in all.
    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
        if let Some(log) = &self.log {
            log.advance(|_| done);
        }
    }

    /// Starts at `done` units already done (a resumed run): the time left is reckoned from
    /// the units done from here.
    pub fn resume_from(&self, done: u64) {
        self.bar.set_position(done);
        self.bar.reset_eta();
        if let Some(log) = &self.log {
            *log.tally.lock().unwrap() = Tally {
                done,
                quarters: done * 4 / log.total.max(1),
                at_start: done,
            };
        }
    }

    /// The task is over: the bar is cleared, the log says how long it took.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        self.log_end();
    }

    /// [`Meter::finish`] with the finished bar left on the terminal (one per phase).
    pub fn finish_shown(&self) {
        self.bar.finish();
        self.log_end();
    }

    fn log_end(&self) {
        if let Some(log) = &self.log {
            let done = log.tally.lock().unwrap().done;
            tracing::info!(
                "{}: {done}/{} in {:.1} s",
                log.label,
                log.total,
                log.started.elapsed().as_secs_f64()
            );
        }
    }
}

impl MeterLog {
    /// Moves the units done to `to(done)`, under one lock (a batch's tasks count on one
    /// meter at once), and logs a line when it passes a quarter of the total.
    fn advance(&self, to: impl FnOnce(u64) -> u64) {
        let mut tally = self.tally.lock().unwrap();
        tally.done = to(tally.done);
        let done = tally.done;
        let quarter = done * 4 / self.total.max(1);
        if quarter <= tally.quarters || quarter >= 4 {
            return;
        }
        tally.quarters = quarter;
        let elapsed = self.started.elapsed().as_secs_f64();
        let since = done.saturating_sub(tally.at_start).max(1) as f64;
        let left = elapsed / since * self.total.saturating_sub(done) as f64;
        tracing::info!(
            "{}",
            progress_line(&self.label, done, self.total, elapsed, left)
        );
    }
}

/// A progress log line: the units done with their share of the total (not the quarter
/// crossed: 4/12 is 33%), the time so far and the estimate left.
fn progress_line(label: &str, done: u64, total: u64, elapsed: f64, left: f64) -> String {
    format!(
        "{label}: {done}/{total} ({}%), {elapsed:.0} s so far, about {left:.0} s left",
        done * 100 / total.max(1)
    )
}

/// One progress [`Meter`] per phase of an edit (a bar on a terminal, log lines otherwise).
#[derive(Default)]
pub struct PhaseBars {
    current: Mutex<Option<Meter>>,
}

impl Progress for PhaseBars {
    fn begin(&self, phase: &str, total: u64) {
        let meter = Meter::new(
            phase,
            total,
            "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise}",
        );
        if let Some(old) = self.current.lock().unwrap().replace(meter) {
            old.finish_shown();
        }
    }

    fn inc(&self, n: u64) {
        if let Some(meter) = &*self.current.lock().unwrap() {
            meter.inc(n);
        }
    }

    fn end(&self) {
        if let Some(meter) = self.current.lock().unwrap().take() {
            meter.finish_shown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's tasks count on one meter at once: no unit is lost between reading the
    /// count and writing it back.
    #[test]
    fn units_counted_from_many_threads_are_all_counted() {
        let log = Arc::new(MeterLog {
            label: "batch".into(),
            total: 8000,
            started: Instant::now(),
            tally: Mutex::default(),
        });
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        log.advance(|done| done + 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let tally = log.tally.lock().unwrap();
        assert_eq!((tally.done, tally.quarters), (8000, 3));
    }

    /// The line gives the share done: 4 of 12 units is 33% (it printed the quarter
    /// crossed, 25%).
    #[test]
    fn a_progress_line_gives_the_share_done() {
        assert_eq!(
            progress_line("complete", 4, 12, 3.2, 6.4),
            "complete: 4/12 (33%), 3 s so far, about 6 s left"
        );
        assert_eq!(
            progress_line("refine", 2, 3, 0.0, 0.0).split(' ').nth(2),
            Some("(66%),")
        );
    }
}
