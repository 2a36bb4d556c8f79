//! The Qwen-VL family in candle (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense): pure model code.
//! What makes it a judge is in [`crate::judge::qwen_vl`].
//!
//! - [`config`] reads `config.json` in either the transformers 4 or 5 layout.
//! - [`image`] resizes and patchifies images exactly as the reference processor.
//! - [`vision`] is the vision tower, [`text`] the M-RoPE language model, [`model`] joins them
//!   (prefill, KV-cache extension, greedy decoding).
//! - [`chat`] renders the chat template and tokenizes with image pads expanded.
//! - [`files`] finds a checkpoint in a folder or a Hugging Face cache entry and loads it.
//! - [`adapter`] merges a peft LoRA adapter into the weights as they are read.
//! - [`reward`] is EditReward's reward model: the backbone with two scalar heads.
//! - [`bench`] times batched against one-at-a-time prefill with random weights.

pub mod adapter;
pub mod bench;
pub mod chat;
pub mod config;
pub mod files;
pub mod image;
pub mod model;
pub mod reward;
pub mod side_by_side;
pub mod text;
pub mod vision;

pub use adapter::PeftAdapter;
pub use chat::ChatFormat;
pub use config::{Family, Qwen2VlConfig};
pub use files::Qwen2VlFiles;
pub use model::{EncodedPrompt, KeyLayout, PositionMode, PromptState, Qwen2Vl, Sampling};
pub use reward::{RewardModel, RewardOutput, REWARD_TOKEN};
