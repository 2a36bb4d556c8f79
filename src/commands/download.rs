//! `download`: Hub repositories into the Hugging Face cache, where discovery finds them.

use crate::backends::hub_requests;
use crate::cli::DownloadArgs;
use crate::hub::{self, HubSettings};

/// Fetches each name's files that the cache lacks, resuming partial ones, and says where
/// they are.
pub fn download(args: DownloadArgs) -> anyhow::Result<()> {
    let settings = HubSettings::from_env();
    for name in &args.names {
        for request in hub_requests(name)? {
            let request = request.revision(&args.revision);
            let done = hub::download(&settings, &request, true)?;
            println!(
                "{name}: {} at commit {} in {} ({} fetched, {} already cached)",
                request.repo_id,
                done.commit,
                done.cache_entry.display(),
                done.fetched,
                done.already_cached
            );
        }
    }
    Ok(())
}
