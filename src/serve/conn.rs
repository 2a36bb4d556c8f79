//! Connections: the server's own accept loop over hyper's HTTP/1 connections, with the
//! limits `axum::serve` does not have.
//!
//! - At most `max_connections` open; one more is answered 503 (OpenAI's error shape,
//!   `Retry-After`) and closed.
//! - A request head must be complete within `header_timeout` of its first byte, and a
//!   connection with no request in flight and nothing received is closed after
//!   `idle_timeout` (a client that opens a connection and says nothing included).
//! - Each request body ([`GuardedBody`]) must arrive within `body_timeout` of its head and
//!   under `max_body_bytes`. A body that is too large, or one its handler did not read (a
//!   refusal), is read to its end and dropped before the answer goes out, so a client that
//!   is still sending reads the 413 or 401 instead of a reset (up to [`DRAIN_BEYOND`] more
//!   bytes; past that, or past the deadline, the answer closes the connection).
//! - On shutdown, idle connections close at once and busy ones finish their request; what
//!   is left at the deadline is dropped ([`Connections::finish_by`]).
//!
//! Timers are the server's own (tokio's clock); nothing here parses HTTP.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response};
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use super::metrics::Metrics;
use crate::stop::StopSignal;

/// How the server treats connections (each is a `serve` flag; docs/serve.md has the
/// defaults and why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// From a request head's first byte to its end.
    pub header_timeout: Duration,
    /// From a request head to the end of its body.
    pub body_timeout: Duration,
    /// A connection with no request in flight and nothing received is closed after this.
    pub idle_timeout: Duration,
    /// Connections open at once; one more is answered 503.
    pub max_connections: usize,
    /// On shutdown, how long running edits and open requests are waited for.
    pub shutdown_deadline: Duration,
    /// The largest request body, in bytes (413 beyond).
    pub max_body_bytes: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            max_connections: 128,
            shutdown_deadline: Duration::from_secs(25),
            max_body_bytes: super::request::Limits::default().max_body_bytes(),
        }
    }
}

/// How many bytes past the limit a refused body is read (and dropped) so its client reads
/// the answer: beyond it the connection is closed instead.
pub const DRAIN_BEYOND: u64 = 64 << 20;

/// Refusals (503) being written at once; beyond it a connection over the cap is closed
/// without an answer.
const REFUSING: usize = 64;

/// Why a request body stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// It passed `max_body_bytes`.
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// It did not arrive within `body_timeout`.
    TimedOut {
        /// The timeout.
        after: Duration,
    },
}

impl std::fmt::Display for BodyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { limit } => {
                write!(
                    f,
                    "the request body is larger than this server accepts ({limit} bytes)"
                )
            }
            Self::TimedOut { after } => write!(
                f,
                "the request body did not arrive within {} s",
                after.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for BodyFault {}

/// What stopped a request's body, if anything did: in the request's extensions, so a
/// handler whose body read failed can answer why (413, 408).
#[derive(Debug, Clone, Default)]
pub struct BodyFaultCell(Arc<Mutex<Option<BodyFault>>>);

impl BodyFaultCell {
    /// The fault, once there is one.
    pub fn get(&self) -> Option<BodyFault> {
        *self.0.lock().unwrap()
    }

    fn set(&self, fault: BodyFault) -> BodyFault {
        *self.0.lock().unwrap().get_or_insert(fault)
    }
}

/// What a connection is doing, for its timeouts.
#[derive(Debug)]
struct Activity {
    /// Requests being answered (from the head to the end of the response body).
    in_flight: usize,
    /// When the first byte of a request head arrived (while no request is in flight).
    head_since: Option<Instant>,
    /// The last byte received or sent.
    last: Instant,
}

/// A connection's activity and the wake-up of its watchdog.
#[derive(Debug)]
struct ConnState {
    activity: Mutex<Activity>,
    changed: Notify,
}

/// Which timeout ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
}

impl ConnState {
    fn new() -> Self {
        Self {
            activity: Mutex::new(Activity {
                in_flight: 0,
                head_since: None,
                last: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn received(&self) {
        let mut a = self.activity.lock().unwrap();
        a.last = Instant::now();
        if a.in_flight == 0 && a.head_since.is_none() {
            a.head_since = Some(a.last);
            drop(a);
            self.changed.notify_one();
        }
    }

    fn sent(&self) {
        self.activity.lock().unwrap().last = Instant::now();
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut a = self.activity.lock().unwrap();
        a.in_flight += 1;
        a.head_since = None;
        drop(a);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn is_idle(&self) -> bool {
        self.activity.lock().unwrap().in_flight == 0
    }

    /// When the connection's next timeout falls, and which (none while a request is in
    /// flight: its body has its own deadline, and a response may stream for long).
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, Expiry)> {
        let a = self.activity.lock().unwrap();
        if a.in_flight > 0 {
            return None;
        }
        Some(match a.head_since {
            Some(t) => (t + limits.header_timeout, Expiry::Header),
            None => (a.last + limits.idle_timeout, Expiry::Idle),
        })
    }
}

/// A request being answered; dropping it (with the response body, or with the service
/// future when the connection dies first) ends it.
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.activity.lock().unwrap();
        a.in_flight -= 1;
        a.last = Instant::now();
        drop(a);
        self.0.changed.notify_one();
    }
}

/// The socket, noting every byte received and sent.
struct Watched {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.state.sent();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.state.sent();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body as handlers see it: under the size limit and the body deadline, or an
/// error (the fault recorded in the request's [`BodyFaultCell`]). What a handler leaves
/// unread goes back to the connection, which drains it before answering.
pub struct GuardedBody {
    inner: Option<Incoming>,
    read: u64,
    limit: u64,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    fault: BodyFaultCell,
    unread: Arc<Mutex<Option<Incoming>>>,
}

impl GuardedBody {
    fn fail(&mut self, fault: BodyFault) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let fault = self.fault.set(fault);
        Poll::Ready(Some(Err(Box::new(fault))))
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(fault) = self.fault.get() {
            return self.fail(fault);
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // A declared length over the limit is refused before a byte is read.
        if inner.size_hint().lower() > self.limit {
            let limit = self.limit;
            return self.fail(BodyFault::TooLarge { limit });
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let after = self.timeout;
            return self.fail(BodyFault::TimedOut { after });
        }
        let inner = self.inner.as_mut().expect("checked above");
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.read += data.len() as u64;
                    if self.read > self.limit {
                        let limit = self.limit;
                        return self.fail(BodyFault::TooLarge { limit });
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take().filter(|b| !b.is_end_stream()) {
            *self.unread.lock().unwrap() = Some(body);
        }
    }
}

/// A response body that ends its request when dropped.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Answers one request with `router`, its body guarded; drains what the handler left
/// unread before the answer goes out.
async fn answer(
    router: Router,
    limits: ConnLimits,
    state: Arc<ConnState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let in_flight = state.begin();
    let deadline = Instant::now() + limits.body_timeout;
    let fault = BodyFaultCell::default();
    let unread = Arc::new(Mutex::new(None));
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(fault.clone());
    let guarded = GuardedBody {
        inner: Some(body),
        read: 0,
        limit: limits.max_body_bytes,
        timeout: limits.body_timeout,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        fault: fault.clone(),
        unread: unread.clone(),
    };
    let request = Request::from_parts(parts, Body::new(guarded));
    let mut response = router.oneshot(request).await.unwrap_or_else(|e| match e {});
    let left = unread.lock().unwrap().take();
    if let Some(body) = left {
        let drained = !matches!(fault.get(), Some(BodyFault::TimedOut { .. }))
            && drain(body, limits.max_body_bytes + DRAIN_BEYOND, deadline).await;
        if !drained {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    Ok(response.map(|inner| {
        Body::new(Tracked {
            inner,
            _in_flight: in_flight,
        })
    }))
}

/// Reads `body` to its end and drops it, unless it is longer than `most` bytes or does not
/// end by `deadline`. Whether it ended.
async fn drain(mut body: Incoming, most: u64, deadline: Instant) -> bool {
    if body.size_hint().lower() > most {
        return false;
    }
    let mut seen = 0u64;
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > most {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or(false)
}

/// Serves one connection until it ends, a timeout ends it, or the shutdown and its own
/// idleness do.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
) {
    metrics.connections.inc();
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Watched {
        stream,
        state: state.clone(),
    });
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |request| {
            answer(router.clone(), limits, state.clone(), request)
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Ours (from a head's first byte) replaces hyper's (from the connection's idleness).
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = *shutdown.borrow();
    if stopping && state.is_idle() {
        metrics.connections.dec();
        return;
    }
    loop {
        let changed = state.changed.notified();
        let deadline = state.deadline(&limits);
        let sleep = tokio::time::sleep_until(deadline.map_or_else(far_future, |d| d.0));
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!("connection: {e}");
                }
                break;
            }
            _ = changed => {}
            _ = sleep, if deadline.is_some() => {
                match state.deadline(&limits) {
                    Some((at, expiry)) if at <= Instant::now() => {
                        tracing::debug!(
                            "closing a connection: {}",
                            match expiry {
                                Expiry::Header => "no complete request head within the header timeout",
                                Expiry::Idle => "idle past the idle timeout",
                            }
                        );
                        break;
                    }
                    _ => {}
                }
            }
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                if state.is_idle() {
                    break;
                }
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    metrics.connections.dec();
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Answers a connection over the cap with 503 and closes it, reading what the client sent
/// meanwhile so the close does not reset the answer away.
async fn refuse(mut stream: TcpStream, limits: ConnLimits, _slot: OwnedSemaphorePermit) {
    let body = serde_json::json!({
        "error": {
            "message": format!(
                "this server has {} connections open, its most; retry shortly",
                limits.max_connections
            ),
            "type": "server_error",
            "param": null,
            "code": "too_many_connections",
        }
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut seen = 0usize;
        loop {
            let n = stream.read(&mut sink).await?;
            seen += n;
            if n == 0 || seen > 64 << 10 {
                return Ok::<_, io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(limits.header_timeout, exchange).await;
}

/// The open connections, after the accept loop stopped.
pub struct Connections {
    tasks: JoinSet<()>,
    shutdown: watch::Sender<bool>,
}

impl Connections {
    /// Closes idle connections now and asks busy ones to close after their request.
    pub fn shut_down(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for every connection to end, dropping those still open at `deadline`.
    pub async fn finish_by(mut self, deadline: Instant) {
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            tracing::info!(
                "closing {} connection(s) still open at the shutdown deadline",
                self.tasks.len()
            );
            self.tasks.shutdown().await;
        }
    }
}

/// Accepts connections on `listener` and serves `router` on each, within `limits`, until
/// `stop` is set; returns the connections still open.
pub async fn accept_until(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    stop: &StopSignal,
) -> Connections {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let (shutdown, watching) = watch::channel(false);
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.stopped() => break,
        };
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: the next accept may succeed once
                // connections close; do not spin meanwhile.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tasks.spawn(connection(
                    stream,
                    router.clone(),
                    limits,
                    watching.clone(),
                    metrics.clone(),
                    slot,
                ));
            }
            Err(_) => {
                metrics.refused_connections.inc();
                if let Ok(slot) = refusing.clone().try_acquire_owned() {
                    tasks.spawn(refuse(stream, limits, slot));
                }
            }
        }
    }
    Connections { tasks, shutdown }
}
