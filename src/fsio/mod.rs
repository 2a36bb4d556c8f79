//! File I/O every floor shares: atomic writes, JSON files that name themselves in errors,
//! and the crash-safe JSONL log ([`jsonl`]).

pub mod jsonl;

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::FileError;

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename), so an
/// interrupted run never leaves a truncated file behind. Creates missing folders.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| FileError::new(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| FileError::new(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| FileError::new(path, e))
}

/// Reads and parses a JSON file; the error names the file and says whether it could not be
/// read or did not parse (with serde's line and column).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FileError::new(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| FileError::new(path, format!("invalid JSON: {e}")))
}
