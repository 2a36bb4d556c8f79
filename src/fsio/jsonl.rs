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

/// Opens a log for appending (creating it), returning its records. A last line without
/// its newline (a crash mid-write) is kept when it parses and cut otherwise.
pub fn open<T: DeserializeOwned>(path: &Path) -> std::io::Result<(Vec<T>, File)> {
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
    Ok((records, file))
}

/// Appends records in one write and syncs them to disk before returning.
pub fn append<T: Serialize>(file: &mut File, records: &[T]) -> std::io::Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_line_is_cut_and_the_next_append_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let (_, mut file) = open::<u32>(&path).unwrap();
        append(&mut file, &[1u32, 2]).unwrap();
        drop(file);
        std::fs::write(&path, "1\n2\n{\"torn").unwrap();
        let (records, mut file) = open::<u32>(&path).unwrap();
        assert_eq!(records, vec![1, 2]);
        append(&mut file, &[3u32]).unwrap();
        assert_eq!(read::<u32>(&path).unwrap(), vec![1, 2, 3]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n3\n");
    }

    #[test]
    fn a_complete_record_missing_its_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "1\n2").unwrap();
        let (records, mut file) = open::<u32>(&path).unwrap();
        assert_eq!(records, vec![1, 2]);
        append(&mut file, &[3u32]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n3\n");
        assert!(read::<u32>(&dir.path().join("missing.jsonl"))
            .unwrap()
            .is_empty());
    }
}
