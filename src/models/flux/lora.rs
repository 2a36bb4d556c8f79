//! The ICEdit LoRA: plain low-rank adapters merged into the base weights at load time, and
//! the MoE variant whose expert layers run at inference.
//!
//! Key layout (diffusers/peft, prefix `transformer.`):
//! - plain: `<module>.lora_A.weight` `[r, in]`, `<module>.lora_B.weight` `[out, r]`, optional
//!   `<module>.alpha` (scale `alpha / r`; absent means 1);
//! - MoE: `<module>.lora_A.expert_E.weight`, `<module>.lora_B.expert_E.weight` and a bias-free
//!   router `<module>.lora_route.weight` `[experts, in]`; each token takes the expert with
//!   the largest router logit, with weight 1.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

use crate::error::ModelError;
use crate::models::weight_use::{name_a_few, UnusedWeights};

/// One plain adapter: `delta W = scale * up @ down`.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `lora_A`, `[rank, in]`.
    pub down: Tensor,
    /// `lora_B`, `[out, rank]`.
    pub up: Tensor,
    /// `alpha / rank` times the user's scale.
    pub scale: f64,
}

impl LowRank {
    /// The dense update `scale * up @ down`, `[out, in]` in f32.
    pub fn delta(&self) -> Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        up.matmul(&down)? * self.scale
    }
}

/// A mixture of low-rank experts with a top-1 router.
#[derive(Debug, Clone)]
pub struct Experts {
    /// One adapter per expert.
    pub experts: Vec<LowRank>,
    /// Router weight `[experts, in]`, no bias.
    pub route: Tensor,
}

/// The adapters of one LoRA file, keyed by diffusers module path (without `transformer.`).
#[derive(Debug, Default)]
pub struct LoraSet {
    /// The file they came from (for messages).
    pub path: PathBuf,
    /// Mergeable adapters.
    pub plain: BTreeMap<String, LowRank>,
    /// Layers that run their experts at inference.
    pub experts: BTreeMap<String, Experts>,
    /// Keys that fit neither layout.
    pub unknown_keys: Vec<String>,
    used: Mutex<BTreeSet<String>>,
    /// Plain adapters run as side branches (over weights they cannot be merged into).
    side_branches: Mutex<BTreeSet<String>>,
}

/// The Hub repository of ICEdit's plain LoRA (`pytorch_lora_weights.safetensors`, rank 32;
/// named as `RiverZ/normal-lora` by ICEdit's README and by the Griptape nodes that load it).
pub const ICEDIT_LORA_REPO: &str = "RiverZ/normal-lora";
/// The Hub repository of ICEdit's MoE LoRA (the default `lora_path` of ICEdit's
/// `scripts/gradio_demo.py`).
pub const ICEDIT_MOE_LORA_REPO: &str = "sanaka87/ICEdit-MoE-LoRA";
/// The file diffusers' `load_lora_weights` reads from a LoRA repository by default.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The LoRA file `path` names: the file itself, or in a folder or Hugging Face cache entry
/// its `pytorch_lora_weights.safetensors`, else its only `.safetensors` file.
pub fn find_lora_file(path: &Path) -> std::result::Result<PathBuf, ModelError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let dir = crate::hub::resolve_snapshot(path)?;
    if dir.join(LORA_FILE).is_file() {
        return Ok(dir.join(LORA_FILE));
    }
    let files = crate::hub::shards(&dir)?;
    match files.as_slice() {
        [one] => Ok(one.clone()),
        many => Err(ModelError::files(
            &dir,
            format!(
                "{} .safetensors files and no {LORA_FILE}: name the LoRA file itself",
                many.len()
            ),
        )),
    }
}

/// What loading did with a LoRA file, for logs and reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraReport {
    /// The file.
    pub path: PathBuf,
    /// Merged plain adapters.
    pub merged: usize,
    /// Plain adapters run as side branches `W x + s B (A x)` (over GGUF or fp8 weights).
    pub side_branches: usize,
    /// Layers running MoE experts.
    pub moe_layers: usize,
    /// Adapters for modules the model does not have.
    pub unused: Vec<String>,
    /// Keys that are not LoRA keys at all.
    pub unknown_keys: Vec<String>,
}

impl LoraSet {
    /// Reads a LoRA safetensors file; `user_scale` multiplies every adapter.
    pub fn load(path: &Path, user_scale: f64) -> std::result::Result<Self, ModelError> {
        let err = |reason: String| ModelError::Files {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(why) = crate::models::file_kind::not_safetensors(path) {
            return Err(err(format!("cannot read LoRA: {why}")));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| err(format!("cannot read LoRA: {e}")))?;
        let mut downs: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut ups: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut alphas: BTreeMap<String, f64> = BTreeMap::new();
        let mut expert_downs: BTreeMap<(String, usize), Tensor> = BTreeMap::new();
        let mut expert_ups: BTreeMap<(String, usize), Tensor> = BTreeMap::new();
        let mut routes: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut unknown_keys = Vec::new();
        // The file's keys in a fixed order (the reader's map has none), and each LoRA
        // tensor named once: `transformer.x` beside a bare `x` would leave which one is
        // used to chance.
        let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut named: BTreeMap<String, String> = BTreeMap::new();
        for (key, tensor) in tensors {
            let name = key
                .strip_prefix("transformer.")
                .or_else(|| key.strip_prefix("base_model.model."))
                .unwrap_or(&key);
            if let Some(first) = named.insert(name.to_string(), key.clone()) {
                return Err(err(format!(
                    "keys `{first}` and `{key}` are the same LoRA tensor `{name}`: keep one"
                )));
            }
            // Matrices must be floating point (integer bytes would be cast to garbage); an
            // alpha is a scalar, which may be stored as an integer.
            if !tensor.dtype().is_float() && tensor.elem_count() > 1 {
                return Err(err(format!(
                    "key `{key}` is stored as {:?}; LoRA matrices are floating point (F32, F16 or BF16), so the file is damaged or mislabelled",
                    tensor.dtype()
                )));
            }
            if let Some(m) = name
                .strip_suffix(".lora_A.weight")
                .or_else(|| name.strip_suffix(".lora_down.weight"))
            {
                downs.insert(m.to_string(), tensor);
            } else if let Some(m) = name
                .strip_suffix(".lora_B.weight")
                .or_else(|| name.strip_suffix(".lora_up.weight"))
            {
                ups.insert(m.to_string(), tensor);
            } else if let Some(m) = name.strip_suffix(".alpha") {
                let a = tensor
                    .to_dtype(DType::F64)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f64>())
                    .map_err(|e| err(format!("key `{key}`: {e}")))?;
                alphas.insert(m.to_string(), *a.first().unwrap_or(&0.0));
            } else if let Some(m) = name.strip_suffix(".lora_route.weight") {
                routes.insert(m.to_string(), tensor);
            } else if let Some((m, e, is_down)) = expert_key(name) {
                if is_down {
                    expert_downs.insert((m, e), tensor);
                } else {
                    expert_ups.insert((m, e), tensor);
                }
            } else {
                unknown_keys.push(key.clone());
            }
        }
        let mut plain = BTreeMap::new();
        for (module, down) in downs {
            let up = ups
                .remove(&module)
                .ok_or_else(|| err(format!("`{module}.lora_A.weight` has no matching lora_B")))?;
            plain.insert(
                module.clone(),
                low_rank(&module, down, up, alphas.get(&module), user_scale).map_err(err)?,
            );
        }
        if let Some(module) = ups.keys().next() {
            return Err(err(format!(
                "`{module}.lora_B.weight` has no matching lora_A"
            )));
        }
        let mut experts = BTreeMap::new();
        for (module, route) in routes {
            let mut list = Vec::new();
            for e in 0.. {
                // Both halves or neither: a lone half stays behind to be reported below.
                let at = (module.clone(), e);
                if !(expert_downs.contains_key(&at) && expert_ups.contains_key(&at)) {
                    break;
                }
                let (Some(down), Some(up)) = (expert_downs.remove(&at), expert_ups.remove(&at))
                else {
                    unreachable!("both halves were just found");
                };
                list.push(
                    low_rank(
                        &format!("{module} expert {e}"),
                        down,
                        up,
                        alphas.get(&module),
                        user_scale,
                    )
                    .map_err(err)?,
                );
            }
            let n = route.dim(0).map_err(|e| err(e.to_string()))?;
            if list.len() != n || list.is_empty() {
                return Err(err(format!(
                    "`{module}.lora_route.weight` routes to {n} experts but {} complete experts were found",
                    list.len()
                )));
            }
            experts.insert(
                module,
                Experts {
                    experts: list,
                    route,
                },
            );
        }
        if let Some(((module, e), _)) = expert_downs.iter().next().or(expert_ups.iter().next()) {
            return Err(err(format!(
                "expert {e} of `{module}` has no router or no matching A/B half"
            )));
        }
        // An alpha scales an adapter; one whose module has none is never applied.
        for module in alphas.keys() {
            if !plain.contains_key(module) && !experts.contains_key(module) {
                unknown_keys.push(named[&format!("{module}.alpha")].clone());
            }
        }
        unknown_keys.sort();
        if plain.is_empty() && experts.is_empty() {
            return Err(err(format!(
                "no LoRA adapters found ({} keys{})",
                unknown_keys.len(),
                unknown_keys
                    .first()
                    .map(|k| format!(", e.g. `{k}`"))
                    .unwrap_or_default()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            plain,
            experts,
            unknown_keys,
            used: Mutex::new(BTreeSet::new()),
            side_branches: Mutex::new(BTreeSet::new()),
        })
    }

    /// The plain adapter of `module`, marking it used.
    pub fn take_plain(&self, module: &str) -> Option<&LowRank> {
        let found = self.plain.get(module)?;
        self.used
            .lock()
            .expect("lora bookkeeping")
            .insert(module.to_string());
        Some(found)
    }

    /// The plain adapter of `module` for a weight it cannot be merged into, marking it used
    /// as a side branch.
    pub fn take_plain_unmerged(&self, module: &str) -> Option<&LowRank> {
        let found = self.take_plain(module)?;
        self.side_branches
            .lock()
            .expect("lora bookkeeping")
            .insert(module.to_string());
        Some(found)
    }

    /// The experts of `module`, marking them used.
    pub fn take_experts(&self, module: &str) -> Option<&Experts> {
        let found = self.experts.get(module)?;
        self.used
            .lock()
            .expect("lora bookkeeping")
            .insert(module.to_string());
        Some(found)
    }

    /// Summarises what was used once the transformer is built. Errors when nothing matched
    /// the model, and under [`UnusedWeights::Refuse`] when any adapter matched no layer or
    /// any key is no LoRA key (diffusers would apply such keys elsewhere, e.g. to a text
    /// encoder, or reject them); [`UnusedWeights::Allow`] logs them instead.
    pub fn report(&self, policy: UnusedWeights) -> std::result::Result<LoraReport, ModelError> {
        let used = self.used.lock().expect("lora bookkeeping").clone();
        let unused: Vec<String> = self
            .plain
            .keys()
            .chain(self.experts.keys())
            .filter(|m| !used.contains(*m))
            .cloned()
            .collect();
        if used.is_empty() {
            return Err(ModelError::Files {
                path: self.path.clone(),
                reason: match self.plain.keys().chain(self.experts.keys()).next() {
                    Some(first) => format!(
                        "the LoRA matches no layer of the transformer (first module: `{first}`); its keys are read in the diffusers/peft naming (`transformer_blocks.0.attn.to_q.lora_A.weight`), not kohya's (`lora_unet_...`)"
                    ),
                    None => "the LoRA holds no adapter (no lora_A/lora_B or lora_down/lora_up pair)".into(),
                },
            });
        }
        if !unused.is_empty() || !self.unknown_keys.is_empty() {
            let mut left: Vec<String> = unused
                .iter()
                .map(|m| format!("`{m}` (adapter of a layer the transformer does not have)"))
                .collect();
            left.extend(
                self.unknown_keys
                    .iter()
                    .map(|k| format!("`{k}` (not a LoRA key)")),
            );
            let list = name_a_few(&left);
            match policy {
                UnusedWeights::Refuse => {
                    return Err(ModelError::Files {
                        path: self.path.clone(),
                        reason: format!(
                            "{} of the LoRA's entries are never applied: {list}; pass \
                             --allow-unused-weights to load it anyway",
                            left.len()
                        ),
                    })
                }
                UnusedWeights::Allow => tracing::warn!(
                    "LoRA {}: {} entries never applied (--allow-unused-weights): {list}",
                    self.path.display(),
                    left.len()
                ),
            }
        }
        let side_branches = self.side_branches.lock().expect("lora bookkeeping").len();
        let merged = self.plain.keys().filter(|m| used.contains(*m)).count() - side_branches;
        let moe_layers = self.experts.keys().filter(|m| used.contains(*m)).count();
        Ok(LoraReport {
            path: self.path.clone(),
            merged,
            side_branches,
            moe_layers,
            unused,
            unknown_keys: self.unknown_keys.clone(),
        })
    }
}

fn expert_key(name: &str) -> Option<(String, usize, bool)> {
    let rest = name.strip_suffix(".weight")?;
    let (head, expert) = rest.rsplit_once(".expert_")?;
    let e: usize = expert.parse().ok()?;
    if let Some(m) = head.strip_suffix(".lora_A") {
        Some((m.to_string(), e, true))
    } else {
        head.strip_suffix(".lora_B")
            .map(|m| (m.to_string(), e, false))
    }
}

fn low_rank(
    module: &str,
    down: Tensor,
    up: Tensor,
    alpha: Option<&f64>,
    user_scale: f64,
) -> std::result::Result<LowRank, String> {
    let (rank, _) = down
        .dims2()
        .map_err(|e| format!("`{module}` lora_A: {e}"))?;
    let (_, rank_b) = up.dims2().map_err(|e| format!("`{module}` lora_B: {e}"))?;
    if rank != rank_b {
        return Err(format!(
            "`{module}`: lora_A has rank {rank}, lora_B has rank {rank_b}"
        ));
    }
    let scale = alpha.map_or(1.0, |a| a / rank as f64) * user_scale;
    Ok(LowRank { down, up, scale })
}
