//! The judge role's failures. A failure is recorded in reports as a failure, never turned
//! into a score; a reply that came back but could not be used still carries its cost, so
//! the run's judge accounting is exact.

use super::CallUsage;
use crate::error::ModelError;

/// Failures of a judge call. Recorded in reports as failures, never turned into scores.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum JudgeError {
    /// The judge's configuration (preset file, key, endpoint) is unusable.
    #[error("judge config: {0}")]
    Config(String),
    /// The endpoint answered with an HTTP error after all retries.
    #[error("judge HTTP {status}: {body}")]
    Http {
        /// HTTP status code.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// The call did not finish in time after all retries.
    #[error("judge timed out: {0}")]
    Timeout(String),
    /// The transport failed (connection refused, TLS, ...).
    #[error("judge transport: {0}")]
    Transport(String),
    /// The reply could not be parsed into the expected answer.
    #[error("judge reply unparseable ({reason}): {reply:?}")]
    Parse {
        /// Why parsing failed.
        reason: String,
        /// The reply text (truncated).
        reply: String,
        /// What the call that produced the reply cost (it is counted although it failed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Box<CallUsage>>,
    },
    /// The judge declined or failed to answer (local model error, refusal, ...).
    #[error("judge failed: {0}")]
    Failed(String),
}

impl JudgeError {
    /// An unparseable reply (its cost is attached where the call was made, with
    /// [`JudgeError::with_usage`]).
    pub fn parse(reason: impl Into<String>, reply: impl Into<String>) -> Self {
        Self::Parse {
            reason: reason.into(),
            reply: reply.into(),
            usage: None,
        }
    }

    /// Whether an HTTP status says the server could not take the call now (408 request
    /// timeout, 429 rate limit, 5xx), so a retry may succeed, rather than refusing it.
    pub fn transient_status(status: u16) -> bool {
        matches!(status, 408 | 429) || (500..600).contains(&status)
    }

    /// Whether the call never reached a judge that answered (the transport failed, it
    /// timed out, the server was overloaded or down), rather than being the judge's answer.
    pub fn unreached(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Timeout(_) => true,
            Self::Http { status, .. } => Self::transient_status(*status),
            _ => false,
        }
    }

    /// What the failed call cost, when it got as far as a reply.
    pub fn usage(&self) -> Option<&CallUsage> {
        match self {
            Self::Parse { usage, .. } => usage.as_deref(),
            _ => None,
        }
    }

    /// This failure with the cost of the call that produced it (kept where the failure is
    /// a reply that could not be used).
    pub fn with_usage(self, spent: CallUsage) -> Self {
        match self {
            Self::Parse { reason, reply, .. } => Self::Parse {
                reason,
                reply,
                usage: Some(Box::new(spent)),
            },
            other => other,
        }
    }
}

impl From<ModelError> for JudgeError {
    fn from(e: ModelError) -> Self {
        match e {
            // A checkpoint or setting that cannot work is the preset's fault (bad input).
            ModelError::Files { .. } | ModelError::Config(_) => Self::Config(e.to_string()),
            ModelError::Input(m) => Self::Failed(m),
            ModelError::Tensor(e) => Self::Failed(format!("tensor error: {e}")),
        }
    }
}
