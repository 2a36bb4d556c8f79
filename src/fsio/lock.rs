//! An exclusive lock on an output folder, so two runs never write the same outputs: the
//! second one is refused at once with the holder's pid, before any work.
//!
//! The lock is an advisory OS lock (`flock` on Unix) on `.icedit.lock` in the folder, held
//! as long as the [`OutputLock`] lives; the OS releases it when the process dies, however it
//! dies, so a killed run never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::FileError;

/// The lock file's name inside an output folder.
pub const LOCK_FILE: &str = ".icedit.lock";

/// Holds a folder's lock until dropped.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock of `dir` (which must exist), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, FileError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| FileError::new(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(FileError::new(
                    dir,
                    format!(
                        "in use by another icedit-scale run{}; wait for it to end, or give another output folder",
                        if holder.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {holder})")
                        }
                    ),
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(FileError::new(&path, format!("cannot lock: {e}")))
            }
        }
        // Ours now: say who holds it.
        file.set_len(0).map_err(|e| FileError::new(&path, e))?;
        file.rewind().map_err(|e| FileError::new(&path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| FileError::new(&path, e))?;
        file.flush().map_err(|e| FileError::new(&path, e))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(dir.path()).unwrap();
        let err = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another icedit-scale run"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        OutputLock::acquire(dir.path()).unwrap();
    }
}
