//! EditReward's reward model (TIGER-AI-Lab/EditReward, arXiv 2509.26346): a Qwen2.5-VL
//! backbone with two small MLP heads, scoring an edit without generating text.
//!
//! The layout and forward pass follow the published model class
//! (`Qwen2_5_VLRewardModelBT_MultiHead` in `EditReward/model/qwen2_5_vl_trainer.py` at
//! commit edb027e):
//!
//! - The checkpoint is the whole model's state dict (`model.language_model.*`,
//!   `model.visual.*`, `lm_head.weight`) plus `rm_heads.head_{0,1}.{0,3,5}.{weight,bias}`:
//!   each head is Linear(hidden, 1024) - ReLU - Linear(1024, 16) - ReLU - Linear(16, 2), in
//!   f32, giving [mean, log sigma]. Config and tokenizer are the base model's; the tokenizer
//!   gains the special token `<|Reward|>` and the embeddings have one row per token.
//! - One forward per head: head 0 reads the instruction-following prompt, head 1 the
//!   visual-quality prompt, both on [source, edited]. The head reads the final-norm hidden
//!   state at the `<|Reward|>` token.
//! - Positions are plain 0..n for every token, image tokens included: the class calls the
//!   language model without input ids or image grids, so transformers falls back to 1-D
//!   positions, and the released checkpoints were trained that way.
//! - The two heads' outputs are averaged; the reward is the mean's first value (unbounded,
//!   typically -3 to 2; it is not a 0-10 VIE score).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use super::files::Qwen2VlFiles;
use super::model::{unused_tensors, EncodedPrompt, PositionMode, Qwen2Vl};
use crate::error::ModelError;
use crate::models::weight_use::{check_unused, ReadLog, Recording, StoredTensors, UnusedWeights};

/// The special token whose hidden state the heads read.
pub const REWARD_TOKEN: &str = "<|Reward|>";

/// The width of the heads' first layer (fixed by the published class).
const HEAD_WIDTH: usize = 1024;
/// The width of their second layer.
const HEAD_NARROW: usize = 16;

/// One head: hidden -> 1024 -> 16 -> [mean, log sigma].
struct RewardHead {
    first: Linear,
    second: Linear,
    out: Linear,
}

impl RewardHead {
    fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            first: linear(hidden, HEAD_WIDTH, vb.pp("0"))?,
            // Index 2 is the dropout, which has no weights.
            second: linear(HEAD_WIDTH, HEAD_NARROW, vb.pp("3"))?,
            out: linear(HEAD_NARROW, 2, vb.pp("5"))?,
        })
    }

    /// `hidden` `[hidden]` (any dtype) -> `[mean, log sigma]`, computed in f32.
    fn forward(&self, hidden: &Tensor) -> Result<[f32; 2]> {
        let x = hidden.to_dtype(DType::F32)?.unsqueeze(0)?;
        let x = self.first.forward(&x)?.relu()?;
        let x = self.second.forward(&x)?.relu()?;
        let v = self.out.forward(&x)?.squeeze(0)?.to_vec1::<f32>()?;
        Ok([v[0], v[1]])
    }
}

/// What the reward model says about one edit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardOutput {
    /// Head 0 (instruction following): [mean, log sigma].
    pub instruction_following: [f32; 2],
    /// Head 1 (visual quality): [mean, log sigma].
    pub visual_quality: [f32; 2],
}

impl RewardOutput {
    /// The reward: the mean of the two heads' means.
    pub fn reward(&self) -> f32 {
        (self.instruction_following[0] + self.visual_quality[0]) / 2.0
    }

    /// The mean of the two heads' log sigma (an uncalibrated uncertainty, log scale).
    pub fn log_sigma(&self) -> f32 {
        (self.instruction_following[1] + self.visual_quality[1]) / 2.0
    }
}

/// The backbone with its heads.
pub struct RewardModel {
    backbone: Qwen2Vl,
    heads: [RewardHead; 2],
    reward_token: u32,
}

/// The checkpoint's safetensors files in `dir` (a folder or a Hugging Face cache entry).
pub fn reward_weights(dir: &Path) -> std::result::Result<Vec<PathBuf>, ModelError> {
    let root = crate::hub::resolve_snapshot(dir)?;
    Ok(crate::hub::shards(&root)?)
}

impl RewardModel {
    /// Loads the reward checkpoint `weights` over the base model's `files` (config,
    /// tokenizer, processor), with `reward_token` the id the tokenizer gave `<|Reward|>`,
    /// in `dtype` on `device` (the heads in f32). The vocabulary size is read off the
    /// checkpoint's embedding rows. A tensor of the checkpoint that neither the backbone nor
    /// the heads read is refused unless the backbone's [`unused_tensors`] lists it or
    /// `unused` allows it.
    pub fn load(
        files: &Qwen2VlFiles,
        weights: Vec<PathBuf>,
        reward_token: u32,
        dtype: DType,
        device: &Device,
        unused: UnusedWeights,
    ) -> std::result::Result<Self, ModelError> {
        let at = weights.first().cloned().unwrap_or_default();
        let fail = |e: candle_core::Error| {
            ModelError::files(&at, format!("loading the reward model: {e}"))
        };
        // SAFETY: the files are memory-mapped read-only and not modified while loaded.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&weights) }
            .map_err(fail)?;
        let rows = [
            "model.language_model.embed_tokens.weight",
            "model.embed_tokens.weight",
        ]
        .iter()
        .find_map(|k| tensors.get(k).ok().map(|t| t.shape()[0]))
        .ok_or_else(|| {
            ModelError::files(
                &at,
                "no embed_tokens weight (is this an EditReward checkpoint?)",
            )
        })?;
        if reward_token as usize >= rows {
            return Err(ModelError::files(
                &at,
                format!(
                    "{REWARD_TOKEN} is token {reward_token}, but the embeddings have {rows} rows"
                ),
            ));
        }
        let mut files = files.clone();
        files.config.text.vocab_size = rows;
        files.weights = weights.clone();
        let log = ReadLog::new();
        let backbone = files.build_recorded(dtype, device, None, unused, &log)?;
        let vb = VarBuilder::from_backend(
            Box::new(Recording::new(tensors, log.clone())),
            DType::F32,
            device.clone(),
        );
        let hidden = files.config.text.hidden_size;
        let heads = [
            RewardHead::new(hidden, vb.pp("rm_heads.head_0")).map_err(fail)?,
            RewardHead::new(hidden, vb.pp("rm_heads.head_1")).map_err(fail)?,
        ];
        check_unused(
            "the reward model",
            &StoredTensors::safetensors(&weights)?,
            &log,
            &unused_tensors(&files.config),
            unused,
        )?;
        Ok(Self {
            backbone,
            heads,
            reward_token,
        })
    }

    /// The final-norm hidden state at the reward token of `prompt` (1-D positions).
    fn pooled(&self, prompt: &EncodedPrompt) -> Result<Tensor> {
        let at: Vec<usize> = prompt
            .ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.reward_token)
            .map(|(i, _)| i)
            .collect();
        let [index] = at[..] else {
            candle_core::bail!(
                "a reward prompt needs exactly one {REWARD_TOKEN} token, this one has {}",
                at.len()
            );
        };
        // Causal attention: the tokens after the reward token cannot change its state.
        let head = EncodedPrompt {
            ids: prompt.ids[..=index].to_vec(),
            images: prompt.images.clone(),
        };
        let hidden = self
            .backbone
            .final_hidden(&head, PositionMode::Sequential)?;
        hidden.get(index)
    }

    /// Scores one edit from its instruction-following and visual-quality prompts (each on
    /// [source, edited]).
    pub fn score(
        &self,
        instruction_following: &EncodedPrompt,
        visual_quality: &EncodedPrompt,
    ) -> Result<RewardOutput> {
        Ok(RewardOutput {
            instruction_following: self.heads[0].forward(&self.pooled(instruction_following)?)?,
            visual_quality: self.heads[1].forward(&self.pooled(visual_quality)?)?,
        })
    }

    /// The final-norm hidden state at the reward token (for checks against a reference).
    pub fn pooled_hidden(&self, prompt: &EncodedPrompt) -> Result<Tensor> {
        self.pooled(prompt)
    }

    /// The backbone.
    pub fn backbone(&self) -> &Qwen2Vl {
        &self.backbone
    }
}
