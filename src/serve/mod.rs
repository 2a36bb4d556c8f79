//! `serve`: one loaded model shared by many clients over HTTP.
//!
//! Requests (the OpenAI-compatible `POST /v1/images/edits`, or `POST /v1/edits` followed
//! over Server-Sent Events) are checked ([`request`]), journaled ([`journal`]) and queued;
//! one worker loop per device takes them from the one bounded queue ([`jobs`]) and runs
//! them through its engine, a few at a time so the generator works while judges think.
//! Every edit's events ([`events`]) stream to its watchers and to the page at `/`
//! ([`page`]); `/metrics` ([`metrics`]) exposes the queue, NFE/s, busy fraction and judge
//! latency. Connections are the server's own ([`conn`]): a cap, header, body and idle
//! timeouts, and a shutdown deadline past which running edits are journaled as interrupted.
//!
//! A driver beside `batch` and `eval`: it takes engines built by the command and never
//! reaches a backend.

pub mod api;
pub mod bench;
pub mod conn;
pub mod error;
pub mod events;
pub mod jobs;
pub mod journal;
pub mod metrics;
pub mod page;
pub mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use conn::ConnLimits;
pub use error::ApiError;
pub use jobs::{JobRegistry, Status};
pub use metrics::{MeteredJudge, Metrics};
pub use request::{EditRequest, Limits};

use crate::engine::{Engine, StrategyConfig};
use crate::stop::StopSignal;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the one bound is printed).
    pub addr: SocketAddr,
    /// Folder of the journal and every edit's outputs; the same folder after a restart
    /// resumes what was accepted.
    pub out: PathBuf,
    /// Edits waiting beyond this are refused with 429.
    pub max_queue: usize,
    /// Edits each worker runs at once (2 lets the generator probe one edit while another
    /// waits for its judge).
    pub in_flight: usize,
    /// Per-request limits.
    pub limits: Limits,
    /// Bearer token clients must send (from an environment variable; never logged).
    pub token: Option<String>,
    /// The strategy requests lay their fields over.
    pub defaults: StrategyConfig,
    /// Timeouts, the connection cap and the shutdown deadline (`max_body_bytes` is set
    /// from `limits`).
    pub conn: ConnLimits,
    /// Where clients reach the server, for `url` answers (default: `http://` and the
    /// address bound).
    pub public_url: Option<String>,
}

/// Runs the server over `engines` (one per device, named) until `stop` is set, then stops
/// taking edits, lets those running finish until the shutdown deadline (those still running
/// then are journaled as interrupted; queued ones stay journaled) and returns. Prints
/// `listening on http://ADDR` once it accepts connections.
pub async fn run(
    engines: Vec<(String, Engine)>,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    stop: StopSignal,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| anyhow::anyhow!("--addr {}: cannot listen: {e}", opts.addr))?;
    run_on(listener, engines, metrics, opts, stop).await
}

/// [`run`] on a socket already bound (`opts.addr` is not used).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    engines: Vec<(String, Engine)>,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    stop: StopSignal,
) -> anyhow::Result<()> {
    let registry = Arc::new(
        JobRegistry::open(
            &opts.out,
            opts.max_queue,
            opts.limits,
            opts.defaults.clone(),
            metrics.clone(),
            // Edits run at once: each device's generator takes --in-flight edits.
            engines.len() * opts.in_flight.max(1),
        )
        .map_err(|e| anyhow::anyhow!("{}: cannot open the journal: {e}", opts.out.display()))?,
    );
    // `--judge none`: every engine is built without one.
    let judged = engines.iter().all(|(_, e)| e.judge().is_some());
    let workers = Arc::new(
        engines
            .iter()
            .map(|(name, e)| (name.clone(), e.worker().clone()))
            .collect::<Vec<_>>(),
    );
    let mut loops = tokio::task::JoinSet::new();
    for (name, engine) in engines {
        for _ in 0..opts.in_flight.max(1) {
            loops.spawn(registry.clone().work(name.clone(), engine.clone()));
        }
    }
    let bound = listener.local_addr()?;
    let public_url = opts
        .public_url
        .clone()
        .unwrap_or_else(|| default_public_url(bound));
    // Loopback without a token trusts whoever reaches the port: not web pages of other
    // sites (see `api::SiteGuard`).
    let site_guard = (opts.token.is_none() && bound.ip().is_loopback())
        .then(|| Arc::new(api::SiteGuard::new(bound, opts.public_url.as_deref())));
    let state = api::AppState {
        registry: registry.clone(),
        token: opts.token.map(Arc::from),
        workers,
        public_url: Arc::from(public_url.trim_end_matches('/')),
        site_guard,
        judged,
    };
    let limits = ConnLimits {
        max_body_bytes: opts.limits.max_body_bytes(),
        ..opts.conn
    };
    // Tests and scripts read this line to learn the port: print it once we accept.
    println!("listening on http://{bound}");
    tracing::info!("listening on http://{bound}");
    let connections =
        conn::accept_until(listener, api::router(state), limits, metrics, &stop).await;
    // No new edits; event streams end; idle connections close, busy ones finish.
    registry.stop.stop();
    connections.shut_down();
    let deadline = tokio::time::Instant::now() + limits.shutdown_deadline;
    let running = registry.metrics.running.get();
    if running > 0 {
        eprintln!(
            "finishing {running} running edit(s) (up to {} s); queued ones stay journaled",
            limits.shutdown_deadline.as_secs_f64()
        );
    }
    let all_ended = async { while loops.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, all_ended).await.is_err() {
        let interrupted = registry.interrupt_running();
        loops.shutdown().await;
        eprintln!(
            "{interrupted} edit(s) still running at the shutdown deadline are journaled as interrupted; they run again at the next start"
        );
    }
    // The clients of interrupted edits are answered (503, not to be resent): a moment for
    // those answers to go out, even past the deadline.
    let answers_out = tokio::time::Instant::now() + std::time::Duration::from_millis(250);
    connections.finish_by(deadline.max(answers_out)).await;
    Ok(())
}

/// `http://` and the bound address; an unspecified address (0.0.0.0, ::) names no host a
/// client could use, so loopback stands in for it (set `--public-url` there).
fn default_public_url(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    if ip != bound.ip() {
        tracing::warn!(
            "listening on every address: `url` answers name {ip}; give --public-url for the address clients use"
        );
    }
    format!("http://{}", SocketAddr::new(ip, bound.port()))
}
