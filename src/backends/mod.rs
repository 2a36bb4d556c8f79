//! Which generator and judge a command runs, chosen once at the command boundary and built
//! once.
//!
//! - [`JudgeSpec`] ([`judge`]) and [`GeneratorSpec`] ([`generator`]): the flags and preset
//!   files read into typed values (each file once), passed down by value. Each says what it
//!   needs from the Hub, what the memory plan counts and how it is built.
//! - [`EngineBuilder`] ([`builder`]): plan check, download, load, engines, in that order,
//!   for every command that runs edits; [`prepare_judge`] for a judge alone.
//! - [`download`]: the released models' repositories and [`fetch`]; [`names`]: what
//!   `download NAME` resolves to.

pub mod builder;
pub mod download;
pub mod generator;
pub mod judge;
pub mod names;

pub use builder::{prepare_judge, require_vie, Built, EngineBuilder};
pub use download::fetch;
pub use generator::{FluxSpec, GeneratorSpec, LoraChoice, VaeTilingMode, Workload};
pub use judge::{JudgeKind, JudgeSpec};
pub use names::hub_requests;
