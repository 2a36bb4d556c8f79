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

/// Of `requests`, those whose repositories are not in the Hugging Face cache yet (what
/// `--download` fetches; `download NAME` fetches every file anyway, resuming).
pub fn not_cached(requests: Vec<RepoRequest>) -> Vec<RepoRequest> {
    let settings = HubSettings::from_env();
    requests
        .into_iter()
        .filter(|r| !hub::cache_entry(&settings, &r.repo_id).is_dir())
        .collect()
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
