//! The `icedit-scale` binary: parse the command line, run it, map errors to exit codes.

use std::io::IsTerminal;

use clap::Parser;
use icedit_scale::cli::{Cli, Command};
use icedit_scale::{commands, host_memory};

fn main() {
    // candle attaches a backtrace to each of its errors when RUST_BACKTRACE is set (through
    // std's Backtrace, which reads RUST_LIB_BACKTRACE first), so a refused file printed 60
    // frames under its one-line message. Errors carry none unless RUST_LIB_BACKTRACE asks;
    // panics keep RUST_BACKTRACE's. Set before the runtime starts any thread.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts");
    runtime.block_on(run());
}

async fn run() {
    // Before any model allocates (see host_memory).
    host_memory::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log redirected to a file or a pipe stays plain.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Some(Command::Serve(_) | Command::Bench(_))) {
        // A closed pipe on stdout (`| head`) ends the process quietly, as it does any Unix
        // tool, instead of a panic in println! (the outputs are written before the
        // summary). The server and the benches keep Rust's default: a client that hangs up
        // must not end the server.
        // SAFETY: sets SIGPIPE's process-wide disposition back to the default; no handler
        // of ours is replaced.
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL)
        };
    }
    if let Err(err) = commands::run(cli).await {
        eprintln!("error: {err:#}");
        std::process::exit(commands::exit_code(&err));
    }
}
