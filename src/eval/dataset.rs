//! Evaluation datasets: a JSONL manifest, the Hugging Face parquet layouts of the Emu Edit
//! test set and GEdit-Bench (read from local files), and generated testbed suites; with task
//! filtering and deterministic sub-sampling.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use super::item::{EvalItem, ItemSource};
use super::parquet;
use crate::error::EditError;
use crate::models::testbed;

/// Which dataset a suite evaluates on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DatasetSpec {
    /// One JSON object per line: `id`, `image` (relative to the file), `instruction`,
    /// optional `task`.
    Jsonl {
        /// The manifest.
        path: PathBuf,
    },
    /// `facebook/emu_edit_test_set` parquet files (columns `image`, `instruction`, `task`).
    EmuEdit {
        /// A parquet file or a folder of them.
        path: PathBuf,
    },
    /// `stepfun-ai/GEdit-Bench` parquet files (`input_image`, `instruction`, `task_type`,
    /// `instruction_language`, `key`).
    GeditBench {
        /// A parquet file or a folder of them.
        path: PathBuf,
        /// Keep only this instruction language (`en` or `cn`).
        #[serde(default)]
        language: Option<String>,
    },
    /// Generated testbed edits (scene seeds `first_scene..first_scene + edits`).
    Testbed {
        /// Number of edits.
        edits: usize,
        /// First scene seed.
        #[serde(default = "default_first_scene")]
        first_scene: u64,
        /// Outcome contrast of the testbed generator (a preset `sharp`, `soft`, `loose` or a
        /// number in (0, 1]); when given it replaces `--testbed-contrast`.
        #[serde(
            default,
            deserialize_with = "contrast_preset",
            skip_serializing_if = "Option::is_none"
        )]
        contrast: Option<f32>,
    },
}

fn default_first_scene() -> u64 {
    1000
}

/// Reads a contrast written as a preset name or a number.
fn contrast_preset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Preset(String),
        Number(f64),
    }
    let parse = crate::generate::testbed::PreviewReliability::parse_contrast;
    match Option::<Written>::deserialize(d)? {
        None => Ok(None),
        Some(Written::Preset(name)) => parse(&name).map(Some),
        Some(Written::Number(x)) => parse(&x.to_string()).map(Some),
    }
    .map_err(|e| serde::de::Error::custom(format!("contrast: {e}")))
}

/// Filtering and sub-sampling applied after loading.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Keep only these task types.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// At most this many items, chosen by hashing ids with `sample_seed` (the same subset
    /// on every machine and in any file order), kept in dataset order.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Seed of the sub-sample.
    #[serde(default)]
    pub sample_seed: u64,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> EditError {
    EditError::Invalid(format!("{}: {what}", path.display()))
}

/// Loads the items of `spec`, then applies `selection`.
pub fn load(spec: &DatasetSpec, selection: &Selection) -> Result<Vec<EvalItem>, EditError> {
    let items = match spec {
        DatasetSpec::Jsonl { path } => load_jsonl(path)?,
        DatasetSpec::EmuEdit { path } => parquet::load(path, parquet::Layout::EmuEdit, None)?,
        DatasetSpec::GeditBench { path, language } => {
            parquet::load(path, parquet::Layout::GeditBench, language.as_deref())?
        }
        DatasetSpec::Testbed {
            edits, first_scene, ..
        } => (0..*edits as u64)
            .map(|i| {
                let seed = first_scene.wrapping_add(i);
                let scene = testbed::SceneEdit::generate(seed);
                EvalItem {
                    id: format!("scene{seed}"),
                    source: ItemSource::Testbed(seed),
                    instruction: scene.instruction.clone(),
                    task: Some(scene.op.task().to_string()),
                    language: None,
                }
            })
            .collect(),
    };
    let mut seen = std::collections::HashSet::new();
    for item in &items {
        if !seen.insert(item.id.clone()) {
            let file = match spec {
                DatasetSpec::Jsonl { path }
                | DatasetSpec::EmuEdit { path }
                | DatasetSpec::GeditBench { path, .. } => path.display().to_string(),
                DatasetSpec::Testbed { .. } => "the testbed dataset".into(),
            };
            return Err(EditError::Invalid(format!(
                "dataset {file}: item id `{}` is used twice; ids must be unique",
                item.id
            )));
        }
    }
    if items.is_empty() {
        return Err(EditError::Invalid(
            "dataset: no items (an empty file, or a `language` no item has)".into(),
        ));
    }
    let tasks: std::collections::BTreeSet<String> =
        items.iter().filter_map(|i| i.task.clone()).collect();
    let selected = select(items, selection);
    if selected.is_empty() {
        // A typo in the task filter would otherwise evaluate nothing and report success.
        return Err(EditError::Invalid(format!(
            "[selection] (tasks {:?}, limit {:?}) keeps no item; the dataset's tasks are {:?}",
            selection.tasks, selection.limit, tasks
        )));
    }
    Ok(selected)
}

/// Task filter, then the deterministic hash sub-sample.
pub fn select(items: Vec<EvalItem>, selection: &Selection) -> Vec<EvalItem> {
    let mut items: Vec<EvalItem> = items
        .into_iter()
        .filter(|i| {
            selection.tasks.is_empty()
                || i.task.as_ref().is_some_and(|t| selection.tasks.contains(t))
        })
        .collect();
    if let Some(limit) = selection.limit {
        items = sample_units(items, limit, selection.sample_seed, |i| &i.id);
    }
    items
}

/// The deterministic hash sub-sample: at most `limit` items, whole units at a time (`unit`
/// names an item's unit: its id, or the group it is judged with). Units are taken in the
/// order of a hash of `seed` and their name, so every machine keeps the same subset, and a
/// unit that would pass `limit` is skipped for the next that fits; the items keep their
/// order.
pub fn sample_units<T>(
    items: Vec<T>,
    limit: usize,
    seed: u64,
    unit: impl Fn(&T) -> &str,
) -> Vec<T> {
    if items.len() <= limit {
        return items;
    }
    let mut sizes: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for item in &items {
        *sizes.entry(unit(item)).or_default() += 1;
    }
    let mut ranked: Vec<(_, &str, usize)> = sizes
        .into_iter()
        .map(|(name, size)| {
            let mut h = Sha256::new();
            h.update(seed.to_le_bytes());
            h.update(name.as_bytes());
            (h.finalize(), name, size)
        })
        .collect();
    ranked.sort_unstable();
    let mut taken = 0;
    let mut keep = std::collections::HashSet::new();
    for (_, name, size) in ranked {
        if taken + size <= limit {
            taken += size;
            keep.insert(name.to_string());
        }
    }
    items
        .into_iter()
        .filter(|i| keep.contains(unit(i)))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlLine {
    id: String,
    image: PathBuf,
    instruction: String,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    language: Option<String>,
}

fn load_jsonl(path: &Path) -> Result<Vec<EvalItem>, EditError> {
    let file = std::fs::File::open(path).map_err(|e| invalid(path, format!("cannot open: {e}")))?;
    let root = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    // The line each id was first seen on, so a repeat names both lines.
    let mut first_line = std::collections::HashMap::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| invalid(path, format!("line {}: {e}", n + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: JsonlLine = serde_json::from_str(&line)
            .map_err(|e| invalid(path, format!("line {}: {e}", n + 1)))?;
        if l.instruction.trim().is_empty() {
            return Err(invalid(path, format!("line {}: empty instruction", n + 1)));
        }
        // Checked now, like judge-eval's datasets: a missing image found item by item
        // would fail its arms one by one, after the items before it ran.
        let image = root.join(&l.image);
        if !image.is_file() {
            return Err(invalid(
                path,
                format!("line {}: `image` {} is not a file", n + 1, image.display()),
            ));
        }
        if let Some(first) = first_line.insert(l.id.clone(), n + 1) {
            return Err(invalid(
                path,
                format!(
                    "line {}: item id `{}` is already used on line {first}; ids must be unique",
                    n + 1,
                    l.id
                ),
            ));
        }
        items.push(EvalItem {
            id: l.id,
            source: ItemSource::File(image),
            instruction: l.instruction,
            task: l.task,
            language: l.language,
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<EvalItem> {
        (0..n)
            .map(|i| EvalItem {
                id: format!("item{i}"),
                source: ItemSource::Testbed(i as u64),
                instruction: "x".into(),
                task: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
                language: None,
            })
            .collect()
    }

    #[test]
    fn a_repeated_jsonl_id_names_the_file_and_both_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"").unwrap();
        let path = dir.path().join("items.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"id": "x", "image": "a.png", "instruction": "one"}"#,
                "\n\n",
                r#"{"id": "x", "image": "a.png", "instruction": "two"}"#,
                "\n"
            ),
        )
        .unwrap();
        let err = load_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("items.jsonl"), "{err}");
        assert!(
            err.contains("line 3: item id `x` is already used on line 1"),
            "{err}"
        );
    }

    #[test]
    fn subsample_is_deterministic_order_preserving_and_independent_of_file_order() {
        let sel = Selection {
            tasks: vec![],
            limit: Some(10),
            sample_seed: 3,
        };
        let a: Vec<String> = select(items(100), &sel).into_iter().map(|i| i.id).collect();
        assert_eq!(a.len(), 10);
        let mut reversed = items(100);
        reversed.reverse();
        let mut b: Vec<String> = select(reversed, &sel).into_iter().map(|i| i.id).collect();
        b.reverse();
        assert_eq!(a, b);
        let idx: Vec<usize> = a.iter().map(|s| s[4..].parse().unwrap()).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "dataset order kept");
        let other: Vec<String> = select(
            items(100),
            &Selection {
                sample_seed: 4,
                ..sel.clone()
            },
        )
        .into_iter()
        .map(|i| i.id)
        .collect();
        assert_ne!(a, other);
    }

    /// Units larger than one (EditReward-Bench's groups of pairs) are kept or left whole,
    /// never past the limit; units of one item give the per-item sample.
    #[test]
    fn a_sample_keeps_whole_units_within_the_limit() {
        // 30 groups of 1 to 4 pairs: (group, pair).
        let pairs: Vec<(String, usize)> = (0..30)
            .flat_map(|g| (0..1 + g % 4).map(move |p| (format!("group{g}"), p)))
            .collect();
        let picked = sample_units(pairs.clone(), 20, 0, |p| &p.0);
        assert!(picked.len() <= 20 && picked.len() >= 17, "{}", picked.len());
        for (group, _) in &picked {
            let kept = picked.iter().filter(|p| &p.0 == group).count();
            let all = pairs.iter().filter(|p| &p.0 == group).count();
            assert_eq!(kept, all, "{group} split");
        }
        assert_eq!(sample_units(pairs.clone(), 1000, 0, |p| &p.0), pairs);
        let per_item = sample_units(items(100), 10, 3, |i| &i.id);
        let selected = select(
            items(100),
            &Selection {
                tasks: vec![],
                limit: Some(10),
                sample_seed: 3,
            },
        );
        let ids = |v: &[EvalItem]| v.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&per_item), ids(&selected));
    }

    #[test]
    fn task_filter_applies_before_the_limit() {
        let sel = Selection {
            tasks: vec!["odd".into()],
            limit: Some(5),
            sample_seed: 0,
        };
        let picked = select(items(40), &sel);
        assert_eq!(picked.len(), 5);
        assert!(picked.iter().all(|i| i.task.as_deref() == Some("odd")));
    }

    #[test]
    fn testbed_items_carry_their_task() {
        let spec = DatasetSpec::Testbed {
            edits: 12,
            first_scene: 0,
            contrast: None,
        };
        let all = load(&spec, &Selection::default()).unwrap();
        assert_eq!(all.len(), 12);
        assert!(all.iter().all(|i| i.task.is_some()));
    }

    /// A task filter that keeps nothing (a typo: `recolor` for `recolour`) is refused with
    /// the tasks the dataset has, instead of evaluating no item and reporting success.
    #[test]
    fn a_selection_that_keeps_no_item_is_refused() {
        let spec = DatasetSpec::Testbed {
            edits: 12,
            first_scene: 0,
            contrast: None,
        };
        let sel = Selection {
            tasks: vec!["recolor".into()],
            ..Selection::default()
        };
        let e = load(&spec, &sel).unwrap_err().to_string();
        assert!(e.contains("recolor") && e.contains("recolour"), "{e}");
    }

    /// A JSONL dataset's images are checked as it loads, naming the line and field.
    #[test]
    fn a_jsonl_line_whose_image_is_missing_is_refused_by_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"").unwrap();
        let path = dir.path().join("items.jsonl");
        std::fs::write(
            &path,
            "{\"id\": \"a\", \"image\": \"a.png\", \"instruction\": \"x\"}\n{\"id\": \"b\", \"image\": \"b.png\", \"instruction\": \"y\"}\n",
        )
        .unwrap();
        let e = load_jsonl(&path).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("`image`") && e.contains("b.png"),
            "{e}"
        );
        std::fs::write(dir.path().join("b.png"), b"").unwrap();
        assert_eq!(load_jsonl(&path).unwrap().len(), 2);
    }
}
