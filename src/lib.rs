//! icedit-scale: test-time scaling for instruction-based image editing with ICEdit.
//!
//! The [`engine`] drives a [`generate::Generator`] (FLUX.1 Fill + ICEdit LoRA, or the
//! built-in testbed) and a [`judge::Judge`] (remote OpenAI-compatible VLM, local Qwen-VL,
//! or the testbed oracle) through a scaling strategy. See ARCHITECTURE.md for the map.
//!
//! The modules stand on floors; each imports only from floors below it (a test,
//! `tests/architecture.rs`, enforces it):
//!
//! 1. ground: [`error`], [`fsio`], [`http`], [`hub`], [`device`], [`stop`], [`edit`]
//! 2. models: [`models`] (FLUX, Qwen-VL, the testbed world), pure model code
//! 3. roles: [`generate`] and [`judge`], the adapters that make a model a Generator or a Judge
//! 4. [`engine`]: strategies over the two traits
//! 5. drivers: [`batch`], [`eval`], [`study`], and the memory [`plan`] checked before loading
//! 6. top: [`cli`], [`backends`], [`commands`]

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
