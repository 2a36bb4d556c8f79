//! `config.json` of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense) checkpoint.
//!
//! Two layouts exist: Hub checkpoints written by transformers 4 put the language model's
//! fields at the top level (with `rope_scaling.mrope_section`), transformers 5 nests them in
//! `text_config` (with `rope_parameters`). Both are read into one resolved [`Qwen2VlConfig`];
//! a missing field is an error that names it.

use serde::Deserialize;
use serde_json::Value;

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
    /// q/k/v projections have biases (Qwen2) or none (Qwen3).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Qwen3-VL interleaves the axes over the frequencies (t, h, w, t, h, w, ...) instead
    /// of giving each axis a contiguous block.
    pub mrope_interleaved: bool,
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

/// Looks a field up in the text section first, then at the top level.
struct Fields<'a> {
    top: &'a Value,
    text: Option<&'a Value>,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.text
            .and_then(|t| t.get(key))
            .filter(|v| !v.is_null())
            .or_else(|| self.top.get(key).filter(|v| !v.is_null()))
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<T, String> {
        let value = self
            .get(key)
            .ok_or_else(|| format!("missing field `{key}`"))?;
        T::deserialize(value).map_err(|e| format!("field `{key}`: {e}"))
    }

    fn parse_or<T: for<'de> Deserialize<'de>>(&self, key: &str, default: T) -> Result<T, String> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.parse(key),
        }
    }
}

fn vision_field<T: for<'de> Deserialize<'de>>(vision: &Value, key: &str) -> Result<T, String> {
    let value = vision
        .get(key)
        .ok_or_else(|| format!("missing field `vision_config.{key}`"))?;
    T::deserialize(value).map_err(|e| format!("field `vision_config.{key}`: {e}"))
}

fn vision_field_or<T: for<'de> Deserialize<'de>>(
    vision: &Value,
    key: &str,
    default: T,
) -> Result<T, String> {
    match vision.get(key).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(_) => vision_field(vision, key),
    }
}

impl Qwen2VlConfig {
    /// Resolves a parsed `config.json`. The error says which field is missing or wrong.
    pub fn from_json(top: &Value) -> Result<Self, String> {
        let model_type = top
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or("missing field `model_type`")?;
        let family = match model_type {
            "qwen2_vl" => Family::Qwen2Vl,
            "qwen2_5_vl" => Family::Qwen25Vl,
            "qwen3_vl" => Family::Qwen3Vl,
            other => {
                return Err(format!(
                    "model_type {other:?} is not a Qwen2-VL checkpoint (expected \"qwen2_vl\", \"qwen2_5_vl\" or \"qwen3_vl\"; MoE checkpoints are not supported)"
                ))
            }
        };
        let fields = Fields {
            top,
            text: top.get("text_config").filter(|v| v.is_object()),
        };
        // transformers 5: rope_parameters; transformers 4: rope_scaling + rope_theta.
        let rope = fields
            .get("rope_parameters")
            .or_else(|| fields.get("rope_scaling"));
        let mrope_section: Vec<usize> = rope
            .and_then(|r| r.get("mrope_section"))
            .map(|v| Vec::<usize>::deserialize(v).map_err(|e| format!("mrope_section: {e}")))
            .transpose()?
            .ok_or("missing field `rope_scaling.mrope_section` (or `rope_parameters`)")?;
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(v) => f64::deserialize(v).map_err(|e| format!("rope_theta: {e}"))?,
            None => fields.parse_or("rope_theta", 1_000_000.0)?,
        };
        let qwen3 = family == Family::Qwen3Vl;
        let hidden_size: usize = fields.parse("hidden_size")?;
        let num_attention_heads: usize = fields.parse("num_attention_heads")?;
        let head_dim = match fields.get("head_dim") {
            Some(_) => fields.parse("head_dim")?,
            None => hidden_size / num_attention_heads.max(1),
        };
        let mrope_interleaved = match rope.and_then(|r| r.get("mrope_interleaved")) {
            Some(v) => bool::deserialize(v).map_err(|e| format!("mrope_interleaved: {e}"))?,
            None => qwen3,
        };
        let text = TextConfig {
            vocab_size: fields.parse("vocab_size")?,
            hidden_size,
            intermediate_size: fields.parse("intermediate_size")?,
            num_hidden_layers: fields.parse("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: fields.parse("num_key_value_heads")?,
            rms_norm_eps: fields.parse_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            mrope_section,
            // The top-level flag is the one transformers honours for the head.
            tie_word_embeddings: match top.get("tie_word_embeddings") {
                Some(v) => bool::deserialize(v).map_err(|e| format!("tie_word_embeddings: {e}"))?,
                None => fields.parse_or("tie_word_embeddings", false)?,
            },
            head_dim,
            qkv_bias: if qwen3 {
                fields.parse_or("attention_bias", false)?
            } else {
                true
            },
            qk_norm: qwen3,
            mrope_interleaved,
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

        let v = top
            .get("vision_config")
            .ok_or("missing field `vision_config`")?;
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let in_channels = match v.get("in_channels") {
            Some(_) => vision_field(v, "in_channels")?,
            None => vision_field_or(v, "in_chans", 3)?,
        };
        let vision = match family {
            Family::Qwen2Vl => {
                let embed_dim: usize = vision_field(v, "embed_dim")?;
                let mlp_ratio: f64 = vision_field_or(v, "mlp_ratio", 4.0)?;
                VisionConfig {
                    depth: vision_field(v, "depth")?,
                    embed_dim,
                    num_heads: vision_field(v, "num_heads")?,
                    mlp_hidden: (embed_dim as f64 * mlp_ratio) as usize,
                    out_hidden_size: vision_field(v, "hidden_size")?,
                    in_channels,
                    patch_size: vision_field_or(v, "patch_size", 14)?,
                    temporal_patch_size: vision_field_or(v, "temporal_patch_size", 2)?,
                    spatial_merge_size: vision_field_or(v, "spatial_merge_size", 2)?,
                    window_size: None,
                    fullatt_block_indexes: Vec::new(),
                    rope_theta,
                    num_position_embeddings: None,
                    deepstack_visual_indexes: Vec::new(),
                }
            }
            Family::Qwen25Vl => VisionConfig {
                depth: vision_field(v, "depth")?,
                embed_dim: vision_field(v, "hidden_size")?,
                num_heads: vision_field(v, "num_heads")?,
                mlp_hidden: vision_field(v, "intermediate_size")?,
                out_hidden_size: vision_field(v, "out_hidden_size")?,
                in_channels,
                patch_size: vision_field_or(v, "patch_size", 14)?,
                temporal_patch_size: vision_field_or(v, "temporal_patch_size", 2)?,
                spatial_merge_size: vision_field_or(v, "spatial_merge_size", 2)?,
                window_size: Some(vision_field(v, "window_size")?),
                fullatt_block_indexes: vision_field(v, "fullatt_block_indexes")?,
                rope_theta,
                num_position_embeddings: None,
                deepstack_visual_indexes: Vec::new(),
            },
            Family::Qwen3Vl => VisionConfig {
                depth: vision_field(v, "depth")?,
                embed_dim: vision_field(v, "hidden_size")?,
                num_heads: vision_field(v, "num_heads")?,
                mlp_hidden: vision_field(v, "intermediate_size")?,
                out_hidden_size: vision_field(v, "out_hidden_size")?,
                in_channels,
                patch_size: vision_field_or(v, "patch_size", 16)?,
                temporal_patch_size: vision_field_or(v, "temporal_patch_size", 2)?,
                spatial_merge_size: vision_field_or(v, "spatial_merge_size", 2)?,
                window_size: None,
                fullatt_block_indexes: Vec::new(),
                rope_theta,
                num_position_embeddings: Some(vision_field(v, "num_position_embeddings")?),
                deepstack_visual_indexes: vision_field_or(
                    v,
                    "deepstack_visual_indexes",
                    Vec::new(),
                )?,
            },
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
        let eos_token_ids = eos_token_ids(
            top.get("eos_token_id")
                .or_else(|| fields.get("eos_token_id")),
        )?;
        Ok(Self {
            family,
            text,
            vision,
            image_token_id: fields.parse("image_token_id")?,
            vision_start_token_id: fields.parse("vision_start_token_id")?,
            vision_end_token_id: fields.parse("vision_end_token_id")?,
            eos_token_ids,
        })
    }
}

/// `eos_token_id` as config.json and generation_config.json write it: one id, a list, or
/// absent.
pub(super) fn eos_token_ids(value: Option<&Value>) -> Result<Vec<u32>, String> {
    let parse = |id: &Value| u32::deserialize(id).map_err(|e| format!("eos_token_id: {e}"));
    match value {
        Some(Value::Array(ids)) => ids.iter().map(parse).collect(),
        Some(id) => Ok(vec![parse(id)?]),
        None => Ok(Vec::new()),
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
        broken["model_type"] = "llava".into();
        assert!(Qwen2VlConfig::from_json(&broken)
            .unwrap_err()
            .contains("llava"));
    }
}
