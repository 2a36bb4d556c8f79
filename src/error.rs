//! Typed errors of the library. `main` adds context with anyhow and maps them to exit codes.
//!
//! Each floor has its own: [`FileError`] for the ground floor's file I/O, [`ModelError`] for
//! model code, [`GenerateError`] for the generator role, [`EngineError`] for the
//! orchestration; the judge role's `JudgeError` lives with it in `crate::judge`, because a
//! failed call carries what it cost. Lower errors convert into higher ones, never the other
//! way.

use std::path::{Path, PathBuf};

/// A file or folder that cannot be read or written; names it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct FileError {
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

impl FileError {
    /// An error about `path`.
    pub fn new(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// Failures of model code (FLUX, Qwen-VL, the testbed world): files, configs, inputs,
/// tensors. The roles turn them into [`GenerateError`] or [`JudgeError`].
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A checkpoint file (weights, config, tokenizer, template) that is missing or wrong;
    /// names the file and, where there is one, the key.
    #[error("{}: {reason}", path.display())]
    Files {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting the model cannot work with (preprocessing limits, option values).
    #[error("{0}")]
    Config(String),
    /// An input the model cannot take (a prompt too long, a tokenizer failure, ...).
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl ModelError {
    /// A [`ModelError::Files`] about `path`.
    pub fn files(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Files {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

impl From<FileError> for ModelError {
    fn from(e: FileError) -> Self {
        Self::Files {
            path: e.path,
            reason: e.reason,
        }
    }
}

/// Bad input: the user's image, instruction or options.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// An image file that cannot be used; names the file.
    #[error("image {path}: {reason}")]
    Image {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other invalid input, with a message naming the field.
    #[error("{0}")]
    Invalid(String),
}

/// Failures of a generator backend.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A weight file or tensor that is missing or wrong; names the file and key.
    #[error("weights {path}: {reason}")]
    Weights {
        /// The file (or folder) concerned.
        path: PathBuf,
        /// What is wrong, naming the tensor key where there is one.
        reason: String,
    },
    /// The generator cannot be set up as asked (missing options, settings the model does
    /// not support): bad input.
    #[error("generator setup: {0}")]
    Config(String),
    /// The input does not fit the model (size, shape, unsupported option).
    #[error("generator input: {0}")]
    Input(String),
    /// A forward ran out of device memory (the candidates' states are intact: the same
    /// step can be retried with fewer candidates).
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// A candidate's latents hold NaN or infinity (weights holding NaN, or an overflow in
    /// f16): decoded, they would be a blank image that a judge might score and pick.
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The generator worker thread is gone (it panicked or was shut down).
    #[error("generator worker stopped: {0}")]
    WorkerGone(String),
}

impl GenerateError {
    /// A tensor error, told apart as [`GenerateError::OutOfMemory`] when the device ran out
    /// of memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, Metal's failed buffer allocation).
    pub fn from_forward(e: candle_core::Error) -> Self {
        let text = e.to_string();
        let lower = text.to_ascii_lowercase();
        if lower.contains("out_of_memory")
            || lower.contains("out of memory")
            || lower.contains("failed to create metal buffer")
        {
            Self::OutOfMemory(text)
        } else {
            Self::Tensor(e)
        }
    }
}

impl From<ModelError> for GenerateError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Files { path, reason } => Self::Weights { path, reason },
            ModelError::Config(m) => Self::Config(m),
            ModelError::Input(m) => Self::Input(m),
            ModelError::Tensor(e) => Self::Tensor(e),
        }
    }
}

/// Failures of the orchestration engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Bad input.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// The generator failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// Writing outputs failed; names the path.
    #[error("cannot write {path}: {reason}")]
    Output {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        reason: String,
    },
    /// An invalid strategy configuration; names the option.
    #[error("strategy: {0}")]
    Strategy(String),
    /// The edit was cancelled (its [`crate::stop::StopSignal`] was set); the generator
    /// stopped at a step boundary.
    #[error("cancelled")]
    Cancelled,
    /// A bug: code under the edit panicked (caught where a long-lived loop must go on, as
    /// the server's workers); the message is the panic's.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<FileError> for EngineError {
    fn from(e: FileError) -> Self {
        Self::Output {
            path: e.path,
            reason: e.reason,
        }
    }
}
