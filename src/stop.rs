//! A request to stop long work early, shared by every driver: `batch`, `eval` and
//! `serve`. Work checks it at its own safe points (between items, between
//! (item, arm) pairs), so whatever finished is saved.
//!
//! Ctrl-C (SIGINT) and SIGTERM both ask for it: schedulers (Slurm, Kubernetes) send SIGTERM
//! first and SIGKILL after a grace period, so a batch must stop cleanly on SIGTERM. A second
//! signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A cloneable stop flag: no new unit of work starts once it is set; work in flight
/// finishes and is saved.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    set: AtomicBool,
    notify: Notify,
}

impl StopSignal {
    /// Asks the work to stop.
    pub fn stop(&self) {
        self.0.set.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::SeqCst)
    }

    /// Resolves once a stop is asked for (at once if it already was).
    pub async fn stopped(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// Sets this signal on the first Ctrl-C or SIGTERM (printing `message` to stderr); a
    /// second one exits at once with status 130. The handlers are in place when this
    /// returns. Needs a tokio runtime.
    pub fn stop_on_signals(&self, message: &'static str) -> std::io::Result<()> {
        let mut signals = Signals::install()?;
        tracing::debug!(target: "icedit_scale::stop", "Ctrl-C and SIGTERM now ask for a stop");
        let stop = self.clone();
        tokio::spawn(async move {
            signals.next().await;
            eprintln!("{message} (Ctrl-C again to abort)");
            stop.stop();
            signals.next().await;
            std::process::exit(130);
        });
        Ok(())
    }
}

/// Ctrl-C and SIGTERM, registered with the OS on creation (so none is missed between
/// installing and waiting).
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// The next Ctrl-C or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
