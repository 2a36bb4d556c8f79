//! Content fingerprints: a digest of what one unit of a resumable run was made from (an
//! item's images and instruction, a manifest line's strategy), stored beside its result so
//! a rerun can tell a unit whose input changed under the same id from one that did not.
//!
//! Files are hashed by their content, not by size and modification time: a copied or
//! checked-out dataset gets new times without new content (a rejudge or re-edit for
//! nothing), and a same-size rewrite within the clock's granularity keeps them (a stale
//! result passed as current). Reading each input once per run costs little next to the
//! judge call or the edit it guards. Paths are left out: the model sees the bytes, so a
//! dataset moved elsewhere keeps its results.

use std::path::Path;

use sha2::{Digest, Sha256};

/// A fingerprint being built from named parts (each part's name and length are hashed with
/// it, so no two different sequences of parts hash alike).
#[derive(Clone)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    /// Starts a fingerprint of a unit of `kind` (a pair, a rating, a manifest line).
    pub fn new(kind: &str) -> Self {
        let mut f = Self(Sha256::new());
        f.bytes("kind", kind.as_bytes());
        f
    }

    /// Adds named text.
    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.bytes(name, value.as_bytes())
    }

    /// Adds named bytes.
    pub fn bytes(&mut self, name: &str, value: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// Adds a file's content. A file that cannot be read adds why: its unit then matches
    /// no stored result made from a readable file, and is run again (where its own error
    /// is recorded).
    pub fn file(&mut self, name: &str, path: &Path) -> &mut Self {
        match std::fs::read(path) {
            Ok(content) => self.bytes(name, &content),
            Err(e) => self.text(&format!("{name} (unreadable)"), &e.kind().to_string()),
        }
    }

    /// The digest: `sha256:` and 64 hex digits.
    pub fn finish(self) -> String {
        format!("sha256:{:x}", self.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_known_by_its_content_not_its_path_or_time() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
        std::fs::write(&a, b"one").unwrap();
        std::fs::write(&b, b"one").unwrap();
        let of = |path: &Path| {
            let mut f = Fingerprint::new("rating");
            f.file("edit", path).text("instruction", "x");
            f.finish()
        };
        assert_eq!(of(&a), of(&b), "same content, another path");
        std::fs::write(&b, b"two").unwrap();
        assert_ne!(of(&a), of(&b), "same size, other content");
        let gone = of(&dir.path().join("gone.png"));
        assert_ne!(gone, of(&a));
        assert!(
            gone.starts_with("sha256:") && gone.len() == 7 + 64,
            "{gone}"
        );
    }

    #[test]
    fn parts_are_told_apart_by_name_and_boundary() {
        let of = |parts: &[(&str, &str)]| {
            let mut f = Fingerprint::new("k");
            for (name, value) in parts {
                f.text(name, value);
            }
            f.finish()
        };
        assert_ne!(of(&[("a", "bc")]), of(&[("a", "b"), ("c", "")]));
        assert_ne!(of(&[("a", "x")]), of(&[("b", "x")]));
        assert_eq!(of(&[("a", "x")]), of(&[("a", "x")]));
        assert_ne!(
            Fingerprint::new("k").finish(),
            Fingerprint::new("j").finish()
        );
    }
}
