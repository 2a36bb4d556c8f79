//! Configuration of the FLUX transformer, read from a diffusers `transformer/config.json`.

use serde::{Deserialize, Serialize};

use crate::models::config_keys::ConfigKeys;

/// How every key of diffusers' `FluxTransformer2DModel` config is treated (see
/// [`crate::models::config_keys`]): all are read but the common `_class_name` and
/// `_diffusers_version`.
pub const CONFIG_KEYS: &[ConfigKeys] = &[ConfigKeys {
    section: "",
    inert: &[],
    refused: &[("patch_size", "2"), ("axes_dims_rope", "[16, 56, 58]")],
}];

/// The FLUX MM-DiT hyper-parameters (diffusers `FluxTransformer2DModel` field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// Channels per input token: 64 noisy latent + 64 masked-image latent + 256 mask for Fill.
    pub in_channels: usize,
    /// Channels per output token (the velocity); `None` means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream (MM-DiT) blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Attention heads; hidden width is `heads * head_dim`.
    pub num_attention_heads: usize,
    /// Width of the T5 embeddings.
    pub joint_attention_dim: usize,
    /// Width of the pooled CLIP embedding.
    pub pooled_projection_dim: usize,
    /// Whether the distilled guidance is an input (true for FLUX.1 [dev] and Fill).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE dimensions per position axis (text/index, row, column); they sum to `head_dim`.
    pub axes_dims_rope: Vec<usize>,
    /// Patch size; FLUX packs 2x2 latents itself, so the transformer uses 1.
    #[serde(default = "one")]
    pub patch_size: usize,
}

fn one() -> usize {
    1
}

impl FluxConfig {
    /// FLUX.1 Fill [dev]: 19 double + 38 single blocks, 3072 wide.
    pub fn fill_dev() -> Self {
        Self {
            in_channels: 384,
            out_channels: Some(64),
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
            patch_size: 1,
        }
    }

    /// Hidden width of the token streams.
    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels per token.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Width of the MLP inside every block (ratio 4).
    pub fn mlp_hidden(&self) -> usize {
        4 * self.hidden()
    }

    /// Checks the invariants the model code relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err(format!(
                "num_attention_heads {} and attention_head_dim {} must both be at least 1",
                self.num_attention_heads, self.attention_head_dim
            ));
        }
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} is not supported (FLUX uses 1)",
                self.patch_size
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim || self.axes_dims_rope.len() != 3 {
            return Err(format!(
                "axes_dims_rope {:?} must be 3 axes summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "axes_dims_rope {:?} must be even",
                self.axes_dims_rope
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_dev_is_consistent() {
        let c = FluxConfig::fill_dev();
        c.validate().unwrap();
        assert_eq!(c.hidden(), 3072);
        assert_eq!(c.out_channels(), 64);
    }

    #[test]
    fn reads_a_diffusers_config() {
        let json = r#"{"_class_name": "FluxTransformer2DModel", "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6], "guidance_embeds": true, "in_channels": 384,
            "joint_attention_dim": 32, "num_attention_heads": 2, "num_layers": 2,
            "num_single_layers": 2, "out_channels": 64, "patch_size": 1,
            "pooled_projection_dim": 32}"#;
        let c: FluxConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.hidden(), 32);
    }
}
