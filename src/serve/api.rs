//! The HTTP API (axum): routes, the bearer-token check, request ids in logs, and each
//! handler. The OpenAI-compatible `POST /v1/images/edits` answers when the edit is over;
//! `POST /v1/edits` answers 202 at once and the edit is followed through
//! `GET /v1/edits/{id}/events` (Server-Sent Events). Unknown routes and methods answer in
//! the same OpenAI error shape. Connections and request bodies are guarded below the router
//! ([`super::conn`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::Component;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::Stream;
use serde_json::{json, Value};
use tracing::Instrument;

use super::conn::{BodyFault, BodyFaultCell};
use super::error::ApiError;
use super::events::ServerEvent;
use super::jobs::{done_event, inspect_upload, EventsNow, Job, JobRegistry, Status};
use super::page;
use super::request::{EditRequest, RawRequest, ResponseFormat};
use crate::engine::report::{CandidateStatus, EditReport};
use crate::engine::{GeneratorWorker, StrategyKind};

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    /// Edits, queue, journal, metrics.
    pub registry: Arc<JobRegistry>,
    /// The bearer token clients must send, if one is set.
    pub token: Option<Arc<str>>,
    /// Each worker's name and generator thread (for `/metrics` and `/healthz`).
    pub workers: Arc<Vec<(String, Arc<GeneratorWorker>)>>,
    /// Where clients reach the server (`url` answers are built on it, never on a
    /// request's Host header), without a trailing slash.
    pub public_url: Arc<str>,
    /// Set on a server bound to loopback without a token: the sites that may call it.
    pub site_guard: Option<Arc<SiteGuard>>,
    /// Whether the server has a judge (`--judge none` runs only `random`).
    pub judged: bool,
}

/// Who may call a server bound to loopback without a token. Such a server trusts whoever
/// reaches its port, and a browser on this machine reaches it for any web page: a
/// cross-site form POST needs no CORS preflight, and DNS rebinding (a page's own name
/// resolved to 127.0.0.1) makes the page same-origin. So a request is refused (403) when
/// its `Host` is not a loopback name or address (or `--public-url`'s host), or when it
/// carries an `Origin` that is not the server's own.
#[derive(Debug, Clone)]
pub struct SiteGuard {
    /// The port the server listens on (a loopback origin must name it).
    port: u16,
    /// `--public-url`'s host, lowercase.
    public_host: Option<String>,
    /// `--public-url`'s origin (`scheme://host[:port]`).
    public_origin: Option<String>,
}

impl SiteGuard {
    /// The guard of a server bound to `bound`, reached at `public_url` if one is given.
    pub fn new(bound: std::net::SocketAddr, public_url: Option<&str>) -> Self {
        let public = public_url.and_then(|u| reqwest::Url::parse(u).ok());
        Self {
            port: bound.port(),
            public_host: public
                .as_ref()
                .and_then(|u| u.host_str().map(str::to_ascii_lowercase)),
            public_origin: public.map(|u| u.origin().ascii_serialization()),
        }
    }

    /// Whether `host` (a `Host` header's name, without its port) names this machine.
    fn loopback(host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host.ends_with(".localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Why a request with these `Host` and `Origin` headers is refused, if it is.
    pub fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<(), ApiError> {
        if let Some(host) = host {
            let name = host
                .parse::<axum::http::uri::Authority>()
                .ok()
                .map(|a| a.host().to_ascii_lowercase());
            let allowed = name.as_deref().is_some_and(|name| {
                Self::loopback(name) || self.public_host.as_deref() == Some(name)
            });
            if !allowed {
                return Err(ApiError::forbidden_host(format!(
                    "Host {host:?} is not this server: without a token it answers loopback names only (localhost, 127.0.0.1, [::1]) and --public-url's host; a web page of another site cannot call it"
                )));
            }
        }
        if let Some(origin) = origin {
            let url = reqwest::Url::parse(origin).ok();
            let own = url.as_ref().is_some_and(|u| {
                (matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some_and(Self::loopback)
                    && u.port_or_known_default() == Some(self.port))
                    || self.public_origin.as_deref() == Some(&u.origin().ascii_serialization())
            });
            if !own {
                return Err(ApiError::forbidden_origin(format!(
                    "Origin {origin:?} is not this server's: without a token it takes requests from its own page and from clients that are not web pages only"
                )));
            }
        }
        Ok(())
    }
}

/// Refuses requests from other sites on a tokenless loopback server ([`SiteGuard`]).
async fn guard_site(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(guard) = &state.site_guard {
        let header = |name| {
            request
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("(not text)"))
        };
        if let Err(e) = guard.check(header(header::HOST), header(header::ORIGIN)) {
            return e.into_response();
        }
    }
    next.run(request).await
}

/// The router: the page, health and metrics, and the edit API. Request bodies are limited
/// where the connection reads them ([`super::conn::GuardedBody`]), so axum's own limit is
/// off.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/images/edits", post(images_edits))
        .route("/v1/edits", post(create_edit).get(list_edits))
        .route("/v1/edits/{id}", get(get_edit).delete(cancel_edit))
        .route("/v1/edits/{id}/events", get(edit_events))
        .route("/v1/edits/{id}/files/{*path}", get(edit_file))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/style.css", get(page::style))
        .route("/healthz", get(healthz))
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), guard_site))
        .layer(middleware::from_fn(error_shape))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

/// Gives axum's own rejections (a path that is not UTF-8, a malformed extractor input) the
/// OpenAI error shape every other error has: an error answer that is not JSON is rewrapped,
/// its text as the message.
async fn error_shape(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut shaped = ApiError {
        status,
        message,
        param: None,
        code: None,
        retry_after: None,
        no_retry: false,
    }
    .into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            shaped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    shaped
}

/// A route that does not exist: 404 in the OpenAI error shape.
async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route {method} {} (the API is under /v1/edits and /v1/images/edits)",
        uri.path()
    ))
}

/// A route that exists, with a method it does not take: 405 in the OpenAI error shape.
async fn no_method(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("{} does not take {method}", uri.path()))
}

/// Gives every request an id, logs it with its status and time (path only: a query may
/// carry a token), and runs its handler inside that span.
async fn request_span(request: Request, next: Next) -> Response {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let rid = NEXT.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", rid, method = %request.method(), path = %request.uri().path());
    let started = Instant::now();
    async move {
        let response = next.run(request).await;
        tracing::info!(
            status = response.status().as_u16(),
            "{:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        response
    }
    .instrument(span)
    .await
}

/// Refuses requests without the bearer token when one is set. EventSource (the page's SSE)
/// cannot send headers, so `?access_token=` is accepted too.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    // The scheme is case-insensitive (RFC 9110 11.1); the query value is percent-decoded
    // (the page encodes it: base64 tokens carry `+`, `/` and `=`).
    let header_token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let query_token = request.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("access_token="))
            .map(|v| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
    });
    let given = header_token.or(query_token).unwrap_or_default();
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Compares without an early exit, so response times do not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a request body as a multipart form or JSON, by its content type. A body the
/// connection cut short is answered for what happened to it: 413 (too large) or 408 (too
/// slow).
async fn read_body(state: &AppState, request: Request) -> Result<RawRequest, ApiError> {
    let limits = state.registry.limits;
    let fault = request.extensions().get::<BodyFaultCell>().cloned();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Media types are case-insensitive (RFC 9110, 8.3.1).
    let media = content_type.to_ascii_lowercase();
    let read = if media.starts_with("multipart/form-data") {
        match Multipart::from_request(request, &()).await {
            Ok(form) => RawRequest::from_multipart(form, &limits).await,
            Err(e) => Err(ApiError::bad_request(format!(
                "unreadable multipart body: {e}"
            ))),
        }
    } else if media.starts_with("application/json") {
        match Bytes::from_request(request, &()).await {
            Ok(body) => RawRequest::from_json(&body, &limits),
            Err(e) => Err(ApiError::bad_request(format!("unreadable body: {e}"))),
        }
    } else {
        Err(ApiError::bad_request(
            "send multipart/form-data (as the OpenAI clients do) or application/json",
        ))
    };
    read.map_err(|e| match fault.and_then(|f| f.get()) {
        // The multipart reader names the field it was reading when the body was cut: the
        // one that crossed the limit. A JSON body is cut before any field is parsed.
        Some(BodyFault::TooLarge { limit }) => match e.param.as_deref() {
            Some(field) if field != "image" => ApiError::too_large(
                field,
                format!(
                    "the request is larger than this server accepts ({limit} bytes), reached while reading `{field}`: fields other than `image` share about 1 MiB"
                ),
            ),
            // A declared length over the limit is refused unread: the image, by far the
            // largest field, is blamed, and the message gives both limits.
            _ => ApiError::too_large(
                "image",
                format!(
                    "the request is larger than this server accepts ({limit} bytes): `image` up to {} bytes, the other fields about 1 MiB together",
                    limits.max_upload_bytes
                ),
            ),
        },
        Some(f @ BodyFault::TimedOut { .. }) => ApiError::timed_out(f.to_string()),
        None => e,
    })
}

/// Checks and journals the request; the edit is queued when this returns. The cheap
/// checks come first (fields, the image header), then a place in the queue (429 when
/// full), then the decode (at most `--max-decodes` at once), then the journal.
async fn submit(state: &AppState, request: Request) -> Result<Arc<Job>, ApiError> {
    let raw = read_body(state, request).await?;
    let limits = state.registry.limits;
    let edit = EditRequest::from_raw(&raw, &state.registry.defaults, &limits)?;
    if !state.judged && edit.strategy.kind != StrategyKind::Random {
        return Err(ApiError::bad_field(
            "strategy",
            format!(
                "`strategy` {}: this server has no judge to choose among candidates; only `random` runs here",
                edit.strategy.kind.name()
            ),
        ));
    }
    let image = raw
        .image
        .expect("from_raw refuses a request without an image");
    let extension = inspect_upload(&image, &limits, &edit)?;
    let admission = state.registry.admit()?;
    let image = Arc::new(image);
    state.registry.check_decodes(image.clone()).await?;
    let registry = state.registry.clone();
    // Writing the upload and fsyncing the journal are blocking work.
    let job =
        tokio::task::spawn_blocking(move || registry.accept(admission, edit, &image, extension))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    tracing::info!(id = %job.id, "accepted");
    Ok(job)
}

/// Links of an edit.
fn links(id: &str) -> Value {
    json!({
        "status": format!("/v1/edits/{id}"),
        "events": format!("/v1/edits/{id}/events"),
        "report": format!("/v1/edits/{id}/files/report.json"),
    })
}

/// `POST /v1/edits`: 202 with the id as soon as the edit is journaled.
async fn create_edit(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let job = submit(&state, request).await?;
    let body = json!({"id": job.id, "status": job.status(), "links": links(&job.id)});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `GET /v1/edits`: the most recent edits (the page's history).
async fn list_edits(State(state): State<AppState>) -> Json<Value> {
    let edits: Vec<Value> = state
        .registry
        .recent(100)
        .iter()
        .map(|j| {
            json!({"id": j.id, "status": j.status(), "created": j.created,
                   "instruction": j.request.instruction, "strategy": j.request.strategy.kind})
        })
        .collect();
    Json(json!({ "data": edits }))
}

/// What the client asked for, under the request's own field names: `prompt`, `n`, `size`
/// as sent, `response_format`, `live_previews`, `user`, and the strategy it runs (the
/// request's fields over the server's defaults) as `strategy`, `seeds`, `seed`, ...
/// Built from the journaled request, so it is the same after a restart.
pub fn request_view(request: &EditRequest) -> Value {
    let mut view = json!({
        "prompt": request.instruction,
        "n": request.n,
        "size": request.size,
        "response_format": request.response_format,
        "live_previews": request.live_previews,
        "user": request.user,
    });
    let strategy = serde_json::to_value(&request.strategy).unwrap_or_default();
    if let (Some(view), Value::Object(strategy)) = (view.as_object_mut(), strategy) {
        for (key, value) in strategy {
            // The config's own names where a request writes another.
            let key = match key.as_str() {
                "kind" => "strategy".to_string(),
                "base_seed" => "seed".to_string(),
                _ => key,
            };
            view.insert(key, value);
        }
    }
    view
}

/// `GET /v1/edits/{id}`: status, the request, and the report once done.
async fn get_edit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.registry.job(&id)?;
    let status = job.status();
    let report = (status == Status::Done)
        .then(|| state.registry.report(&id))
        .flatten();
    Ok(Json(json!({
        "id": job.id,
        "status": status,
        "created": job.created,
        "instruction": job.request.instruction,
        "strategy": job.request.strategy,
        "request": request_view(&job.request),
        "worker": job.worker(),
        "error": job.error(),
        "links": links(&job.id),
        "report": report,
    })))
}

/// `DELETE /v1/edits/{id}`: cancels a queued or running edit.
async fn cancel_edit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let status = state.registry.cancel(&id)?;
    let note = match status {
        Status::Running => "cancelling: the generator stops at its next step boundary",
        _ => "cancelled",
    };
    Ok(Json(json!({"id": id, "status": status, "note": note})))
}

/// `GET /v1/edits/{id}/events`: the edit's events from the first, then live, ending with
/// `done`, `failed` or `cancelled`. A reconnecting client's `Last-Event-ID` resumes after
/// the events it has.
async fn edit_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = state.registry.job(&id)?;
    let from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        // The last id there can be: the client has every event (`u64::MAX + 1` would
        // overflow, or wrap to 0 and replay the stream).
        .map_or(0, |last| last.saturating_add(1));
    let (registry, stop) = (state.registry.clone(), state.registry.stop.clone());
    // State: the job, the next seq to send, the stored stream once it is read from disk,
    // whether the last event went out.
    let stream = futures::stream::unfold(
        (job, from, None::<VecDeque<ServerEvent>>, false),
        move |(job, next, mut disk, finished)| {
            let (registry, stop) = (registry.clone(), stop.clone());
            async move {
                if finished {
                    return None;
                }
                let mut changes = job.watch();
                loop {
                    if let Some(stored) = disk.as_mut() {
                        let e = stored.pop_front()?;
                        let last = e.is_last();
                        return Some((Ok(sse(&e)), (job, e.seq + 1, disk, last)));
                    }
                    match job.events_since(next) {
                        EventsNow::OnDisk => {
                            // The edit ended (in this process or before it): its stream is
                            // in events.jsonl.
                            let mut stored = registry.events_on_disk(&job);
                            stored.retain(|e| e.seq >= next);
                            disk = Some(stored.into());
                        }
                        EventsNow::Events(events) if !events.is_empty() => {
                            let e = &events[0];
                            let last = e.is_last();
                            return Some((Ok(sse(e)), (job, e.seq + 1, None, last)));
                        }
                        EventsNow::Over => return None,
                        EventsNow::Events(_) => {
                            tokio::select! {
                                changed = changes.changed() => if changed.is_err() { return None },
                                _ = stop.stopped() => return None,
                            }
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn sse(e: &ServerEvent) -> Event {
    Event::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
        .data(e.data.to_string())
}

/// `GET /v1/edits/{id}/files/{path}`: a file of the edit's folder (previews, finals, the
/// contact sheet, report.json). Paths never leave the folder.
async fn edit_file(
    State(state): State<AppState>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.registry.job(&id)?;
    let rel = std::path::Path::new(&path);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ApiError::bad_field(
            "path",
            "file paths stay inside the edit's folder",
        ));
    }
    let missing = || ApiError::not_found(format!("edit {id} has no file {path:?} (yet)"));
    // Symlinks are resolved and must stay inside the folder; only regular files are read
    // (a FIFO would block the read).
    let dir = state.registry.edit_dir(&id);
    let wanted = dir.join(rel);
    let (dir, file) = tokio::task::spawn_blocking(move || {
        Some((dir.canonicalize().ok()?, wanted.canonicalize().ok()?))
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(missing)?;
    if !file.starts_with(&dir) {
        return Err(ApiError::bad_field(
            "path",
            "file paths stay inside the edit's folder (a link out of it is not followed)",
        ));
    }
    let is_file = tokio::fs::metadata(&file).await.is_ok_and(|m| m.is_file());
    if !is_file {
        return Err(missing());
    }
    let bytes = tokio::fs::read(&file).await.map_err(|_| missing())?;
    let content_type = match rel.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("jpg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("json") => "application/json",
        Some("jsonl") => "application/jsonl",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from(bytes),
    )
        .into_response())
}

/// `GET /healthz`: up, with the workers and the queue.
async fn healthz(State(state): State<AppState>) -> Json<Value> {
    let workers: Vec<&str> = state.workers.iter().map(|(n, _)| n.as_str()).collect();
    Json(json!({
        "status": if state.registry.stop.is_set() { "stopping" } else { "ok" },
        "workers": workers,
        "queue_depth": state.registry.queue_depth(),
        "max_queue": state.registry.max_queue,
        // The widest refine the start-up memory plan covered (0: none); the page offers
        // no wider one.
        "max_refine": state.registry.limits.max_refine,
        // What a request's empty fields become (the page shows them as placeholders).
        "defaults": state.registry.defaults,
    }))
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.registry.metrics.render(&state.workers);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Cancels a synchronous edit whose client went away before its answer (axum drops the
/// handler's future when the connection closes): nobody else knows its id, so running it on
/// would only hold a worker, and a client that resends after a timeout would run it twice.
/// Not while the server shuts down: a running edit then finishes or is journaled to run
/// again, as every other edit.
struct CancelIfAbandoned {
    registry: Arc<JobRegistry>,
    /// The edit, until its answer is decided.
    id: Option<String>,
}

impl Drop for CancelIfAbandoned {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        if self.registry.stop.is_set() {
            return;
        }
        if let Ok(status) = self.registry.cancel(&id) {
            tracing::info!(%id, ?status, "its client left before the answer: cancelled");
        }
    }
}

/// `POST /v1/images/edits`: OpenAI's image edit. Answers when the edit is over, in the
/// OpenAI shape (`created`, `data[]`) with our `icedit` object beside it.
async fn images_edits(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    // `url` answers are absolute (OpenAI's are), on the server's public address: a Host
    // header is the client's to choose.
    let base = state.public_url.clone();
    let job = submit(&state, request).await?;
    let mut abandoned = CancelIfAbandoned {
        registry: state.registry.clone(),
        id: Some(job.id.clone()),
    };
    let status = tokio::select! {
        s = job.finished() => s,
        _ = state.registry.stop.stopped() => {
            if job.status() != Status::Queued {
                // Running edits finish before the server exits, or are interrupted at its
                // deadline: wait for either.
                tokio::select! {
                    s = job.finished() => s,
                    _ = state.registry.interrupted.stopped() => {
                        abandoned.id = None;
                        return Err(ApiError::journaled_at_shutdown(format!(
                            "the server stopped at its shutdown deadline while edit {} ran; it is journaled and runs again after a restart (GET /v1/edits/{}); sending the request again would run it twice",
                            job.id, job.id
                        )));
                    }
                }
            } else {
                // Still queued: it is journaled and runs after the restart.
                abandoned.id = None;
                return Err(ApiError::journaled_at_shutdown(format!(
                    "the server is shutting down; edit {} is journaled and will run after a restart (GET /v1/edits/{}); sending the request again would run it twice",
                    job.id, job.id
                )));
            }
        }
    };
    abandoned.id = None;
    match status {
        Status::Done => {}
        Status::Cancelled => {
            return Err(ApiError::edit_cancelled(format!(
                "edit {} was cancelled (DELETE /v1/edits/{})",
                job.id, job.id
            )))
        }
        _ => {
            return Err(ApiError::edit_failed(
                format!(
                    "edit {} failed: {}",
                    job.id,
                    job.error().unwrap_or_default()
                ),
                job.failed_by_request(),
            ))
        }
    }
    done_answer(&state.registry, &job, &base).await.map(Json)
}

/// The answer of `POST /v1/images/edits` for `job`, which ended `done`: its images in the
/// OpenAI shape and our `icedit` object beside them. `base` is the server's public URL.
/// The edit was accepted and ran: whatever fails here (its report or files unreadable), a
/// resend would run it again, so every error says not to (`x-should-retry: false`).
async fn done_answer(registry: &JobRegistry, job: &Job, base: &str) -> Result<Value, ApiError> {
    answer_of_done(registry, job, base)
        .await
        .map_err(ApiError::after_acceptance)
}

/// [`done_answer`] with errors as they are.
async fn answer_of_done(registry: &JobRegistry, job: &Job, base: &str) -> Result<Value, ApiError> {
    let report = registry
        .report(&job.id)
        .ok_or_else(|| ApiError::internal(format!("edit {}: report.json is unreadable", job.id)))?;
    // The pick first, then the other finished candidates by VIE O.
    let mut finished: Vec<_> = report
        .candidates
        .iter()
        .filter(|c| c.final_file.is_some() && c.status != CandidateStatus::Pruned)
        .collect();
    let pick = report.pick.as_ref().map(|p| p.index);
    finished.sort_by(|a, b| {
        (Some(b.index) == pick)
            .cmp(&(Some(a.index) == pick))
            .then(
                b.overall()
                    .unwrap_or(f32::MIN)
                    .total_cmp(&a.overall().unwrap_or(f32::MIN)),
            )
            .then(a.index.cmp(&b.index))
    });
    if finished.is_empty() {
        return Err(ApiError::internal(format!(
            "edit {}: no candidate finished",
            job.id
        )));
    }
    let dir = registry.edit_dir(&job.id);
    let mut data = Vec::new();
    let mut size = None;
    for c in finished.iter().take(job.request.n) {
        let (rel, (w, h)) = returned_image(&report, c.index).ok_or_else(|| {
            ApiError::internal(format!("edit {}: no file for a candidate", job.id))
        })?;
        // The pick comes first: `size` is the size of the image the client asked for.
        size.get_or_insert((w, h));
        let item = match job.request.response_format {
            ResponseFormat::Url => {
                json!({"url": format!("{base}/v1/edits/{}/files/{rel}", job.id)})
            }
            ResponseFormat::B64Json => {
                let bytes = tokio::fs::read(dir.join(rel))
                    .await
                    .map_err(|e| ApiError::internal(format!("edit {}: {rel}: {e}", job.id)))?;
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(bytes)})
            }
        };
        data.push(item);
    }
    let (w, h) = size.expect("data holds at least the pick");
    let mut icedit = done_event(&job.id, &report);
    icedit["id"] = json!(job.id);
    icedit["vie"] = json!(report.picked().and_then(|c| c.vie.as_ref()));
    Ok(json!({
        "created": job.created,
        "data": data,
        "output_format": "png",
        "size": format!("{w}x{h}"),
        "icedit": icedit,
    }))
}

/// The file returned for candidate `index` and its size: its refine where it had one (the
/// pick's is `final.png`, a runner-up's with `refine_best` is under `refined/`), else its
/// image at the edit's size. A `size` wider than the edit asks for the refine, so the
/// unrefined image is returned only for candidates that were not refined.
fn returned_image(report: &EditReport, index: usize) -> Option<(&str, (u32, u32))> {
    let refine = report
        .refine
        .iter()
        .chain(&report.runner_up_refines)
        .find(|r| r.candidate == index)
        .and_then(|r| Some((r.file.as_deref()?, r.size)));
    refine.or_else(|| {
        Some((
            report.candidates[index].final_file.as_deref()?,
            report.panel,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StrategyConfig;
    use crate::serve::request::Limits;
    use crate::serve::Metrics;

    fn png() -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(64, 64)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    }

    /// A registry in `out` with one accepted edit of `fields`.
    fn accepted(out: &std::path::Path, fields: &[(&str, &str)]) -> (Arc<JobRegistry>, Arc<Job>) {
        let (limits, defaults) = (Limits::default(), StrategyConfig::default());
        let metrics = Arc::new(Metrics::default());
        let registry =
            Arc::new(JobRegistry::open(out, 4, limits, defaults.clone(), metrics, 1).unwrap());
        let raw = RawRequest {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            image: Some(png()),
        };
        let request = EditRequest::from_raw(&raw, &defaults, &limits).unwrap();
        let admission = registry.admit().unwrap();
        let job = registry.accept(admission, request, &png(), "png").unwrap();
        (registry, job)
    }

    #[tokio::test]
    async fn an_answer_that_fails_after_the_edit_ran_is_never_resent() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, job) = accepted(dir.path(), &[("prompt", "x")]);
        // Its report is unreadable (a disk that lost it): a 500, not to be resent, which
        // would run the whole edit again.
        std::fs::write(registry.edit_dir(&job.id).join("report.json"), b"{").unwrap();
        let e = done_answer(&registry, &job, "http://127.0.0.1:1")
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains(&job.id), "{e}");
        let r = e.into_response();
        assert_eq!(r.headers()["x-should-retry"], "false");
    }

    #[test]
    fn a_tokenless_loopback_server_takes_its_own_site_only() {
        let guard = SiteGuard::new(
            "127.0.0.1:8080".parse().unwrap(),
            Some("https://edits.example.org/base"),
        );
        let ok = |host, origin| guard.check(host, origin).is_ok();
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "127.0.0.2",
            "edits.example.org",
        ] {
            assert!(ok(Some(host), None), "{host}");
        }
        assert!(ok(None, None));
        for host in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "",
            "a b",
        ] {
            let e = guard.check(Some(host), None).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (403, Some("forbidden_host")),
                "{host}"
            );
        }
        for origin in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
            "https://edits.example.org",
        ] {
            assert!(ok(Some("127.0.0.1:8080"), Some(origin)), "{origin}");
        }
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:9999",
            "http://evil.example:8080",
            "null",
            "https://edits.example.org:8443",
        ] {
            let e = guard
                .check(Some("127.0.0.1:8080"), Some(origin))
                .unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (403, Some("forbidden_origin")),
                "{origin}"
            );
        }
    }

    #[test]
    fn the_request_is_shown_under_the_requests_own_names() {
        let dir = tempfile::tempdir().unwrap();
        let fields = [
            ("prompt", "make it snow"),
            ("n", "3"),
            ("size", "64x64"),
            ("response_format", "url"),
            ("live_previews", "true"),
            ("user", "u-1"),
            ("strategy", "best-of-n"),
            ("seed", "7"),
        ];
        let (_registry, job) = accepted(dir.path(), &fields);
        let view = request_view(&job.request);
        assert_eq!(view["prompt"], "make it snow");
        assert_eq!(view["n"], 3);
        assert_eq!(view["size"], "64x64");
        assert_eq!(view["response_format"], "url");
        assert_eq!(view["live_previews"], true);
        assert_eq!(view["user"], "u-1");
        assert_eq!(view["strategy"], "best-of-n");
        assert_eq!(view["seed"], 7);
        assert!(view.get("kind").is_none() && view.get("base_seed").is_none());
    }
}
