//! Getting weights from the Hugging Face Hub: the repositories the released models live in,
//! and [`fetch`], which downloads what the cache lacks.

use std::path::PathBuf;

use crate::hub::{self, HubSettings, RepoRequest};
use crate::models::flux::files::{DIFFUSERS_FILES, FILL_DEV_REPO};
use crate::models::flux::lora::{ICEDIT_LORA_REPO, ICEDIT_MOE_LORA_REPO};
use crate::models::qwen_vl::files::CHECKPOINT_FILES;

/// FLUX.1 Fill [dev] in the diffusers layout.
pub fn flux_fill_request() -> RepoRequest {
    RepoRequest::new(FILL_DEV_REPO).include(DIFFUSERS_FILES.iter().copied())
}

/// A released ICEdit LoRA (`ICEDIT_LORA_REPO` or `ICEDIT_MOE_LORA_REPO`).
pub fn lora_request(repo: &str) -> RepoRequest {
    RepoRequest::new(repo).include(["*.safetensors"])
}

/// The LoRA repository a release name (`icedit`, `icedit-moe`) stands for.
pub fn released_lora(name: &str) -> Option<&'static str> {
    match name {
        "icedit" => Some(ICEDIT_LORA_REPO),
        "icedit-moe" => Some(ICEDIT_MOE_LORA_REPO),
        _ => None,
    }
}

/// TAEF1, the tiny preview decoder.
pub fn taef1_request() -> RepoRequest {
    RepoRequest::new(crate::models::taef1::TAEF1_REPO)
        .include(crate::models::taef1::TAEF1_FILES.iter().copied())
}

/// A Qwen-VL checkpoint (or adapter) repository: the files a loader reads.
pub fn checkpoint_request(repo: &str) -> RepoRequest {
    RepoRequest::new(repo).include(CHECKPOINT_FILES.iter().copied())
}

/// Fetches what each of `requests` lacks (`--download`): the Hub is listed on every run,
/// so a repository left partial (a broken transfer, an emptied folder, a cache entry that
/// holds only another layout's file) is completed, resuming from its partial files. When
/// the Hub cannot be reached, a repository whose cache entry already has a snapshot of the
/// revision is used as it stands, with a warning (a machine that went offline keeps
/// running; the loader names any file missing); one without fails with the network error.
pub fn fetch_missing(requests: &[RepoRequest]) -> Result<(), hub::HubError> {
    let settings = HubSettings::from_env();
    for request in requests {
        match fetch(request) {
            Ok(_) => {}
            Err(e @ hub::HubError::Network { .. }) if has_snapshot(&settings, request) => {
                tracing::warn!(
                    repo = %request.repo_id,
                    "{e}; using the snapshot already in the cache, unchecked"
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether the cache holds a snapshot of the request's revision: its ref resolved to a
/// snapshot folder with files in it (what a finished download leaves).
fn has_snapshot(settings: &HubSettings, request: &RepoRequest) -> bool {
    let entry = hub::cache_entry(settings, &request.repo_id);
    let Ok(commit) = std::fs::read_to_string(entry.join("refs").join(&request.revision)) else {
        return false;
    };
    std::fs::read_dir(entry.join("snapshots").join(commit.trim()))
        .is_ok_and(|mut files| files.next().is_some())
}

/// Downloads what `request` names that the cache lacks (with progress bars) and returns
/// the repository's cache entry.
pub fn fetch(request: &RepoRequest) -> Result<PathBuf, hub::HubError> {
    let settings = HubSettings::from_env();
    tracing::info!(repo = %request.repo_id, cache = %settings.cache_dir.display(), "fetching from the Hugging Face Hub");
    let done = hub::download(&settings, request, true)?;
    tracing::info!(
        repo = %request.repo_id,
        fetched = done.fetched,
        cached = done.already_cached,
        "in the cache at {}",
        done.cache_entry.display()
    );
    Ok(done.cache_entry)
}
