//! Batch manifests: one JSON object per line, streamed (never loaded whole).
//!
//! ```json
//! {"id": "cat-01", "image": "images/cat.png", "instruction": "make the cat black"}
//! {"id": "sky-02", "image": "images/sky.jpg", "instruction": "make the sky night", "seeds": [3, 7, 11], "strategy": "best-of-n"}
//! ```
//! Image paths are relative to the manifest's folder (the root) and must stay inside it.
//! Strategy keys (`strategy`, `seeds` as a count or a list, `probe_steps`, `keep`, `steps`,
//! `seed`) override the batch's flags for that line ([`StrategyOverrides`]).

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::strategy::StrategyField;
use crate::engine::{StrategyConfig, StrategyOverrides, ValueSource};
use crate::fsio::fingerprint::Fingerprint;

/// One manifest line as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestLine {
    /// Unique id of the item (also its output folder name).
    pub id: String,
    /// Image path, relative to the manifest root.
    pub image: PathBuf,
    /// The instruction.
    pub instruction: String,
    /// Strategy values overriding the batch's for this item.
    #[serde(flatten)]
    pub overrides: StrategyOverrides,
    /// Keys that are none of the above (an error: serde cannot deny unknown fields next to
    /// a flattened struct, so they are collected and refused by the reader).
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl ManifestLine {
    /// The strategy for this item: the batch default with this line's overrides.
    pub fn strategy(&self, default: &StrategyConfig) -> StrategyConfig {
        self.overrides.apply(default)
    }
}

/// A usable manifest item.
#[derive(Debug, Clone)]
pub struct Item {
    /// 1-based line number in the manifest.
    pub line: usize,
    /// The parsed line.
    pub spec: ManifestLine,
    /// The image path resolved against the root.
    pub image_path: PathBuf,
    /// The batch's strategy with this line's overrides, checked.
    pub strategy: StrategyConfig,
}

impl Item {
    /// The fingerprint of what this line asks for: the image's content, the instruction
    /// and the strategy it runs (the batch's with the line's overrides); see
    /// [`crate::fsio::fingerprint`]. The id and line number are names, not content.
    pub fn fingerprint(&self) -> String {
        let mut f = Fingerprint::new("manifest line");
        f.file("image", &self.image_path)
            .text("instruction", &self.spec.instruction)
            .text(
                "strategy",
                &serde_json::to_string(&self.strategy).expect("a strategy serializes"),
            );
        f.finish()
    }
}

/// A manifest line that cannot be used; reported and skipped, never fatal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BadItem {
    /// 1-based line number.
    pub line: usize,
    /// The id, when the line had one.
    pub id: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// One entry of the manifest stream.
#[derive(Debug)]
pub enum Entry {
    /// A usable item (boxed: it is much larger than a bad line).
    Item(Box<Item>),
    /// A line to report and skip.
    Bad(BadItem),
}

/// Streams a manifest, validating each line: JSON shape, known keys, non-empty id and
/// instruction, an id usable as a folder name, no duplicate id, an image path inside
/// `root`, a strategy (the batch's with the line's overrides) that can run. Memory grows
/// only with the set of ids seen.
pub struct ManifestReader<R> {
    lines: std::io::Split<R>,
    root: PathBuf,
    strategy: StrategyConfig,
    line: usize,
    seen: HashSet<String>,
}

impl ManifestReader<std::io::BufReader<std::fs::File>> {
    /// Opens `path`; image paths resolve against `root` (default: the manifest's folder),
    /// lines without overrides run `strategy`.
    pub fn open(
        path: &Path,
        root: Option<&Path>,
        strategy: StrategyConfig,
    ) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let root = match root {
            Some(r) => r.to_path_buf(),
            None => path.parent().unwrap_or(Path::new("")).to_path_buf(),
        };
        Ok(Self::new(std::io::BufReader::new(file), root, strategy))
    }
}

/// Why the file at `path` is not a manifest at all (an image or other binary file given
/// as `--manifest`), judged by its first bytes; `None` when it may be one (each line is
/// then checked on its own).
pub fn not_a_manifest(path: &Path) -> Option<String> {
    let mut head = Vec::with_capacity(8192);
    let file = std::fs::File::open(path).ok()?;
    std::io::Read::read_to_end(&mut std::io::Read::take(file, 8192), &mut head).ok()?;
    let kind = match crate::models::file_kind::image_kind(&head) {
        Some(image) => image,
        None if head.contains(&0) => "a binary file",
        None => return None,
    };
    Some(format!(
        "{kind}, not a JSONL manifest (one JSON object per line: {{\"id\", \"image\", \"instruction\"}})"
    ))
}

impl<R: BufRead> ManifestReader<R> {
    /// Reads manifest lines from `reader`; image paths resolve against `root` (an empty
    /// root, the folder of a bare `edits.jsonl`, is the working directory).
    pub fn new(reader: R, root: PathBuf, strategy: StrategyConfig) -> Self {
        let root = if root.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            root
        };
        Self {
            lines: reader.split(b'\n'),
            root,
            strategy,
            line: 0,
            seen: HashSet::new(),
        }
    }

    /// The ids of the usable items read so far (every shard's).
    pub fn item_ids(&self) -> &HashSet<String> {
        &self.seen
    }

    fn check(&mut self, text: &str) -> Result<Item, BadItem> {
        let bad = |id: Option<String>, reason: String| BadItem {
            line: self.line,
            id,
            reason,
        };
        let spec = parse_line(text).map_err(|reason| bad(None, reason))?;
        let id = Some(spec.id.clone());
        if let Some(key) = spec.unknown.keys().next() {
            return Err(bad(
                id,
                format!(
                    "unknown key `{key}` (expected id, image, instruction, {})",
                    StrategyField::key_list(StrategyField::overridable())
                ),
            ));
        }
        if spec.id.is_empty()
            || !spec
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || spec.id.starts_with('.')
        {
            return Err(bad(
                id,
                "id must be non-empty letters, digits, '-', '_' or '.' (it names a folder)".into(),
            ));
        }
        if spec.instruction.trim().is_empty() {
            return Err(bad(id, "empty instruction".into()));
        }
        let image_path = match inside_root(&self.root, &spec.image) {
            Ok(path) => path,
            Err(resolved) => {
                return Err(bad(
                    id,
                    format!(
                        "image path {} is outside the manifest root {}{}",
                        spec.image.display(),
                        self.root.display(),
                        resolved
                            .map(|r| format!(" (it resolves to {})", r.display()))
                            .unwrap_or_default()
                    ),
                ))
            }
        };
        let strategy = spec.strategy(&self.strategy);
        if let Err(e) = strategy.check(&ValueSource::ManifestLine(self.line)) {
            return Err(bad(id, e.message));
        }
        if !self.seen.insert(spec.id.clone()) {
            return Err(bad(id, format!("duplicate id {:?}", spec.id)));
        }
        Ok(Item {
            line: self.line,
            spec,
            image_path,
            strategy,
        })
    }
}

/// A line as a [`ManifestLine`]; a value of the wrong type is named by its key (serde's
/// own message gives a column, and for `seeds` not even that).
fn parse_line(text: &str) -> Result<ManifestLine, String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| {
            format!("not a JSON object (one per line, e.g. {{\"id\": ..., \"image\": ..., \"instruction\": ...}}): {e}")
        })?;
    if let Ok(spec) = serde_json::from_value(serde_json::Value::Object(object.clone())) {
        return Ok(spec);
    }
    for (key, value) in &object {
        let wrong = match key.as_str() {
            "id" | "instruction" | "image" if !value.is_string() => {
                Some("expected text".to_string())
            }
            "seeds" => serde_json::from_value::<crate::engine::Seeds>(value.clone())
                .err()
                .map(|_| "expected a count of seeds or a list of seeds".to_string()),
            k if StrategyField::overridable().any(|f| f.key() == k) => {
                let single = serde_json::json!({ k: value });
                serde_json::from_value::<StrategyOverrides>(single)
                    .err()
                    .map(|e| e.to_string())
            }
            _ => None,
        };
        if let Some(wrong) = wrong {
            return Err(format!("`{key}` = {value}: {wrong}"));
        }
    }
    // What is left is a missing key, which serde names.
    serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| format!("not a valid item: {e}"))
}

/// `image` resolved against `root` if it stays inside it. Symlinks are followed (a link
/// inside the root to a file outside it is outside), and `..` that stays inside is fine.
/// A path that does not exist yet is judged lexically; loading it fails later with its own
/// error. On refusal, the resolved path when there is one.
fn inside_root(root: &Path, image: &Path) -> Result<PathBuf, Option<PathBuf>> {
    let joined = root.join(image);
    let canonical_root = root.canonicalize().unwrap_or_else(|_| normalize(root));
    match joined.canonicalize() {
        Ok(resolved) if resolved.starts_with(&canonical_root) => Ok(resolved),
        Ok(resolved) => Err(Some(resolved)),
        Err(_) => {
            let lexical = normalize(image);
            let inside = if image.is_absolute() {
                lexical.starts_with(&canonical_root) || lexical.starts_with(normalize(root))
            } else {
                !matches!(lexical.components().next(), Some(Component::ParentDir))
            };
            if inside {
                Ok(joined)
            } else {
                Err(None)
            }
        }
    }
}

/// `path` with `.` dropped and `..` applied, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            // `..` cancels a name before it, never another `..` (`../../x` stays
            // outside: popping the first `..` made it `x`, inside), and stops at the root.
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    out
}

impl<R: BufRead> Iterator for ManifestReader<R> {
    type Item = std::io::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let bytes = match self.lines.next()? {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            self.line += 1;
            // One line that is not UTF-8 is that line's failure, not the manifest's.
            let text = match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    return Some(Ok(Entry::Bad(BadItem {
                        line: self.line,
                        id: None,
                        reason: format!(
                            "the line is not UTF-8 text (byte {} of it is not)",
                            e.utf8_error().valid_up_to() + 1
                        ),
                    })))
                }
            };
            let text = text.strip_suffix('\r').unwrap_or(&text);
            if text.trim().is_empty() {
                continue;
            }
            return Some(Ok(match self.check(text) {
                Ok(item) => Entry::Item(Box::new(item)),
                Err(bad) => Entry::Bad(bad),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StrategyKind;

    fn read(text: &str) -> Vec<Entry> {
        ManifestReader::new(
            std::io::Cursor::new(text.to_string()),
            "/data".into(),
            StrategyConfig::default(),
        )
        .map(|e| e.unwrap())
        .collect()
    }

    #[test]
    fn validates_lines_and_reports_bad_ones() {
        let entries = read(concat!(
            "{\"id\": \"a\", \"image\": \"x.png\", \"instruction\": \"make it red\"}\n",
            "\n",
            "{\"id\": \"b\", \"image\": \"../etc/passwd\", \"instruction\": \"x\"}\n",
            "{\"id\": \"c\", \"image\": \"c.png\", \"instruction\": \"  \"}\n",
            "{\"id\": \"a\", \"image\": \"y.png\", \"instruction\": \"dup\"}\n",
            "not json\n",
            "{\"id\": \"d/e\", \"image\": \"d.png\", \"instruction\": \"x\"}\n",
            "{\"id\": \"f\", \"image\": \"/abs.png\", \"instruction\": \"x\"}\n",
            "{\"id\": \"g\", \"image\": \"g.png\", \"instruction\": \"x\", \"seeds\": [4, 5], \"strategy\": \"best-of-n\"}\n",
            "{\"id\": \"h\", \"image\": \"h.png\", \"instruction\": \"x\", \"probe_steps\": 50}\n",
            "{\"id\": \"i\", \"image\": \"i.png\", \"instruction\": \"x\", \"seedz\": 3}\n",
            "{\"id\": \"j\", \"image\": \"j.png\", \"instruction\": \"x\", \"seeds\": 4, \"keep\": 1}\n",
            "{\"id\": \"k\", \"image\": \"../../missing.png\", \"instruction\": \"x\"}\n",
        ));
        let summary: Vec<String> = entries
            .iter()
            .map(|e| match e {
                Entry::Item(i) => format!("ok {} line {}", i.spec.id, i.line),
                Entry::Bad(b) => format!("bad line {}: {}", b.line, b.reason),
            })
            .collect();
        assert_eq!(summary[0], "ok a line 1");
        assert!(summary[1].starts_with("bad line 3: image path ../etc/passwd is outside"));
        assert!(summary[2].contains("empty instruction"));
        assert!(summary[3].contains("duplicate id"));
        assert!(summary[4].starts_with("bad line 6: not a JSON object"));
        assert!(summary[5].contains("names a folder"));
        assert!(summary[6].contains("outside the manifest root"));
        assert_eq!(summary[7], "ok g line 9");
        let Entry::Item(g) = &entries[7] else {
            unreachable!()
        };
        assert_eq!(g.image_path, PathBuf::from("/data/g.png"));
        let s = &g.strategy;
        assert_eq!(
            (s.kind, s.seed_list.clone()),
            (StrategyKind::BestOfN, Some(vec![4, 5]))
        );
        assert_eq!(s.candidate_count(), 2);
        // A strategy that cannot run is refused at its line, in the file's own key names.
        assert_eq!(
            summary[8],
            "bad line 10: probe_steps 50 must be between 1 and steps - 1 (49)"
        );
        assert!(summary[9].contains("unknown key `seedz`"), "{}", summary[9]);
        let Entry::Item(j) = &entries[10] else {
            panic!("{}", summary[10])
        };
        assert_eq!((j.strategy.seeds, j.strategy.keep), (4, 1));
        // Two levels up and missing: outside (the lexical check read `../../x` as `x`).
        assert!(
            summary[11].starts_with("bad line 13: image path ../../missing.png is outside"),
            "{}",
            summary[11]
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_a_bad_line_not_the_end_of_the_manifest() {
        let mut text = b"{\"id\": \"a\", \"image\": \"a.png\", \"instruction\": \"x\"}\n".to_vec();
        text.extend_from_slice(
            b"{\"id\": \"b\", \"image\": \"b.png\", \"instruction\": \"caf\xe9\"}\n",
        );
        text.extend_from_slice(b"{\"id\": \"c\", \"image\": \"c.png\", \"instruction\": \"y\"}\n");
        let entries: Vec<Entry> = ManifestReader::new(
            std::io::Cursor::new(text),
            "/data".into(),
            StrategyConfig::default(),
        )
        .map(|e| e.unwrap())
        .collect();
        assert_eq!(entries.len(), 3);
        assert!(matches!(&entries[0], Entry::Item(i) if i.spec.id == "a"));
        let Entry::Bad(bad) = &entries[1] else {
            panic!("{:?}", entries[1])
        };
        assert_eq!(bad.line, 2);
        assert!(bad.reason.contains("UTF-8"), "{}", bad.reason);
        assert!(matches!(&entries[2], Entry::Item(i) if i.spec.id == "c" && i.line == 3));
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key() {
        for (line, key) in [
            (
                r#"{"id": "a", "image": "a.png", "instruction": "x", "probe_steps": "four"}"#,
                "probe_steps",
            ),
            (
                r#"{"id": "a", "image": "a.png", "instruction": "x", "seeds": "many"}"#,
                "seeds",
            ),
            (
                r#"{"id": "a", "image": "a.png", "instruction": "x", "target": [1]}"#,
                "target",
            ),
            (
                r#"{"id": "a", "image": "a.png", "instruction": "x", "strategy": "fastest"}"#,
                "strategy",
            ),
            (r#"{"id": 7, "image": "a.png", "instruction": "x"}"#, "id"),
            (
                r#"{"id": "a", "image": ["a.png"], "instruction": "x"}"#,
                "image",
            ),
        ] {
            let entries = read(line);
            let Entry::Bad(bad) = &entries[0] else {
                panic!("{line}: accepted")
            };
            assert!(
                bad.reason.contains(&format!("`{key}`")),
                "{line}: {}",
                bad.reason
            );
            assert!(!bad.reason.contains("column"), "{line}: {}", bad.reason);
        }
        // A target beyond f32 is infinite: refused by name like NaN would be.
        let entries = read(r#"{"id": "a", "image": "a.png", "instruction": "x", "target": 1e39}"#);
        let Entry::Bad(bad) = &entries[0] else {
            panic!("accepted")
        };
        assert!(bad.reason.contains("target"), "{}", bad.reason);
    }

    #[test]
    fn a_line_sets_its_own_step_cache_and_a_bad_one_is_named() {
        let entries = read(concat!(
            "{\"id\": \"a\", \"image\": \"a.png\", \"instruction\": \"x\", \"cache\": \"fbc:0.12\"}\n",
            "{\"id\": \"b\", \"image\": \"b.png\", \"instruction\": \"x\", \"cache\": \"fbc:fast\"}\n",
            "{\"id\": \"c\", \"image\": \"c.png\", \"instruction\": \"x\"}\n",
        ));
        let Entry::Item(a) = &entries[0] else {
            panic!("{:?}", entries[0])
        };
        assert_eq!(a.strategy.cache.to_string(), "fbc:0.12");
        let Entry::Bad(b) = &entries[1] else {
            panic!("{:?}", entries[1])
        };
        assert_eq!(b.line, 2);
        assert!(
            b.reason
                .contains("cache \"fbc:fast\": threshold \"fast\" is not a number"),
            "{}",
            b.reason
        );
        let Entry::Item(c) = &entries[2] else {
            panic!("{:?}", entries[2])
        };
        assert!(!c.strategy.cache.is_on());
    }
}
