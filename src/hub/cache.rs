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

/// The safetensors shards of a folder: the files its `*.safetensors.index.json` names
/// when it has one (as diffusers and transformers read a sharded save; any other
/// `.safetensors` beside them, a stale single-file copy say, is left out with a warning),
/// else every `*.safetensors` in it. Sorted.
pub fn shards(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| FileError::new(dir, "not found (component folder)"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let mut files: Vec<PathBuf> = entries
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .cloned()
        .collect();
    files.sort();
    let mut indexes: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".safetensors.index.json"))
        })
        .collect();
    indexes.sort();
    match indexes.as_slice() {
        [] => {}
        [index] => {
            let listed = indexed_shards(index)?;
            let unlisted: Vec<String> = files
                .iter()
                .filter(|f| !listed.contains(f))
                .map(|f| f.display().to_string())
                .collect();
            if !unlisted.is_empty() {
                tracing::warn!(
                    "{}: not read, the index does not name them: {}",
                    index.display(),
                    unlisted.join(", ")
                );
            }
            return Ok(listed);
        }
        several => {
            let names: Vec<String> = several.iter().map(|p| p.display().to_string()).collect();
            return Err(FileError::new(
                dir,
                format!(
                    "several safetensors indexes ({}): keep the one to load",
                    names.join(", ")
                ),
            ));
        }
    }
    if files.is_empty() {
        return Err(FileError::new(
            dir,
            "not found (no .safetensors files in this folder)",
        ));
    }
    Ok(files)
}

/// The files a `*.safetensors.index.json` maps its tensors to, each checked to exist.
fn indexed_shards(index: &Path) -> Result<Vec<PathBuf>, FileError> {
    let text = std::fs::read_to_string(index).map_err(|e| FileError::new(index, e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| FileError::new(index, format!("not a safetensors index: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| FileError::new(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = std::collections::BTreeSet::new();
    for (key, file) in map {
        let name = file
            .as_str()
            .filter(|n| !n.contains('/') && !n.contains('\\') && *n != ".." && !n.is_empty())
            .ok_or_else(|| {
                FileError::new(
                    index,
                    format!("`weight_map` entry `{key}`: {file} is not a file name"),
                )
            })?;
        files.insert(dir.join(name));
    }
    if files.is_empty() {
        return Err(FileError::new(index, "`weight_map` is empty"));
    }
    for file in &files {
        if !file.is_file() {
            return Err(FileError::new(
                file,
                format!(
                    "missing: the shard is named by {} (an unfinished download?)",
                    index.display()
                ),
            ));
        }
    }
    Ok(files.into_iter().collect())
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

    /// A sharded save is read through its index: a stale single-file copy beside the
    /// shards is left out (it once replaced every tensor, the last file winning), a shard
    /// the index names but the folder lacks is named, and two indexes are refused.
    #[test]
    fn an_index_names_the_shards_that_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "a-00001.safetensors",
            "a-00002.safetensors",
            "a.safetensors",
        ] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        assert_eq!(shards(d).unwrap().len(), 3, "no index: every file");
        std::fs::write(
            d.join("a.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"x": "a-00001.safetensors", "y": "a-00002.safetensors", "z": "a-00001.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            shards(d).unwrap(),
            vec![d.join("a-00001.safetensors"), d.join("a-00002.safetensors")]
        );
        std::fs::remove_file(d.join("a-00002.safetensors")).unwrap();
        let e = shards(d).unwrap_err().to_string();
        assert!(
            e.contains("a-00002.safetensors") && e.contains("missing"),
            "{e}"
        );
        std::fs::write(d.join("b.safetensors.index.json"), "{}").unwrap();
        let e = shards(d).unwrap_err().to_string();
        assert!(e.contains("several safetensors indexes"), "{e}");
    }

    #[test]
    fn an_index_entry_that_is_not_a_file_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("m.safetensors.index.json"),
            r#"{"weight_map": {"x": "../elsewhere.safetensors"}}"#,
        )
        .unwrap();
        let e = shards(dir.path()).unwrap_err().to_string();
        assert!(e.contains("`x`"), "{e}");
    }
}
