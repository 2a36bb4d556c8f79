//! FLUX.1 Fill [dev] + the ICEdit LoRA in candle: pure model code (configs, blocks,
//! weights and their discovery), written against diffusers names. What makes it a
//! generator is in [`crate::generate::flux`].
//!
//! - [`config`]: the transformer's `config.json`; [`embeddings`], [`blocks`] and
//!   [`transformer`]: the MM-DiT; [`lora`]: plain and MoE ICEdit adapters.
//! - [`step_cache`]: First-Block-Cache and TaylorSeer per candidate
//!   ([`transformer::FluxTransformer::forward_cached`]), the bytes a cache holds;
//!   [`flops`]: what each part of a forward costs.
//! - [`vae`]: the autoencoder, [`vae_tiling`]: its passes tile by tile; [`text`]: T5 and CLIP with their tokenizers.
//! - [`weights`] + [`keymap`]: safetensors or GGUF in any layout behind a `VarBuilder`;
//!   [`held_weight`]: a matrix held dense, quantized or fp8; [`linear`]: layers over them;
//!   [`files`]: where a checkpoint's files are.
//! - [`latents`]: packing, mask tokens, position ids; [`scheduler`]: the dynamic shift.
//! - [`graph_step`]: the forward replayed from a CUDA graph per batch shape (opt-in).
//! - [`bench`]: `bench flux` with random weights.

pub mod bench;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod files;
pub mod flops;
pub mod graph_step;
pub mod held_weight;
pub mod keymap;
pub mod latents;
pub mod linear;
pub mod lora;
pub mod scheduler;
pub mod step_cache;
pub mod t5;
pub mod t5_quantized;
pub mod text;
pub mod transformer;
pub mod vae;
pub mod vae_mid;
pub mod vae_tiling;
pub mod weights;

pub use config::FluxConfig;
pub use files::{FluxFiles, FluxPaths};
