//! What each subcommand does, on top of the library; `main` only parses and maps errors.
//!
//! One file per family: [`edit`] (edit, demo), [`batch`] (batch, merge), [`eval`] (eval,
//! study), [`download`], [`bench`] (the benchmarks).

pub mod batch;
pub mod bench;
pub mod download;
pub mod edit;
pub mod eval;

use crate::cli::{BenchCommand, Cli, Command};
use crate::engine::StrategyError;
use crate::error::{EditError, EngineError, GenerateError, JudgeError};
use crate::hub::HubError;

/// Process exit code for bad input (unreadable image, bad option, missing weights, bad
/// preset). Runtime failures exit with 1; clap's usage errors also use 2.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Process exit code for failures while running.
pub const EXIT_RUNTIME: i32 = 1;

/// Maps an error to the exit code that tells bad input from runtime failure.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<EditError>() || cause.is::<StrategyError>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return match e {
                EngineError::Edit(_) | EngineError::Strategy(_) => EXIT_BAD_INPUT,
                EngineError::Generate(GenerateError::Weights { .. }) => EXIT_BAD_INPUT,
                _ => EXIT_RUNTIME,
            };
        }
        if let Some(GenerateError::Weights { .. }) = cause.downcast_ref::<GenerateError>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(JudgeError::Config(_)) = cause.downcast_ref::<JudgeError>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<HubError>() {
            // What the user named cannot be had (refused, absent, mistyped); the rest are
            // transfer failures worth a retry.
            return match e {
                HubError::Gated { .. }
                | HubError::NotFound { .. }
                | HubError::NoMatch { .. }
                | HubError::InvalidRequest { .. } => EXIT_BAD_INPUT,
                _ => EXIT_RUNTIME,
            };
        }
    }
    EXIT_RUNTIME
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Edit(args)) => edit::edit(*args).await,
        Some(Command::Demo(args)) => edit::demo(args).await,
        Some(Command::Batch(args)) => batch::batch(*args).await,
        Some(Command::Merge(args)) => batch::merge(args),
        Some(Command::Study(args)) => eval::study(args).await,
        Some(Command::Eval(args)) => eval::eval(args).await,
        Some(Command::Download(args)) => download::download(args),
        Some(Command::Bench(BenchCommand::Pipeline(args))) => bench::pipeline(args).await,
        Some(Command::Bench(BenchCommand::Memory(args))) => bench::memory(args).await,
        Some(Command::Bench(BenchCommand::Flux(args))) => bench::flux(args),
        Some(Command::Bench(BenchCommand::Judge(args))) => bench::judge(args),
        None => edit::edit(cli.edit).await,
    }
}
