//! What the plan learns from the weight files without reading any weight: the JSON headers
//! of safetensors files (8 bytes of length, then the header), GGUF headers, `config.json`
//! files and file sizes. Nothing here maps or reads tensor data, so a plan can be made (and
//! refused) before minutes of loading, and even for a file whose data is incomplete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use serde::de::DeserializeOwned;

use super::footprint::WeightFormat;
pub use crate::models::file_kind::is_gguf;
use crate::models::flux::files::{self as flux_files, KeyShapes};
use crate::models::flux::vae::VaeConfig;
use crate::models::flux::FluxConfig;

/// A tensor as a safetensors header describes it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HeaderEntry {
    /// Stored dtype (`BF16`, `F8_E4M3`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// The tensors a safetensors file's header lists (the data is not read).
pub fn safetensors_header(path: &Path) -> Result<BTreeMap<String, HeaderEntry>, String> {
    let fail = |e: String| format!("{}: {e}", path.display());
    let mut file = File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| fail(format!("no safetensors header ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(fail(format!("safetensors header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| fail(format!("incomplete safetensors header ({e})")))?;
    let all: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| fail(format!("safetensors header: {e}")))?;
    all.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let entry = serde_json::from_value(v)
                .map_err(|e| fail(format!("safetensors header entry `{k}`: {e}")))?;
            Ok((k, entry))
        })
        .collect()
}

/// The safetensors files of a folder (or the file itself), sorted; none when the folder
/// is missing or holds none (the loader then names what is missing).
pub fn safetensors_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    // A Hugging Face cache entry (`models--org--name`) holds its files in a snapshot.
    let dir = crate::hub::cache::resolve_snapshot(path).unwrap_or_else(|_| path.to_path_buf());
    crate::hub::shards(&dir).unwrap_or_default()
}

/// Parameters stored in the safetensors files under `path` (headers only); `None` when
/// there are none or a header cannot be read.
pub fn stored_parameters(path: &Path) -> Option<usize> {
    let files = safetensors_files(path);
    if files.is_empty() {
        return None;
    }
    let mut total = 0;
    for f in files {
        let header = safetensors_header(&f).ok()?;
        total += header
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum::<usize>();
    }
    Some(total)
}

/// The format a transformer file holds its linear weights in: a GGUF file's most common
/// quantized type, fp8 when a safetensors file stores its weights as F8_E4M3, else dense.
pub fn transformer_format(files: &[PathBuf]) -> Result<WeightFormat, String> {
    let Some(first) = files.first() else {
        return Ok(WeightFormat::Dense);
    };
    if is_gguf(first) {
        let mut file = File::open(first).map_err(|e| format!("{}: {e}", first.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| format!("{}: GGUF header: {e}", first.display()))?;
        let mut bytes: BTreeMap<String, (GgmlDType, usize)> = BTreeMap::new();
        for info in content.tensor_infos.values() {
            let t = info.ggml_dtype;
            if matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                continue;
            }
            bytes.entry(format!("{t:?}")).or_insert((t, 0)).1 += info.shape.elem_count();
        }
        return Ok(bytes
            .into_values()
            .max_by_key(|(_, n)| *n)
            .map_or(WeightFormat::Dense, |(t, _)| WeightFormat::Quantized(t)));
    }
    if let Some(reason) = crate::models::file_kind::gguf_name_without_magic(first) {
        return Err(format!("{}: {reason}", first.display()));
    }
    let header = safetensors_header(first)?;
    let fp8 = header
        .iter()
        .any(|(k, t)| k.ends_with(".weight") && t.dtype == "F8_E4M3" && t.shape.len() == 2);
    Ok(if fp8 {
        WeightFormat::Fp8
    } else {
        WeightFormat::Dense
    })
}

/// The keys and shapes of a transformer's files read from their headers alone (every
/// safetensors shard's JSON header, or a GGUF file's tensor infos), for finding its config
/// as the loader does without mapping any weight.
#[derive(Debug, Clone, Default)]
pub struct HeaderShapes(BTreeMap<String, Vec<usize>>);

impl HeaderShapes {
    /// The headers of `files`.
    pub fn read(files: &[PathBuf]) -> Result<Self, String> {
        let mut shapes = BTreeMap::new();
        for f in files {
            if is_gguf(f) {
                let mut file = File::open(f).map_err(|e| format!("{}: {e}", f.display()))?;
                let content = gguf_file::Content::read(&mut file)
                    .map_err(|e| format!("{}: GGUF header: {e}", f.display()))?;
                // Stored dims as the loader's WeightSource reports them.
                shapes.extend(
                    content
                        .tensor_infos
                        .into_iter()
                        .map(|(k, info)| (k, info.shape.dims().to_vec())),
                );
            } else {
                if let Some(reason) = crate::models::file_kind::gguf_name_without_magic(f) {
                    return Err(format!("{}: {reason}", f.display()));
                }
                shapes.extend(
                    safetensors_header(f)?
                        .into_iter()
                        .map(|(k, t)| (k, t.shape)),
                );
            }
        }
        Ok(Self(shapes))
    }
}

impl KeyShapes for HeaderShapes {
    fn key_shape(&self, key: &str) -> Option<Vec<usize>> {
        self.0.get(key).cloned()
    }
    fn keys(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// Reads a JSON config if the file exists.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Where an edit's weights are, as the flags name them (the same rules as
/// `models::flux::FluxFiles::discover`, without opening any weight file).
#[derive(Debug, Clone, Default)]
pub struct PeekedFiles {
    /// Transformer files (empty when not found: the loader names what is missing).
    pub transformer: Vec<PathBuf>,
    /// Transformer hyper-parameters (`transformer/config.json`, else FLUX.1 Fill's).
    pub transformer_config: Option<FluxConfig>,
    /// Autoencoder hyper-parameters (`vae/config.json`, else the FLUX AE's).
    pub vae_config: Option<VaeConfig>,
    /// T5 + CLIP parameters stored under the text encoders' folders.
    pub text_parameters: Option<usize>,
}

/// A loader's refusal in the words `edit` gives it (`weights PATH: reason`).
fn as_edit_says(e: crate::error::ModelError) -> String {
    crate::error::GenerateError::from(e).to_string()
}

/// Finds the files of a model folder / explicit paths and reads their headers and configs,
/// refusing what the loader would refuse (a missing model folder, one without a
/// transformer, a config that does not fit the transformer's weights or the VAE).
pub fn peek_flux(
    model_dir: Option<&Path>,
    transformer: Option<&Path>,
    text_encoders: Option<&Path>,
) -> Result<PeekedFiles, String> {
    if transformer.is_some() && model_dir.is_none() && text_encoders.is_none() {
        // What the loader would refuse, said before the plan reads anything.
        return Err(crate::models::flux::files::NEEDS_FOLDERS.into());
    }
    // The folders and files as the loader finds them, refused as it refuses them: a
    // model folder that does not exist, or holds no transformer, is named now instead of
    // planned as FLUX.1 Fill's published configuration.
    let root = model_dir
        .map(flux_files::model_folder)
        .transpose()
        .map_err(as_edit_says)?;
    let snapshot =
        |dir: &Path| crate::hub::cache::resolve_snapshot(dir).unwrap_or_else(|_| dir.to_path_buf());
    let text_root = text_encoders.map(snapshot).or(root.clone());
    let files = match (transformer, &root) {
        (Some(f), _) => vec![f.to_path_buf()],
        (None, Some(r)) => flux_files::transformer_in_folder(r).map_err(as_edit_says)?,
        _ => Vec::new(),
    };
    let config_in = |sub: &str| -> Result<Option<PathBuf>, String> {
        Ok([root.as_ref(), text_root.as_ref()]
            .into_iter()
            .flatten()
            .map(|r| r.join(sub).join("config.json"))
            .find(|p| p.is_file()))
    };
    // Checked as the loaders check them, from the files' headers: the plan runs first, and
    // its arithmetic relies on what they refuse (heads, VAE levels, a folder's config that
    // is not the named transformer's).
    let transformer_config_path =
        flux_files::transformer_config_path(root.as_deref(), transformer, text_root.as_deref());
    let transformer_config = if files.is_empty() {
        None
    } else {
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(format!("weights {}: file not found", missing.display()));
        }
        let shapes = HeaderShapes::read(&files)?;
        Some(
            flux_files::resolve_transformer_config(
                transformer_config_path.as_deref(),
                root.as_deref(),
                &files,
                &shapes,
            )
            .map_err(as_edit_says)?,
        )
    };
    let vae_config: Option<VaeConfig> = match config_in("vae")? {
        Some(p) => read_config(&p)?
            .map(|c: VaeConfig| c.check().map(|()| c))
            .transpose()
            .map_err(|e| format!("{}: {e}", p.display()))?,
        None => None,
    };
    // The loader refuses a transformer that cannot take the Fill conditioning of this VAE
    // (a FLUX.1 [dev] file, say) once both are read: so does the plan, before.
    if let Some(config) = &transformer_config {
        let vae = vae_config.clone().unwrap_or_else(VaeConfig::flux);
        if let Some(why) = flux_files::fill_mismatch(config, &vae) {
            return Err(format!("weights {}: {why}", files[0].display()));
        }
    }
    let text_parameters = text_root.as_ref().and_then(|r| {
        let clip = stored_parameters(&r.join("text_encoder"))?;
        let t5 = stored_parameters(&r.join("text_encoder_2"))?;
        Some(clip + t5)
    });
    Ok(PeekedFiles {
        transformer: files,
        transformer_config,
        vae_config,
        text_parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux")
    }

    #[test]
    fn reads_formats_and_counts_from_headers_only() {
        let f = fixtures();
        assert_eq!(
            transformer_format(&[f.join("gguf/flux1-fill-tiny-q8_0.gguf")]).unwrap(),
            WeightFormat::Quantized(GgmlDType::Q8_0)
        );
        assert_eq!(
            transformer_format(&[f.join("fp8/flux1-fill-tiny-fp8-scaled.safetensors")]).unwrap(),
            WeightFormat::Fp8
        );
        assert_eq!(
            transformer_format(&[f.join("bfl/flux1-fill-dev.safetensors")]).unwrap(),
            WeightFormat::Dense
        );
        let peeked = peek_flux(Some(&f.join("tiny")), None, None).unwrap();
        let config = peeked.transformer_config.unwrap();
        assert_eq!(config.num_layers, 2);
        assert!(peeked.vae_config.is_some());
        assert!(peeked.text_parameters.unwrap() > 0);
        assert!(!peeked.transformer.is_empty());
    }
}
