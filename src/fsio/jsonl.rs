//! Append-only JSONL logs that survive a crash mid-write (batch `summary.jsonl`, eval
//! `results.jsonl`): records are appended in one write and fsynced; on reopening, a torn
//! last line is cut so the next append starts on a line of its own.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Parses the complete lines of `text`, warning about (and skipping) unreadable ones.
fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Vec<T> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| match serde_json::from_str(line) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("{}: skipping an unreadable line: {e}", path.display());
                None
            }
        })
        .collect()
}

/// Reads every record of a log (a missing file is empty). Read-only: a torn last line is
/// skipped, not repaired.
pub fn read<T: DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(path, &text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// A log opened for appending by [`open`].
///
/// After an append that failed and could not be cut back either (the disk refused the
/// truncation too), the file ends in a partial record: it refuses further appends, which
/// would be glued onto that record and lost with it, until it is reopened, which cuts the
/// torn line.
#[derive(Debug)]
pub struct Log {
    file: File,
    /// Why appends are refused, once a failed append could not be cut back.
    torn: Option<String>,
}

impl Log {
    /// Opens `path` for appending (it must exist), e.g. after it was rewritten whole.
    pub fn reopen(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: OpenOptions::new().append(true).open(path)?,
            torn: None,
        })
    }

    /// Appends records in one write and syncs them to disk before returning (see
    /// [`append`]).
    pub fn append<T: Serialize>(&mut self, records: &[T]) -> std::io::Result<()> {
        self.append_with(records, |file, bytes| file.write_all(bytes))
    }

    fn append_with<T: Serialize>(
        &mut self,
        records: &[T],
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if let Some(torn) = &self.torn {
            return Err(std::io::Error::other(format!(
                "{torn}; nothing more is appended until the log is reopened (which cuts the torn line)"
            )));
        }
        append_cut_back(&mut self.file, records, write).map_err(|failure| {
            if let Some(cut) = failure.cut_back {
                self.torn = Some(format!(
                    "a failed append ({}) could not be cut back ({cut})",
                    failure.error
                ));
            }
            failure.error
        })
    }
}

/// Replaces the file at `path` with `records`, one per line, atomically and durably (see
/// [`super::write_atomic`]): a crash leaves either the old log or the new one.
pub fn write<T: Serialize>(path: &Path, records: &[T]) -> Result<(), super::FileError> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(|e| super::FileError::new(path, e))?);
        text.push('\n');
    }
    super::write_atomic(path, text.as_bytes())
}

/// Opens a log for appending (creating it), returning its records. A last line without
/// its newline (a crash mid-write) is kept when it parses and cut otherwise.
pub fn open<T: DeserializeOwned>(path: &Path) -> std::io::Result<(Vec<T>, Log)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let mut records = parse(path, &text[..complete]);
    let tail = &text[complete..];
    let created = !path.exists();
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    if created {
        // The new file's entry in its folder must survive a power loss too.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        super::sync_dir(dir.unwrap_or(Path::new("."))).map_err(std::io::Error::other)?;
    }
    if !tail.trim().is_empty() {
        match serde_json::from_str::<T>(tail) {
            Ok(r) => {
                records.push(r);
                file.write_all(b"\n")?;
            }
            Err(_) => {
                tracing::warn!("{}: cutting a torn last line", path.display());
                file.set_len(complete as u64)?;
            }
        }
        file.sync_data()?;
    }
    let log = Log { file, torn: None };
    Ok((records, log))
}

/// Appends records in one write and syncs them to disk before returning. On an error the
/// file is cut back to its length before the call, so a write that stopped partway
/// (ENOSPC, EIO) leaves no torn line for the next record to be glued onto.
pub fn append<T: Serialize>(file: &mut File, records: &[T]) -> std::io::Result<()> {
    append_cut_back(file, records, |file, bytes| file.write_all(bytes)).map_err(|f| f.error)
}

/// A failed append: why, and why it could not be cut back, if it could not.
struct AppendFailure {
    error: std::io::Error,
    cut_back: Option<std::io::Error>,
}

/// [`append`] with the write itself given (a test fails it partway).
fn append_cut_back<T: Serialize>(
    file: &mut File,
    records: &[T],
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) -> Result<(), AppendFailure> {
    let failed = |error| AppendFailure {
        error,
        cut_back: None,
    };
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(|e| failed(e.into()))?);
        text.push('\n');
    }
    let len = file.metadata().map_err(failed)?.len();
    let written = write(file, text.as_bytes()).and_then(|()| file.sync_data());
    written.map_err(|error| {
        // The caller reports these records as not written: none of their bytes may stay
        // (a whole record left after a failed sync would count once the file is read).
        let cut_back = file.set_len(len).and_then(|()| file.sync_data()).err();
        if let Some(e) = &cut_back {
            tracing::error!("cutting a failed append back to {len} bytes: {e}");
        }
        AppendFailure { error, cut_back }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_line_is_cut_and_the_next_append_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let (_, mut log) = open::<u32>(&path).unwrap();
        log.append(&[1u32, 2]).unwrap();
        drop(log);
        std::fs::write(&path, "1\n2\n{\"torn").unwrap();
        let (records, mut log) = open::<u32>(&path).unwrap();
        assert_eq!(records, vec![1, 2]);
        log.append(&[3u32]).unwrap();
        assert_eq!(read::<u32>(&path).unwrap(), vec![1, 2, 3]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n3\n");
    }

    #[test]
    fn a_write_that_fails_partway_leaves_nothing_for_the_next_record_to_be_glued_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let (_, mut log) = open::<String>(&path).unwrap();
        log.append(&["one".to_string()]).unwrap();
        // A disk that fills halfway through the record: part of it is written, then the
        // write fails.
        let e = log
            .append_with(&["torn".to_string()], |file, bytes| {
                file.write_all(&bytes[..bytes.len() / 2])?;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        log.append(&["two".to_string()]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "\"one\"\n\"two\"\n"
        );
        drop(log);
        let (records, _) = open::<String>(&path).unwrap();
        assert_eq!(records, ["one", "two"]);
    }

    /// A failed append that cannot be cut back either (the file refuses the truncation
    /// too) leaves a partial record: the log then refuses appends, which would be glued
    /// onto it and lost with it, and reopening cuts it.
    #[test]
    fn a_log_whose_failed_append_could_not_be_cut_back_refuses_appends_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let (_, mut log) = open::<String>(&path).unwrap();
        log.append(&["one".to_string()]).unwrap();
        // Half the record reaches the file; then the handle can no longer write or
        // truncate (a read-only handle stands in for the failing disk).
        let e = log
            .append_with(&["torn".to_string()], |file, bytes| {
                file.write_all(&bytes[..bytes.len() / 2])?;
                *file = File::open(&path)?;
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            })
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "\"one\"\n\"to");
        let refused = log.append(&["two".to_string()]).unwrap_err().to_string();
        assert!(
            refused.contains("could not be cut back") && refused.contains("reopened"),
            "{refused}"
        );
        drop(log);
        let (records, mut log) = open::<String>(&path).unwrap();
        assert_eq!(records, ["one"]);
        log.append(&["two".to_string()]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "\"one\"\n\"two\"\n"
        );
    }

    #[test]
    fn a_complete_record_missing_its_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "1\n2").unwrap();
        let (records, mut log) = open::<u32>(&path).unwrap();
        assert_eq!(records, vec![1, 2]);
        log.append(&[3u32]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n3\n");
        assert!(read::<u32>(&dir.path().join("missing.jsonl"))
            .unwrap()
            .is_empty());
    }
}
