//! `serve`: builds one engine per device behind one judge and runs the HTTP server until
//! Ctrl-C or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use crate::backends::{EngineBuilder, GeneratorSpec, JudgeSpec, Workload};
use crate::cli::ServeArgs;
use crate::error::EditError;
use crate::judge::Judge;
use crate::serve::{self, ConnLimits, Limits, MeteredJudge, Metrics, ServeOptions};
use crate::stop::StopSignal;

/// `serve`: stops taking edits on the first Ctrl-C / SIGTERM, finishes those running and
/// exits; queued edits stay journaled for the next start.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let stop = StopSignal::default();
    stop.stop_on_signals("shutting down: finishing the edits running; queued ones stay journaled")?;
    serve_until(args, stop).await
}

/// `serve` until `stop` is set.
pub async fn serve_until(args: ServeArgs, stop: StopSignal) -> anyhow::Result<()> {
    let defaults = args.strategy.to_config()?;
    let judge = JudgeSpec::from_args(&args.engine.judge)?;
    judge.check_serves(&defaults)?;
    judge.preflight("--judge", true)?;
    let generator = GeneratorSpec::from_args(&args.engine.generator, args.engine.download)?;
    // Defaults beyond the limits would refuse every request that leaves them unset.
    if defaults.candidate_count() > args.max_seeds || defaults.steps > args.max_steps {
        return Err(EditError::Invalid(format!(
            "the default strategy ({} seeds, {} steps) is beyond --max-seeds {} / --max-steps {}: \
             every request that does not set them would be refused; lower --seeds / --steps or raise the limits",
            defaults.candidate_count(),
            defaults.steps,
            args.max_seeds,
            args.max_steps
        ))
        .into());
    }
    let token = read_token(args.token_env.as_deref())?;
    if token.is_none() && !args.addr.ip().is_loopback() && !args.insecure_no_auth {
        return Err(EditError::Invalid(format!(
            "--addr {}: reachable from other machines, and no token is set: export {DEFAULT_TOKEN_ENV}=<token> \
             (or name another variable with --token-env), or pass --insecure-no-auth to serve without \
             authentication (a private network, a proxy that authenticates)",
            args.addr
        ))
        .into());
    }
    if let Some(url) = &args.public_url {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
            _ => {
                return Err(EditError::Invalid(format!(
                    "--public-url {url:?} is not an http(s) URL (e.g. https://edits.example.org)"
                ))
                .into())
            }
        }
    }
    // A port in use is bad input, found before the output folder is made and the model
    // loads (minutes): the socket is tried and let go; the server binds it once it is ready
    // to accept, so a load does not leave clients hanging on a port nobody answers.
    std::net::TcpListener::bind(args.addr)
        .map_err(|e| EditError::Invalid(format!("--addr {}: cannot listen: {e}", args.addr)))?;
    crate::fsio::prepare_output_dir(&args.out, "--out")
        .map_err(|e| EditError::Invalid(e.to_string()))?;
    let _lock = super::claim_output(&args.out, "--out")?;
    let devices = args
        .devices
        .clone()
        .unwrap_or_else(|| vec![args.engine.generator.device.clone()]);
    if devices.is_empty() || devices.iter().any(|d| d.trim().is_empty()) {
        return Err(
            EditError::Invalid("--devices: name at least one device, none empty".into()).into(),
        );
    }
    // The server's default strategy, with the widest refine a request may ask for
    // (--max-refine, a square panel; requests with larger refines are refused); a request
    // that asks for a cache of its own is not planned.
    let width = crate::edit::DEFAULT_PANEL_WIDTH as usize;
    if let Some(refine) = defaults.refine.filter(|&r| r > args.max_refine) {
        return Err(EditError::Invalid(format!(
            "--refine {refine} is wider than --max-refine {}: every request would be refused; raise --max-refine or lower --refine",
            args.max_refine
        ))
        .into());
    }
    // A request may ask for more seeds than the default: forwards at --batch-size.
    let mut workload = Workload::new((width, width), true, [&defaults]).with_any_candidates();
    if args.max_refine > 0 {
        workload = workload.with_refine_by(args.max_refine, "--max-refine");
    }
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    let builder = EngineBuilder {
        devices: Some(devices),
        ..EngineBuilder::new(generator, judge, args.engine.download, workload)
            .allowing_unused_weights(args.engine.allow_unused_weights)
    };
    let engines = builder
        .build_wrapped(move |j| Arc::new(MeteredJudge::new(j, m.clone())) as Arc<dyn Judge>)?
        .engines;
    if token.is_some() {
        tracing::info!(
            "clients must send the bearer token from ${}",
            args.token_env.as_deref().unwrap_or(DEFAULT_TOKEN_ENV)
        );
    } else if args.insecure_no_auth && !args.addr.ip().is_loopback() {
        tracing::warn!(
            "--insecure-no-auth: anyone who reaches {} can use this server",
            args.addr
        );
    }
    let opts = ServeOptions {
        addr: args.addr,
        out: args.out.clone(),
        max_queue: args.max_queue,
        in_flight: args.in_flight,
        limits: Limits {
            max_upload_bytes: args.max_upload_mb << 20,
            max_pixels: args.max_megapixels as u64 * 1_000_000,
            max_seeds: args.max_seeds,
            max_steps: args.max_steps,
            max_prompt_chars: args.max_prompt_chars,
            max_decodes: args.max_decodes,
            max_refine: args.max_refine,
        },
        token,
        defaults,
        conn: ConnLimits {
            header_timeout: Duration::from_secs_f64(args.header_timeout_s),
            body_timeout: Duration::from_secs_f64(args.body_timeout_s),
            idle_timeout: Duration::from_secs_f64(args.idle_timeout_s),
            max_connections: args.max_connections,
            shutdown_deadline: Duration::from_secs_f64(args.shutdown_deadline_s),
            ..ConnLimits::default()
        },
        public_url: args.public_url.clone(),
    };
    serve::run(engines, metrics, opts, stop).await
}

/// The variable the token is read from when `--token-env` names none.
const DEFAULT_TOKEN_ENV: &str = "ICEDIT_SERVE_TOKEN";

/// The bearer token: from the variable `--token-env` names, which must then be set and not
/// blank; else from ICEDIT_SERVE_TOKEN when it is set (blank is refused). Never fails open:
/// a token asked for and not readable stops the start (bad input, naming the variable).
fn read_token(named: Option<&str>) -> Result<Option<String>, EditError> {
    let var = named.unwrap_or(DEFAULT_TOKEN_ENV);
    let flag = if named.is_some() {
        format!("--token-env {var}")
    } else {
        var.to_string()
    };
    match std::env::var(var) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        Ok(_) => Err(EditError::Invalid(format!(
            "{flag}: the variable {var} is set but blank; export {var}=<token>, or unset it to serve loopback clients without a token"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(EditError::Invalid(format!(
            "{flag}: the variable {var} is not UTF-8 text"
        ))),
        Err(std::env::VarError::NotPresent) if named.is_some() => Err(EditError::Invalid(format!(
            "{flag}: the variable {var} is not set; export {var}=<token> (or leave out --token-env to serve loopback clients without a token)"
        ))),
        Err(std::env::VarError::NotPresent) => Ok(None),
    }
}
