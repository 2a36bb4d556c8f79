//! What each subcommand does, on top of the library; `main` only parses and maps errors.
//!
//! One file per family: [`edit`] (edit, demo), [`batch`] (batch, merge), [`eval`] (eval,
//! study), [`judge_eval`], [`download`], [`bench`] (the benchmarks), [`plan`].

pub mod batch;
pub mod bench;
pub mod download;
pub mod edit;
pub mod eval;
pub mod judge_eval;
pub mod plan;
pub mod serve;

use crate::cli::{BenchCommand, Cli, Command};
use crate::engine::StrategyError;
use crate::error::{EditError, EngineError, GenerateError};
use crate::fsio::{prepare_output_dir, OutputLock};
use crate::hub::HubError;
use crate::judge::JudgeError;

/// Process exit code for failures while running.
pub const EXIT_RUNTIME: i32 = 1;
/// Process exit code for bad input (unreadable image, bad option, missing weights, bad
/// preset), refused before any work; clap's usage errors also use 2.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Process exit code of a batch or eval that ran to the end but where items failed or were
/// invalid (their results and reasons are in the summary).
pub const EXIT_SOME_FAILED: i32 = 3;
/// Process exit code of a run stopped before the end (Ctrl-C, SIGTERM); what finished is
/// saved and the same command resumes.
pub const EXIT_STOPPED: i32 = 4;

/// Why a run that saved its results did not fully succeed (the exit code tells which).
#[derive(Debug, thiserror::Error)]
pub enum Incomplete {
    /// Stopped on request before the end.
    #[error("stopped before the end ({done} handled in this run, done, failed or invalid; {left} left); run the same command again to resume")]
    Stopped {
        /// Units this run handled (recorded done, failed or invalid).
        done: usize,
        /// Units not started.
        left: usize,
    },
    /// An edit stopped on request: an edit is one unit and keeps nothing of a stopped run.
    #[error("the edit stopped before the end and kept nothing (an edit is one unit); the same command starts it over")]
    EditStopped,
    /// The edit ran and its outputs are written, but not all of it finished: no candidate
    /// could be scored (every scoring call of the judge failed), or the refine failed. A
    /// batch would mark the item failed.
    #[error("{reason}; the outputs are in {}, and running it again retries (the judge's answered calls are cached)", .out.display())]
    Unfinished {
        /// What failed.
        reason: String,
        /// The output folder.
        out: std::path::PathBuf,
    },
    /// Every unit ran; some failed or were invalid.
    #[error("{failed} of the {total} {units} this run handled failed or were invalid ({units} finished by earlier runs are not counted); the reasons are in {}", .summary.display())]
    SomeFailed {
        /// Failed or invalid units.
        failed: usize,
        /// The units this run handled (recorded done, failed or invalid).
        total: usize,
        /// What a unit is, in the plural (`items`, `(item, arm) results`).
        units: &'static str,
        /// Where the reasons are.
        summary: std::path::PathBuf,
    },
}

/// Maps an error to the exit code that tells bad input from runtime failure.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(incomplete) = cause.downcast_ref::<Incomplete>() {
            return match incomplete {
                Incomplete::Stopped { .. } | Incomplete::EditStopped => EXIT_STOPPED,
                Incomplete::SomeFailed { .. } | Incomplete::Unfinished { .. } => EXIT_SOME_FAILED,
            };
        }
        if cause.is::<EditError>() || cause.is::<StrategyError>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return match e {
                EngineError::Edit(_) | EngineError::Strategy(_) => EXIT_BAD_INPUT,
                EngineError::Generate(GenerateError::Weights { .. } | GenerateError::Config(_)) => {
                    EXIT_BAD_INPUT
                }
                _ => EXIT_RUNTIME,
            };
        }
        if let Some(GenerateError::Weights { .. } | GenerateError::Config(_)) =
            cause.downcast_ref::<GenerateError>()
        {
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
        Some(Command::Eval(args)) => eval::eval(*args).await,
        Some(Command::JudgeEval(args)) => judge_eval::judge_eval(args).await,
        Some(Command::Download(args)) => download::download(args),
        Some(Command::Plan(args)) => plan::plan(*args),
        Some(Command::Serve(args)) => serve::serve(*args).await,
        Some(Command::Bench(BenchCommand::Pipeline(args))) => bench::pipeline(args).await,
        Some(Command::Bench(BenchCommand::Memory(args))) => bench::memory(args).await,
        Some(Command::Bench(BenchCommand::Flux(args))) => bench::flux(args),
        Some(Command::Bench(BenchCommand::Judge(args))) => bench::judge(args),
        Some(Command::Bench(BenchCommand::Serve(args))) => bench::serve(args).await,
        None => edit::edit(cli.edit).await,
    }
}

/// Builds the generator of a command that shows no live previews (everything but `serve`):
/// there `--tiny-decoder` only decodes the judge's previews, with `--preview-decoder tiny`,
/// so without it the decoder would be loaded and never used.
pub fn generator_without_live_previews(
    args: &crate::cli::GeneratorArgs,
    download: bool,
) -> Result<crate::backends::GeneratorSpec, EditError> {
    if args.tiny_decoder.is_some() && args.preview_decoder != "tiny" {
        return Err(EditError::Invalid(
            "--tiny-decoder decodes live previews (shown by `serve` only) and, with \
             --preview-decoder tiny, the judge's previews: add --preview-decoder tiny, or drop \
             --tiny-decoder"
                .into(),
        ));
    }
    crate::backends::GeneratorSpec::from_args(args, download)
}

/// `--report-only` on a folder holding no stored records (a mistyped `--out`) is refused
/// instead of writing an empty report there (`eval`, `judge-eval`).
pub fn refuse_report_without_records(out: &std::path::Path, log: &str) -> Result<(), EditError> {
    let path = out.join(log);
    let empty =
        std::fs::read(&path).map_or(true, |bytes| bytes.iter().all(u8::is_ascii_whitespace));
    if empty {
        return Err(EditError::Invalid(format!(
            "--report-only: {} holds no stored records to report; check --out, or run without --report-only",
            path.display()
        )));
    }
    Ok(())
}

/// Removes `out` when it holds nothing but its lock file (a run that claimed a new folder
/// and was refused before writing anything); a folder with anything else in it is kept.
pub fn remove_if_untouched(out: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    let names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    if names
        .iter()
        .all(|n| n.as_os_str() == crate::fsio::LOCK_FILE)
    {
        let _ = std::fs::remove_file(out.join(crate::fsio::LOCK_FILE));
        let _ = std::fs::remove_dir(out);
    }
}

/// Makes `out` an output folder this process alone writes: refused (bad input, before any
/// work) when it names a file or another run holds it.
pub fn claim_output(out: &std::path::Path, flag: &str) -> Result<OutputLock, EditError> {
    prepare_output_dir(out, flag).map_err(|e| EditError::Invalid(e.to_string()))?;
    OutputLock::acquire(out).map_err(|e| EditError::Invalid(e.to_string()))
}
