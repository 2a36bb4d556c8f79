//! icedit-scale: test-time scaling for instruction-based image editing with ICEdit.
//!
//! The [`engine`] drives a [`generate::Generator`] (FLUX.1 Fill + ICEdit LoRA, or the
//! built-in testbed) and a [`judge::Judge`] (remote OpenAI-compatible VLM, local Qwen2-VL,
//! or the testbed oracle) through a scaling strategy. See ARCHITECTURE.md for the map.

pub mod backends;
pub mod batch;
pub mod cli;
pub mod commands;
pub mod edit;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod jsonl;
pub mod judge;
pub mod study;
