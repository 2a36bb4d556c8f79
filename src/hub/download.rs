//! Downloading a Hugging Face Hub repository into the standard Hugging Face cache.
//!
//! Files land where `huggingface_hub` (Python) and candle's examples put them:
//! `<cache>/models--org--name/` with `blobs/<etag>`, `snapshots/<commit>/<path>` (a relative
//! link to its blob) and `refs/<revision>` (the commit), so a repository downloaded here is
//! found by every tool that reads that cache, and a file already there is not fetched again.
//! The transfer itself is hf-hub's blocking (ureq) API: it appends to `blobs/<etag>.part`,
//! which is how an interrupted download resumes on the next run.
//!
//! This module is self-contained: it uses std, hf-hub (and ureq, the HTTP client whose errors
//! hf-hub's wrap), indicatif, thiserror and tracing, nothing else from the crate.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo, Metadata};
use hf_hub::api::{Progress, RepoInfo};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};

/// The public Hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the Hub is and where files go.
///
/// [`HubSettings::from_env`] reads, like `huggingface_hub`:
/// - `HF_ENDPOINT`: the Hub's address (default [`DEFAULT_ENDPOINT`]);
/// - `HF_HUB_CACHE`: the cache folder; else `HF_HOME/hub`; else
///   `$XDG_CACHE_HOME/huggingface/hub`; else `~/.cache/huggingface/hub`;
/// - `HF_TOKEN`: the access token; else the token file `HF_TOKEN_PATH`, else `HF_HOME/token`
///   (`~/.cache/huggingface/token` by default), which `huggingface-cli login` writes.
///
/// The token is never logged: `Debug` prints it as `***`, and no error message carries it.
#[derive(Clone)]
pub struct HubSettings {
    /// The Hub's base URL, without a trailing slash (e.g. `https://huggingface.co`).
    pub endpoint: String,
    /// The cache folder holding `models--org--name` entries.
    pub cache_dir: PathBuf,
    /// How many more times one file is tried after its transfer broke off, the connection
    /// failed or the Hub answered 5xx (each try resumes from the partial file). Refusals
    /// (401, 403, 404) are never retried. Default 3.
    pub retries: usize,
    /// Wait before the first retry; it doubles for each further one, up to a minute.
    /// Default 2 s.
    pub retry_wait: Duration,
    token: Option<String>,
}

impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("retries", &self.retries)
            .field("retry_wait", &self.retry_wait)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A value from the environment, trimmed; empty counts as unset.
fn non_empty(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl HubSettings {
    /// Settings from the process environment (see the type's documentation).
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Settings from any variable lookup, so they can be tested without touching the process
    /// environment. Reads the token file when no `HF_TOKEN` is given.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let endpoint = non_empty(get("HF_ENDPOINT"))
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let home = non_empty(get("HOME")).or_else(|| non_empty(get("USERPROFILE")));
        // HF_HOME defaults the way huggingface_hub's does, so both share one cache and token.
        let hf_home = non_empty(get("HF_HOME"))
            .map(PathBuf::from)
            .or_else(|| non_empty(get("XDG_CACHE_HOME")).map(|x| Path::new(&x).join("huggingface")))
            .unwrap_or_else(|| {
                Path::new(home.as_deref().unwrap_or("."))
                    .join(".cache")
                    .join("huggingface")
            });
        let cache_dir = non_empty(get("HF_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = non_empty(get("HF_TOKEN_PATH"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = non_empty(get("HF_TOKEN"))
            .or_else(|| non_empty(std::fs::read_to_string(&token_file).ok()));
        Self {
            endpoint,
            cache_dir,
            retries: 3,
            retry_wait: Duration::from_secs(2),
            token,
        }
    }

    /// The same settings with this token (or none: anonymous requests).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = non_empty(token);
        self
    }

    /// Whether requests will carry a token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Hides the token in text that came from elsewhere (an HTTP library's error message), in
    /// case it was ever echoed there.
    fn redact(&self, text: String) -> String {
        match &self.token {
            Some(token) if text.contains(token.as_str()) => text.replace(token.as_str(), "***"),
            _ => text,
        }
    }
}

/// One repository and which of its files to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRequest {
    /// `org/name` (or a bare `name`), as on the Hub.
    pub repo_id: String,
    /// A branch, tag or commit; `main` by default.
    pub revision: String,
    /// Patterns selecting files by their path in the repository; empty means every file.
    /// `*` matches any run of characters, `/` included, and `?` any one character (as in
    /// `huggingface_hub`'s `allow_patterns`): `"transformer/*"`, `"*.json"`. A pattern
    /// ending in `/` selects that whole folder.
    pub include: Vec<String>,
}

impl RepoRequest {
    /// Every file of `repo_id` at `main`.
    pub fn new(repo_id: impl Into<String>) -> Self {
        Self {
            repo_id: repo_id.into(),
            revision: "main".into(),
            include: Vec::new(),
        }
    }

    /// The same request at another revision.
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// The same request limited to files matching any of `patterns`.
    pub fn include<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.include = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// Whether `path` is selected by [`RepoRequest::include`].
    pub fn selects(&self, path: &str) -> bool {
        self.include.is_empty() || self.include.iter().any(|p| glob_match(p, path))
    }
}

/// What [`download`] left in the cache.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The repository's cache entry, `<cache>/models--org--name`.
    pub cache_entry: PathBuf,
    /// The commit the revision resolved to.
    pub commit: String,
    /// `<cache_entry>/snapshots/<commit>`.
    pub snapshot: PathBuf,
    /// Every selected file, inside the snapshot, in the repository's listing order.
    pub files: Vec<PathBuf>,
    /// How many of them were transferred by this call.
    pub fetched: usize,
    /// How many were already in the cache.
    pub already_cached: usize,
}

/// Failures of [`download`]. Every message names the repository, and the file or URL where
/// there is one; none carries the token.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The repository id or revision cannot be a Hub name.
    #[error("{repo}: invalid request: {reason}")]
    InvalidRequest {
        /// The repository id as given.
        repo: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The Hub refused access (401 or 403): the repository is gated, private, or does not
    /// exist (the Hub answers 401 for unknown repositories to anonymous users).
    #[error("{}", gated_message(.repo, .file.as_deref(), *.status, .endpoint, *.token_sent))]
    Gated {
        /// The repository.
        repo: String,
        /// The file refused, if the refusal came for a file rather than the listing.
        file: Option<String>,
        /// The HTTP status (401 or 403).
        status: u16,
        /// The Hub's base URL, to point at the repository's page.
        endpoint: String,
        /// Whether a token was sent (and so refused).
        token_sent: bool,
    },
    /// The repository, revision or file does not exist (404).
    #[error("{repo}: {} not found at revision {revision} (HTTP 404)", .file.as_deref().map(|f| format!("file {f}")).unwrap_or_else(|| "repository".into()))]
    NotFound {
        /// The repository.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file, if the repository itself was found.
        file: Option<String>,
    },
    /// The include patterns matched none of the repository's files.
    #[error(
        "{repo}@{revision}: no file matches {patterns:?} (the repository has {available} files)"
    )]
    NoMatch {
        /// The repository.
        repo: String,
        /// The revision listed.
        revision: String,
        /// The patterns given.
        patterns: Vec<String>,
        /// How many files the repository has.
        available: usize,
    },
    /// Any other HTTP error status.
    #[error("{repo}: HTTP {status} from {url}")]
    Http {
        /// The repository.
        repo: String,
        /// The URL requested.
        url: String,
        /// The status.
        status: u16,
    },
    /// The Hub could not be reached, or the connection failed before a response.
    #[error("{repo}: cannot reach {url}: {reason}")]
    Network {
        /// The repository.
        repo: String,
        /// The URL requested.
        url: String,
        /// The transport's explanation.
        reason: String,
    },
    /// A file's transfer broke off; what arrived is kept and the next run resumes from it.
    #[error("{repo}: download of {file} broke off after {received} of {size} bytes ({reason}); run again to resume from {}", .partial.display())]
    Interrupted {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// Bytes kept in the partial file.
        received: u64,
        /// The file's full size.
        size: u64,
        /// The partial file (`blobs/<etag>.part`).
        partial: PathBuf,
        /// The transport's explanation.
        reason: String,
    },
    /// A file arrived with the wrong size (for instance a server that ignored a resume's
    /// `Range` and sent the whole file again); the bad copy was removed.
    #[error("{repo}: {file} arrived with {received} bytes instead of {size}; the bad copy was removed, run again to fetch it afresh")]
    WrongSize {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// Bytes that arrived (after resuming, if it did).
        received: u64,
        /// The size the Hub announced.
        size: u64,
    },
    /// A file whose bytes do not hash to the sha256 the Hub named it by (its LFS etag): a
    /// partial file from an earlier run held wrong bytes, say. The bad copy was removed.
    #[error("{repo}: {file} arrived with content of sha256 {got}, not the {expected} the Hub names; the bad copy was removed, run again to fetch it afresh")]
    WrongContent {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// The sha256 the Hub announced (the etag).
        expected: String,
        /// The sha256 of what arrived.
        got: String,
    },
    /// The Hub answered something this module cannot use (missing headers, bad JSON, an
    /// unsafe file path in the listing).
    #[error("{repo}: unexpected answer from {url}: {reason}")]
    Protocol {
        /// The repository.
        repo: String,
        /// The URL requested.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The revision moved to another commit while its files were downloading.
    #[error("{repo}: revision {revision} moved from commit {listed} to {served} during the download; run again")]
    RevisionMoved {
        /// The repository.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The commit the listing named.
        listed: String,
        /// The commit the file was served from.
        served: String,
    },
    /// Another process holds the file's download lock.
    #[error("{repo}: {file} is being downloaded by another process (lock {} is held); wait for it, or delete the lock if no download is running", .lock.display())]
    Busy {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// The lock file.
        lock: PathBuf,
    },
    /// A local file operation failed.
    #[error("{repo}: {}: {reason}", .path.display())]
    Io {
        /// The repository.
        repo: String,
        /// The file or folder concerned.
        path: PathBuf,
        /// The system's explanation.
        reason: String,
    },
}

fn gated_message(
    repo: &str,
    file: Option<&str>,
    status: u16,
    endpoint: &str,
    token_sent: bool,
) -> String {
    let what = match file {
        Some(file) => format!("{repo}: access to {file} refused (HTTP {status})"),
        None => format!("{repo}: access refused (HTTP {status})"),
    };
    let help = if token_sent {
        "the token sent was refused: check that HF_TOKEN (or the token saved by \
         `huggingface-cli login`) is valid, has read access, and belongs to an account that \
         accepted the licence"
    } else {
        "no token was sent: set HF_TOKEN or run `huggingface-cli login`"
    };
    format!(
        "{what}. The repository is gated or private (or does not exist): accept its licence \
         at {endpoint}/{repo} while logged in; {help}"
    )
}

/// `<cache_dir>/models--org--name`, where [`download`] puts `repo_id`.
pub fn cache_entry(settings: &HubSettings, repo_id: &str) -> PathBuf {
    settings
        .cache_dir
        .join(format!("models--{}", repo_id.replace('/', "--")))
}

/// Whether `name` names a Hub repository (`org/name`) rather than a path that exists.
pub fn names_repo(name: &str) -> bool {
    !Path::new(name).exists() && name.split('/').count() == 2 && !name.starts_with('.')
}

/// Where `name` is on this machine: the path itself if it exists, or the cache entry of
/// the Hub repository it names if that is there (not yet resolved to a snapshot).
pub fn find_local(settings: &HubSettings, name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let entry = cache_entry(settings, name);
    (names_repo(name) && entry.is_dir()).then_some(entry)
}

/// `*` matches any run of characters (`/` included), `?` one character; everything else
/// itself. A pattern ending in `/` matches everything below that folder.
fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = if pattern.ends_with('/') {
        pattern.chars().chain(['*']).collect()
    } else {
        pattern.chars().collect()
    };
    let text: Vec<char> = text.chars().collect();
    // Greedy matching that backtracks only to the last `*`: linear for patterns like ours.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

fn validate(request: &RepoRequest) -> Result<(), HubError> {
    let invalid = |reason: String| HubError::InvalidRequest {
        repo: request.repo_id.clone(),
        reason,
    };
    let parts: Vec<&str> = request.repo_id.split('/').collect();
    if parts.len() > 2 {
        return Err(invalid("expected `org/name` or `name`".into()));
    }
    for part in &parts {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if part.is_empty()
            || !part.chars().all(allowed)
            || part.contains("--")
            || part.contains("..")
            || part.starts_with(['-', '.'])
            || part.ends_with(['-', '.'])
        {
            return Err(invalid(format!(
                "{part:?} is not a Hub name (letters, digits, `-`, `_`, `.`; no `--` or `..`)"
            )));
        }
    }
    // The revision becomes a path under refs/, so it must stay inside it.
    let revision = &request.revision;
    if revision.is_empty()
        || revision.starts_with('/')
        || revision
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid(format!(
            "revision {revision:?} is not a branch, tag or commit"
        )));
    }
    Ok(())
}

/// A path from the Hub's listing that stays inside the snapshot folder.
fn safe_repo_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// One file's progress bar; its label says which file of how many.
struct FileBar {
    bar: ProgressBar,
}

impl FileBar {
    fn new(label: String) -> Self {
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Self {
            bar: ProgressBar::new(0).with_style(style).with_message(label),
        }
    }
}

impl Progress for FileBar {
    fn init(&mut self, size: usize, _filename: &str) {
        // hf-hub calls `init` again before each attempt, then `update` with the bytes
        // already on disk, so start from zero each time.
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    fn finish(&mut self) {
        self.bar.finish();
    }
}

/// Everything one download needs to name its errors.
struct Transfer<'a> {
    settings: &'a HubSettings,
    request: &'a RepoRequest,
    cache_entry: PathBuf,
    api: Api,
}

impl Transfer<'_> {
    fn repo(&self) -> String {
        self.request.repo_id.clone()
    }

    fn io(&self, path: &Path, e: std::io::Error) -> HubError {
        HubError::Io {
            repo: self.repo(),
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }

    /// Maps a ureq error for `url` (the listing when `file` is None).
    fn map_ureq(&self, url: &str, file: Option<&str>, e: &ureq::Error) -> HubError {
        match e {
            ureq::Error::StatusCode(status) => self.map_status(url, file, *status),
            ureq::Error::Json(e) => HubError::Protocol {
                repo: self.repo(),
                url: url.to_string(),
                reason: format!("invalid JSON: {e}"),
            },
            e => HubError::Network {
                repo: self.repo(),
                url: url.to_string(),
                reason: self.settings.redact(e.to_string()),
            },
        }
    }

    fn map_status(&self, url: &str, file: Option<&str>, status: u16) -> HubError {
        match status {
            401 | 403 => HubError::Gated {
                repo: self.repo(),
                file: file.map(str::to_string),
                status,
                endpoint: self.settings.endpoint.clone(),
                token_sent: self.settings.has_token(),
            },
            404 => HubError::NotFound {
                repo: self.repo(),
                revision: self.request.revision.clone(),
                file: file.map(str::to_string),
            },
            status => HubError::Http {
                repo: self.repo(),
                url: url.to_string(),
                status,
            },
        }
    }

    /// Maps an hf-hub error met while fetching `file` from `url`.
    fn map_api(&self, url: &str, file: &str, e: ApiError, meta: Option<&Metadata>) -> HubError {
        match e {
            ApiError::RequestError(e) => self.map_ureq(url, Some(file), &e),
            ApiError::TooManyRetries(e) => self.map_api(url, file, *e, meta),
            ApiError::MissingHeader(h) => HubError::Protocol {
                repo: self.repo(),
                url: url.to_string(),
                reason: format!(
                    "no {h} header (is {} a Hugging Face Hub?)",
                    self.settings.endpoint
                ),
            },
            ApiError::InvalidHeader(h) => HubError::Protocol {
                repo: self.repo(),
                url: url.to_string(),
                reason: format!("invalid {h} header"),
            },
            ApiError::ParseIntError(e) => HubError::Protocol {
                repo: self.repo(),
                url: url.to_string(),
                reason: format!("invalid size in content-range: {e}"),
            },
            ApiError::LockAcquisition(lock) => HubError::Busy {
                repo: self.repo(),
                file: file.to_string(),
                lock,
            },
            ApiError::InvalidResume => HubError::Protocol {
                repo: self.repo(),
                url: url.to_string(),
                reason: "the partial file is larger than the file".into(),
            },
            ApiError::IoError(e) if is_transfer_error(&e) => match meta {
                Some(meta) => {
                    let partial = self.part_path(meta);
                    HubError::Interrupted {
                        repo: self.repo(),
                        file: file.to_string(),
                        received: std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0),
                        size: meta.size() as u64,
                        partial,
                        reason: self.settings.redact(e.to_string()),
                    }
                }
                None => HubError::Network {
                    repo: self.repo(),
                    url: url.to_string(),
                    reason: self.settings.redact(e.to_string()),
                },
            },
            ApiError::IoError(e) => HubError::Io {
                repo: self.repo(),
                path: self.cache_entry.clone(),
                reason: format!("while storing {file}: {e}"),
            },
            // ApiError is not exhaustive across hf-hub's features.
            #[allow(unreachable_patterns)]
            other => HubError::Network {
                repo: self.repo(),
                url: url.to_string(),
                reason: self.settings.redact(other.to_string()),
            },
        }
    }

    fn blob_path(&self, meta: &Metadata) -> PathBuf {
        self.cache_entry.join("blobs").join(meta.etag())
    }

    fn part_path(&self, meta: &Metadata) -> PathBuf {
        // hf-hub's name for the file being written: the blob with `.part` for extension.
        self.blob_path(meta).with_extension("part")
    }

    /// Lists the revision's files and the commit it resolves to.
    fn list(&self, api_repo: &ApiRepo) -> Result<RepoInfo, HubError> {
        let request = api_repo.info_request();
        // Statuses come back as responses here, not errors, so the body can be read as JSON
        // only on success and the status mapped otherwise.
        let request = request.config().http_status_as_error(false).build();
        let url = request
            .uri_ref()
            .map(|u| u.to_string())
            .unwrap_or_else(|| format!("{}/api/models/{}", self.settings.endpoint, self.repo()));
        let mut response = request.call().map_err(|e| self.map_ureq(&url, None, &e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(self.map_status(&url, None, status));
        }
        response
            .body_mut()
            .read_json::<RepoInfo>()
            .map_err(|e| self.map_ureq(&url, None, &e))
    }

    /// Fetches one file into the cache (resuming its partial file), retrying transfers that
    /// break off. Returns the path hf-hub put it at.
    fn fetch(
        &self,
        api_repo: &ApiRepo,
        file: &str,
        label: &str,
        progress: bool,
    ) -> Result<PathBuf, HubError> {
        let url = api_repo.url(file);
        let mut attempt = 0;
        loop {
            match self.fetch_once(api_repo, &url, file, label, progress) {
                Err(e) if attempt < self.settings.retries && transient(&e) => {
                    let wait = self
                        .settings
                        .retry_wait
                        .checked_mul(2u32.saturating_pow(attempt as u32))
                        .unwrap_or(MAX_RETRY_WAIT)
                        .min(MAX_RETRY_WAIT);
                    tracing::warn!("{e}; retrying in {wait:?}");
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn fetch_once(
        &self,
        api_repo: &ApiRepo,
        url: &str,
        file: &str,
        label: &str,
        progress: bool,
    ) -> Result<PathBuf, HubError> {
        // hf-hub asks for these too; asking first gives the size to check the result against
        // and the partial file's name, and costs one tiny request per missing file.
        let meta = self
            .api
            .metadata(url)
            .map_err(|e| self.map_api(url, file, e, None))?;
        let size = meta.size() as u64;
        let part = self.part_path(&meta);
        match std::fs::metadata(&part).map(|m| m.len()) {
            // A finished but unrenamed partial would make hf-hub ask for `bytes=size-`, which
            // the Hub answers with 416; an oversized one cannot be resumed.
            Ok(len) if len >= size && size > 0 => {
                tracing::warn!(
                    "{}: discarding partial {} ({len} bytes of {size})",
                    self.repo(),
                    part.display()
                );
                std::fs::remove_file(&part).map_err(|e| self.io(&part, e))?;
            }
            Ok(len) if len > 0 => {
                tracing::info!("{}: resuming {file} from byte {len} of {size}", self.repo())
            }
            _ => tracing::info!("{}: downloading {file} ({size} bytes)", self.repo()),
        }
        let pointer = self
            .cache_entry
            .join("snapshots")
            .join(meta.commit_hash())
            .join(file);
        remove_dangling(&pointer).map_err(|e| self.io(&pointer, e))?;

        let result = if progress {
            let bar = FileBar::new(label.to_string());
            let handle = bar.bar.clone();
            let result = api_repo.download_with_progress(file, bar);
            if result.is_err() {
                handle.abandon();
            }
            result
        } else {
            api_repo.download_with_progress(file, ())
        };
        let path = result.map_err(|e| self.map_api(url, file, e, Some(&meta)))?;

        // hf-hub checks neither that a resumed request got a 206 nor the final length.
        let blob = self.blob_path(&meta);
        let received = std::fs::metadata(&blob)
            .map_err(|e| self.io(&blob, e))?
            .len();
        if received != size {
            std::fs::remove_file(&blob).map_err(|e| self.io(&blob, e))?;
            remove_dangling(&path).map_err(|e| self.io(&path, e))?;
            return Err(HubError::WrongSize {
                repo: self.repo(),
                file: file.to_string(),
                received,
                size,
            });
        }
        // An LFS file's etag is its content's sha256, and the blob is stored under that
        // name for good: check it, or a resumed partial with wrong bytes would be trusted
        // by every later run.
        let expected = meta.etag();
        if expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            let got = sha256_file(&blob).map_err(|e| self.io(&blob, e))?;
            if !got.eq_ignore_ascii_case(expected) {
                std::fs::remove_file(&blob).map_err(|e| self.io(&blob, e))?;
                remove_dangling(&path).map_err(|e| self.io(&path, e))?;
                return Err(HubError::WrongContent {
                    repo: self.repo(),
                    file: file.to_string(),
                    expected: expected.to_string(),
                    got,
                });
            }
        }
        Ok(path)
    }
}

/// The sha256 of a file's content, lower-case hex, read in blocks.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The longest wait between two tries of a file.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// Whether trying the same file again may succeed.
fn transient(e: &HubError) -> bool {
    match e {
        HubError::Interrupted { .. } | HubError::Network { .. } => true,
        HubError::Http { status, .. } => (500..600).contains(status),
        _ => false,
    }
}

/// Whether an I/O error from hf-hub came from the network transfer (the connection broke)
/// rather than from the disk.
fn is_transfer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    e.get_ref().is_some_and(|inner| inner.is::<ureq::Error>())
        || matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | TimedOut | BrokenPipe
        )
}

/// Removes a snapshot link whose blob is gone: hf-hub would not replace it (it checks that the
/// link's target exists) and creating the new link would fail.
fn remove_dangling(link: &Path) -> std::io::Result<()> {
    let is_link = std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && !link.exists() {
        std::fs::remove_file(link)?;
    }
    Ok(())
}

/// Downloads the selected files of a repository into the cache. Blocking.
///
/// Lists the revision's files (`GET {endpoint}/api/models/{repo}/revision/{revision}`),
/// keeps those [`RepoRequest::include`] selects, and downloads each one not already in
/// `snapshots/<commit>/`; a file whose earlier download broke off resumes from its partial
/// file. With `progress`, each transfer shows an indicatif bar on stderr.
pub fn download(
    settings: &HubSettings,
    request: &RepoRequest,
    progress: bool,
) -> Result<Downloaded, HubError> {
    validate(request)?;
    // hf-hub builds the snapshot links from absolute paths.
    let cache_dir = std::path::absolute(&settings.cache_dir).map_err(|e| HubError::Io {
        repo: request.repo_id.clone(),
        path: settings.cache_dir.clone(),
        reason: e.to_string(),
    })?;
    let cache = Cache::new(cache_dir.clone());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(settings.endpoint.clone())
        // Always set: `from_cache` would otherwise pick up a token file next to the cache.
        .with_token(settings.token.clone())
        // Retries happen here, each reopening the partial file (see `Transfer::fetch`).
        .with_retries(0)
        .with_progress(false)
        .with_user_agent("icedit-scale", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| HubError::Network {
            repo: request.repo_id.clone(),
            url: settings.endpoint.clone(),
            reason: settings.redact(e.to_string()),
        })?;
    let repo = Repo::with_revision(
        request.repo_id.clone(),
        RepoType::Model,
        request.revision.clone(),
    );
    let api_repo = api.repo(repo.clone());
    let session = Transfer {
        settings,
        request,
        cache_entry: cache_dir.join(repo.folder_name()),
        api,
    };

    let info = session.list(&api_repo)?;
    let listing_url = format!("{}/api/{}", settings.endpoint, repo.api_url());
    if let Some(bad) = info.siblings.iter().find(|s| !safe_repo_path(&s.rfilename)) {
        return Err(HubError::Protocol {
            repo: session.repo(),
            url: listing_url,
            reason: format!("the listing names an unsafe path {:?}", bad.rfilename),
        });
    }
    let commit = info.sha.trim().to_string();
    if commit.is_empty() || !safe_repo_path(&commit) || commit.contains('/') {
        return Err(HubError::Protocol {
            repo: session.repo(),
            url: listing_url,
            reason: format!("the listing names an invalid commit {commit:?}"),
        });
    }
    let selected: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| request.selects(f))
        .collect();
    if selected.is_empty() && !request.include.is_empty() {
        return Err(HubError::NoMatch {
            repo: session.repo(),
            revision: request.revision.clone(),
            patterns: request.include.clone(),
            available: info.siblings.len(),
        });
    }

    let snapshot = session.cache_entry.join("snapshots").join(&commit);
    let (mut fetched, mut already_cached) = (0, 0);
    let mut files = Vec::with_capacity(selected.len());
    for (i, file) in selected.iter().enumerate() {
        let target = snapshot.join(file);
        if target.is_file() {
            tracing::debug!("{}: {file} already cached", session.repo());
            already_cached += 1;
        } else {
            let label = format!("[{}/{}] {file}", i + 1, selected.len());
            let path = session.fetch(&api_repo, file, &label, progress)?;
            if path != target {
                let served = path
                    .strip_prefix(session.cache_entry.join("snapshots"))
                    .ok()
                    .and_then(|p| p.components().next())
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string());
                return Err(HubError::RevisionMoved {
                    repo: session.repo(),
                    revision: request.revision.clone(),
                    listed: commit,
                    served,
                });
            }
            fetched += 1;
        }
        files.push(target);
    }

    // hf-hub writes the ref with each file it fetches; a run that fetched nothing (or nothing
    // at all was selected) still records which commit the revision now names.
    std::fs::create_dir_all(&snapshot).map_err(|e| session.io(&snapshot, e))?;
    cache
        .repo(repo)
        .create_ref(&commit)
        .map_err(|e| session.io(&session.cache_entry.join("refs"), e))?;
    tracing::info!(
        "{}@{}: {fetched} fetched, {already_cached} already cached, in {}",
        session.repo(),
        request.revision,
        snapshot.display()
    );
    Ok(Downloaded {
        cache_entry: session.cache_entry,
        commit,
        snapshot,
        files,
        fetched,
        already_cached,
    })
}
