//! The local judge: Qwen2-VL and Qwen2.5-VL in candle.
//!
//! - [`config`] reads `config.json` in either the transformers 4 or 5 layout.
//! - [`image`] resizes and patchifies images exactly as the reference processor.
//! - [`vision`] is the vision tower, [`text`] the M-RoPE language model, [`model`] joins them.
//! - [`prompt`] renders the chat template and tokenizes with image pads expanded.
//! - [`files`] finds a checkpoint in a folder or a Hugging Face cache entry.
//! - [`bench`] times batched against one-at-a-time prefill with random weights.
//! - [`judge`] implements the engine's `Judge` trait; [`answer`] reads answers off
//!   next-token probabilities.

pub mod answer;
pub mod bench;
pub mod config;
pub mod files;
pub mod image;
pub mod judge;
pub mod model;
pub mod prompt;
pub mod text;
pub mod vision;

pub use config::{Family, Qwen2VlConfig};
pub use files::Qwen2VlFiles;
pub use judge::{LocalJudgeConfig, Qwen2VlJudge};
pub use model::{EncodedPrompt, KeyLayout, Qwen2Vl, Session};
pub use prompt::ChatFormat;
