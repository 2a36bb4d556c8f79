//! Getting model files: finding a checkpoint in a Hugging Face cache entry or folder
//! ([`cache`]) and fetching repositories into that cache ([`download`]).
//!
//! This is ground-floor code: it knows the Hub's folder and URL layouts, nothing about any
//! model. Model code (`models::flux::files`, `models::qwen_vl::files`) builds on it.

pub mod cache;
pub mod download;

pub use cache::{resolve_snapshot, shards};
pub use download::{
    cache_entry, download, find_local, names_repo, Downloaded, HubError, HubSettings, RepoRequest,
};
