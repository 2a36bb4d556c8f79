//! A fake Hugging Face Hub for tests: serves fixture repositories from memory on
//! 127.0.0.1 (ephemeral port) through the Hub's URL layout.
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}`: `{"sha": ..., "siblings": [{"rfilename": ...}]}`
//! - `GET|HEAD /{org}/{name}/resolve/{rev}/{path}`: the file, honouring `Range` (206 and
//!   `content-range`), with `etag` (quoted sha256 of the content), `x-repo-commit` and
//!   `content-length`. With [`FakeRepo::via_cdn`], it answers 302 to `/cdn/...` on
//!   `localhost` (another host name, like the Hub's LFS storage) with `x-linked-etag`, and the
//!   bytes come from there.
//!
//! It can require a bearer token ([`FakeRepo::gated`]: files only, as the Hub does for gated
//! repositories; [`FakeRepo::private`]: the listing too), cut the connection after N bytes of a
//! file's first full-body request ([`FakeHub::cut_after`]), and records every request it saw
//! ([`FakeHub::requests`]), each recorded before its answer is written, so a client that has its
//! answer can read the record without waiting.
//!
//! A std-only HTTP/1.1 server (one thread per connection, `Connection: close`): cutting a body
//! halfway needs control of the socket that mock-server crates do not give.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// A repository the fake Hub serves.
#[derive(Clone, Debug)]
pub struct FakeRepo {
    /// The commit `main` resolves to (40 hex digits).
    pub commit: String,
    /// Path in the repository to content, in listing order.
    pub files: Vec<(String, Vec<u8>)>,
    token: Option<String>,
    private: bool,
    via_cdn: bool,
    ignore_resume_range: bool,
}

impl FakeRepo {
    /// A repository holding these files; its commit is derived from their paths and bytes.
    pub fn new(files: Vec<(String, Vec<u8>)>) -> Self {
        let mut hash = Sha256::new();
        for (path, bytes) in &files {
            hash.update(path.as_bytes());
            hash.update([0]);
            hash.update(Sha256::digest(bytes));
        }
        let commit = hex::encode(hash.finalize())[..40].to_string();
        Self {
            commit,
            files,
            token: None,
            private: false,
            via_cdn: false,
            ignore_resume_range: false,
        }
    }

    /// Every file under `dir`, by its `/`-separated path relative to it, sorted.
    pub fn from_dir(dir: &Path) -> Self {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).expect("fixture folder") {
                let path = entry.expect("fixture entry").path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path.strip_prefix(root).unwrap();
                    let rel: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    out.push((rel.join("/"), std::fs::read(&path).expect("fixture file")));
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, dir, &mut files);
        files.sort();
        Self::new(files)
    }

    /// Files answer 401 without `Authorization: Bearer {token}`; the listing stays public.
    pub fn gated(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// Like [`FakeRepo::gated`], and the listing needs the token too.
    pub fn private(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self.private = true;
        self
    }

    /// Files are served by a 302 to another host name (`localhost`), as the Hub does for LFS.
    pub fn via_cdn(mut self) -> Self {
        self.via_cdn = true;
        self
    }

    /// A `Range` that does not start at byte 0 is ignored: the whole file comes back with 200,
    /// as from a server or proxy without range support (`bytes=0-0` still works).
    pub fn ignoring_resume_range(mut self) -> Self {
        self.ignore_resume_range = true;
        self
    }

    /// The content of `path`.
    pub fn file(&self, path: &str) -> &[u8] {
        &self
            .files
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("no {path} in the fake repository"))
            .1
    }

    fn authorised(&self, authorization: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => authorization == Some(format!("Bearer {token}").as_str()),
        }
    }
}

/// The sha256 of `bytes` in hex: the etag the fake Hub gives a file, so its blob's name.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One request the fake Hub received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// `GET` or `HEAD`.
    pub method: String,
    /// The request target, query string included.
    pub target: String,
    /// The `Range` header.
    pub range: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Host` header.
    pub host: Option<String>,
    /// The status answered.
    pub status: u16,
}

struct Cut {
    repo: String,
    file: String,
    after: usize,
    done: bool,
}

#[derive(Default)]
struct State {
    repos: Mutex<HashMap<String, FakeRepo>>,
    seen: Mutex<Vec<SeenRequest>>,
    cuts: Mutex<Vec<Cut>>,
    stop: AtomicBool,
}

/// The running fake Hub; stops when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Starts serving on an ephemeral port of 127.0.0.1.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake Hub");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let accept_state = state.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = accept_state.clone();
                std::thread::spawn(move || serve_connection(stream, addr, &state));
            }
        });
        Self {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// The base URL to use as `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `repo` as `repo_id` (`org/name`).
    pub fn serve(&self, repo_id: &str, repo: FakeRepo) {
        self.state
            .repos
            .lock()
            .unwrap()
            .insert(repo_id.to_string(), repo);
    }

    /// The first full-body request for `file` of `repo_id` gets its headers (full length
    /// announced) and `after` bytes, then the connection closes.
    pub fn cut_after(&self, repo_id: &str, file: &str, after: usize) {
        self.state.cuts.lock().unwrap().push(Cut {
            repo: repo_id.to_string(),
            file: file.to_string(),
            after,
            done: false,
        });
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        self.state.seen.lock().unwrap().clear();
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    headers: HashMap<String, String>,
}

fn read_head(stream: &TcpStream) -> Option<Head> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    Some(Head {
        method,
        target,
        headers,
    })
}

/// `%XX` escapes decoded (hf-hub writes a revision's `/` as `%2F`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An answer to write.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Write only this many body bytes, then close.
    cut_at: Option<usize>,
}

impl Answer {
    fn text(status: u16, error_code: &str, message: &str) -> Self {
        Self {
            status,
            headers: vec![
                ("content-type".into(), "text/plain".into()),
                ("x-error-code".into(), error_code.into()),
                ("x-error-message".into(), message.into()),
            ],
            body: message.as_bytes().to_vec(),
            cut_at: None,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

fn serve_connection(mut stream: TcpStream, addr: SocketAddr, state: &State) {
    let Some(head) = read_head(&stream) else {
        return;
    };
    let answer = route(&head, addr, state);
    state.seen.lock().unwrap().push(SeenRequest {
        method: head.method.clone(),
        target: head.target.clone(),
        range: head.headers.get("range").cloned(),
        authorization: head.headers.get("authorization").cloned(),
        host: head.headers.get("host").cloned(),
        status: answer.status,
    });
    let mut out = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
    for (name, value) in &answer.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        answer.body.len()
    ));
    let mut bytes = out.into_bytes();
    if head.method != "HEAD" {
        let end = answer.cut_at.unwrap_or(answer.body.len());
        bytes.extend_from_slice(&answer.body[..end]);
    }
    let _ = stream.write_all(&bytes);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn route(head: &Head, addr: SocketAddr, state: &State) -> Answer {
    if head.method != "GET" && head.method != "HEAD" {
        return Answer::text(405, "MethodNotAllowed", "only GET and HEAD");
    }
    let path = head.target.split('?').next().unwrap_or("");
    let authorization = head.headers.get("authorization").map(String::as_str);
    let repos = state.repos.lock().unwrap();

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo_id, revision)) = rest.split_once("/revision/") else {
            return Answer::text(404, "NotFound", "unknown API route");
        };
        let Some(repo) = repos.get(repo_id) else {
            return Answer::text(404, "RepoNotFound", "Repository not found");
        };
        if repo.private && !repo.authorised(authorization) {
            return Answer::text(
                401,
                "RepoNotFound",
                "Invalid credentials in Authorization header",
            );
        }
        let revision = percent_decode(revision);
        if revision != "main" && revision != repo.commit {
            return Answer::text(404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|(p, _)| serde_json::json!({ "rfilename": p }))
            .collect();
        let body = serde_json::json!({
            "id": repo_id,
            "sha": repo.commit,
            "siblings": siblings,
        });
        return Answer {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).unwrap(),
            cut_at: None,
        };
    }

    // The storage side of a redirected file: /cdn/{org}/{name}/{commit}/{path}.
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let mut parts = rest.splitn(4, '/');
        let (Some(org), Some(name), Some(_commit), Some(file)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Answer::text(404, "NotFound", "unknown storage object");
        };
        let repo_id = format!("{org}/{name}");
        let Some(repo) = repos.get(&repo_id) else {
            return Answer::text(404, "NotFound", "unknown storage object");
        };
        let file = percent_decode(file);
        let Some((_, bytes)) = repo.files.iter().find(|(p, _)| *p == file) else {
            return Answer::text(404, "NotFound", "unknown storage object");
        };
        return content(head, state, (&repo_id, repo), &file, bytes, Vec::new());
    }

    let Some((repo_id, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return Answer::text(404, "NotFound", "unknown route");
    };
    let Some(repo) = repos.get(repo_id) else {
        return Answer::text(404, "RepoNotFound", "Repository not found");
    };
    let Some((revision, file)) = rest.split_once('/') else {
        return Answer::text(404, "EntryNotFound", "no file named");
    };
    let (revision, file) = (percent_decode(revision), percent_decode(file));
    if !repo.authorised(authorization) {
        return Answer::text(
            401,
            "GatedRepo",
            "Access to this model is restricted. You must have access to it and be authenticated to access it.",
        );
    }
    if revision != "main" && revision != repo.commit {
        return Answer::text(404, "RevisionNotFound", "Invalid rev id");
    }
    let Some((_, bytes)) = repo.files.iter().find(|(p, _)| *p == file) else {
        return Answer::text(404, "EntryNotFound", "Entry not found");
    };
    let etag = format!("\"{}\"", sha256_hex(bytes));
    let commit_headers = vec![("x-repo-commit".to_string(), repo.commit.clone())];
    if repo.via_cdn {
        let location = format!(
            "http://localhost:{}/cdn/{repo_id}/{}/{file}",
            addr.port(),
            repo.commit
        );
        let mut headers = commit_headers;
        headers.push(("x-linked-etag".into(), etag));
        headers.push(("x-linked-size".into(), bytes.len().to_string()));
        headers.push(("location".into(), location));
        return Answer {
            status: 302,
            headers,
            body: Vec::new(),
            cut_at: None,
        };
    }
    let mut headers = commit_headers;
    headers.push(("etag".into(), etag));
    content(head, state, (repo_id, repo), &file, bytes, headers)
}

/// A file's bytes, or the range asked for; applies a pending cut.
fn content(
    head: &Head,
    state: &State,
    (repo_id, repo): (&str, &FakeRepo),
    file: &str,
    bytes: &[u8],
    mut headers: Vec<(String, String)>,
) -> Answer {
    let size = bytes.len();
    headers.push(("accept-ranges".into(), "bytes".into()));
    headers.push(("content-type".into(), "application/octet-stream".into()));
    let range = match head.headers.get("range") {
        None => None,
        Some(range) => match parse_range(range, size) {
            Some((start, _)) if start > 0 && repo.ignore_resume_range => None,
            Some(range) => Some(range),
            None => {
                headers.push(("content-range".into(), format!("bytes */{size}")));
                return Answer {
                    status: 416,
                    headers,
                    body: Vec::new(),
                    cut_at: None,
                };
            }
        },
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let body = if size == 0 {
        Vec::new()
    } else {
        bytes[start..=end].to_vec()
    };
    let status = if range.is_some() {
        headers.push((
            "content-range".into(),
            format!("bytes {start}-{end}/{size}"),
        ));
        206
    } else {
        200
    };
    let full_body = head.method == "GET" && start == 0 && end + 1 == size && size > 1;
    let mut cut_at = None;
    if full_body {
        let mut cuts = state.cuts.lock().unwrap();
        if let Some(cut) = cuts
            .iter_mut()
            .find(|c| !c.done && c.repo == repo_id && c.file == file)
        {
            cut.done = true;
            cut_at = Some(cut.after.min(body.len()));
        }
    }
    Answer {
        status,
        headers,
        body,
        cut_at,
    }
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes; None if not
/// satisfiable.
fn parse_range(range: &str, size: usize) -> Option<(usize, usize)> {
    let spec = range.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    if size == 0 {
        return None;
    }
    if a.is_empty() {
        let n: usize = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        return Some((size.saturating_sub(n), size - 1));
    }
    let start: usize = a.parse().ok()?;
    let end = if b.is_empty() {
        size - 1
    } else {
        b.parse::<usize>().ok()?.min(size - 1)
    };
    (start <= end && start < size).then_some((start, end))
}
