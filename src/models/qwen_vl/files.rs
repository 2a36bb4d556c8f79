//! Finding and loading a Qwen2-VL checkpoint: a folder as `save_pretrained` or the Hub
//! writes it, or a Hugging Face cache entry (`models--Qwen--Qwen2-VL-7B-Instruct`).

use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::adapter::{check_all_merged, AdaptedWeights, PeftAdapter};
use super::chat::ChatFormat;
use super::config::{Qwen2VlConfig, TokenIds};
use super::image::ImageProcessorConfig;
use super::model::{unused_tensors, KeyLayout, Qwen2Vl};
use crate::error::ModelError;
use crate::fsio::read_json;
use crate::hub::{resolve_snapshot, shards};
use crate::models::weight_use::{check_unused, ReadLog, Recording, StoredTensors, UnusedWeights};

/// The files of a checkpoint [`Qwen2VlFiles::discover`] reads (configs, weights, tokenizer,
/// chat template), as patterns over a Hub repository's paths.
pub const CHECKPOINT_FILES: &[&str] = &["*.json", "*.safetensors", "*.jinja", "*.txt"];

/// Every file of one checkpoint, resolved.
#[derive(Debug, Clone)]
pub struct Qwen2VlFiles {
    /// The folder (a snapshot, for cache entries).
    pub root: PathBuf,
    /// Parsed `config.json`.
    pub config: Qwen2VlConfig,
    /// Safetensors shards.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Image preprocessing (`preprocessor_config.json`, or Qwen2-VL's defaults if absent).
    pub image: ImageProcessorConfig,
    /// The chat template's source, from `chat_template.jinja`, `chat_template.json` or
    /// `tokenizer_config.json` (`None`: the built-in Qwen2-VL template).
    pub chat_template: Option<String>,
}

fn config_error(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::files(path, reason)
}

impl Qwen2VlFiles {
    /// Resolves the files under `dir`. Errors name the missing file or bad field.
    pub fn discover(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(config_error(
                dir,
                "not a folder (expected a Qwen2-VL checkpoint)",
            ));
        }
        let root = resolve_snapshot(dir)?;
        let config_path = root.join("config.json");
        if !config_path.is_file() {
            return Err(config_error(&config_path, "not found"));
        }
        let mut config = Qwen2VlConfig::from_json(&read_json(&config_path)?)
            .map_err(|e| config_error(&config_path, e))?;
        let weights = shards(&root)?;
        let tokenizer = root.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(config_error(&tokenizer, "not found"));
        }
        add_end_of_turn_ids(&root, &tokenizer, &mut config.eos_token_ids)?;
        let preprocessor = root.join("preprocessor_config.json");
        let image = if preprocessor.is_file() {
            ImageProcessorConfig::load(&preprocessor)?
        } else {
            ImageProcessorConfig::default()
        };
        if image.patch_size != config.vision.patch_size
            || image.merge_size != config.vision.spatial_merge_size
            || image.temporal_patch_size != config.vision.temporal_patch_size
        {
            return Err(config_error(
                &preprocessor,
                format!(
                    "patch {} / merge {} / temporal {} disagree with config.json's vision_config ({} / {} / {})",
                    image.patch_size,
                    image.merge_size,
                    image.temporal_patch_size,
                    config.vision.patch_size,
                    config.vision.spatial_merge_size,
                    config.vision.temporal_patch_size
                ),
            ));
        }
        Ok(Self {
            chat_template: chat_template(&root)?,
            root,
            config,
            weights,
            tokenizer,
            image,
        })
    }

    /// Loads the weights onto `device` in `dtype`. A missing or misshapen tensor is an
    /// error naming the folder and the key; so is a tensor of the files that the model does
    /// not read (unless [`unused_tensors`] lists it).
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Qwen2Vl, ModelError> {
        self.load_adapted(dtype, device, None, UnusedWeights::Refuse)
    }

    /// As [`Self::load`], with a peft LoRA adapter merged into the weights as they are read
    /// (an adapter module that matches no weight is an error naming it) and `unused` saying
    /// what to do with tensors nobody read.
    pub fn load_adapted(
        &self,
        dtype: DType,
        device: &Device,
        adapter: Option<Arc<PeftAdapter>>,
        unused: UnusedWeights,
    ) -> Result<Qwen2Vl, ModelError> {
        let log = ReadLog::new();
        let model = self.build_recorded(dtype, device, adapter, unused, &log)?;
        check_unused(
            "the Qwen-VL model",
            &StoredTensors::safetensors(&self.weights)?,
            &log,
            &unused_tensors(&self.config),
            unused,
        )?;
        Ok(model)
    }

    /// Builds the model (with `adapter` merged) recording every tensor read in `log`,
    /// without comparing them with the files: for loaders that read more of the same files
    /// (a reward model's heads) and check once at the end.
    pub fn build_recorded(
        &self,
        dtype: DType,
        device: &Device,
        adapter: Option<Arc<PeftAdapter>>,
        unused: UnusedWeights,
        log: &ReadLog,
    ) -> Result<Qwen2Vl, ModelError> {
        let fail =
            |e: candle_core::Error| config_error(&self.root, format!("loading weights: {e}"));
        let mut names = Vec::new();
        for file in &self.weights {
            let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
                .map_err(|e| config_error(file, e))?;
            names.extend(tensors.tensors().into_iter().map(|(name, _)| name));
        }
        let layout = KeyLayout::detect(names.iter().map(String::as_str)).ok_or_else(|| {
            config_error(
                &self.root,
                "no Qwen2-VL tensors (expected `model.embed_tokens.*`/`visual.*` or `model.language_model.*`)",
            )
        })?;
        // SAFETY: the files are memory-mapped read-only and not modified while loaded.
        let base = unsafe { MmapedSafetensors::multi(&self.weights) }.map_err(fail)?;
        let Some(adapter) = adapter else {
            let vb = VarBuilder::from_backend(
                Box::new(Recording::new(base, log.clone())),
                dtype,
                device.clone(),
            );
            return Qwen2Vl::new(&self.config, layout, vb).map_err(fail);
        };
        let (weights, merged) = AdaptedWeights::new(base, adapter.clone());
        let vb = VarBuilder::from_backend(
            Box::new(Recording::new(weights, log.clone())),
            dtype,
            device.clone(),
        );
        let model = Qwen2Vl::new(&self.config, layout, vb).map_err(fail)?;
        check_all_merged(&adapter, &merged, unused)?;
        Ok(model)
    }

    /// The chat format: template and tokenizer.
    pub fn chat_format(&self) -> Result<ChatFormat, ModelError> {
        ChatFormat::new(&self.tokenizer, self.chat_template.clone(), &self.config)
    }
}

/// Completes the ids generation stops at: `config.json` may name none (Qwen3-VL written by
/// transformers 5 keeps them elsewhere), `generation_config.json` often names more
/// (`<|endoftext|>` too), and every Qwen chat template ends a turn with `<|im_end|>`.
fn add_end_of_turn_ids(
    root: &Path,
    tokenizer: &Path,
    ids: &mut Vec<u32>,
) -> Result<(), ModelError> {
    let mut add = |id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    let generation = root.join("generation_config.json");
    if generation.is_file() {
        let config: GenerationConfig = read_json(&generation)?;
        config
            .eos_token_id
            .iter()
            .flat_map(TokenIds::to_vec)
            .for_each(&mut add);
    }
    // Only the added tokens are read: a real tokenizer.json is megabytes of vocabulary
    // and merges, which the tokenizers crate parses once more when the judge loads.
    let added: AddedTokens = read_json(tokenizer)?;
    added
        .added_tokens
        .iter()
        .filter(|t| t.content == "<|im_end|>")
        .for_each(|t| add(t.id));
    Ok(())
}

/// The part of `generation_config.json` that says where generation stops.
#[derive(serde::Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

/// The part of `tokenizer.json` that names the special tokens.
#[derive(serde::Deserialize)]
struct AddedTokens {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(serde::Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

/// The template as transformers finds it: `chat_template.jinja` (transformers 5),
/// `chat_template.json` (Qwen Hub repos), or the `chat_template` of `tokenizer_config.json`.
fn chat_template(root: &Path) -> Result<Option<String>, ModelError> {
    let jinja = root.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| config_error(&jinja, e));
    }
    for name in ["chat_template.json", "tokenizer_config.json"] {
        let path = root.join(name);
        if path.is_file() {
            if let Some(t) = read_json::<serde_json::Value>(&path)?
                .get("chat_template")
                .and_then(|t| t.as_str())
            {
                return Ok(Some(t.to_string()));
            }
        }
    }
    Ok(None)
}
