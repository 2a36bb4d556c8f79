//! Model code, apart from the roles it plays: FLUX.1 Fill ([`flux`]), TAEF1, its tiny
//! preview decoder ([`taef1`]), the Qwen-VL family ([`qwen_vl`]) and the testbed's simulated
//! world ([`testbed`]). Configs, blocks, weights and their loading; no knowledge of
//! generators, judges or the engine (a test enforces it). [`bench`] holds what the model
//! benchmarks share; [`activation`] the activations configs name; [`cpu`] fused CPU kernels for the
//! f32 hot spots (attention) that candle runs as several passes, [`cuda`] their GPU
//! counterparts (softmax, bias add), and [`linear`] the biased linear forward that picks
//! between them. [`weight_use`] holds every loader to account for the tensors of its files:
//! what the model read against what the files hold. [`step_cache`] holds the model-agnostic
//! part of step caching (First-Block-Cache, TaylorSeer: the rules, each candidate's memory).
//! [`fp8`] the e4m3 quantization the fp8 GEMM uses, as a CPU reference. [`file_kind`] tells
//! a weight file's kind (GGUF, safetensors, neither) by its first bytes.

pub mod activation;
pub mod bench;
pub mod config_keys;
pub mod cpu;
pub mod cuda;
pub mod file_kind;
pub mod flux;
pub mod fp8;
pub mod kernel_check;
pub mod linear;
pub mod noise;
pub mod qwen_vl;
pub mod step_cache;
pub mod taef1;
pub mod testbed;
pub mod weight_use;
