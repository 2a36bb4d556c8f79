//! A content-addressed on-disk cache of judge replies, so a rerun pays for nothing twice.
//!
//! Key: SHA-256 over the model, the sampling parameters, the full prompt text and the
//! images' PNG bytes. Value: the raw reply with its usage, as JSON, written atomically.
//! Only replies that were read into an answer are stored: a reply that could not be used
//! is asked for again on a rerun, not replayed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stored reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedReply {
    /// The reply text.
    pub text: String,
    /// Logprobs of the reply tokens, when the endpoint gave them: (token, top alternatives).
    #[serde(default)]
    pub logprobs: Vec<(String, Vec<(String, f32)>)>,
    /// Prompt tokens billed when it was first fetched.
    pub prompt_tokens: u64,
    /// Completion tokens billed when it was first fetched.
    pub completion_tokens: u64,
    /// The model's refusal, when it gave one instead of content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// The cache folder.
#[derive(Debug, Clone)]
pub struct ReplyCache {
    dir: PathBuf,
}

impl ReplyCache {
    /// A cache under `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The key of a call.
    pub fn key(model: &str, params: &str, prompt: &str, images: &[&[u8]]) -> String {
        let mut h = Sha256::new();
        for part in [model.as_bytes(), params.as_bytes(), prompt.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for image in images {
            h.update(Sha256::digest(image));
        }
        hex::encode(h.finalize())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// A stored reply, if any (an unreadable entry counts as a miss).
    pub fn get(&self, key: &str) -> Option<CachedReply> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores a reply (best effort: a failed write only costs a future call).
    pub fn put(&self, key: &str, reply: &CachedReply) {
        let path = self.path(key);
        let json = serde_json::to_vec(reply).expect("serialisable");
        if let Err(e) = crate::fsio::write_atomic(&path, &json) {
            tracing::warn!("judge cache: {e}");
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
