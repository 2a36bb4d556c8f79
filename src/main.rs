//! The `icedit-scale` binary: parse the command line, run it, map errors to exit codes.

use std::io::IsTerminal;

use clap::Parser;
use icedit_scale::cli::Cli;
use icedit_scale::{commands, host_memory};

#[tokio::main]
async fn main() {
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
    if let Err(err) = commands::run(cli).await {
        eprintln!("error: {err:#}");
        std::process::exit(commands::exit_code(&err));
    }
}
