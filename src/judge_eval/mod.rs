//! `judge-eval`: how well a judge agrees with people. It asks the judge about human-labelled
//! preference pairs (both orders) and ratings ([`data`]), stores each answer as it comes
//! ([`store`], resumable), and reports accuracy, rank correlations, position bias, failures
//! and cost with bootstrap intervals ([`stats`], [`report`]).

pub mod benchmarks;
pub mod data;
pub mod report;
pub mod runner;
pub mod stats;
pub mod store;

pub use data::{load_jsonl, testbed_cases, Case, EditedImage, HumanLabel};
pub use report::JudgeEvalReport;
pub use runner::{fingerprints, run, set_aside_changed, Changed, RunConfig, RunCounts};
pub use stats::Label;
pub use store::{Judgement, JudgementStore};
