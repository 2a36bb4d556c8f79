//! File I/O every floor shares: durable atomic writes, JSON files that name themselves in
//! errors, an exclusive lock on an output folder ([`OutputLock`]), the crash-safe JSONL
//! log ([`jsonl`]), a log of per-unit results that a rerun retries ([`unit_log`]), the
//! settings a resumable run's results were made with ([`settings`]) and the content each
//! unit's result was made from ([`fingerprint`]).

pub mod fingerprint;
pub mod jsonl;
mod lock;
pub mod settings;
pub mod unit_log;

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::FileError;
pub use lock::{OutputLock, LOCK_FILE};

/// Writes `bytes` to `path` atomically and durably: a temp file in the same folder is
/// written and fsynced, renamed over `path`, and the folder is fsynced so the rename itself
/// survives a power loss. An interrupted run never leaves a truncated file behind. Creates
/// missing folders.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| FileError::new(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|e| FileError::new(&tmp, e))?;
    file.write_all(bytes).map_err(|e| FileError::new(&tmp, e))?;
    sync_file(&file, &tmp)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| FileError::new(path, e))?;
    sync_dir(dir)
}

/// Flushes a file's data and metadata to the disk.
pub fn sync_file(file: &File, path: &Path) -> Result<(), FileError> {
    file.sync_all()
        .map_err(|e| FileError::new(path, format!("fsync: {e}")))?;
    record_sync(path);
    Ok(())
}

/// Flushes a folder's entries (a rename or a new file in it) to the disk.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    // A folder is opened read-only and fsynced; on Unix that persists its entries.
    #[cfg(unix)]
    {
        let handle = File::open(dir).map_err(|e| FileError::new(dir, e))?;
        handle
            .sync_all()
            .map_err(|e| FileError::new(dir, format!("fsync: {e}")))?;
    }
    record_sync(dir);
    Ok(())
}

/// Reads and parses a JSON file; the error names the file and says whether it could not be
/// read or did not parse (with serde's line and column).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FileError::new(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| FileError::new(path, format!("invalid JSON: {e}")))
}

/// The folder `out` as an output folder: created if missing, refused if it is a file (so a
/// run never does its work and then fails to write it).
pub fn prepare_output_dir(out: &Path, flag: &str) -> Result<(), FileError> {
    if out.exists() && !out.is_dir() {
        return Err(FileError::new(
            out,
            format!("{flag} names an existing file; give a folder (new or existing)"),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| FileError::new(out, format!("{flag}: {e}")))
}

#[cfg(test)]
thread_local! {
    /// The fsyncs this thread made, in order (tests check durability through it).
    static SYNCED: std::cell::RefCell<Vec<std::path::PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn record_sync(_path: &Path) {
    #[cfg(test)]
    SYNCED.with(|s| s.borrow_mut().push(_path.to_path_buf()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_syncs_the_file_then_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/report.json");
        SYNCED.with(|s| s.borrow_mut().clear());
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(!path.with_extension("tmp").exists());
        let synced = SYNCED.with(|s| s.borrow().clone());
        assert_eq!(
            synced,
            vec![path.with_extension("tmp"), dir.path().join("sub")],
            "the temp file's data before the rename, the folder's entry after it"
        );
    }

    #[test]
    fn an_output_folder_that_is_a_file_is_refused_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("taken");
        std::fs::write(&file, "x").unwrap();
        let err = prepare_output_dir(&file, "--out").unwrap_err();
        assert!(
            err.to_string().contains("--out names an existing file"),
            "{err}"
        );
        prepare_output_dir(&dir.path().join("new/out"), "--out").unwrap();
        assert!(dir.path().join("new/out").is_dir());
    }
}
