//! Batch edits at scale: a streamed JSONL manifest, a pipelined bounded queue through one
//! engine, durable per-item results that a rerun resumes from, deterministic sharding for
//! array jobs (Slurm, Kubernetes indexed Jobs) and merging of shard outputs.

pub mod bench;
pub mod manifest;
pub mod runner;
pub mod shard;
pub mod store;

pub use runner::{merge_shards, run_batch, BatchOptions, BatchOutcome, Merged, ShardRecord};
pub use shard::Shard;
pub use store::{ItemResult, ItemStatus};
