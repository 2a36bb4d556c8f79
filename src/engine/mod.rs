//! The orchestration engine: strategies over a [`crate::generate::Generator`] and a
//! [`crate::judge::Judge`], NFE accounting, outputs and the report.
//!
//! The engine knows nothing about FLUX or any judge vendor; it only drives the two traits.

pub mod budget;
pub mod contact_sheet;
pub mod events;
pub mod outputs;
pub mod progress;
pub mod report;
pub mod run;
pub mod selection;
pub mod strategy;
pub mod worker;

pub use events::EditEvent;
pub use progress::{Meter, PhaseBars, Progress, Silent};
pub use report::EditReport;
pub use run::{EditJob, Engine};
pub use strategy::{
    Seeds, StrategyConfig, StrategyError, StrategyKind, StrategyOverrides, ValueSource,
};
pub use worker::GeneratorWorker;
