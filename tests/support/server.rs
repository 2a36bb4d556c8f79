//! The `serve` binary as a child process, driven over HTTP like any client: start it on a
//! free port (its "listening on" line gives the port), submit edits, read their event
//! streams and the journal. Nothing here waits on the clock.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use futures::StreamExt;
use serde_json::Value;

/// A running server.
pub struct Server {
    /// The child process (taken once it is waited for).
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Where its stderr (the log) is copied.
    pub stderr: PathBuf,
    /// The log's lines as they arrive (closed when the process's stderr is).
    log_lines: tokio::sync::watch::Receiver<Vec<String>>,
    /// The thread that copies the log (joined once the process has exited).
    copier: Option<std::thread::JoinHandle<()>>,
}

/// Longest a test waits for a log line before calling the server hung (a guard against a
/// hang, not a timing: the line normally comes within milliseconds).
const LOG_HANG: std::time::Duration = std::time::Duration::from_secs(300);

/// The `serve` command line for `out` on `addr`, with `args` and environment `env` (no
/// inherited ICEDIT_SERVE_TOKEN), logging at info to stderr (`log`: a pipe, or a file).
fn command(addr: &str, out: &Path, args: &[&str], env: &[(&str, &str)], log: Stdio) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icedit-scale"));
    cmd.args(["serve", "--addr", addr, "--out"])
        .arg(out)
        .args(args)
        .env_remove("ICEDIT_SERVE_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Copies the child's stderr line by line into the file `path` and the channel `lines`, on
/// a thread of its own, until the child closes it.
fn copy_log(
    stderr: std::process::ChildStderr,
    path: &Path,
) -> (
    tokio::sync::watch::Receiver<Vec<String>>,
    std::thread::JoinHandle<()>,
) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let copier = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(file, "{line}");
            tx.send_modify(|lines| lines.push(line));
        }
    });
    (rx, copier)
}

impl Server {
    /// Starts `serve` on a free loopback port with `args` (and `--out out`), environment
    /// `env`, and returns once it prints its address.
    pub fn start(out: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_at("127.0.0.1:0", out, args, env)
    }

    /// [`Server::start`] on `addr`.
    pub fn start_at(addr: &str, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let stderr = out.with_extension(format!("stderr{}", rand_suffix()));
        let mut child = command(addr, out, args, env, Stdio::piped())
            .spawn()
            .expect("starting icedit-scale serve");
        let (log_lines, copier) = copy_log(child.stderr.take().unwrap(), &stderr);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let base = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| {
                    panic!(
                        "serve exited: {}",
                        std::fs::read_to_string(&stderr).unwrap()
                    )
                })
                .unwrap();
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.trim().to_string();
            }
        };
        // Keep reading stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child: Some(child),
            base,
            stderr,
            log_lines,
            copier: Some(copier),
        }
    }

    /// Waits for the log to hold `count` lines that contain `needle` (on the lines as they
    /// arrive, not on a clock) and returns them; a server that exits first fails the test.
    pub async fn log_lines_with(&self, needle: &str, count: usize) -> Vec<String> {
        let matching = |lines: &[String]| {
            lines
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut rx = self.log_lines.clone();
        let waited = tokio::time::timeout(
            LOG_HANG,
            rx.wait_for(|lines| matching(lines).len() >= count),
        )
        .await;
        match waited {
            Ok(Ok(lines)) => matching(&lines),
            _ => panic!(
                "the log never held {count} lines with `{needle}`: {}",
                self.log()
            ),
        }
    }

    /// The id of the `n`-th edit (from 1) the server logs as accepted, once it has.
    pub async fn accepted_edit(&self, n: usize) -> String {
        const ACCEPTED: &str = ": accepted id=";
        let lines = self.log_lines_with(ACCEPTED, n).await;
        let line = &lines[n - 1];
        let at = line.find(ACCEPTED).unwrap() + ACCEPTED.len();
        line[at..]
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap()
            .to_string()
    }

    /// Stops the server (SIGTERM, its shutdown runs) and returns its whole log.
    pub fn stop_and_log(mut self) -> String {
        self.sigterm();
        self.wait_exit(LOG_HANG);
        self.log()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not waited for").id()
    }

    /// Waits for the process to exit (after a signal); a process still running after
    /// `guard` is killed and fails the test (a hang, not a timing).
    pub fn wait_exit(&mut self, guard: std::time::Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("waited for once");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait()).unwrap());
        match rx.recv_timeout(guard) {
            Ok(status) => {
                // The log is whole once its copier has read to the end.
                if let Some(copier) = self.copier.take() {
                    copier.join().unwrap();
                }
                status.unwrap()
            }
            Err(_) => {
                // SAFETY: killing our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("serve did not exit: {}", self.log());
            }
        }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The `host:port` it listens on.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill_9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM (the server's own shutdown runs).
    pub fn sigterm(&self) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) }, 0);
    }

    /// Its log so far (while it runs, the last lines may still be on their way: use
    /// [`Server::stop_and_log`] to check what the log never holds).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `serve` where it must refuse to start: returns its exit code and stderr. Panics
/// when it starts listening instead (so a server that fails open never hangs the test).
pub fn refused_start(addr: &str, out: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let stderr = out.with_extension(format!("stderr{}", rand_suffix()));
    let mut child = command(
        addr,
        out,
        args,
        env,
        std::fs::File::create(&stderr).unwrap().into(),
    )
    .spawn()
    .expect("starting icedit-scale serve");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines {
        let line = line.unwrap();
        if line.starts_with("listening on ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve {args:?} started ({line}) instead of refusing: {}",
                std::fs::read_to_string(&stderr).unwrap()
            );
        }
    }
    let status = child.wait().unwrap();
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&stderr).unwrap(),
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A PNG of `w` x `h` with some structure.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            if (x / 16 + y / 16) % 2 == 0 { 200 } else { 40 },
        ])
    });
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// A multipart form with `image` as a PNG file and `fields` as text.
pub fn form(fields: &[(&str, &str)], image: Vec<u8>) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(image)
            .file_name("source.png")
            .mime_str("image/png")
            .unwrap(),
    );
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    form
}

/// `POST /v1/edits`; returns the edit id.
pub async fn submit(client: &reqwest::Client, server: &Server, fields: &[(&str, &str)]) -> String {
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(fields, png(192, 128)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let body: Value = r.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    /// Its number in the stream.
    pub id: u64,
    /// Its name.
    pub event: String,
    /// Its JSON data.
    pub data: Value,
}

/// Reads an edit's event stream; with `until`, stops after the first event of that name,
/// else reads to the end of the stream.
pub async fn events(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    until: Option<&str>,
) -> Vec<Sse> {
    events_after(client, server, id, None, until).await
}

/// [`events`] as a client that reconnects with the `Last-Event-ID` `last` gets them.
pub async fn events_after(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    last: Option<u64>,
    until: Option<&str>,
) -> Vec<Sse> {
    let mut request = client.get(server.url(&format!("/v1/edits/{id}/events")));
    if let Some(last) = last {
        request = request.header("last-event-id", last.to_string());
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    let mut buffer = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut fields: HashMap<&str, String> = HashMap::new();
            for line in block.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    fields.insert(k, v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            let (Some(id), Some(event), Some(data)) =
                (fields.get("id"), fields.get("event"), fields.get("data"))
            else {
                continue; // keep-alive comments
            };
            let e = Sse {
                id: id.parse().unwrap(),
                event: event.clone(),
                data: serde_json::from_str(data).unwrap(),
            };
            let stop = until == Some(e.event.as_str());
            out.push(e);
            if stop {
                return out;
            }
        }
    }
    out
}

/// The journal's records.
pub fn journal(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How many records of `kind` (`accepted`, `ended`, `interrupted`) the journal holds for
/// edit `id`.
pub fn records_of(records: &[Value], kind: &str, id: &str) -> usize {
    records
        .iter()
        .filter(|r| r["record"] == kind && r["id"] == id)
        .count()
}
