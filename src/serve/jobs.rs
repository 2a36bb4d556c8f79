//! Edits as jobs: the registry of every edit the server knows, the one bounded queue all
//! requests share, and the worker loops that take edits from it (one engine per device,
//! a few edits in flight on each so the generator works while judges think).
//!
//! An edit's life: `queued` (journaled, in the queue) -> `running` (a worker took it) ->
//! `done` | `failed` | `cancelled` (journaled as ended). Its events are kept in memory and
//! written to `events.jsonl` in its folder when it ends (read from there after a restart).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt as _;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::error::ApiError;
use super::events::{relay, EventSink, ServerEvent};
use super::journal::{Accepted, Ending, Journal, Record};
use super::metrics::{Metrics, WorkerLabel};
use super::request::{EditRequest, Limits};
use crate::edit::refine::refine_size;
use crate::edit::{
    check_decodes, load_image_bytes, panel_size, resize_to_panel, EditContext, ImageLimits,
};
use crate::engine::outputs::write_outputs_except;
use crate::engine::report::EditReport;
use crate::engine::{EditJob, Engine, StrategyConfig};
use crate::error::{EditError, EngineError, GenerateError};
use crate::fsio::{jsonl, write_atomic};
use crate::stop::StopSignal;

/// Where an edit is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// Finished; outputs on disk.
    Done,
    /// Failed (the error says why).
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl Status {
    /// Whether the edit is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    fn of(ending: Ending) -> Self {
        match ending {
            Ending::Done => Self::Done,
            Ending::Failed => Self::Failed,
            Ending::Cancelled => Self::Cancelled,
        }
    }
}

/// What changes while an edit lives.
struct JobState {
    status: Status,
    /// The events published in this process while the edit runs; once it ended they are
    /// in its `events.jsonl` and dropped from memory (`stored`), so a long-running server
    /// holds the streams of running edits only.
    events: Vec<ServerEvent>,
    /// The stream is complete in `events.jsonl` (read it from there).
    stored: bool,
    /// The next event's `seq`: events are numbered from `earlier_runs << 32` (see
    /// [`Accepted::earlier_runs`]), so ids keep growing across restarts.
    published: u64,
    error: Option<String>,
    /// The edit failed because of its own values, not the server's (see [`caused_by_request`]).
    failed_by_request: bool,
    worker: Option<String>,
    /// Its run is over and it is ending `done`: too late for a cancel, which is refused
    /// rather than answered "cancelling" for an edit that will not be cancelled.
    finishing: bool,
}

/// One edit the server knows.
pub struct Job {
    /// The edit id.
    pub id: String,
    /// Unix seconds of acceptance.
    pub created: u64,
    /// The checked request.
    pub request: EditRequest,
    /// The upload's file name in the edit's folder.
    pub source: String,
    /// Set by DELETE: the generator stops at its next step boundary.
    pub cancel: StopSignal,
    /// Set by the one [`JobRegistry::end`] that journals how it ended.
    ended: AtomicBool,
    state: Mutex<JobState>,
    /// Bumped whenever an event is published or the status changes.
    changed: watch::Sender<u64>,
}

impl Job {
    fn new(accepted: Accepted) -> Self {
        let first_seq = u64::from(accepted.earlier_runs) << 32;
        let (status, error) = match accepted.ended {
            Some((ending, error)) => (Status::of(ending), error),
            None => (Status::Queued, None),
        };
        Self {
            id: accepted.id,
            created: accepted.created,
            request: accepted.request,
            source: accepted.source,
            cancel: StopSignal::default(),
            ended: AtomicBool::new(status.is_final()),
            state: Mutex::new(JobState {
                status,
                events: Vec::new(),
                // An edit that ended before this process has its stream on disk only.
                stored: status.is_final(),
                published: first_seq,
                error,
                failed_by_request: false,
                worker: None,
                finishing: false,
            }),
            changed: watch::channel(0).0,
        }
    }

    /// The edit's status now.
    pub fn status(&self) -> Status {
        self.state.lock().unwrap().status
    }

    /// Why it failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.state.lock().unwrap().error.clone()
    }

    /// Whether it failed because of the request's own values (sending it again fails the
    /// same way), as told in this process.
    pub fn failed_by_request(&self) -> bool {
        self.state.lock().unwrap().failed_by_request
    }

    /// The worker that runs (or ran) it in this process.
    pub fn worker(&self) -> Option<String> {
        self.state.lock().unwrap().worker.clone()
    }

    /// Appends an event to the stream and wakes its watchers.
    fn publish(&self, kind: &str, data: Value) {
        let mut s = self.state.lock().unwrap();
        let event = ServerEvent {
            seq: s.published,
            kind: kind.to_string(),
            data,
        };
        s.published += 1;
        s.events.push(event);
        let n = s.published;
        drop(s);
        self.changed.send_replace(n);
    }

    fn set_status(&self, status: Status, error: Option<String>) {
        let mut s = self.state.lock().unwrap();
        s.status = status;
        if error.is_some() {
            s.error = error;
        }
        drop(s);
        self.changed.send_modify(|_| {});
    }

    /// Where the stream stands for a reader at `from`: events in memory from there, the
    /// end of the stream, or "read the rest from disk" ([`JobRegistry::events_on_disk`]).
    pub fn events_since(&self, from: u64) -> EventsNow {
        let s = self.state.lock().unwrap();
        if s.stored {
            return EventsNow::OnDisk;
        }
        let events: Vec<ServerEvent> = s.events.iter().filter(|e| e.seq >= from).cloned().collect();
        if events.is_empty() && s.events.last().is_some_and(ServerEvent::is_last) {
            return EventsNow::Over;
        }
        EventsNow::Events(events)
    }

    /// A receiver that changes whenever something is published.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves once the edit is over.
    pub async fn finished(&self) -> Status {
        let mut rx = self.watch();
        loop {
            let status = self.status();
            if status.is_final() {
                return status;
            }
            if rx.changed().await.is_err() {
                return self.status();
            }
        }
    }
}

/// What a stream reader gets now.
pub enum EventsNow {
    /// New events (none yet: wait for a change).
    Events(Vec<ServerEvent>),
    /// The reader has the whole stream.
    Over,
    /// The stream is stored in the edit's `events.jsonl`.
    OnDisk,
}

/// How an edit is made available to a worker.
struct Queue {
    waiting: VecDeque<Arc<Job>>,
    /// Places held by requests whose image is being checked (see [`Admission`]).
    reserved: usize,
}

/// A place in the queue, held by a request from before its image is decoded until it is
/// journaled and queued ([`JobRegistry::accept`]); given back if dropped unused.
pub struct Admission {
    registry: Arc<JobRegistry>,
    used: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.used {
            self.registry.queue.lock().unwrap().reserved -= 1;
        }
    }
}

/// A decode slot in use: counted in the `icedit_image_decodes` gauge while it lives.
struct DecodeSlot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl DecodeSlot {
    fn new(permit: OwnedSemaphorePermit, gauge: Gauge) -> Self {
        gauge.inc();
        Self {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for DecodeSlot {
    fn drop(&mut self) {
        // Before the permit goes (fields drop after this): whoever gets the slot next
        // reads the gauge without this decode.
        self.gauge.dec();
    }
}

/// Everything the handlers and workers share.
pub struct JobRegistry {
    out: PathBuf,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Ids in order of acceptance (the page's history).
    order: Mutex<Vec<String>>,
    queue: Mutex<Queue>,
    queued: Notify,
    journal: Mutex<Journal>,
    /// Uploads being decoded (at most `limits.max_decodes`).
    decodes: Arc<Semaphore>,
    /// Largest queue before 429.
    pub max_queue: usize,
    /// Per-request limits.
    pub limits: Limits,
    /// The strategy requests lay their fields over.
    pub defaults: StrategyConfig,
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: no new edits are taken or started.
    pub stop: StopSignal,
    /// Set at the shutdown deadline ([`Self::interrupt_running`]): an edit stopped now is
    /// interrupted (it runs again after the restart), not cancelled. Clients waiting on a
    /// running edit are answered when it is set.
    pub interrupted: StopSignal,
    /// Seconds per finished edit, a moving mean of the recent ones (for Retry-After), and
    /// how many finished.
    pace: Mutex<(f64, u64)>,
    workers: usize,
}

/// Unix seconds now.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh edit id: `ed_` and 16 hex digits (time and randomness, so ids from before a
/// restart never collide with new ones).
fn new_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("ed_{:016x}", nanos ^ rand::random::<u64>() >> 24)
}

impl JobRegistry {
    /// Opens `out`'s journal: edits that ended are known (served from disk), those that did
    /// not are queued again in the order they were accepted.
    pub fn open(
        out: &Path,
        max_queue: usize,
        limits: Limits,
        defaults: StrategyConfig,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(out.join("edits"))?;
        let (mut journal, accepted) = Journal::open(out)?;
        let mut jobs = HashMap::new();
        let mut order = Vec::new();
        let mut waiting = VecDeque::new();
        let mut resumed = 0;
        for a in accepted {
            let job = Arc::new(Job::new(a));
            if !job.status().is_final() {
                // Its stream starts again with where it waits, as a new edit's does.
                job.publish(
                    "queued",
                    json!({"position": waiting.len(), "resumed": true}),
                );
                waiting.push_back(job.clone());
                resumed += 1;
            }
            order.push(job.id.clone());
            jobs.insert(job.id.clone(), job);
        }
        if resumed > 0 {
            tracing::info!("{resumed} accepted edit(s) had not ended; they run again");
            journal.append(&Record::Resumed {})?;
        }
        metrics.queue_depth.set(waiting.len() as i64);
        Ok(Self {
            out: out.to_path_buf(),
            jobs: Mutex::new(jobs),
            order: Mutex::new(order),
            queue: Mutex::new(Queue {
                waiting,
                reserved: 0,
            }),
            queued: Notify::new(),
            journal: Mutex::new(journal),
            decodes: Arc::new(Semaphore::new(limits.max_decodes.max(1))),
            max_queue,
            limits,
            defaults,
            metrics,
            stop: StopSignal::default(),
            interrupted: StopSignal::default(),
            pace: Mutex::new((0.0, 0)),
            workers: workers.max(1),
        })
    }

    /// An edit's folder.
    pub fn edit_dir(&self, id: &str) -> PathBuf {
        self.out.join("edits").join(id)
    }

    /// The edit with this id.
    pub fn job(&self, id: &str) -> Result<Arc<Job>, ApiError> {
        self.jobs
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no edit with id {id:?}")))
    }

    /// Every edit, newest first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Job>> {
        let order = self.order.lock().unwrap();
        let jobs = self.jobs.lock().unwrap();
        order
            .iter()
            .rev()
            .take(limit)
            .filter_map(|id| jobs.get(id).cloned())
            .collect()
    }

    /// Edits waiting now.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().unwrap().waiting.len()
    }

    /// Seconds a refused client should wait: the time the queue ahead of it takes at the
    /// recent pace (1 s before any edit has finished) over the edits run at once, at
    /// least 1.
    fn retry_after(&self, depth: usize) -> u64 {
        let (mean, n) = *self.pace.lock().unwrap();
        let mean = if n == 0 { 1.0 } else { mean };
        ((mean * depth as f64 / self.workers as f64).ceil() as u64).max(1)
    }

    /// Holds a place in the queue for a request, before its image is decoded: refused (503)
    /// once the server stops and (429) when the queue, with the places already held, is
    /// full, so a refused request costs no decode.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, ApiError> {
        if self.stop.is_set() {
            return Err(ApiError::shutting_down());
        }
        let mut queue = self.queue.lock().unwrap();
        let depth = queue.waiting.len() + queue.reserved;
        if depth >= self.max_queue {
            return Err(ApiError::queue_full(depth, self.retry_after(depth)));
        }
        queue.reserved += 1;
        Ok(Admission {
            registry: self.clone(),
            used: false,
        })
    }

    /// Checks that `image` decodes, at most `limits.max_decodes` at once (a decode holds the
    /// image's pixels), on the blocking pool.
    pub async fn check_decodes(&self, image: Arc<Vec<u8>>) -> Result<(), ApiError> {
        let limits = image_limits(&self.limits);
        self.in_decode_slot(move || check_decodes(&image, "image", limits))
            .await?
            .map_err(|e| {
                let reason = match e {
                    EditError::Image { reason, .. } => reason,
                    other => other.to_string(),
                };
                ApiError::bad_field("image", format!("`image`: {reason}"))
            })
    }

    /// Runs `decode` on the blocking pool once a decode slot is free. The slot and the
    /// `icedit_image_decodes` gauge belong to the blocking task, not to the caller: a
    /// client that disconnects drops this future, but the decode runs on (a blocking
    /// task cannot be cancelled) and holds its pixels until it ends, so its slot must too.
    async fn in_decode_slot<T: Send + 'static>(
        &self,
        decode: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self
            .decodes
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let slot = DecodeSlot::new(permit, self.metrics.decodes.clone());
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            decode()
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Saves the upload and journals the edit, then queues it in the place `admission`
    /// held. The record is on disk before this returns: an accepted edit survives a crash.
    /// Blocking (two fsyncs).
    pub fn accept(
        &self,
        mut admission: Admission,
        request: EditRequest,
        image: &[u8],
        extension: &str,
    ) -> Result<Arc<Job>, ApiError> {
        if self.stop.is_set() {
            return Err(ApiError::shutting_down());
        }
        let id = new_id();
        let source = format!("source.{extension}");
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!("edit {id}: {what}: {e}");
            ApiError::internal(format!("cannot accept the edit: {what} failed ({e})"))
        };
        write_atomic(&self.edit_dir(&id).join(&source), image)
            .map_err(|e| internal("saving the upload", &e))?;
        let created = now();
        let accepted = Accepted {
            id: id.clone(),
            created,
            source: source.clone(),
            request: request.clone(),
            ended: None,
            earlier_runs: 0,
        };
        self.journal
            .lock()
            .unwrap()
            .append(&Record::Accepted {
                id: id.clone(),
                created,
                source,
                request: Box::new(request),
            })
            .map_err(|e| internal("writing the journal", &e))?;
        let job = Arc::new(Job::new(accepted));
        let mut queue = self.queue.lock().unwrap();
        admission.used = true;
        queue.reserved -= 1;
        job.publish("queued", json!({"position": queue.waiting.len()}));
        self.jobs.lock().unwrap().insert(id.clone(), job.clone());
        self.order.lock().unwrap().push(id);
        queue.waiting.push_back(job.clone());
        self.metrics.queue_depth.set(queue.waiting.len() as i64);
        self.metrics.count("accepted");
        drop(queue);
        self.queued.notify_one();
        Ok(job)
    }

    /// Cancels an edit: a queued one ends at once, a running one at its generator's next
    /// step boundary. Refused (409) when it is over.
    pub fn cancel(&self, id: &str) -> Result<Status, ApiError> {
        let job = self.job(id)?;
        let mut queue = self.queue.lock().unwrap();
        match job.status() {
            Status::Queued => {
                let before = queue.waiting.len();
                queue.waiting.retain(|j| j.id != id);
                if queue.waiting.len() == before {
                    // Still queued but no longer in the queue: another DELETE took it out
                    // and is ending it (a worker would have marked it running).
                    return Err(ApiError::conflict(format!(
                        "edit {id} is already being cancelled"
                    )));
                }
                self.metrics.queue_depth.set(queue.waiting.len() as i64);
                drop(queue);
                self.end(&job, Ending::Cancelled, None);
                Ok(Status::Cancelled)
            }
            Status::Running => {
                // Decided under the edit's state lock, which the worker holds when it
                // settles how a finished run ends: a 200 here is an edit that ends cancelled.
                let state = job.state.lock().unwrap();
                if state.status != Status::Running {
                    return Err(ApiError::conflict(format!("edit {id} is already over")));
                }
                if state.finishing {
                    return Err(ApiError::conflict(format!(
                        "edit {id} has finished its work and ends done"
                    )));
                }
                if job.cancel.is_set() {
                    return Err(ApiError::conflict(format!(
                        "edit {id} is already being cancelled"
                    )));
                }
                job.cancel.stop();
                Ok(Status::Running)
            }
            s => Err(ApiError::conflict(format!(
                "edit {id} is already {}",
                serde_json::to_value(s)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or("over")
            ))),
        }
    }

    /// The next queued edit, marked running; `None` once the server stops.
    async fn next(&self) -> Option<Arc<Job>> {
        loop {
            let notified = self.queued.notified();
            if self.stop.is_set() {
                return None;
            }
            {
                let mut queue = self.queue.lock().unwrap();
                if let Some(job) = queue.waiting.pop_front() {
                    self.metrics.queue_depth.set(queue.waiting.len() as i64);
                    job.set_status(Status::Running, None);
                    return Some(job);
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = self.stop.stopped() => return None,
            }
        }
    }

    /// Records how an edit ended: journal, status, last event, its events on disk,
    /// metrics. The journal record is the one that counts: an edit ends exactly once.
    fn end(&self, job: &Job, ending: Ending, error: Option<String>) {
        let data = match ending {
            Ending::Done => Value::Null,
            Ending::Failed => json!({"error": error}),
            Ending::Cancelled => json!({}),
        };
        self.end_with(job, ending, error, data)
    }

    /// [`Self::end`] with the terminal event's data. The status and the metrics change
    /// before the event is published, so a client that saw the event reads the ended status
    /// and counts.
    fn end_with(&self, job: &Job, ending: Ending, error: Option<String>, data: Value) {
        if job.ended.swap(true, Ordering::SeqCst) {
            tracing::error!(
                "edit {} ended twice; the second end ({ending:?}) is dropped",
                job.id
            );
            return;
        }
        let kind = match ending {
            Ending::Done => "done",
            Ending::Failed => "failed",
            Ending::Cancelled => "cancelled",
        };
        // The whole stream, its last event included, is on disk before the journal says
        // the edit ended: after a crash an ended edit's stream is whole (written
        // atomically: a kill mid-write leaves the old file or none, never a cut one). An
        // edit not yet ended in the journal runs again and rewrites it.
        let mut events: Vec<ServerEvent> = job.state.lock().unwrap().events.clone();
        let seq = events
            .last()
            .map_or(job.state.lock().unwrap().published, |e| e.seq + 1);
        events.push(ServerEvent {
            seq,
            kind: kind.to_string(),
            data: data.clone(),
        });
        let path = self.edit_dir(&job.id).join("events.jsonl");
        let stored = match jsonl::write(&path, &events) {
            Ok(()) => true,
            Err(e) => {
                // Kept in memory instead; a restart serves the stream's end from the
                // journal ([`Self::events_on_disk`]).
                tracing::warn!("{}: {e}", path.display());
                false
            }
        };
        let record = Record::Ended {
            id: job.id.clone(),
            ending,
            error: error.clone(),
        };
        if let Err(e) = self.journal.lock().unwrap().append(&record) {
            // The edit will run again after a restart; nothing is lost.
            tracing::error!("edit {}: journaling its end: {e}", job.id);
        }
        job.set_status(Status::of(ending), error);
        self.metrics.count(kind);
        job.publish(kind, data);
        if stored {
            let mut s = job.state.lock().unwrap();
            s.events = Vec::new();
            s.stored = true;
        }
    }

    /// Journals every running edit as interrupted (the server stops without waiting for
    /// them; the next start runs them again), stops their generators at their next step
    /// boundary, and returns how many. Their worker loops then end them as interrupted, not
    /// cancelled; call this before the loops are dropped (dropping a loop joins its
    /// generator thread, which would otherwise run the edit to its end first).
    pub fn interrupt_running(&self) -> usize {
        self.interrupted.stop();
        let running: Vec<Arc<Job>> = self
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| j.status() == Status::Running)
            .cloned()
            .collect();
        let mut journal = self.journal.lock().unwrap();
        for job in &running {
            let record = Record::Interrupted { id: job.id.clone() };
            if let Err(e) = journal.append(&record) {
                // Unended either way: it runs again after the restart.
                tracing::warn!("edit {}: journaling its interruption: {e}", job.id);
            }
            job.cancel.stop();
        }
        running.len()
    }

    /// The stored events of an edit that ended (read from its folder). A stream without
    /// its last event (lost or cut short on disk, as servers before the stream was written
    /// ahead of the journal's end could leave it) gets one made from how the journal says
    /// the edit ended, so every reader's stream ends.
    pub fn events_on_disk(&self, job: &Job) -> Vec<ServerEvent> {
        let mut events: Vec<ServerEvent> =
            jsonl::read(&self.edit_dir(&job.id).join("events.jsonl")).unwrap_or_default();
        if events.last().is_some_and(ServerEvent::is_last) {
            return events;
        }
        let (kind, data) = match job.status() {
            Status::Done => (
                "done",
                self.report(&job.id)
                    .map_or(Value::Null, |r| done_event(&job.id, &r)),
            ),
            Status::Failed => ("failed", json!({"error": job.error()})),
            Status::Cancelled => ("cancelled", json!({})),
            Status::Queued | Status::Running => return events,
        };
        let seq = events
            .last()
            .map_or(job.state.lock().unwrap().published, |e| e.seq + 1);
        events.push(ServerEvent {
            seq,
            kind: kind.to_string(),
            data,
        });
        events
    }

    /// The report of a finished edit, as written in its folder.
    pub fn report(&self, id: &str) -> Option<EditReport> {
        let text = std::fs::read(self.edit_dir(id).join("report.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Runs edits from the queue on `engine` until the server stops; returns when the
    /// edits it started are over.
    pub async fn work(self: Arc<Self>, name: String, engine: Engine) {
        while let Some(job) = self.next().await {
            let span = tracing::info_span!("edit", id = %job.id, worker = %name);
            self.run(&name, &engine, job).instrument(span).await;
        }
    }

    async fn run(&self, worker: &str, engine: &Engine, job: Arc<Job>) {
        job.state.lock().unwrap().worker = Some(worker.to_string());
        self.metrics.running.inc();
        let started = Instant::now();
        tracing::info!("started");
        job.publish("started", json!({"worker": worker}));
        let dir = self.edit_dir(&job.id);
        // A panic under the edit (a judge's parser, say) must end this edit, not the worker
        // loop: uncaught, its client would wait forever and the server lose a worker.
        let result = std::panic::AssertUnwindSafe(self.run_engine(engine, &job, &dir))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(EngineError::Internal(panic_message(&*panic))));
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.running.dec();
        let label = WorkerLabel {
            worker: worker.to_string(),
        };
        // A run that finished after a client's cancel was answered 200 ends cancelled, as
        // that client was told; one that finished first is marked so no cancel is accepted.
        let cancelled_late = result.is_ok() && {
            let mut state = job.state.lock().unwrap();
            let cancelled = job.cancel.is_set() && !self.interrupted.is_set();
            state.finishing = !cancelled;
            cancelled
        };
        if cancelled_late {
            tracing::info!("cancelled (its run had just finished)");
            self.end(&job, Ending::Cancelled, None);
            return;
        }
        match result {
            Ok(report) => {
                self.metrics
                    .nfe
                    .get_or_create(&label)
                    .inc_by(report.nfe.total as u64);
                self.metrics
                    .edit_seconds
                    .get_or_create(&label)
                    .observe(seconds);
                let mut pace = self.pace.lock().unwrap();
                pace.1 += 1;
                // The mean of the first edits, then a moving mean over about the last 5:
                // one long edit early on must not set Retry-After for the rest of the day.
                let weight = (1.0 / pace.1 as f64).max(0.2);
                pace.0 += (seconds - pace.0) * weight;
                drop(pace);
                if let Some(e) = &report.refine_error {
                    // The size asked for was not made: a failure, though the search's
                    // outputs and report stay in the edit's folder.
                    let why = format!(
                        "the refine failed (the edit at its own size and its report are kept): {e}"
                    );
                    tracing::warn!("{why}");
                    self.end(&job, Ending::Failed, Some(why));
                    return;
                }
                tracing::info!(nfe = report.nfe.total, "done in {seconds:.1} s");
                self.end_with(&job, Ending::Done, None, done_event(&job.id, &report));
            }
            Err(EngineError::Cancelled) if self.interrupted.is_set() => {
                // Journaled as interrupted already: it has not ended.
                tracing::info!("interrupted at the shutdown deadline");
            }
            Err(EngineError::Cancelled) => {
                tracing::info!("cancelled");
                self.end(&job, Ending::Cancelled, None);
            }
            Err(e) => {
                tracing::warn!("failed: {e}");
                // Told before the end, which wakes the request waiting on the edit.
                job.state.lock().unwrap().failed_by_request = caused_by_request(&e);
                self.end(&job, Ending::Failed, Some(e.to_string()));
            }
        }
    }

    /// Loads the source, runs the edit with its events relayed, writes its outputs.
    async fn run_engine(
        &self,
        engine: &Engine,
        job: &Arc<Job>,
        dir: &Path,
    ) -> Result<EditReport, EngineError> {
        // Reading, decoding and resizing a large upload take seconds of CPU: off the async
        // runtime's threads, which answer every other request meanwhile.
        let (path, source) = (dir.join(&job.source), job.source.clone());
        let (limits, width) = (image_limits(&self.limits), job.request.width);
        let (image, panel) = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|e| EngineError::Output {
                path: path.clone(),
                reason: format!("cannot read the upload: {e}"),
            })?;
            let image = load_image_bytes(&bytes, &source, limits)?;
            let panel = resize_to_panel(&image, width)?;
            Ok::<_, EngineError>((image, panel))
        })
        .await
        .map_err(|e| EngineError::Output {
            path: dir.join(&job.source),
            reason: format!("decoding the upload stopped: {e}"),
        })??;
        let mut edit = EditContext::new(job.id.clone(), panel, job.request.instruction.clone());
        if job.request.strategy.refine.is_some() {
            // A refine resizes the upload to its own size.
            edit = edit.with_original(Arc::new(image));
        }
        let mut edit_job = EditJob::new(edit, job.request.strategy.clone());
        edit_job.cancel = job.cancel.clone();
        edit_job.live_previews = job.request.live_previews;
        let (sink, events) = EventSink::new();
        let publisher = job.clone();
        let relayed = tokio::spawn(relay(
            job.id.clone(),
            dir.to_path_buf(),
            events,
            move |kind, data| publisher.publish(kind, data),
        ));
        let result = engine.run(edit_job, Arc::new(sink)).await;
        // The run has dropped every copy of the sink: the relay ends after the last event.
        let written = relayed.await.unwrap_or_default();
        let mut report = result?;
        let out = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            write_outputs_except(&mut report, &out, &written).map(|_| report)
        })
        .await
        .map_err(|e| EngineError::Output {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?
    }
}

/// The `done` event: the pick, every candidate's final status and score, NFE, judge totals
/// and where the files are.
pub fn done_event(id: &str, report: &EditReport) -> Value {
    let url = |rel: &str| format!("/v1/edits/{id}/files/{rel}");
    let candidates: Vec<Value> = report
        .candidates
        .iter()
        .map(|c| {
            json!({
                "index": c.index, "seed": c.seed, "status": c.status,
                "overall": c.overall(),
                "sc": c.vie.as_ref().and_then(|v| v.ok()).map(|v| v.sc),
                "pq": c.vie.as_ref().and_then(|v| v.ok()).map(|v| v.pq),
                "final_url": c.final_file.as_deref().map(url),
            })
        })
        .collect();
    json!({
        "pick": report.pick,
        "final_url": report.pick_file.as_deref().map(url),
        "report_url": url("report.json"),
        "contact_sheet_url": url("contact_sheet.png"),
        "candidates": candidates,
        "nfe": report.nfe.total,
        "best_of_n_nfe": report.nfe.best_of_n_equivalent,
        "random_nfe": report.nfe.random_equivalent,
        "judge": {
            "calls": report.judge_totals.calls,
            "failures": report.judge_totals.failures,
            "prompt_tokens": report.judge_totals.prompt_tokens,
            "completion_tokens": report.judge_totals.completion_tokens,
        },
        "notes": report.notes,
        "seconds": report.timings.total_s,
    })
}

/// Whether an edit failed because of its own values (its image, its strategy, an input the
/// generator cannot take) rather than the server (files, memory, the model): the same
/// request fails the same way again.
/// What a caught panic said (its `&str` or `String` payload).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn caused_by_request(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Edit(_)
            | EngineError::Strategy(_)
            | EngineError::Generate(GenerateError::Config(_) | GenerateError::Input(_))
    )
}

/// The decoder's limits for an upload: the pixel limit is the policy (checked from the
/// header first); the allocation limit leaves room for the widest pixel the formats decode
/// to, RGBA at 16 bits per channel (8 bytes), so a 16-bit PNG under the pixel limit decodes.
fn image_limits(limits: &Limits) -> ImageLimits {
    ImageLimits {
        max_side: ImageLimits::default().max_side,
        max_alloc: limits.max_pixels.saturating_mul(8),
    }
}

/// Checks an upload from its header alone, before a place in the queue is held or any
/// pixel decoded: its format, its pixel count against the limit, that a panel of the
/// request's width can be made of it (and its refine, if it asks for one), and that the
/// height `size` names, if it names one, is the one this image has at that width. Returns
/// its file extension.
pub fn inspect_upload(
    bytes: &[u8],
    limits: &Limits,
    request: &EditRequest,
) -> Result<&'static str, ApiError> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad_field("image", format!("`image`: {e}")))?;
    let format = reader
        .format()
        .ok_or_else(|| ApiError::bad_field("image", "`image` is not a PNG, JPEG or WebP image"))?;
    let extension = match format {
        image::ImageFormat::Png => "png",
        image::ImageFormat::Jpeg => "jpg",
        image::ImageFormat::WebP => "webp",
        other => {
            return Err(ApiError::bad_field(
                "image",
                format!("`image` is {other:?}; send PNG, JPEG or WebP"),
            ))
        }
    };
    // As the image is shown (EXIF orientation applied): the size the edit is made at.
    let (w, h) = crate::edit::image_io::shown_dimensions(reader)
        .map_err(|e| ApiError::bad_field("image", format!("`image` is unreadable: {e}")))?;
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(ApiError::too_large(
            "image",
            format!(
                "`image` is {w}x{h} = {} pixels; this server accepts at most {}",
                u64::from(w) * u64::from(h),
                limits.max_pixels
            ),
        ));
    }
    // Messages in the API's words: the CLI's flags mean nothing to an HTTP client.
    let panel = panel_size(w, h, request.width).map_err(|e| {
        let reason = e
            .to_string()
            .replace("give a smaller --width", "send a smaller `size`");
        ApiError::bad_field("image", format!("`image`: {reason}"))
    })?;
    let made = match request.strategy.refine {
        Some(width) => refine_size(panel, width).map_err(|e| {
            let field = request.refine_field();
            let reason = e
                .to_string()
                .replacen(&format!("--refine {width}: "), "", 1)
                .replace("--refine", "`refine`");
            ApiError::bad_field(
                field,
                format!(
                    "`{field}` {width}: this {w}x{h} image edits at {}x{}: {reason}",
                    panel.0, panel.1
                ),
            )
        })?,
        None => panel,
    };
    if let Some(width) = request.strategy.refine {
        // The memory plan covered a square refine panel of --max-refine; a larger one
        // could run the device out of memory mid-edit.
        let planned = u64::from(limits.max_refine).pow(2);
        if u64::from(made.0) * u64::from(made.1) > planned {
            let field = request.refine_field();
            let reason = if limits.max_refine == 0 {
                "this server does not refine (started with --max-refine 0)".to_string()
            } else {
                format!(
                    "its {}x{} refine is more than the {m}x{m} this server planned for; send a smaller `{field}`",
                    made.0,
                    made.1,
                    m = limits.max_refine
                )
            };
            return Err(ApiError::bad_field(
                field,
                format!("`{field}` {width}: {reason}"),
            ));
        }
    }
    if let (Some(asked), Some(sent)) = (request.size_height, request.size.as_deref()) {
        // `size` names the image returned: the refine's when its width is wider than the
        // edit, else the panel.
        let (width, height) = if request.refine_field() == "size" {
            made
        } else {
            panel
        };
        if asked != height {
            return Err(ApiError::bad_field(
                "size",
                format!(
                    "`size` {sent}: this {w}x{h} image at width {width} is {width}x{height} (the height follows the image); send size={width}x{height} or size={width}"
                ),
            ));
        }
    }
    Ok(extension)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::DEFAULT_PANEL_WIDTH;
    use crate::serve::request::RawRequest;

    /// A checked request with `fields` (its image is checked apart).
    fn request(fields: &[(&str, &str)]) -> EditRequest {
        let raw = RawRequest {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            image: Some(Vec::new()),
        };
        EditRequest::from_raw(&raw, &StrategyConfig::default(), &Limits::default()).unwrap()
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(w, h)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    }

    /// The error of `inspect_upload` for a `w` x `h` PNG and `fields`, if any.
    fn refused(w: u32, h: u32, fields: &[(&str, &str)]) -> Option<ApiError> {
        inspect_upload(&png(w, h), &Limits::default(), &request(fields)).err()
    }

    #[test]
    fn a_size_height_is_accepted_only_when_the_image_has_it_at_that_width() {
        let x = ("prompt", "x");
        // 64x64 at width 64 is 64x64.
        assert!(refused(64, 64, &[x, ("size", "64x64")]).is_none());
        assert!(refused(64, 64, &[x, ("size", "64")]).is_none());
        let e = refused(64, 64, &[x, ("size", "64x128")]).unwrap();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("size")));
        assert!(e.message.contains("size=64x64"), "{e}");
        // 192x128 at width 128 is 128x80 (85 rounded down to a multiple of 16).
        assert!(refused(192, 128, &[x, ("size", "128x80")]).is_none());
        assert!(refused(192, 128, &[x, ("size", "128x128")]).is_some());
        // Wider than the edit: `size` names the refined image. 192x128 edits at 512x336
        // and refines to 576x368.
        assert!(refused(192, 128, &[x, ("size", "576x368")]).is_none());
        assert!(refused(192, 128, &[x, ("size", "576x576")]).is_some());
        // A portrait whose refine passes 1536 px is refused naming `size`, or `refine`
        // where that field asked for it, in the API's words.
        for (fields, param) in [
            (&[x, ("size", "1024")][..], "size"),
            (&[x, ("size", "1024x1536")][..], "size"),
            (&[x, ("refine", "1024")][..], "refine"),
        ] {
            let e = refused(128, 256, fields).unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{fields:?}: {e}");
            assert!(!e.message.contains("--"), "{e}");
        }
        // A panel too tall names `size`, not the CLI's --width.
        let e = refused(16, 2000, &[x, ("size", "512")]).unwrap();
        assert_eq!(e.param.as_deref(), Some("image"));
        assert!(
            e.message.contains("`size`") && !e.message.contains("--"),
            "{e}"
        );
    }

    #[test]
    fn a_size_is_accepted_iff_its_height_is_the_images_at_its_width() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let (w, h) = (rng.random_range(16..400), rng.random_range(16..400));
            let width = 16 * rng.random_range(1..=64u32);
            let asked = 16 * rng.random_range(1..=96u32);
            let Ok(panel) = panel_size(w, h, width.min(DEFAULT_PANEL_WIDTH)) else {
                continue;
            };
            let made = if width > DEFAULT_PANEL_WIDTH {
                refine_size(panel, width)
            } else {
                Ok(panel)
            };
            let size = format!("{width}x{asked}");
            let e = refused(w, h, &[("prompt", "x"), ("size", &size)]);
            // A refine larger than the planned square (--max-refine) is refused too.
            let max_refine = u64::from(Limits::default().max_refine);
            match made {
                Ok((made_w, height)) => {
                    let planned = width <= DEFAULT_PANEL_WIDTH
                        || u64::from(made_w) * u64::from(height) <= max_refine * max_refine;
                    assert_eq!(
                        e.is_none(),
                        asked == height && planned,
                        "{w}x{h} {size}: {e:?}"
                    )
                }
                Err(_) => assert!(e.is_some(), "{w}x{h} {size}"),
            }
        }
    }

    /// A judge whose every call panics, as a bug in a parser would.
    struct PanickingJudge;

    #[async_trait::async_trait]
    impl crate::judge::Judge for PanickingJudge {
        fn name(&self) -> String {
            "panics".into()
        }
        async fn screen(
            &self,
            _: &EditContext,
            _: &image::RgbImage,
            _: crate::judge::PreviewStage,
        ) -> Result<crate::judge::ScreenVerdict, crate::judge::JudgeError> {
            panic!("a judge bug")
        }
        async fn compare(
            &self,
            _: &EditContext,
            _: &image::RgbImage,
            _: &image::RgbImage,
        ) -> Result<crate::judge::Comparison, crate::judge::JudgeError> {
            panic!("a judge bug")
        }
        async fn semantic_consistency(
            &self,
            _: &EditContext,
            _: &image::RgbImage,
        ) -> Result<crate::judge::SubScores, crate::judge::JudgeError> {
            panic!("a judge bug")
        }
        async fn perceptual_quality(
            &self,
            _: &EditContext,
            _: &image::RgbImage,
        ) -> Result<crate::judge::SubScores, crate::judge::JudgeError> {
            panic!("a judge bug")
        }
    }

    /// A panic under an edit ends that edit as failed, naming the panic, and the worker
    /// loop goes on to the next edit (uncaught, the client would wait forever and the
    /// server lose the worker).
    #[tokio::test]
    async fn a_panic_under_an_edit_fails_it_and_the_worker_goes_on() {
        use crate::engine::GeneratorWorker;
        use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path(), 1);
        let generator = TestbedGenerator::new(TestbedConfig::default());
        let engine = Engine::new(
            Arc::new(GeneratorWorker::spawn(Box::new(generator))),
            Arc::new(PanickingJudge),
            2,
        );
        tokio::spawn(registry.clone().work("w0".into(), engine));
        let fields = [("prompt", "x"), ("seeds", "2"), ("steps", "6")];
        for _ in 0..2 {
            let admission = registry.admit().unwrap();
            let job = registry
                .accept(admission, request(&fields), &png(64, 64), "png")
                .unwrap();
            assert_eq!(job.finished().await, Status::Failed);
            let error = job.error().unwrap();
            assert!(error.contains("internal error: a judge bug"), "{error}");
        }
    }

    fn registry(out: &Path, max_decodes: usize) -> Arc<JobRegistry> {
        let limits = Limits {
            max_decodes,
            ..Limits::default()
        };
        let metrics = Arc::new(Metrics::default());
        let defaults = StrategyConfig::default();
        Arc::new(JobRegistry::open(out, 4, limits, defaults, metrics, 1).unwrap())
    }

    #[tokio::test]
    async fn a_decode_holds_its_slot_until_it_ends_though_its_client_went_away() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path(), 1);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let request = tokio::spawn({
            let registry = registry.clone();
            async move {
                registry
                    .in_decode_slot(move || {
                        started_tx.send(()).unwrap();
                        // The decode goes on whatever happens to the request.
                        release_rx.recv().unwrap();
                    })
                    .await
            }
        });
        started_rx.await.unwrap();
        // The client disconnects: hyper drops the handler's future mid-decode.
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        // The decode still runs, so it still holds the one slot and is still counted.
        assert_eq!(registry.decodes.available_permits(), 0);
        assert_eq!(registry.metrics.decodes.get(), 1);
        // It ends: the slot comes free, and the gauge is back to 0 by then.
        release_tx.send(()).unwrap();
        let next = registry.decodes.acquire().await.unwrap();
        assert_eq!(registry.metrics.decodes.get(), 0);
        drop(next);
    }

    /// A 16-bit RGBA PNG at the pixel limit (8 bytes a pixel decoded) is accepted, not
    /// refused by the decoder's allocation limit.
    #[tokio::test]
    async fn a_16_bit_upload_under_the_pixel_limit_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_pixels: 200 * 100,
            ..Limits::default()
        };
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(
            JobRegistry::open(dir.path(), 4, limits, StrategyConfig::default(), metrics, 1)
                .unwrap(),
        );
        let image = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            200,
            100,
            image::Rgba([1000, 20000, 40000, 65535]),
        );
        let mut png = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let request = request(&[("prompt", "x"), ("size", "64")]);
        assert_eq!(
            inspect_upload(&png, &registry.limits, &request).unwrap(),
            "png"
        );
        registry.check_decodes(Arc::new(png)).await.unwrap();
    }
}
