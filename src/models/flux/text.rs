//! The two text encoders FLUX conditions on: T5 (token states, 512 tokens at full size) and
//! CLIP-L (pooled vector), with their tokenizers. Encoded once per edit.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::files::EncoderFiles;
use super::t5::T5Encoder;
use super::weights::{shared_var_builder, weights_error, KeyLayout, WeightSource};
use crate::error::ModelError;
use crate::fsio::read_json;
use crate::models::config_keys::ConfigKeys;
use crate::models::weight_use::{KnownUnused, UnusedWeights};

/// Tensors a CLIP text checkpoint may hold that the encoder does not read, because
/// transformers' `CLIPTextModel` (what FLUX pipelines load as `text_encoder`) does not
/// either; each under both prefixes transformers has saved it with.
pub const CLIP_UNUSED_TENSORS: &[KnownUnused] = &[
    KnownUnused::new(
        "*embeddings.position_ids",
        "the position indices 0..max_position_embeddings, a buffer older transformers saved; \
         CLIPTextEmbeddings registers it non-persistent (models/clip/modeling_clip.py), so \
         loading drops it, and the encoder here counts positions the same way",
    ),
    KnownUnused::new(
        "text_projection.weight",
        "the projection of CLIPTextModelWithProjection; CLIPTextModel, whose pooled output \
         FLUX takes, has no projection and drops the key",
    ),
];

/// CLIP's context length.
pub const CLIP_TOKENS: usize = 77;

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Files {
        path: path.to_path_buf(),
        reason: format!("tokenizer: {e}"),
    }
}

/// One entry of `tokenizer_config.json`'s `added_tokens_decoder` (transformers'
/// `AddedToken` fields): how the token is matched in text.
#[derive(Debug, Deserialize)]
struct AddedTokenFlags {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    /// Matched after the normalizer (lowercase, whitespace) rather than in the raw text.
    #[serde(default)]
    normalized: bool,
    #[serde(default = "yes")]
    special: bool,
}

fn yes() -> bool {
    true
}

/// The part of `tokenizer_config.json` the rebuilt tokenizer honours.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    added_tokens_decoder: std::collections::BTreeMap<String, AddedTokenFlags>,
}

/// Loads `dir/tokenizer.json`, or builds CLIP's byte-level BPE from `vocab.json` +
/// `merges.txt` (how the FLUX repositories ship the CLIP tokenizer), with the added tokens'
/// flags from `tokenizer_config.json` when the folder has one (as transformers reads them;
/// without it, the special tokens match the raw text, transformers' default).
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, ModelError> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Tokenizer::from_file(&json).map_err(|e| tokenizer_error(&json, e));
    }
    let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !vocab_path.is_file() || !merges_path.is_file() {
        return Err(ModelError::Files {
            path: dir.to_path_buf(),
            reason: "no tokenizer.json, and no vocab.json + merges.txt to build one from".into(),
        });
    }
    let vocab: serde_json::Map<String, serde_json::Value> = read_json(&vocab_path)?;
    let merges: Vec<Vec<String>> = std::fs::read_to_string(&merges_path)
        .map_err(|e| tokenizer_error(&merges_path, e))?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect();
    let id = |t: &str| {
        vocab
            .get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| tokenizer_error(&vocab_path, format!("no `{t}` token")))
    };
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let config_path = dir.join("tokenizer_config.json");
    let config: TokenizerConfig = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        TokenizerConfig::default()
    };
    let mut added: Vec<serde_json::Value> = Vec::new();
    for (id, t) in &config.added_tokens_decoder {
        let id: u64 = id.parse().map_err(|_| {
            tokenizer_error(
                &config_path,
                format!("added_tokens_decoder key {id:?} is not a token id"),
            )
        })?;
        added.push(serde_json::json!({"id": id, "content": t.content, "single_word": t.single_word,
            "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}));
    }
    for (id, content) in [(bos, "<|startoftext|>"), (eos, "<|endoftext|>")] {
        if !added.iter().any(|t| t["content"] == content) {
            added.push(
                serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
            );
        }
    }
    // The layout transformers' CLIPTokenizer builds (byte-level BPE, `</w>` word ends).
    let spec = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos],
            "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| tokenizer_error(&vocab_path, e))
}

/// Token ids padded (with `pad_id`) or truncated to exactly `len`, special tokens added.
pub fn token_ids(
    tokenizer: &Tokenizer,
    text: &str,
    len: usize,
    pad_id: u32,
) -> Result<Vec<u32>, ModelError> {
    let mut tokenizer = tokenizer.clone();
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: len,
            ..Default::default()
        }))
        .map_err(|e| ModelError::Input(format!("tokenizer: {e}")))?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(len),
        pad_id,
        ..Default::default()
    }));
    let encoding = tokenizer
        .encode(text, true)
        .map_err(|e| ModelError::Input(format!("tokenizer: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}

/// Refuses a tokenizer that can give ids past the encoder's embedding table (a tokenizer
/// folder of another model): the first prompt would fail deep in an index select.
fn tokenizer_fits(
    tokenizer: &Tokenizer,
    files: &EncoderFiles,
    vocab_size: usize,
) -> Result<(), ModelError> {
    let ids = tokenizer
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |id| id as usize + 1);
    if ids > vocab_size {
        return Err(ModelError::files(
            &files.tokenizer_dir,
            format!(
                "the tokenizer gives token ids up to {}, and the encoder ({}) has vocab_size \
                 {vocab_size}: the tokenizer belongs to another model",
                ids - 1,
                files.config.display()
            ),
        ));
    }
    Ok(())
}

/// transformers' `CLIPTextConfig` fields that matter here.
#[derive(Debug, Deserialize)]
struct HfClipConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
    #[serde(default)]
    projection_dim: usize,
    #[serde(default)]
    pad_token_id: Option<u32>,
    /// candle's CLIP uses 1e-5 (transformers' default) and has no setting for it.
    #[serde(default = "clip_eps")]
    layer_norm_eps: f64,
    /// Where the pooled state is read: transformers' CLIPTextTransformer takes the highest
    /// token id's position when this is 2 (the legacy configs) and the first
    /// `eos_token_id` otherwise; candle always takes the highest id's.
    #[serde(default = "legacy_eos")]
    eos_token_id: u32,
}

fn legacy_eos() -> u32 {
    2
}

/// How every key of transformers' `CLIPTextConfig` is treated (see
/// [`crate::models::config_keys`]).
pub const CLIP_CONFIG_KEYS: &[ConfigKeys] = &[ConfigKeys {
    section: "",
    inert: &[
        ("attention_dropout", "dropout, off at inference"),
        (
            "bos_token_id",
            "the tokenizer's start token; the prompt's ids come from the tokenizer",
        ),
        (
            "model_type",
            "names the class; FLUX's text_encoder is CLIP by construction",
        ),
    ],
    refused: &[
        ("hidden_act", "\"gelu\""),
        ("layer_norm_eps", "1e-6"),
        ("eos_token_id", "7"),
    ],
}];

/// How every key of transformers' `T5Config` is treated (see
/// [`crate::models::config_keys`]): the encoder's are read by candle's T5 config, the GGUF
/// encoder's and [`check_t5_config`]; the decoder's and training's are inert.
pub const T5_CONFIG_KEYS: &[ConfigKeys] = &[ConfigKeys {
    section: "",
    inert: &[
        ("classifier_dropout", "dropout of a classification head, not built"),
        ("is_gated_act", "derived from feed_forward_proj (T5Config.__post_init__ recomputes it)"),
        ("scale_decoder_outputs", "scales the decoder's output before its LM head; only the encoder is built (T5EncoderModel has no decoder)"),
        ("model_type", "names the class; FLUX's text_encoder_2 is T5 by construction"),
        ("_name_or_path", "where the config was loaded from"),
    ],
    refused: &[("dense_act_fn", "\"relu\"")],
}];

/// T5's `config.json` as the loader reads it: the fields candle's dense T5, the GGUF encoder
/// and the checks here read, checked. Returns the padding id.
pub fn check_t5_config(value: &serde_json::Value) -> Result<u32, String> {
    let checks: T5Checks = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    checks.check()?;
    serde_json::from_value::<candle_transformers::models::t5::Config>(value.clone())
        .map_err(|e| e.to_string())?;
    serde_json::from_value::<super::t5_quantized::T5EncoderConfig>(value.clone())
        .map_err(|e| e.to_string())?;
    Ok(checks.pad_token_id as u32)
}

/// CLIP's `config.json` as the loader reads it: candle's config and the padding id, or a
/// refusal naming the field candle's CLIP cannot honour.
pub fn clip_text_config(
    value: &serde_json::Value,
) -> Result<(ClipTextConfig, Option<u32>), String> {
    let hf: HfClipConfig = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    if (hf.layer_norm_eps - 1e-5).abs() > 1e-12 {
        return Err(format!(
            "`layer_norm_eps` = {} is not supported (candle's CLIP uses 1e-5)",
            hf.layer_norm_eps
        ));
    }
    if hf.hidden_act != "quick_gelu" {
        return Err(format!(
            "hidden_act `{}` is not supported (CLIP-L uses quick_gelu)",
            hf.hidden_act
        ));
    }
    // The first eos is the highest id's position when eos is the last id of the vocabulary
    // (CLIP's <|endoftext|>, 49407 of 49408), as the tokenizer always appends it.
    if hf.eos_token_id != 2 && hf.eos_token_id as usize + 1 != hf.vocab_size {
        return Err(format!(
            "`eos_token_id` = {} is not supported: transformers pools at the first such token, \
             candle's CLIP at the highest token id, which agree only for 2 (legacy) or the last id \
             of the vocabulary ({})",
            hf.eos_token_id,
            hf.vocab_size - 1
        ));
    }
    let config = ClipTextConfig {
        vocab_size: hf.vocab_size,
        embed_dim: hf.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: hf.intermediate_size,
        max_position_embeddings: hf.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: hf.num_hidden_layers,
        num_attention_heads: hf.num_attention_heads,
        projection_dim: hf.projection_dim,
    };
    Ok((config, hf.pad_token_id))
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}

fn clip_eps() -> f64 {
    1e-5
}

/// The fields of T5's config that candle-transformers' T5 does not read but that must agree
/// with what it computes.
#[derive(Debug, Deserialize)]
struct T5Checks {
    #[serde(default)]
    feed_forward_proj: Option<String>,
    /// T5 v1.1 states the gated activation again here; candle takes it from
    /// `feed_forward_proj`, so the two must agree.
    #[serde(default)]
    dense_act_fn: Option<String>,
    /// The padding id (transformers' default 0).
    #[serde(default)]
    pad_token_id: usize,
}

impl T5Checks {
    fn check(&self) -> Result<(), String> {
        let implied = match self.feed_forward_proj.as_deref() {
            Some("gated-gelu") => "gelu_new",
            Some("gated-silu") => "silu",
            Some(other) => other.trim_start_matches("gated-"),
            None => "relu",
        };
        match self.dense_act_fn.as_deref() {
            Some(act) if act != implied && !(implied == "gelu_new" && act == "gelu_pytorch_tanh") => {
                Err(format!(
                    "`dense_act_fn` = {act:?} disagrees with `feed_forward_proj` = {:?} (which computes {implied}); such a T5 is not supported",
                    self.feed_forward_proj.as_deref().unwrap_or("relu")
                ))
            }
            _ => Ok(()),
        }
    }
}

/// T5 + CLIP with their tokenizers.
pub struct TextEncoders {
    t5: T5Encoder,
    t5_tokenizer: Tokenizer,
    t5_pad: u32,
    clip: ClipTextTransformer,
    clip_tokenizer: Tokenizer,
    clip_pad: u32,
    dtype: DType,
}

impl TextEncoders {
    /// Loads both encoders (CLIP from `text_encoder/`, T5 from `text_encoder_2/` layouts).
    /// A tensor of either's files that it does not read is refused unless listed as unread by
    /// the reference too, or `unused` allows it.
    pub fn load(
        clip: &EncoderFiles,
        t5: &EncoderFiles,
        dtype: DType,
        dev: &Device,
        unused: UnusedWeights,
    ) -> Result<Self, ModelError> {
        let t5_json: serde_json::Value = read_json(&t5.config)?;
        let t5_pad =
            check_t5_config(&t5_json).map_err(|reason| ModelError::files(&t5.config, reason))?;
        let t5_model = T5Encoder::load(&t5.weights, &t5.config, dtype, dev, unused)?;

        let (clip_config, clip_pad_id) = clip_text_config(&read_json(&clip.config)?)
            .map_err(|reason| ModelError::files(&clip.config, reason))?;
        let clip_source =
            std::sync::Arc::new(WeightSource::open(&clip.weights, KeyLayout::Diffusers)?);
        let clip_vb: VarBuilder = shared_var_builder(clip_source.clone(), dtype, dev);
        // Older transformers saved CLIPTextModel under `text_model.`, newer ones at the root.
        let clip_root = if clip_vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            clip_vb.pp("text_model")
        } else {
            clip_vb
        };
        let clip_model = ClipTextTransformer::new(clip_root, &clip_config)
            .map_err(|e| weights_error(&clip.weights[0], e))?;
        clip_source.check_unused("the CLIP text encoder", CLIP_UNUSED_TENSORS, unused)?;

        let clip_tokenizer = load_tokenizer(&clip.tokenizer_dir)?;
        tokenizer_fits(&clip_tokenizer, clip, clip_config.vocab_size)?;
        let t5_tokenizer = load_tokenizer(&t5.tokenizer_dir)?;
        if let Some(vocab) = t5_json.get("vocab_size").and_then(|v| v.as_u64()) {
            tokenizer_fits(&t5_tokenizer, t5, vocab as usize)?;
        }
        // CLIP pads with its end-of-text token.
        let clip_pad = clip_tokenizer
            .token_to_id("<|endoftext|>")
            .or(clip_pad_id)
            .unwrap_or(0);
        Ok(Self {
            t5: t5_model,
            t5_tokenizer,
            t5_pad,
            clip: clip_model,
            clip_tokenizer,
            clip_pad,
            dtype,
        })
    }

    /// T5 token ids for `prompt`, `t5_tokens` long.
    pub fn t5_ids(&self, prompt: &str, t5_tokens: usize) -> Result<Vec<u32>, ModelError> {
        token_ids(&self.t5_tokenizer, prompt, t5_tokens, self.t5_pad)
    }

    /// CLIP token ids for `prompt`, 77 long.
    pub fn clip_ids(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        token_ids(&self.clip_tokenizer, prompt, CLIP_TOKENS, self.clip_pad)
    }

    /// Encodes `prompt`: T5 states `[1, t5_tokens, d]` and CLIP pooled `[1, 768]`, in the
    /// encoders' dtype.
    pub fn encode(
        &mut self,
        prompt: &str,
        t5_tokens: usize,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let dev = self.t5.device().clone();
        let t5_ids = Tensor::new(self.t5_ids(prompt, t5_tokens)?, &dev)?.unsqueeze(0)?;
        let t5 = self.t5.forward(&t5_ids, self.dtype)?;
        let clip_ids = Tensor::new(self.clip_ids(prompt)?, &dev)?.unsqueeze(0)?;
        let pooled = self.clip.forward(&clip_ids)?;
        Ok((t5, pooled))
    }
}
