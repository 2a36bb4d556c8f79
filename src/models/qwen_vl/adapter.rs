//! PEFT LoRA adapters on a Qwen-VL checkpoint, merged into the weights as they are read.
//!
//! peft's `save_pretrained` writes `adapter_config.json` (r, lora_alpha, use_rslora,
//! alpha_pattern, ...) and `adapter_model.safetensors` with one `lora_A` `[r, in]` and one
//! `lora_B` `[out, r]` per wrapped linear, keyed `base_model.model.<module>.lora_A.weight`.
//! The merged weight is `W + scale * B @ A` with `scale = lora_alpha / r` (or
//! `lora_alpha / sqrt(r)` with rsLoRA), times the preset's `adapter_scale`.
//!
//! Module names come in two layouts whichever layout the base checkpoint uses: adapters
//! trained on transformers >= 4.52 name `model.language_model.*` / `model.visual.*`, older
//! ones `model.*` / `visual.*`. Both are mapped onto one canonical name (`text.*`,
//! `vision.*`, `lm_head`), as are the base checkpoint's keys, so any adapter meets any
//! checkpoint. Every LoRA pair must find its weight: one that is never read (a name the
//! model does not have) is an error, not a silently unadapted model.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use serde::Deserialize;

use crate::error::ModelError;
use crate::fsio::read_json;
use crate::models::weight_use::{name_a_few, UnusedWeights};

/// The fields of `adapter_config.json` that decide the merge.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// `"LORA"`; anything else is refused.
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Per-module alpha overrides (keys match a module name's ending).
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    /// Per-module rank overrides (the rank is read off each `lora_A` anyway).
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    /// DoRA adapters need a magnitude vector the merge here does not apply: refused.
    #[serde(default)]
    pub use_dora: bool,
    /// Weights stored transposed (GPT-2 Conv1D): not a Qwen layout, refused.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// A trained bias on `lora_B`: refused.
    #[serde(default)]
    pub lora_bias: bool,
    /// Whole modules saved alongside the LoRA.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// One adapted linear: its LoRA factors and scale.
#[derive(Debug)]
struct LoraPair {
    /// The module as the adapter file names it (after `base_model.model.`).
    key: String,
    /// `[r, in]`.
    a: Tensor,
    /// `[out, r]`.
    b: Tensor,
    scale: f64,
}

/// A loaded adapter: LoRA pairs by canonical module name.
#[derive(Debug)]
pub struct PeftAdapter {
    folder: PathBuf,
    pairs: HashMap<String, LoraPair>,
}

/// The canonical module name of an adapter key's module (after `base_model.model.`) or a
/// base checkpoint key, in either transformers layout.
fn canonical(name: &str) -> String {
    for (prefix, to) in [
        ("model.language_model.", "text."),
        ("model.visual.", "vision."),
        ("visual.", "vision."),
        ("model.", "text."),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return format!("{to}{rest}");
        }
    }
    name.to_string()
}

/// peft's pattern lookup: a key applies to a module whose name is the key or ends in
/// `.key`; the longest such key wins.
fn pattern_value<T: Copy>(patterns: &HashMap<String, T>, module: &str) -> Option<T> {
    patterns
        .iter()
        .filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}

impl PeftAdapter {
    /// Reads the adapter in `folder` (as peft saves it) with its merge scale multiplied by
    /// `strength`. Errors name the file and the field or key.
    pub fn load(folder: &Path, strength: f64) -> std::result::Result<Self, ModelError> {
        let config_path = folder.join("adapter_config.json");
        if !config_path.is_file() {
            let nested: Vec<String> = std::fs::read_dir(folder)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("adapter_config.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let hint = if nested.is_empty() {
                String::new()
            } else {
                format!(
                    " (peft saves named adapters in sub folders; this one has: {})",
                    nested.join(", ")
                )
            };
            return Err(ModelError::files(&config_path, format!("not found{hint}")));
        }
        let config: AdapterConfig = read_json(&config_path)?;
        let refuse = |what: String| ModelError::files(&config_path, what);
        if config.peft_type != "LORA" {
            return Err(refuse(format!(
                "`peft_type` = {:?}: only LORA adapters can be merged",
                config.peft_type
            )));
        }
        for (flag, on) in [
            ("use_dora", config.use_dora),
            ("fan_in_fan_out", config.fan_in_fan_out),
            ("lora_bias", config.lora_bias),
        ] {
            if on {
                return Err(refuse(format!(
                    "`{flag}` = true is not supported (plain LoRA only)"
                )));
            }
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return Err(refuse(
                "`modules_to_save` is set: adapters that replace whole modules are not supported"
                    .into(),
            ));
        }
        if config.r == 0 || !config.lora_alpha.is_finite() {
            return Err(refuse(format!(
                "`r` = {} and `lora_alpha` = {} do not give a scale",
                config.r, config.lora_alpha
            )));
        }
        let weights = folder.join("adapter_model.safetensors");
        if !weights.is_file() {
            let what = if folder.join("adapter_model.bin").is_file() {
                "not found (only adapter_model.bin, a pickle, is there: save with safe_serialization=True)"
            } else {
                "not found"
            };
            return Err(ModelError::files(&weights, what));
        }
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .map_err(|e| ModelError::files(&weights, e))?;
        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, tensor) in tensors {
            let bad = |why: &str| ModelError::files(&weights, format!("key `{key}`: {why}"));
            let inner = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let (module, is_a) = if let Some(m) = inner.strip_suffix(".lora_A.weight") {
                (m, true)
            } else if let Some(m) = inner.strip_suffix(".lora_B.weight") {
                (m, false)
            } else {
                return Err(bad("not a LoRA factor (lora_A / lora_B weight)"));
            };
            if tensor.rank() != 2 {
                return Err(bad("a LoRA factor must be a matrix"));
            }
            let entry = halves.entry(module.to_string()).or_default();
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(|e| bad(&e.to_string()))?;
            if is_a {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let mut pairs = HashMap::new();
        for (module, halves) in halves {
            let (Some(a), Some(b)) = halves else {
                return Err(ModelError::files(
                    &weights,
                    format!("module `{module}` has only one of lora_A / lora_B"),
                ));
            };
            let r = a.dim(0).map_err(|e| ModelError::files(&weights, e))?;
            if b.dim(1).map_err(|e| ModelError::files(&weights, e))? != r {
                return Err(ModelError::files(
                    &weights,
                    format!(
                        "module `{module}`: lora_A {:?} and lora_B {:?} disagree on the rank",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            let alpha = pattern_value(&config.alpha_pattern, &module).unwrap_or(config.lora_alpha);
            let divisor = if config.use_rslora {
                (r as f64).sqrt()
            } else {
                r as f64
            };
            pairs.insert(
                canonical(&module),
                LoraPair {
                    key: module.clone(),
                    a,
                    b,
                    scale: strength * alpha / divisor,
                },
            );
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            pairs,
        })
    }

    /// Adapted linears.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the adapter adapts nothing.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A checkpoint's tensors with an adapter merged in as they are read.
pub struct AdaptedWeights {
    base: MmapedSafetensors,
    adapter: Arc<PeftAdapter>,
    merged: Arc<Mutex<HashSet<String>>>,
}

impl AdaptedWeights {
    /// `base` with `adapter` merged in. The returned set fills with the canonical names of
    /// the modules merged so far (see [`check_all_merged`]).
    pub fn new(
        base: MmapedSafetensors,
        adapter: Arc<PeftAdapter>,
    ) -> (Self, Arc<Mutex<HashSet<String>>>) {
        let merged = Arc::new(Mutex::new(HashSet::new()));
        (
            Self {
                base,
                adapter,
                merged: merged.clone(),
            },
            merged,
        )
    }

    fn merge(&self, name: &str, tensor: Tensor) -> Result<Tensor> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(tensor);
        };
        let module = canonical(module);
        let Some(pair) = self.adapter.pairs.get(&module) else {
            return Ok(tensor);
        };
        let dtype = tensor.dtype();
        let delta = pair.b.matmul(&pair.a)?.affine(pair.scale, 0.0)?;
        let base = tensor.to_dtype(DType::F32)?;
        if delta.shape() != base.shape() {
            candle_core::bail!(
                "adapter {}: module `{module}` has LoRA {:?} x {:?}, the weight `{name}` is {:?}",
                self.adapter.folder.display(),
                pair.b.dims(),
                pair.a.dims(),
                base.dims()
            );
        }
        self.merged.lock().expect("not poisoned").insert(module);
        let delta = delta.to_device(base.device())?;
        (base + delta)?.to_dtype(dtype)
    }
}

impl SimpleBackend for AdaptedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        // Read in f32 so the delta is added before any rounding to a narrow dtype.
        let tensor = SimpleBackend::get(&self.base, shape, name, init, DType::F32, dev)?;
        self.merge(name, tensor)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = SimpleBackend::get_unchecked(&self.base, name, DType::F32, dev)?;
        self.merge(name, tensor)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.base, name)
    }
}

/// After the model is built: every LoRA pair of `adapter` must have met its weight. One
/// that did not (a module name the model does not have) is an error naming its keys under
/// [`UnusedWeights::Refuse`], a warning under [`UnusedWeights::Allow`].
pub fn check_all_merged(
    adapter: &PeftAdapter,
    merged: &Mutex<HashSet<String>>,
    unused: UnusedWeights,
) -> std::result::Result<(), ModelError> {
    let merged = merged.lock().expect("not poisoned");
    let mut missing: Vec<&String> = adapter
        .pairs
        .keys()
        .filter(|m| !merged.contains(*m))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort();
    let file = adapter.folder.join("adapter_model.safetensors");
    let named: Vec<String> = missing
        .iter()
        .map(|m| format!("`{}.lora_A/lora_B`", adapter.pairs[*m].key))
        .collect();
    let list = name_a_few(&named);
    match unused {
        UnusedWeights::Refuse => Err(ModelError::files(
            &file,
            format!(
                "{} of {} LoRA modules match no weight of the model: {list}; is the adapter for \
                 another model? (--allow-unused-weights loads it anyway)",
                missing.len(),
                adapter.pairs.len(),
            ),
        )),
        UnusedWeights::Allow => {
            tracing::warn!(
                "adapter {}: {} LoRA modules match no weight and are not applied \
                 (--allow-unused-weights): {list}",
                file.display(),
                missing.len()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_meet_on_one_name() {
        assert_eq!(
            canonical("model.language_model.layers.0.self_attn.q_proj"),
            "text.layers.0.self_attn.q_proj"
        );
        assert_eq!(
            canonical("model.layers.0.self_attn.q_proj"),
            "text.layers.0.self_attn.q_proj"
        );
        assert_eq!(
            canonical("model.visual.blocks.1.attn.qkv"),
            "vision.blocks.1.attn.qkv"
        );
        assert_eq!(
            canonical("visual.blocks.1.attn.qkv"),
            "vision.blocks.1.attn.qkv"
        );
        assert_eq!(canonical("lm_head"), "lm_head");
    }

    #[test]
    fn patterns_match_name_endings_longest_first() {
        let p: HashMap<String, f64> = [
            ("q_proj".to_string(), 2.0),
            ("layers.1.self_attn.q_proj".to_string(), 3.0),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            pattern_value(&p, "model.layers.0.self_attn.q_proj"),
            Some(2.0)
        );
        assert_eq!(
            pattern_value(&p, "model.layers.1.self_attn.q_proj"),
            Some(3.0)
        );
        assert_eq!(pattern_value(&p, "model.layers.1.self_attn.xq_proj"), None);
    }
}
