//! A request to stop long work early (Ctrl-C), shared by every driver: `batch`, `eval` and
//! the server to come. Work checks it at its own safe points (between items, between
//! (item, arm) pairs), so whatever finished is saved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A cloneable stop flag: no new unit of work starts once it is set; work in flight
/// finishes and is saved.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// Asks the work to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sets this signal on the first Ctrl-C (printing `message` to stderr); a second Ctrl-C
    /// exits at once with status 130. Needs a tokio runtime.
    pub fn stop_on_ctrl_c(&self, message: &'static str) {
        let stop = self.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("{message} (Ctrl-C again to abort)");
                stop.stop();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
}
