//! The Hugging Face cache layout as the Hub's clients write it:
//! `models--org--name/{blobs/, refs/main, snapshots/<commit>/...}`.

use std::path::{Path, PathBuf};

use crate::error::FileError;

/// A Hugging Face cache entry resolves to the snapshot `refs/main` names, or its only one;
/// any other folder is returned as it is.
pub fn resolve_snapshot(dir: &Path) -> Result<PathBuf, FileError> {
    let snapshots = dir.join("snapshots");
    if !snapshots.is_dir() {
        return Ok(dir.to_path_buf());
    }
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs").join("main")) {
        let chosen = snapshots.join(rev.trim());
        if chosen.is_dir() {
            return Ok(chosen);
        }
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| FileError::new(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(FileError::new(
            &snapshots,
            "not found (no snapshot in this Hugging Face cache entry)",
        )),
        _ => Err(FileError::new(
            &snapshots,
            "several snapshots and no refs/main; point at one snapshot",
        )),
    }
}

/// The safetensors shards of a folder (every `*.safetensors` in it, sorted).
pub fn shards(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| FileError::new(dir, "not found (component folder)"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FileError::new(
            dir,
            "not found (no .safetensors files in this folder)",
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_entry_resolves_to_the_snapshot_refs_main_names() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("models--org--name");
        for commit in ["aaa", "bbb"] {
            std::fs::create_dir_all(entry.join("snapshots").join(commit)).unwrap();
        }
        let err = resolve_snapshot(&entry).unwrap_err();
        assert!(err.to_string().contains("several snapshots"), "{err}");
        std::fs::create_dir_all(entry.join("refs")).unwrap();
        std::fs::write(entry.join("refs/main"), "bbb\n").unwrap();
        assert_eq!(
            resolve_snapshot(&entry).unwrap(),
            entry.join("snapshots/bbb")
        );
        // A plain folder is its own snapshot.
        assert_eq!(resolve_snapshot(dir.path()).unwrap(), dir.path());
    }
}
