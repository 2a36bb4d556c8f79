//! Weight files: a `VarBuilder` backend over memory-mapped safetensors or a GGUF file that
//! speaks diffusers names whatever the file's layout, merges plain LoRA adapters as dense
//! tensors are read, hands quantized (GGUF) and fp8 weights to the linear layers as they are
//! held, and names the file and key in every error.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::models::file_kind::{gguf_name_without_magic, is_gguf, not_safetensors};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::held_weight::Weight;
use super::keymap::{transformer_key, vae_key, Cut};
use super::lora::LoraSet;
use crate::error::ModelError;
use crate::models::weight_use::{
    check_unused, KnownUnused, ReadLog, StoredTensors, UnusedReport, UnusedWeights,
};

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

/// Where the tensors are.
enum Store {
    /// Memory-mapped safetensors shards.
    Safetensors(MmapedSafetensors),
    /// One GGUF file: its index, and the file to read tensors from.
    Gguf {
        content: Content,
        file: Mutex<std::fs::File>,
    },
}

/// Weights addressed by diffusers names.
pub struct WeightSource {
    files: Vec<PathBuf>,
    store: Store,
    layout: KeyLayout,
    /// Prefix some BFL files put before every key (`model.diffusion_model.`).
    prefix: String,
    lora: Option<Arc<LoraSet>>,
    /// The file keys read so far (see [`Self::check_unused`]).
    log: ReadLog,
    /// Whether the files are a scaled fp8 checkpoint (some weight carries a scale), settled
    /// at the first fp8 weight read.
    scaled_fp8: OnceLock<bool>,
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
        let store = match files {
            [one] if is_gguf(one) => {
                let mut file = std::fs::File::open(one).map_err(|e| ModelError::files(one, e))?;
                let content = Content::read(&mut file).map_err(|e| {
                    ModelError::files(one, format!("not a readable GGUF file: {e}"))
                })?;
                Store::Gguf {
                    content,
                    file: Mutex::new(file),
                }
            }
            _ => {
                if let Some((path, reason)) = files.iter().find_map(|f| {
                    gguf_name_without_magic(f)
                        .or_else(|| not_safetensors(f))
                        .map(|r| (f, r))
                }) {
                    return Err(ModelError::files(path, reason));
                }
                // SAFETY: the files are opened read-only; like every mmap-based loader we rely
                // on nobody truncating them while the process runs.
                let tensors =
                    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| ModelError::Files {
                        path: files.first().cloned().unwrap_or_default(),
                        reason: format!("not a readable safetensors (or GGUF) file: {e}"),
                    })?;
                Store::Safetensors(tensors)
            }
        };
        let mut source = Self {
            files: files.to_vec(),
            store,
            layout,
            prefix: String::new(),
            lora: None,
            log: ReadLog::new(),
            scaled_fp8: OnceLock::new(),
        };
        if source.has_key("model.diffusion_model.img_in.weight") {
            source.prefix = "model.diffusion_model.".to_string();
        }
        Ok(source)
    }

    /// Whether the weights come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self.store, Store::Gguf { .. })
    }

    /// The same source read with another key layout (detected after opening).
    pub fn with_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Merges `lora`'s plain adapters into the weights as they are read.
    pub fn with_lora(mut self, lora: Option<Arc<LoraSet>>) -> Self {
        self.lora = lora;
        self
    }

    /// Whether the files hold `key` (a file key, not a diffusers name).
    pub fn has_key(&self, key: &str) -> bool {
        match &self.store {
            Store::Safetensors(t) => t.get(key).is_ok(),
            Store::Gguf { content, .. } => content.tensor_infos.contains_key(key),
        }
    }

    /// Every key in the files.
    pub fn keys(&self) -> Vec<String> {
        match &self.store {
            Store::Safetensors(t) => t.tensors().into_iter().map(|(k, _)| k).collect(),
            Store::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
        }
    }

    /// The stored shape of a file key.
    pub fn key_shape(&self, key: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Safetensors(t) => t.get(key).ok().map(|v| v.shape().to_vec()),
            Store::Gguf { content, .. } => content
                .tensor_infos
                .get(key)
                .map(|i| i.shape.dims().to_vec()),
        }
    }

    /// The ggml type of a GGUF key.
    pub fn key_ggml_dtype(&self, key: &str) -> Option<GgmlDType> {
        match &self.store {
            Store::Gguf { content, .. } => content.tensor_infos.get(key).map(|i| i.ggml_dtype),
            Store::Safetensors(_) => None,
        }
    }

    /// Bytes the file spends on `key` as stored.
    pub fn key_bytes(&self, key: &str) -> Option<usize> {
        match &self.store {
            Store::Safetensors(t) => t.get(key).ok().map(|v| v.data().len()),
            Store::Gguf { content, .. } => content.tensor_infos.get(key).map(|i| {
                i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()
            }),
        }
    }

    /// Why `key` could not be read: missing from the file, or there but not readable (a
    /// dtype candle does not read, such as F8_E5M2), with the reader's own words.
    fn unreadable(&self, key: &str, e: candle_core::Error) -> candle_core::Error {
        if self.has_key(key) {
            candle_core::Error::Msg(format!(
                "{}: tensor `{key}` cannot be read: {e}",
                self.label()
            ))
        } else {
            candle_core::Error::Msg(format!("{}: missing tensor `{key}`", self.label()))
        }
    }

    /// A GGUF tensor as stored (quantized), on the CPU.
    fn gguf_tensor(&self, key: &str) -> Result<QTensor> {
        let Store::Gguf { content, file } = &self.store else {
            candle_core::bail!("{}: not a GGUF file", self.label());
        };
        let mut file = file.lock().expect("GGUF file handle");
        content
            .tensor(&mut *file, key, &Device::Cpu)
            .map_err(|e| self.unreadable(key, e))
    }

    /// The weight `name` as the file holds it when it is not a plain float tensor (a
    /// quantized GGUF tensor, or fp8 safetensors with its scale), on `dev`; `None` when the
    /// dense path reads it.
    pub fn held_weight(&self, name: &str, dev: &Device) -> Result<Option<Weight>> {
        let Some((key, cut)) = self.resolve(name) else {
            return Ok(None);
        };
        match &self.store {
            Store::Gguf { content, .. } => {
                let Some(info) = content.tensor_infos.get(&key) else {
                    return Ok(None);
                };
                if matches!(
                    info.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                ) {
                    return Ok(None);
                }
                let q = cut_quantized(&self.gguf_tensor(&key)?, cut, &key)?;
                self.record(&key, cut);
                let dtype = q.dtype();
                let q = move_quantized(&q, dev)?;
                Ok(Some(Weight::Quantized(
                    Arc::new(QMatMul::from_qtensor(q)?),
                    dtype,
                )))
            }
            Store::Safetensors(t) => {
                let Ok(view) = t.get(&key) else {
                    return Ok(None);
                };
                if view.dtype() != safetensors::Dtype::F8_E4M3 {
                    return Ok(None);
                }
                let weight =
                    cut_dense(t.load(&key, &Device::Cpu)?, cut, &key, name, &self.label())?;
                self.record(&key, cut);
                let scale = self.fp8_scale(t, &key)?;
                Ok(Some(Weight::Fp8 {
                    weight: weight.to_device(dev)?,
                    scale,
                }))
            }
        }
    }

    /// The per-tensor scale stored beside the fp8 weight `key` (1 when there is none),
    /// recording the scale's key as read.
    fn fp8_scale(&self, t: &MmapedSafetensors, key: &str) -> Result<f64> {
        // "Scaled" fp8 checkpoints keep one scale per weight beside it: ComfyUI's
        // `scaled_fp8` files spell it `.scale_weight`, its newer mixed-precision files
        // `.weight_scale`. Unscaled files have neither (scale 1).
        let module = key.trim_end_matches(".weight");
        for scale_key in [
            format!("{module}.scale_weight"),
            format!("{module}.weight_scale"),
        ] {
            if let Ok(s) = t.load(&scale_key, &Device::Cpu) {
                let values = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let [value] = values.as_slice() else {
                    candle_core::bail!(
                        "{}: `{scale_key}` holds {} values, a per-tensor fp8 scale is one",
                        self.label(),
                        values.len()
                    );
                };
                self.log.record(&scale_key);
                return Ok(*value as f64);
            }
        }
        // In a scaled checkpoint every fp8 weight has its scale: one without it was cut
        // from the file, and reading it at scale 1 would run the layer at the wrong size.
        let scaled = *self.scaled_fp8.get_or_init(|| {
            t.tensors().iter().any(|(k, _)| {
                k == "scaled_fp8" || k.ends_with(".scale_weight") || k.ends_with(".weight_scale")
            })
        });
        if scaled {
            candle_core::bail!(
                "{}: the fp8 weight `{key}` has no `{module}.scale_weight` (or `.weight_scale`), \
                 and the file's other fp8 weights carry one (a scaled fp8 checkpoint): the file \
                 is incomplete; download it again",
                self.label()
            );
        }
        Ok(1.0)
    }

    /// Records `key` as read (only the rows `cut` takes, for a slice of a fused tensor).
    fn record(&self, key: &str, cut: Cut) {
        match cut {
            Cut::Rows(start, len) => self.log.record_rows(key, start, len),
            Cut::All | Cut::SwapHalves | Cut::Squeeze => self.log.record(key),
        }
    }

    /// Records the file key (and rows) behind the diffusers `name` as read.
    fn note_read(&self, name: &str) {
        if let Some((key, cut)) = self.resolve(name) {
            self.record(&key, cut);
        }
    }

    /// Every tensor of the files.
    pub fn stored_tensors(&self) -> std::result::Result<StoredTensors, ModelError> {
        match &self.store {
            Store::Safetensors(_) => StoredTensors::safetensors(&self.files),
            Store::Gguf { content, .. } => Ok(StoredTensors::gguf(&self.files[0], content)),
        }
    }

    /// After the model is built: the tensors of the files it never read, refused (or, under
    /// [`UnusedWeights::Allow`], logged) unless `known` says the reference leaves them unread
    /// too. `what` names the model in messages.
    pub fn check_unused(
        &self,
        what: &str,
        known: &[KnownUnused],
        policy: UnusedWeights,
    ) -> std::result::Result<UnusedReport, ModelError> {
        check_unused(what, &self.stored_tensors()?, &self.log, known, policy)
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
        let whole = match &self.store {
            Store::Safetensors(t) => {
                let whole = t
                    .load(&key, &Device::Cpu)
                    .map_err(|e| self.unreadable(&key, e))?;
                // An fp8 weight read dense (`--dequantize`) is the stored value times its
                // scale, as the held path computes it per forward.
                if whole.dtype() == DType::F8E4M3 && key.ends_with(".weight") {
                    let scale = self.fp8_scale(t, &key)?;
                    (whole.to_dtype(DType::F32)? * scale)?
                } else {
                    whole
                }
            }
            // Dense reads of a GGUF tensor (norms, biases, embedders, f16 weights).
            Store::Gguf { .. } => self.gguf_tensor(&key)?.dequantize(&Device::Cpu)?,
        };
        cut_dense(whole, cut, &key, name, &self.label())
    }
}

/// Cuts a dense tensor as `cut` says.
fn cut_dense(whole: Tensor, cut: Cut, key: &str, name: &str, label: &str) -> Result<Tensor> {
    match cut {
        Cut::All => Ok(whole),
        Cut::Rows(start, len) => {
            let rows = whole.dim(0)?;
            if start + len > rows {
                candle_core::bail!(
                    "{label}: tensor `{key}` has {rows} rows, `{name}` needs rows {start}..{}",
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

/// Cuts a quantized `[rows, cols]` tensor by rows: each row is quantized on its own, so a
/// row range is a byte range.
fn cut_quantized(q: &QTensor, cut: Cut, key: &str) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let take = |ranges: &[(usize, usize)]| -> Result<QTensor> {
        let mut bytes = Vec::new();
        let mut n = 0;
        for &(start, len) in ranges {
            if start + len > rows {
                candle_core::bail!(
                    "tensor `{key}` has {rows} rows, needs rows {start}..{}",
                    start + len
                );
            }
            bytes.extend_from_slice(&data[start * row_bytes..(start + len) * row_bytes]);
            n += len;
        }
        QTensor::new(
            QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?,
            (n, cols),
        )
    };
    match cut {
        Cut::All | Cut::Squeeze => take(&[(0, rows)]),
        Cut::Rows(start, len) => take(&[(start, len)]),
        Cut::SwapHalves => take(&[(rows / 2, rows / 2), (0, rows / 2)]),
    }
}

/// The same quantized tensor on `dev` (its bytes copied into the device's storage).
fn move_quantized(q: &QTensor, dev: &Device) -> Result<QTensor> {
    QTensor::new(
        QStorage::from_data(q.data()?, dev, q.dtype())?,
        q.shape().clone(),
    )
}

impl SimpleBackend for WeightSource {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.read_merged(name, dtype, dev)?;
        if tensor.shape() != &shape {
            let key = self.resolve(name).map(|(k, _)| k).unwrap_or_default();
            candle_core::bail!(
                "{}: tensor `{key}` (for `{name}`) has shape {:?}, the model needs {:?}",
                self.label(),
                tensor.dims(),
                shape.dims()
            );
        }
        self.note_read(name);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.read_merged(name, dtype, dev)?;
        self.note_read(name);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some_and(|(k, _)| self.has_key(&k))
    }
}

impl WeightSource {
    /// The tensor for `name` with any plain LoRA merged, in `dtype` on `dev` (not recorded
    /// as read: the caller records it once its shape is accepted).
    fn read_merged(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
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
}

/// Builds a `VarBuilder` over a weight source.
pub fn var_builder(source: WeightSource, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(source), dtype, dev.clone())
}

/// A `VarBuilder` over a source the linear layers also ask for held (quantized, fp8)
/// weights.
pub fn shared_var_builder(
    source: Arc<WeightSource>,
    dtype: DType,
    dev: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Shared(source)), dtype, dev.clone())
}

/// A [`WeightSource`] behind an `Arc`, as a `VarBuilder` backend.
struct Shared(Arc<WeightSource>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.0.get(shape, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Converts a loading error into one that names the weights.
pub fn weights_error(path: &Path, e: candle_core::Error) -> ModelError {
    ModelError::Files {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor that is in the file in a dtype candle does not read is said to be so, not
    /// called missing (which sent users looking for a key that is there).
    #[test]
    fn a_tensor_that_is_there_but_unreadable_is_not_called_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e5m2.safetensors");
        let header = br#"{"w.weight":{"dtype":"F8_E5M2","shape":[2,2],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 4]);
        std::fs::write(&path, bytes).unwrap();
        let source = WeightSource::open(&[path], KeyLayout::Diffusers).unwrap();
        let e = source
            .get_unchecked("w.weight", DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot be read") && !e.contains("missing"),
            "{e}"
        );
        let e = source
            .get_unchecked("v.weight", DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("v.weight"), "{e}");
    }
}
