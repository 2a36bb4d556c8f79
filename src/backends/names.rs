//! What `download NAME` fetches: a released model by its short name, a judge preset's
//! weights (through the same [`JudgeSpec`] a run builds, so `download` and `--download`
//! fetch the same), or any Hub repository.

use std::path::Path;

use crate::error::EditError;
use crate::hub::RepoRequest;
use crate::models::flux::lora::{ICEDIT_LORA_REPO, ICEDIT_MOE_LORA_REPO};

use super::download::{flux_fill_request, lora_request, taef1_request};
use super::judge::JudgeSpec;

/// The repositories `download NAME` fetches: `flux-fill`, `icedit-lora`,
/// `icedit-moe-lora`, `taef1`, a judge preset (`.toml`: what its model needs, a
/// composite's members included), or a Hub id (every file).
pub fn hub_requests(name: &str) -> anyhow::Result<Vec<RepoRequest>> {
    Ok(match name {
        "flux-fill" => vec![flux_fill_request()],
        "icedit-lora" => vec![lora_request(ICEDIT_LORA_REPO)],
        "icedit-moe-lora" => vec![lora_request(ICEDIT_MOE_LORA_REPO)],
        "taef1" => vec![taef1_request()],
        preset if preset.ends_with(".toml") => {
            let spec = JudgeSpec::from_file(Path::new(preset))?;
            let requests = spec.downloads();
            if requests.is_empty() {
                return Err(EditError::Invalid(format!(
                    "{preset}: judge {} has no weights to download (a remote or testbed judge, \
                     or its folders are used as they are)",
                    spec.name
                ))
                .into());
            }
            requests
        }
        id if id.contains('/') => vec![RepoRequest::new(id)],
        other => {
            return Err(EditError::Invalid(format!(
                "{other}: expected flux-fill, icedit-lora, icedit-moe-lora, taef1, a judge preset (.toml) or a Hub id org/name"
            ))
            .into())
        }
    })
}
