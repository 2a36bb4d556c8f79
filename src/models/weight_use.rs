//! No weight left unread: every loader records the tensors its model reads, and after the
//! model is built compares them with every tensor its files hold. A tensor nobody read (a
//! bias the model was built without, an extra norm, a renamed layer, a LoRA merged under
//! another name) is an error naming it, unless the reference implementation leaves it unread
//! too, which each model lists in one place with the reason ([`KnownUnused`]). The
//! `--allow-unused-weights` escape hatch ([`UnusedWeights::Allow`]) loads anyway and logs what
//! was left.
//!
//! - [`ReadLog`] records file keys as they are read (whole tensors, or row ranges of a fused
//!   tensor that several model names share); [`Recording`] is a `VarBuilder` backend that
//!   records every name it serves.
//! - [`StoredTensors`] lists the tensors of a checkpoint's files (file, key, rows).
//! - [`check_unused`] compares the two and applies the policy.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

use crate::error::ModelError;

/// What a loader does with tensors of its files that the model never read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnusedWeights {
    /// Refuse to load, naming them (the default: a model that silently skips a tensor
    /// computes something other than the checkpoint).
    #[default]
    Refuse,
    /// Load anyway and log them (`--allow-unused-weights`, for experiments).
    Allow,
}

impl UnusedWeights {
    /// [`Self::Allow`] when `allow` is set.
    pub fn allow_if(allow: bool) -> Self {
        if allow {
            Self::Allow
        } else {
            Self::Refuse
        }
    }
}

/// Tensors a checkpoint may hold that the reference implementation does not read either.
/// `pattern` is a file key where `*` stands for any run of characters; `reason` says why
/// the reference leaves it unread (cite the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownUnused {
    /// Keys it covers (`*` matches any characters, dots included).
    pub pattern: Cow<'static, str>,
    /// Why the reference leaves them unread.
    pub reason: Cow<'static, str>,
}

impl KnownUnused {
    /// A fixed entry.
    pub const fn new(pattern: &'static str, reason: &'static str) -> Self {
        Self {
            pattern: Cow::Borrowed(pattern),
            reason: Cow::Borrowed(reason),
        }
    }

    /// Whether `key` is one of the keys this entry covers.
    pub fn covers(&self, key: &str) -> bool {
        glob_match(self.pattern.as_bytes(), key.as_bytes())
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob_match(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

/// How much of one stored tensor was read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Coverage {
    Whole,
    /// Row ranges `(start, len)` of dimension 0.
    Rows(Vec<(usize, usize)>),
}

/// The file keys read so far (shared by the backends of one checkpoint).
#[derive(Debug, Clone, Default)]
pub struct ReadLog(Arc<Mutex<BTreeMap<String, Coverage>>>);

impl ReadLog {
    /// A new, empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// `key` was read whole.
    pub fn record(&self, key: &str) {
        self.0
            .lock()
            .expect("read log")
            .insert(key.to_string(), Coverage::Whole);
    }

    /// Rows `start..start + len` of `key` were read (a slice of a fused tensor).
    pub fn record_rows(&self, key: &str, start: usize, len: usize) {
        let mut log = self.0.lock().expect("read log");
        match log
            .entry(key.to_string())
            .or_insert_with(|| Coverage::Rows(Vec::new()))
        {
            Coverage::Whole => {}
            Coverage::Rows(ranges) => ranges.push((start, len)),
        }
    }

    /// Whether `key` was read at all.
    pub fn contains(&self, key: &str) -> bool {
        self.0.lock().expect("read log").contains_key(key)
    }

    /// Rows of a `rows`-row tensor that were never read, as ranges; empty when read whole
    /// or fully covered. `None` when the key was not read at all.
    fn unread_rows(&self, key: &str, rows: Option<usize>) -> Option<Vec<(usize, usize)>> {
        let log = self.0.lock().expect("read log");
        match log.get(key)? {
            Coverage::Whole => Some(Vec::new()),
            Coverage::Rows(ranges) => {
                let Some(rows) = rows else {
                    return Some(Vec::new());
                };
                let mut ranges = ranges.clone();
                ranges.sort_unstable();
                let mut gaps = Vec::new();
                let mut next = 0;
                for (start, len) in ranges {
                    if start > next {
                        gaps.push((next, start - next));
                    }
                    next = next.max(start + len);
                }
                if next < rows {
                    gaps.push((next, rows - next));
                }
                Some(gaps)
            }
        }
    }
}

/// A `VarBuilder` backend that records every name it serves in a [`ReadLog`] (the names
/// must be the file's keys: put any renaming outside it).
pub struct Recording<B> {
    inner: B,
    log: ReadLog,
}

impl<B> Recording<B> {
    /// `inner`, recording into `log`.
    pub fn new(inner: B, log: ReadLog) -> Self {
        Self { inner, log }
    }
}

impl<B: SimpleBackend> SimpleBackend for Recording<B> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let tensor = self.inner.get(shape, name, init, dtype, dev)?;
        self.log.record(name);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.inner.get_unchecked(name, dtype, dev)?;
        self.log.record(name);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// One tensor of a checkpoint's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// The file holding it.
    pub file: PathBuf,
    /// Its key in the file.
    pub key: String,
    /// Its size along dimension 0 (`None` for a scalar).
    pub rows: Option<usize>,
    /// The stored element type when it is not floating point (`I32`, `U8`, ...): a weight
    /// the model reads must be floating point, or its bytes would be cast to garbage.
    pub integer_dtype: Option<String>,
}

/// Every tensor of a checkpoint's files.
#[derive(Debug, Clone, Default)]
pub struct StoredTensors(pub Vec<StoredTensor>);

impl StoredTensors {
    /// The tensors of safetensors `files`, read from their headers (no data is touched).
    pub fn safetensors(files: &[PathBuf]) -> std::result::Result<Self, ModelError> {
        let mut all = Vec::new();
        for file in files {
            // SAFETY: mapped read-only; only the header is parsed.
            let st =
                unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
                    ModelError::files(file, format!("not a readable safetensors file: {e}"))
                })?;
            all.extend(st.tensors().into_iter().map(|(key, view)| {
                use safetensors::Dtype;
                let integer = matches!(
                    view.dtype(),
                    Dtype::BOOL
                        | Dtype::U8
                        | Dtype::I8
                        | Dtype::I16
                        | Dtype::U16
                        | Dtype::I32
                        | Dtype::U32
                        | Dtype::I64
                        | Dtype::U64
                );
                StoredTensor {
                    file: file.clone(),
                    rows: view.shape().first().copied(),
                    integer_dtype: integer.then(|| format!("{:?}", view.dtype())),
                    key,
                }
            }));
        }
        all.sort_by(|a, b| (&a.file, &a.key).cmp(&(&b.file, &b.key)));
        // A key in two files is read from whichever the reader maps last: the other copy
        // would be neither used nor reported.
        let mut first_file: HashMap<&str, &PathBuf> = HashMap::new();
        for t in &all {
            if let Some(earlier) = first_file.insert(&t.key, &t.file) {
                return Err(ModelError::files(
                    &t.file,
                    format!(
                        "tensor `{}` is also in {}: one checkpoint's shards hold each tensor once (a stale copy beside them?)",
                        t.key,
                        earlier.display()
                    ),
                ));
            }
        }
        Ok(Self(all))
    }

    /// The tensors of one GGUF file, from its parsed header.
    pub fn gguf(file: &Path, content: &candle_core::quantized::gguf_file::Content) -> Self {
        let mut all: Vec<StoredTensor> = content
            .tensor_infos
            .iter()
            .map(|(key, info)| StoredTensor {
                file: file.to_path_buf(),
                key: key.clone(),
                rows: info.shape.dims().first().copied(),
                integer_dtype: None,
            })
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Self(all)
    }
}

/// A tensor (or part of one) the model did not read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unread {
    /// The file holding it.
    pub file: PathBuf,
    /// Its key.
    pub key: String,
    /// Set when only some rows went unread: which.
    pub rows: Option<String>,
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file.file_name().map_or_else(
            || self.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match &self.rows {
            Some(rows) => write!(f, "{file}: `{}` (rows {rows})", self.key),
            None => write!(f, "{file}: `{}`", self.key),
        }
    }
}

/// What the comparison found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnusedReport {
    /// Tensors nobody read and no list explains (loaded only under [`UnusedWeights::Allow`]).
    pub unread: Vec<Unread>,
    /// Tensors left unread as the reference leaves them.
    pub known_unused: usize,
}

/// How many unread tensors an error names before it gives a count.
pub const NAMED_IN_ERRORS: usize = 5;

/// Names at most [`NAMED_IN_ERRORS`] of `items`, then how many more there are.
pub fn name_a_few<T: std::fmt::Display>(items: &[T]) -> String {
    let mut text = items
        .iter()
        .take(NAMED_IN_ERRORS)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > NAMED_IN_ERRORS {
        text.push_str(&format!(" and {} more", items.len() - NAMED_IN_ERRORS));
    }
    text
}

/// Compares the tensors of `stored` with those `log` saw read, for the model `what` ("the
/// FLUX transformer"). Unread tensors that `known` covers are the reference's too; any other
/// is an error under [`UnusedWeights::Refuse`] naming a few (file and key) and the count, and
/// a warning under [`UnusedWeights::Allow`].
pub fn check_unused(
    what: &str,
    stored: &StoredTensors,
    log: &ReadLog,
    known: &[KnownUnused],
    policy: UnusedWeights,
) -> std::result::Result<UnusedReport, ModelError> {
    let mut report = UnusedReport::default();
    for t in &stored.0 {
        let unread = match log.unread_rows(&t.key, t.rows) {
            None => Some(None),
            Some(gaps) if gaps.is_empty() => None,
            Some(gaps) => Some(Some(
                gaps.iter()
                    .map(|(s, n)| format!("{s}..{}", s + n))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        };
        let Some(rows) = unread else {
            // Read by the model: its stored bytes must be a float type (a scalar, such as a
            // LoRA's alpha, may be an integer).
            if let (Some(dtype), Some(_)) = (&t.integer_dtype, t.rows) {
                return Err(ModelError::files(
                    &t.file,
                    format!(
                        "tensor `{}` of {what}'s checkpoint is stored as {dtype}; the model reads floating-point weights (F32, F16, BF16 or F8), so the file is damaged or mislabelled",
                        t.key
                    ),
                ));
            }
            continue;
        };
        if let Some(entry) = known.iter().find(|k| k.covers(&t.key)) {
            tracing::debug!(key = %t.key, reason = %entry.reason, "{what}: tensor unread, as the reference leaves it");
            report.known_unused += 1;
            continue;
        }
        report.unread.push(Unread {
            file: t.file.clone(),
            key: t.key.clone(),
            rows,
        });
    }
    if report.unread.is_empty() {
        return Ok(report);
    }
    let n = report.unread.len();
    let list = name_a_few(&report.unread);
    match policy {
        UnusedWeights::Refuse => Err(ModelError::files(
            &report.unread[0].file,
            format!(
                "{n} tensor{} of {what}'s checkpoint {} never read by the model built here, and the \
                 reference does not leave {} unread either: {list}. The model would compute \
                 something other than the checkpoint; pass --allow-unused-weights to load it anyway",
                if n == 1 { "" } else { "s" },
                if n == 1 { "is" } else { "are" },
                if n == 1 { "it" } else { "them" },
            ),
        )),
        UnusedWeights::Allow => {
            tracing::warn!(
                unread = n,
                "{what}: loaded with tensors the model never reads (--allow-unused-weights): {list}"
            );
            Ok(report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(keys: &[(&str, Option<usize>)]) -> StoredTensors {
        StoredTensors(
            keys.iter()
                .map(|(k, rows)| StoredTensor {
                    file: PathBuf::from("/ckpt/model.safetensors"),
                    key: k.to_string(),
                    rows: *rows,
                    integer_dtype: None,
                })
                .collect(),
        )
    }

    /// Two files holding the same key: refused, naming both, instead of one copy being
    /// read and the other passing as read.
    #[test]
    fn a_key_in_two_safetensors_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let (a, b) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        candle_core::safetensors::save(&std::collections::HashMap::from([("w", t.clone())]), &a)
            .unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("w", t.clone()), ("v", t)]),
            &b,
        )
        .unwrap();
        let e = StoredTensors::safetensors(&[a.clone(), b.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`w`") && e.contains("a.safetensors") && e.contains("b.safetensors"),
            "{e}"
        );
        assert_eq!(StoredTensors::safetensors(&[b]).unwrap().0.len(), 2);
    }

    #[test]
    fn patterns_match_any_run_of_characters() {
        let k = KnownUnused::new("*.scale_input", "r");
        assert!(k.covers("double_blocks.0.img_attn.qkv.scale_input"));
        assert!(!k.covers("double_blocks.0.img_attn.qkv.scale_weight"));
        assert!(KnownUnused::new("encoder.layers.*", "r").covers("encoder.layers.3.conv.0.weight"));
        assert!(!KnownUnused::new("encoder.*", "r").covers("decoder.layers.0.weight"));
        assert!(KnownUnused::new("scaled_fp8", "r").covers("scaled_fp8"));
    }

    #[test]
    fn unread_tensors_are_refused_by_name_and_counted() {
        let files = stored(&[
            ("a.weight", Some(4)),
            ("b.weight", Some(4)),
            ("extra.bias", Some(4)),
            ("head.weight", Some(2)),
        ]);
        let log = ReadLog::new();
        log.record("a.weight");
        log.record("b.weight");
        let known = [KnownUnused::new("head.*", "the reference has no head")];
        let err = check_unused("the model", &files, &log, &known, UnusedWeights::Refuse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors: `extra.bias`"), "{err}");
        assert!(err.contains("1 tensor of the model's"), "{err}");
        assert!(!err.contains("head.weight"), "{err}");
        assert!(err.contains("--allow-unused-weights"), "{err}");
        let report = check_unused("the model", &files, &log, &known, UnusedWeights::Allow).unwrap();
        assert_eq!(report.unread.len(), 1);
        assert_eq!(report.known_unused, 1);
        log.record("extra.bias");
        let report =
            check_unused("the model", &files, &log, &known, UnusedWeights::Refuse).unwrap();
        assert!(report.unread.is_empty());
    }

    #[test]
    fn a_fused_tensor_must_be_read_in_full() {
        let files = stored(&[("qkv.weight", Some(12))]);
        let log = ReadLog::new();
        log.record_rows("qkv.weight", 0, 4);
        log.record_rows("qkv.weight", 8, 4);
        let err = check_unused("m", &files, &log, &[], UnusedWeights::Refuse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`qkv.weight` (rows 4..8)"), "{err}");
        log.record_rows("qkv.weight", 4, 4);
        assert!(check_unused("m", &files, &log, &[], UnusedWeights::Refuse).is_ok());
    }

    #[test]
    fn errors_name_a_few_then_count() {
        let keys: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
        let files = stored(&keys.iter().map(|k| (k.as_str(), None)).collect::<Vec<_>>());
        let err = check_unused("m", &files, &ReadLog::new(), &[], UnusedWeights::Refuse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("8 tensors"), "{err}");
        assert!(err.contains("`t4` and 3 more"), "{err}");
        assert!(!err.contains("`t5`"), "{err}");
    }
}
