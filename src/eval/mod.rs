//! `icedit-scale eval`: how much a scaling strategy improves edits over random seeding, per
//! NFE spent, on a benchmark, with statistics honest enough for a paper.
//!
//! A [`suite::Suite`] (TOML under `eval/`) names a dataset, the arms (strategies with their
//! parameters), the selection judge and a separate evaluation judge. [`runner`] runs every
//! (item, arm) through the engine and stores each result as it finishes
//! ([`store::ResultStore`]); [`report`] aggregates them with [`stats`].

pub mod dataset;
pub mod item;
pub mod parquet;
pub mod plot;
pub mod report;
pub mod runner;
pub mod stats;
pub mod store;
pub mod suite;
