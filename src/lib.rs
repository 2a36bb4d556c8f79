//! icedit-scale: test-time scaling for instruction-based image editing with ICEdit.
//!
//! The [`engine`] drives a [`generate::Generator`] (FLUX.1 Fill + ICEdit LoRA, or the
//! built-in testbed) and a [`judge::Judge`] (remote OpenAI-compatible VLM, local Qwen-VL,
//! or the testbed oracle) through a scaling strategy. See ARCHITECTURE.md for the map.
//!
//! The modules stand on floors, each importing only from its own floor or below: from
//! shared I/O ([`error`], [`fsio`], [`hub`], [`edit`], ...) through [`models`], the memory
//! [`plan`], the two roles ([`generate`], [`judge`]) and the [`engine`], to the drivers
//! ([`batch`], [`eval`], [`serve`], ...) and the command line ([`cli`], [`backends`],
//! [`commands`]). The floors are stated once, in `fn floor()` of `tests/architecture.rs`,
//! which enforces them.

pub mod backends;
pub mod batch;
pub mod cli;
pub mod commands;
pub mod device;
pub mod edit;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fsio;
pub mod generate;
pub mod host_memory;
pub mod http;
pub mod hub;
pub mod judge;
pub mod judge_eval;
pub mod models;
pub mod plan;
pub mod serve;
pub mod stop;
pub mod study;
