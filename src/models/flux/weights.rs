//! Weight files: a `VarBuilder` backend over memory-mapped safetensors that speaks diffusers
//! names whatever the file's layout, merges plain LoRA adapters as tensors are read, and
//! names the file and key in every error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::keymap::{transformer_key, vae_key, Cut};
use super::lora::LoraSet;
use crate::error::ModelError;

/// How the tensors of a file are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KeyLayout {
    /// diffusers / transformers names: read as asked.
    Diffusers,
    /// A BFL transformer checkpoint (`flux1-fill-dev.safetensors`).
    BflTransformer {
        /// Stream width.
        hidden: usize,
        /// Single-block MLP width.
        mlp: usize,
    },
    /// A BFL autoencoder (`ae.safetensors`).
    BflVae {
        /// Resolution levels.
        levels: usize,
    },
}

/// Memory-mapped weights addressed by diffusers names.
pub struct WeightSource {
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    layout: KeyLayout,
    /// Prefix some BFL files put before every key (`model.diffusion_model.`).
    prefix: String,
    lora: Option<Arc<LoraSet>>,
}

impl WeightSource {
    /// Maps `files` (the shards of one model).
    pub fn open(files: &[PathBuf], layout: KeyLayout) -> std::result::Result<Self, ModelError> {
        for f in files {
            if !f.is_file() {
                return Err(ModelError::Files {
                    path: f.clone(),
                    reason: "file not found".into(),
                });
            }
        }
        // SAFETY: the files are opened read-only; like every mmap-based loader we rely on
        // nobody truncating them while the process runs.
        let tensors =
            unsafe { MmapedSafetensors::multi(files) }.map_err(|e| ModelError::Files {
                path: files.first().cloned().unwrap_or_default(),
                reason: format!("not a readable safetensors file: {e}"),
            })?;
        let prefix = if tensors.get("model.diffusion_model.img_in.weight").is_ok() {
            "model.diffusion_model.".to_string()
        } else {
            String::new()
        };
        Ok(Self {
            files: files.to_vec(),
            tensors,
            layout,
            prefix,
            lora: None,
        })
    }

    /// Merges `lora`'s plain adapters into the weights as they are read.
    pub fn with_lora(mut self, lora: Option<Arc<LoraSet>>) -> Self {
        self.lora = lora;
        self
    }

    /// Whether the files hold `key` (a file key, not a diffusers name).
    pub fn has_key(&self, key: &str) -> bool {
        self.tensors.get(key).is_ok()
    }

    /// Every key in the files.
    pub fn keys(&self) -> Vec<String> {
        self.tensors.tensors().into_iter().map(|(k, _)| k).collect()
    }

    /// The stored shape of a file key.
    pub fn key_shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).ok().map(|v| v.shape().to_vec())
    }

    fn label(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!("{} (+{} shards)", many[0].display(), many.len() - 1),
        }
    }

    fn resolve(&self, name: &str) -> Option<(String, Cut)> {
        match self.layout {
            KeyLayout::Diffusers => Some((name.to_string(), Cut::All)),
            KeyLayout::BflTransformer { hidden, mlp } => {
                transformer_key(name, hidden, mlp).map(|(k, c)| (format!("{}{k}", self.prefix), c))
            }
            KeyLayout::BflVae { levels } => Some(vae_key(name, levels)),
        }
    }

    /// Reads the tensor for a diffusers `name` on the CPU, in its stored dtype.
    fn read(&self, name: &str) -> Result<Tensor> {
        let Some((key, cut)) = self.resolve(name) else {
            candle_core::bail!(
                "{}: no tensor corresponds to `{name}` in this layout",
                self.label()
            );
        };
        let whole = self.tensors.load(&key, &Device::Cpu).map_err(|_| {
            candle_core::Error::Msg(format!("{}: missing tensor `{key}`", self.label()))
        })?;
        match cut {
            Cut::All => Ok(whole),
            Cut::Rows(start, len) => {
                let rows = whole.dim(0)?;
                if start + len > rows {
                    candle_core::bail!(
                        "{}: tensor `{key}` has {rows} rows, `{name}` needs rows {start}..{}",
                        self.label(),
                        start + len
                    );
                }
                whole.narrow(0, start, len)?.contiguous()
            }
            Cut::SwapHalves => {
                let half = whole.dim(0)? / 2;
                Tensor::cat(
                    &[whole.narrow(0, half, half)?, whole.narrow(0, 0, half)?],
                    0,
                )
            }
            Cut::Squeeze => match whole.dims() {
                [o, i, 1, 1] => whole.reshape((*o, *i)),
                _ => Ok(whole),
            },
        }
    }
}

impl SimpleBackend for WeightSource {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            let key = self.resolve(name).map(|(k, _)| k).unwrap_or_default();
            candle_core::bail!(
                "{}: tensor `{key}` (for `{name}`) has shape {:?}, the model needs {:?}",
                self.label(),
                tensor.dims(),
                shape.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut tensor = self.read(name)?;
        if let (Some(lora), Some(module)) = (&self.lora, name.strip_suffix(".weight")) {
            if let Some(adapter) = lora.take_plain(module) {
                let delta = adapter.delta()?;
                if delta.dims() != tensor.dims() {
                    candle_core::bail!(
                        "{}: LoRA for `{module}` makes a {:?} update, the weight is {:?}",
                        lora.path.display(),
                        delta.dims(),
                        tensor.dims()
                    );
                }
                tensor = (tensor.to_dtype(DType::F32)? + delta)?;
            }
        }
        tensor.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some_and(|(k, _)| self.has_key(&k))
    }
}

/// Builds a `VarBuilder` over a weight source.
pub fn var_builder(source: WeightSource, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(source), dtype, dev.clone())
}

/// Converts a loading error into one that names the weights.
pub fn weights_error(path: &Path, e: candle_core::Error) -> ModelError {
    ModelError::Files {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
