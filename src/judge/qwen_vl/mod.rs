//! The local judge: a Qwen-VL checkpoint ([`crate::models::qwen_vl`]) behind the engine's
//! `Judge` trait.
//!
//! - [`judge`]: the preset, the worker thread that owns the model, batching, primed JSON
//!   readings or greedy generation + parsing.
//! - [`answer`]: probabilities of candidate answers off the next-token distribution.

pub mod answer;
pub mod judge;

pub use judge::{LocalJudgeConfig, Qwen2VlJudge};
