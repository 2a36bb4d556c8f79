//! The generator worker: one thread that owns the model and runs blocking jobs in FIFO
//! order, so async code (judge calls, other edits) keeps going while the model computes.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::GenerateError;
use crate::generate::{Generator, GeneratorInfo};

type Job = Box<dyn FnOnce(&mut dyn Generator) + Send>;

/// Handle to the generator thread. Cheap to share behind an `Arc`.
pub struct GeneratorWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    info: GeneratorInfo,
    busy_nanos: Arc<AtomicU64>,
    started: Instant,
}

impl GeneratorWorker {
    /// Moves `generator` onto its own thread.
    pub fn spawn(generator: Box<dyn Generator>) -> Self {
        let info = generator.info();
        let (tx, rx) = mpsc::channel::<Job>();
        let busy_nanos = Arc::new(AtomicU64::new(0));
        let busy = busy_nanos.clone();
        let thread = std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || {
                let mut generator = generator;
                for job in rx {
                    let start = Instant::now();
                    // A panicking job drops its reply channel; the caller sees WorkerGone for
                    // that job and the worker keeps serving the others.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut *generator)));
                    busy.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
            })
            .expect("spawning the generator thread");
        Self {
            jobs: Some(tx),
            thread: Some(thread),
            info,
            busy_nanos,
            started: Instant::now(),
        }
    }

    /// The generator's description (taken once at spawn).
    pub fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    /// Runs `job` on the generator thread and awaits its result.
    pub async fn run<R, F>(&self, job: F) -> Result<R, GenerateError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Generator) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| GenerateError::WorkerGone("worker shut down".into()))?;
        jobs.send(Box::new(move |g: &mut dyn Generator| {
            let _ = tx.send(job(g));
        }))
        .map_err(|_| GenerateError::WorkerGone("worker thread has exited".into()))?;
        rx.await
            .map_err(|_| GenerateError::WorkerGone("a generator job panicked".into()))
    }

    /// Total time the thread has spent running jobs.
    pub fn busy_time(&self) -> Duration {
        Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed))
    }

    /// Time since the worker was spawned.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for GeneratorWorker {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after its current job.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
