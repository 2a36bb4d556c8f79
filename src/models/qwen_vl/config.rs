//! `config.json` of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense) checkpoint.
//!
//! Two layouts exist: Hub checkpoints written by transformers 4 put the language model's
//! fields at the top level (with `rope_scaling.mrope_section`), transformers 5 nests them in
//! `text_config` (with `rope_parameters`). Both are read into one resolved [`Qwen2VlConfig`];
//! a missing field is an error that names it.

use serde::Deserialize;
use serde_json::Value;

use crate::models::activation::Activation;
use crate::models::config_keys::ConfigKeys;

/// Top-level keys of every family's reference config that do not change the math here.
const TOP_INERT: &[(&str, &str)] = &[(
    "video_token_id",
    "marks video pads; only images are given to the model here, so no prompt holds it",
)];

/// `text_config` keys of every family's reference config that do not change the math here.
const TEXT_INERT: &[(&str, &str)] = &[
    ("attention_dropout", "dropout, off at inference"),
    ("max_position_embeddings", "sizes caches and dynamic RoPE variants; the default / mrope frequencies do not depend on it (other rope types are refused)"),
    ("pad_token_id", "the embedding's padding row only matters for training; prompts here are never padded"),
    ("bos_token_id", "the prompt's ids come from the chat template and tokenizer"),
    ("model_type", "names the sub-config class; the family comes from the top-level model_type"),
];

/// The Qwen2 decoders' sliding-window keys: only used with `use_sliding_window`, which is
/// refused when true (Qwen2VLTextConfig.__post_init__ drops `sliding_window` otherwise, and
/// the attention then slides over nothing whatever `layer_types` says).
const SLIDING_INERT: &[(&str, &str)] = &[
    (
        "sliding_window",
        "only used with use_sliding_window (refused when true)",
    ),
    (
        "max_window_layers",
        "only used with use_sliding_window (refused when true)",
    ),
    (
        "layer_types",
        "sliding_attention entries only slide with use_sliding_window (refused when true)",
    ),
];

/// `vision_config` keys of every family's reference config that do not change the math here.
const VISION_INERT: &[(&str, &str)] = &[(
    "model_type",
    "names the sub-config class; the family comes from the top-level model_type",
)];

/// How every key of transformers' `Qwen2VLConfig` is treated, by section (see
/// [`crate::models::config_keys`]).
pub const QWEN2_VL_CONFIG_KEYS: &[ConfigKeys] = &[
    ConfigKeys {
        section: "",
        inert: TOP_INERT,
        refused: &[],
    },
    ConfigKeys {
        section: "text_config",
        inert: &[],
        refused: TEXT_REFUSED,
    },
    ConfigKeys {
        section: "vision_config",
        inert: VISION_INERT,
        refused: &[("hidden_act", "\"xielu\"")],
    },
];

/// How every key of transformers' `Qwen2_5_VLConfig` is treated, by section.
pub const QWEN2_5_VL_CONFIG_KEYS: &[ConfigKeys] = &[
    ConfigKeys {
        section: "",
        inert: TOP_INERT,
        refused: &[],
    },
    ConfigKeys {
        section: "text_config",
        inert: &[],
        refused: TEXT_REFUSED,
    },
    ConfigKeys {
        section: "vision_config",
        inert: &[
            (
                "model_type",
                "names the sub-config class; the family comes from the top-level model_type",
            ),
            (
                "tokens_per_second",
                "spaces the temporal positions of video frames; an image has one temporal index",
            ),
        ],
        refused: &[("hidden_act", "\"xielu\"")],
    },
];

/// How every key of transformers' `Qwen3VLConfig` is treated, by section.
pub const QWEN3_VL_CONFIG_KEYS: &[ConfigKeys] = &[
    ConfigKeys {
        section: "",
        inert: TOP_INERT,
        refused: &[],
    },
    ConfigKeys {
        section: "text_config",
        inert: &[],
        refused: &[
            ("hidden_act", "\"relu2\""),
            ("rope_parameters", "{\"rope_type\": \"yarn\"}"),
        ],
    },
    ConfigKeys {
        section: "vision_config",
        inert: VISION_INERT,
        refused: &[
            ("hidden_act", "\"xielu\""),
            ("deepstack_visual_indexes", "[99]"),
        ],
    },
];

/// `text_config` keys refused (by name) for values not implemented here.
const TEXT_REFUSED: &[(&str, &str)] = &[
    ("hidden_act", "\"relu2\""),
    ("use_sliding_window", "true"),
    ("rope_parameters", "{\"rope_type\": \"yarn\"}"),
];

impl Family {
    /// How each key of the family's reference config is treated.
    pub fn config_keys(self) -> &'static [ConfigKeys] {
        match self {
            Self::Qwen2Vl => QWEN2_VL_CONFIG_KEYS,
            Self::Qwen25Vl => QWEN2_5_VL_CONFIG_KEYS,
            Self::Qwen3Vl => QWEN3_VL_CONFIG_KEYS,
        }
    }

    /// The inert keys of `section` every family shares ([`ConfigKeys::inert_reason`]'s
    /// `common`).
    pub fn shared_inert(section: &str) -> Vec<(&'static str, &'static str)> {
        let mut all = crate::models::config_keys::TRANSFORMERS_COMMON_INERT.to_vec();
        if section == "text_config" {
            all.extend_from_slice(TEXT_INERT);
            all.extend_from_slice(SLIDING_INERT);
        }
        all
    }
}

/// Which model family a checkpoint belongs to; they differ only in the vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen2-VL: LayerNorm, fc1/quick-GELU/fc2 MLP, full attention in every block.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm, SwiGLU MLP, window attention except in `fullatt_block_indexes`.
    Qwen25Vl,
    /// Qwen3-VL (dense): learned position embeddings, tanh-GELU MLP, DeepStack features
    /// added to the first decoder layers; a Qwen3 decoder (q/k norm, interleaved M-RoPE).
    Qwen3Vl,
}

/// The language model.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Vocabulary rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Frequencies given to the (temporal, height, width) position ids, in pairs of
    /// `head_dim / 2`.
    pub mrope_section: Vec<usize>,
    /// The LM head reuses the embedding (the small checkpoints).
    pub tie_word_embeddings: bool,
    /// Width of one attention head (Qwen3 states it; Qwen2 derives it).
    pub head_dim: usize,
    /// q/k/v projections have biases (Qwen2; Qwen3 with `attention_bias`) or none.
    pub qkv_bias: bool,
    /// The output projection has a bias: Qwen3-VL with `attention_bias`, where transformers
    /// gives q, k, v and o their biases together (`Qwen3VLTextAttention`); never in Qwen2.
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Qwen3-VL interleaves the axes over the frequencies (t, h, w, t, h, w, ...) instead
    /// of giving each axis a contiguous block. Fixed by the family, as in transformers: a
    /// config's `mrope_interleaved` that says otherwise is refused.
    pub mrope_interleaved: bool,
    /// The MLP's activation (`hidden_act`; SiLU in every released checkpoint).
    pub hidden_act: Activation,
}

impl TextConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// The vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Width inside the tower.
    pub embed_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width.
    pub mlp_hidden: usize,
    /// Width of the merged tokens handed to the language model.
    pub out_hidden_size: usize,
    /// Input channels (3).
    pub in_channels: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2; an image is repeated).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one language token (2).
    pub spatial_merge_size: usize,
    /// Qwen2.5-VL: window side in pixels for window attention.
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: blocks that attend over the whole image.
    pub fullatt_block_indexes: Vec<usize>,
    /// Base of the 2-D rotary embedding.
    pub rope_theta: f64,
    /// Qwen3-VL: side² of the learned position-embedding grid, resampled to each image.
    pub num_position_embeddings: Option<usize>,
    /// Qwen3-VL: blocks whose output feeds a DeepStack merger (one per decoder layer from 0).
    pub deepstack_visual_indexes: Vec<usize>,
    /// The block MLP's activation (`vision_config.hidden_act`: quick-GELU in Qwen2-VL,
    /// SiLU in Qwen2.5-VL, tanh-GELU in Qwen3-VL).
    pub hidden_act: Activation,
}

impl VisionConfig {
    /// Values in one flattened patch: channels x temporal x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
}

/// A checkpoint's configuration, resolved from either layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    /// Which tower the checkpoint has.
    pub family: Family,
    /// Language model.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`: one per merged image token.
    pub image_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    /// End of a turn (`<|im_end|>`); generation stops here.
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` as configs write it: one id or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (transformers 4).
#[derive(Debug, Clone, Default, Deserialize)]
struct RopeFields {
    mrope_section: Option<Vec<usize>>,
    rope_theta: Option<f64>,
    mrope_interleaved: Option<bool>,
    /// transformers 4 writes `type`, 5 `rope_type`; only multimodal RoPE is implemented.
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
}

/// The language model's fields wherever a layout puts them: at the top level
/// (transformers 4) or under `text_config` (transformers 5). All optional here; resolution
/// says which are required and which default.
#[derive(Debug, Clone, Default, Deserialize)]
struct TextFields {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeFields>,
    rope_scaling: Option<RopeFields>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    image_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
}

/// The top of `config.json`: which family, and the sections.
#[derive(Debug, Clone, Deserialize)]
struct ConfigHead {
    model_type: String,
    text_config: Option<Value>,
    vision_config: Value,
}

/// `vision_config` of Qwen2-VL.
#[derive(Debug, Clone, Deserialize)]
struct Qwen2VisionFields {
    depth: usize,
    embed_dim: usize,
    num_heads: usize,
    #[serde(default = "defaults::mlp_ratio")]
    mlp_ratio: f64,
    /// The width handed to the language model.
    hidden_size: usize,
    #[serde(flatten)]
    common: CommonVisionFields,
}

/// `vision_config` of Qwen2.5-VL.
#[derive(Debug, Clone, Deserialize)]
struct Qwen25VisionFields {
    depth: usize,
    hidden_size: usize,
    num_heads: usize,
    intermediate_size: usize,
    out_hidden_size: usize,
    window_size: usize,
    fullatt_block_indexes: Vec<usize>,
    #[serde(flatten)]
    common: CommonVisionFields,
}

/// `vision_config` of Qwen3-VL.
#[derive(Debug, Clone, Deserialize)]
struct Qwen3VisionFields {
    depth: usize,
    hidden_size: usize,
    num_heads: usize,
    intermediate_size: usize,
    out_hidden_size: usize,
    num_position_embeddings: usize,
    #[serde(default)]
    deepstack_visual_indexes: Vec<usize>,
    #[serde(flatten)]
    common: CommonVisionFields,
}

/// Fields every vision tower has; the patch size defaults per family.
#[derive(Debug, Clone, Deserialize)]
struct CommonVisionFields {
    in_channels: Option<usize>,
    /// transformers 4's name for `in_channels`.
    in_chans: Option<usize>,
    patch_size: Option<usize>,
    #[serde(default = "defaults::two")]
    temporal_patch_size: usize,
    #[serde(default = "defaults::two")]
    spatial_merge_size: usize,
    rope_parameters: Option<RopeFields>,
    hidden_act: Option<String>,
}

impl CommonVisionFields {
    /// The block MLP's activation: the config's, else the family's.
    fn hidden_act(&self, family_default: Activation) -> Result<Activation, String> {
        match &self.hidden_act {
            Some(name) => {
                Activation::from_name(name).map_err(|e| format!("vision_config.hidden_act: {e}"))
            }
            None => Ok(family_default),
        }
    }

    fn in_channels(&self) -> usize {
        self.in_channels.or(self.in_chans).unwrap_or(3)
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(10_000.0)
    }
}

mod defaults {
    pub fn mlp_ratio() -> f64 {
        4.0
    }
    pub fn two() -> usize {
        2
    }
}

/// Deserializes `value` as `T`; errors name the path of the bad field under `section`.
fn parse<T: serde::de::DeserializeOwned>(value: &Value, section: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = match (section, path.as_str()) {
            ("", ".") => String::new(),
            ("", p) => format!("field `{p}`: "),
            (s, ".") => format!("{s}: "),
            (s, p) => format!("field `{s}.{p}`: "),
        };
        format!("{at}{}", e.into_inner())
    })
}

/// The text section's value of a field, else the top level's.
fn either<T: Clone>(
    text: &TextFields,
    top: &TextFields,
    get: impl Fn(&TextFields) -> &Option<T>,
) -> Option<T> {
    get(text).clone().or_else(|| get(top).clone())
}

impl Qwen2VlConfig {
    /// Resolves a parsed `config.json` in either layout. The error names the missing or
    /// wrong field.
    pub fn from_json(top: &Value) -> Result<Self, String> {
        let head: ConfigHead = parse(top, "")?;
        let family = match head.model_type.as_str() {
            "qwen2_vl" => Family::Qwen2Vl,
            "qwen2_5_vl" => Family::Qwen25Vl,
            "qwen3_vl" => Family::Qwen3Vl,
            other => {
                return Err(format!(
                    "model_type {other:?} is not a Qwen2-VL checkpoint (expected \"qwen2_vl\", \"qwen2_5_vl\" or \"qwen3_vl\"; MoE checkpoints are not supported)"
                ))
            }
        };
        let top_fields: TextFields = parse(top, "")?;
        let text_fields: TextFields = match head.text_config.as_ref().filter(|v| v.is_object()) {
            Some(section) => parse(section, "text_config")?,
            None => TextFields::default(),
        };
        let (t, f) = (&text_fields, &top_fields);
        // A required field: the text section's value, else the top level's, else an error
        // naming it.
        macro_rules! required {
            ($field:ident) => {
                either(t, f, |x| &x.$field)
                    .ok_or_else(|| format!("missing field `{}`", stringify!($field)))?
            };
        }
        // transformers 5: rope_parameters; transformers 4: rope_scaling + rope_theta.
        let rope = either(t, f, |x| &x.rope_parameters)
            .or_else(|| either(t, f, |x| &x.rope_scaling))
            .unwrap_or_default();
        let rope_section = if either(t, f, |x| &x.rope_parameters).is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        // Fields that change the computation and that this code does not implement are
        // refused, never ignored.
        if let Some(kind) = rope.rope_type.as_ref().or(rope.kind.as_ref()) {
            if !matches!(kind.as_str(), "mrope" | "default") {
                return Err(format!(
                    "`{rope_section}.rope_type` = {kind:?} is not implemented (only multimodal RoPE, \"mrope\"/\"default\")"
                ));
            }
        }
        let mrope_section = rope
            .mrope_section
            .clone()
            .ok_or("missing field `rope_scaling.mrope_section` (or `rope_parameters`)")?;
        if either(t, f, |x| &x.use_sliding_window) == Some(true) {
            return Err(
                "use_sliding_window = true is not implemented (every released Qwen-VL attends over the whole sequence)"
                    .into(),
            );
        }
        // transformers 5 fixes the M-RoPE layout by family and never reads the field:
        // Qwen3VLTextRotaryEmbedding.recomposition_frequencies always interleaves, Qwen2-VL's
        // and Qwen2.5-VL's apply_multimodal_rotary_pos_emb always splits into blocks. A
        // config asking for the other layout would run differently here and there: refused.
        let qwen3 = family == Family::Qwen3Vl;
        if let Some(interleaved) = rope.mrope_interleaved.filter(|&i| i != qwen3) {
            return Err(format!(
                "`{rope_section}.mrope_interleaved` = {interleaved} is not supported: transformers' {} {} \
                 whatever the field says",
                head.model_type,
                if qwen3 {
                    "always interleaves the M-RoPE axes over the frequencies"
                } else {
                    "always gives each M-RoPE axis a contiguous block of frequencies"
                }
            ));
        }
        let hidden_act = match either(t, f, |x| &x.hidden_act) {
            Some(name) => Activation::from_name(&name).map_err(|e| format!("hidden_act: {e}"))?,
            None => Activation::Silu,
        };
        let hidden_size = required!(hidden_size);
        let num_attention_heads = required!(num_attention_heads);
        let text = TextConfig {
            vocab_size: required!(vocab_size),
            hidden_size,
            intermediate_size: required!(intermediate_size),
            num_hidden_layers: required!(num_hidden_layers),
            num_attention_heads,
            num_key_value_heads: required!(num_key_value_heads),
            rms_norm_eps: either(t, f, |x| &x.rms_norm_eps).unwrap_or(1e-6),
            rope_theta: rope
                .rope_theta
                .or_else(|| either(t, f, |x| &x.rope_theta))
                .unwrap_or(1_000_000.0),
            mrope_section,
            // The top-level flag is the one transformers honours for the head.
            tie_word_embeddings: either(f, t, |x| &x.tie_word_embeddings).unwrap_or(false),
            head_dim: either(t, f, |x| &x.head_dim)
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
            qkv_bias: if qwen3 {
                either(t, f, |x| &x.attention_bias).unwrap_or(false)
            } else {
                true
            },
            // transformers' Qwen2-VL text attention has no such field: o_proj is bias-free.
            o_bias: qwen3 && either(t, f, |x| &x.attention_bias).unwrap_or(false),
            qk_norm: qwen3,
            mrope_interleaved: qwen3,
            hidden_act,
        };
        if text.num_attention_heads == 0
            || (!qwen3 && !text.hidden_size.is_multiple_of(text.num_attention_heads))
            || !text
                .num_attention_heads
                .is_multiple_of(text.num_key_value_heads.max(1))
        {
            return Err(format!(
                "hidden_size {} / num_attention_heads {} / num_key_value_heads {} do not divide",
                text.hidden_size, text.num_attention_heads, text.num_key_value_heads
            ));
        }
        let head_dim = text.head_dim();
        if text.mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(format!(
                "mrope_section {:?} does not cover head_dim {head_dim} (its sum must be head_dim / 2)",
                text.mrope_section
            ));
        }

        let v = &head.vision_config;
        let vision = match family {
            Family::Qwen2Vl => {
                let q: Qwen2VisionFields = parse(v, "vision_config")?;
                VisionConfig {
                    depth: q.depth,
                    embed_dim: q.embed_dim,
                    num_heads: q.num_heads,
                    mlp_hidden: (q.embed_dim as f64 * q.mlp_ratio) as usize,
                    out_hidden_size: q.hidden_size,
                    in_channels: q.common.in_channels(),
                    patch_size: q.common.patch_size.unwrap_or(14),
                    temporal_patch_size: q.common.temporal_patch_size,
                    spatial_merge_size: q.common.spatial_merge_size,
                    window_size: None,
                    fullatt_block_indexes: Vec::new(),
                    rope_theta: q.common.rope_theta(),
                    num_position_embeddings: None,
                    deepstack_visual_indexes: Vec::new(),
                    hidden_act: q.common.hidden_act(Activation::QuickGelu)?,
                }
            }
            Family::Qwen25Vl => {
                let q: Qwen25VisionFields = parse(v, "vision_config")?;
                VisionConfig {
                    depth: q.depth,
                    embed_dim: q.hidden_size,
                    num_heads: q.num_heads,
                    mlp_hidden: q.intermediate_size,
                    out_hidden_size: q.out_hidden_size,
                    in_channels: q.common.in_channels(),
                    patch_size: q.common.patch_size.unwrap_or(14),
                    temporal_patch_size: q.common.temporal_patch_size,
                    spatial_merge_size: q.common.spatial_merge_size,
                    window_size: Some(q.window_size),
                    fullatt_block_indexes: q.fullatt_block_indexes,
                    rope_theta: q.common.rope_theta(),
                    num_position_embeddings: None,
                    deepstack_visual_indexes: Vec::new(),
                    hidden_act: q.common.hidden_act(Activation::Silu)?,
                }
            }
            Family::Qwen3Vl => {
                let q: Qwen3VisionFields = parse(v, "vision_config")?;
                VisionConfig {
                    depth: q.depth,
                    embed_dim: q.hidden_size,
                    num_heads: q.num_heads,
                    mlp_hidden: q.intermediate_size,
                    out_hidden_size: q.out_hidden_size,
                    in_channels: q.common.in_channels(),
                    patch_size: q.common.patch_size.unwrap_or(16),
                    temporal_patch_size: q.common.temporal_patch_size,
                    spatial_merge_size: q.common.spatial_merge_size,
                    window_size: None,
                    fullatt_block_indexes: Vec::new(),
                    rope_theta: q.common.rope_theta(),
                    num_position_embeddings: Some(q.num_position_embeddings),
                    deepstack_visual_indexes: q.deepstack_visual_indexes,
                    hidden_act: q.common.hidden_act(Activation::GeluTanh)?,
                }
            }
        };
        if vision
            .deepstack_visual_indexes
            .iter()
            .any(|&i| i >= vision.depth)
            || vision.deepstack_visual_indexes.len() > text.num_hidden_layers
        {
            return Err(format!(
                "vision_config.deepstack_visual_indexes {:?} do not fit depth {} / {} decoder layers",
                vision.deepstack_visual_indexes, vision.depth, text.num_hidden_layers
            ));
        }
        if vision.num_heads == 0
            || !vision.embed_dim.is_multiple_of(vision.num_heads)
            || !vision.head_dim().is_multiple_of(4)
        {
            return Err(format!(
                "vision_config: embed width {} / num_heads {} must give a head_dim divisible by 4",
                vision.embed_dim, vision.num_heads
            ));
        }
        Ok(Self {
            family,
            text,
            vision,
            image_token_id: required!(image_token_id),
            vision_start_token_id: required!(vision_start_token_id),
            vision_end_token_id: required!(vision_end_token_id),
            // The top level first, as transformers reads it.
            eos_token_ids: either(f, t, |x| &x.eos_token_id)
                .map(|ids| ids.to_vec())
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/qwen2vl/tiny/{name}/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn reads_both_families_from_transformers5_layout() {
        let c = Qwen2VlConfig::from_json(&fixture("qwen2_vl")).unwrap();
        assert_eq!(c.family, Family::Qwen2Vl);
        assert_eq!(c.text.head_dim(), 16);
        assert_eq!(c.text.mrope_section, vec![2, 3, 3]);
        assert_eq!(c.vision.mlp_hidden, 64);
        assert_eq!(c.vision.out_hidden_size, 64);
        assert_eq!(c.image_token_id, 341);
        assert_eq!(c.eos_token_ids, vec![338]);
        let c = Qwen2VlConfig::from_json(&fixture("qwen2_5_vl")).unwrap();
        assert_eq!(c.family, Family::Qwen25Vl);
        assert_eq!(c.vision.window_size, Some(56));
        assert_eq!(c.vision.fullatt_block_indexes, vec![1]);
        let path = format!(
            "{}/tests/fixtures/qwen3vl/tiny/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let q3: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let c = Qwen2VlConfig::from_json(&q3).unwrap();
        assert_eq!(c.family, Family::Qwen3Vl);
        assert!(c.text.qk_norm && !c.text.qkv_bias && c.text.mrope_interleaved);
        assert_eq!(c.vision.num_position_embeddings, Some(16));
        assert_eq!(c.vision.deepstack_visual_indexes, vec![0]);
        assert_eq!(c.vision.patch_dim(), 3 * 2 * 16 * 16);
    }

    #[test]
    fn a_text_config_section_wins_over_the_top_level_and_its_errors_name_it() {
        let mut c = fixture("qwen2_vl");
        let top = Qwen2VlConfig::from_json(&c).unwrap();
        // A stray top-level value is shadowed by text_config's.
        c["vocab_size"] = 7.into();
        assert_eq!(
            Qwen2VlConfig::from_json(&c).unwrap().text.vocab_size,
            top.text.vocab_size
        );
        c["text_config"]["num_hidden_layers"] = (-1).into();
        let err = Qwen2VlConfig::from_json(&c).unwrap_err();
        assert!(
            err.starts_with("field `text_config.num_hidden_layers`"),
            "{err}"
        );
    }

    #[test]
    fn math_changing_fields_are_honoured_or_refused_by_name() {
        for family in ["qwen2_vl", "qwen2_5_vl"] {
            let base = fixture(family);
            let c = Qwen2VlConfig::from_json(&base).unwrap();
            assert_eq!(c.text.hidden_act, Activation::Silu);
            let expect = if family == "qwen2_vl" {
                Activation::QuickGelu
            } else {
                Activation::Silu
            };
            assert_eq!(c.vision.hidden_act, expect, "{family}");
            // A supported other activation is honoured...
            let mut v = base.clone();
            v["vision_config"]["hidden_act"] = "gelu".into();
            assert_eq!(
                Qwen2VlConfig::from_json(&v).unwrap().vision.hidden_act,
                Activation::Gelu
            );
            // ...an unsupported one is refused, naming the field and value.
            v["vision_config"]["hidden_act"] = "xielu".into();
            let err = Qwen2VlConfig::from_json(&v).unwrap_err();
            assert!(
                err.starts_with("vision_config.hidden_act") && err.contains("xielu"),
                "{err}"
            );
            let mut t = base.clone();
            t["text_config"]["hidden_act"] = "relu2".into();
            let err = Qwen2VlConfig::from_json(&t).unwrap_err();
            assert!(
                err.starts_with("hidden_act") && err.contains("relu2"),
                "{err}"
            );
            let mut w = base.clone();
            w["text_config"]["use_sliding_window"] = true.into();
            let err = Qwen2VlConfig::from_json(&w).unwrap_err();
            assert!(err.contains("use_sliding_window"), "{err}");
        }
        let path = format!(
            "{}/tests/fixtures/qwen3vl/tiny/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut q3: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            Qwen2VlConfig::from_json(&q3).unwrap().vision.hidden_act,
            Activation::GeluTanh
        );
        // attention_bias gives q, k, v and o their biases together, as transformers does.
        let c = Qwen2VlConfig::from_json(&q3).unwrap();
        assert!(!c.text.qkv_bias && !c.text.o_bias);
        let mut biased = q3.clone();
        biased["text_config"]["attention_bias"] = true.into();
        let c = Qwen2VlConfig::from_json(&biased).unwrap();
        assert!(c.text.qkv_bias && c.text.o_bias);
        // mrope_interleaved is fixed by the family in transformers: saying so is accepted,
        // saying otherwise refused by name.
        let mut flat = q3.clone();
        flat["text_config"]["rope_parameters"]["mrope_interleaved"] = false.into();
        let err = Qwen2VlConfig::from_json(&flat).unwrap_err();
        assert!(
            err.contains("`rope_parameters.mrope_interleaved` = false"),
            "{err}"
        );
        let mut q2 = fixture("qwen2_vl");
        assert!(!Qwen2VlConfig::from_json(&q2).unwrap().text.o_bias);
        q2["text_config"]["rope_parameters"]["mrope_interleaved"] = false.into();
        assert!(
            !Qwen2VlConfig::from_json(&q2)
                .unwrap()
                .text
                .mrope_interleaved
        );
        q2["text_config"]["rope_parameters"]["mrope_interleaved"] = true.into();
        let err = Qwen2VlConfig::from_json(&q2).unwrap_err();
        assert!(err.contains("mrope_interleaved` = true"), "{err}");
        q3["text_config"]["rope_parameters"]["rope_type"] = "yarn".into();
        let err = Qwen2VlConfig::from_json(&q3).unwrap_err();
        assert!(err.contains("\"yarn\""), "{err}");
    }

    #[test]
    fn reads_the_flat_hub_layout_and_names_missing_fields() {
        // The shape of Qwen/Qwen2-VL-2B-Instruct's config.json (transformers 4).
        let hub = serde_json::json!({
            "model_type": "qwen2_vl", "vocab_size": 151936, "hidden_size": 1536,
            "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": true, "image_token_id": 151655,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "eos_token_id": 151645,
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                "in_chans": 3, "hidden_size": 1536, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2}
        });
        let c = Qwen2VlConfig::from_json(&hub).unwrap();
        assert_eq!(c.text.head_dim(), 128);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.vision.mlp_hidden, 5120);
        let mut broken = hub.clone();
        broken
            .as_object_mut()
            .unwrap()
            .remove("num_key_value_heads");
        let err = Qwen2VlConfig::from_json(&broken).unwrap_err();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let mut wrong = hub.clone();
        wrong["vision_config"]["depth"] = "deep".into();
        let err = Qwen2VlConfig::from_json(&wrong).unwrap_err();
        assert!(
            err.starts_with("field `vision_config.depth`: invalid type"),
            "{err}"
        );
        let mut wrong = hub.clone();
        wrong["rope_scaling"]["mrope_section"] = serde_json::json!([16, "x", 24]);
        let err = Qwen2VlConfig::from_json(&wrong).unwrap_err();
        assert!(err.contains("rope_scaling.mrope_section"), "{err}");
        broken["model_type"] = "llava".into();
        assert!(Qwen2VlConfig::from_json(&broken)
            .unwrap_err()
            .contains("llava"));
    }
}
