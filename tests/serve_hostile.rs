//! `serve` against hostile clients and careless operators (issue 34): slow and stalled
//! connections, too many connections, oversized and malformed bodies, tokens the server
//! cannot read, symlinks and Host headers, racing cancels. Each test pins one defect.
//!
//! Nothing waits on the clock: timeouts are the server's own (short ones configured), and a
//! test waits for the server's event (a connection closed, an answer, the process exit).
//! Where a broken server would hang instead, a generous guard turns the hang into a failure.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use support::server::{events, form, journal, png, records_of, refused_start, submit, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a guarded wait may take before the test calls it a hang (only a broken server
/// gets near it; a passing run never waits on it).
const HANG: Duration = Duration::from_secs(120);

fn client() -> reqwest::Client {
    icedit_scale::http::client_builder().build().unwrap()
}

/// Reads `stream` to its end (the server closed it), or fails the test as a hang.
async fn read_to_close(stream: &mut tokio::net::TcpStream, what: &str) -> String {
    let mut bytes = Vec::new();
    match tokio::time::timeout(HANG, stream.read_to_end(&mut bytes)).await {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => panic!("{what}: the server kept the connection open"),
    }
}

/// An error answer's `(status, param, message)`.
async fn refusal(r: reqwest::Response) -> (u16, Value, String) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (
        status,
        body["error"]["param"].clone(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// A long edit: 64 full runs of 1000 steps (minutes), still running whenever the test acts.
const LONG: [(&str, &str); 5] = [
    ("prompt", "x"),
    ("strategy", "best-of-n"),
    ("seeds", "64"),
    ("steps", "1000"),
    ("size", "128"),
];

/// A short edit.
const SHORT: [(&str, &str); 4] = [
    ("prompt", "make it snow"),
    ("seeds", "2"),
    ("steps", "6"),
    ("size", "64"),
];

#[tokio::test]
async fn a_non_finite_target_is_refused_by_name_whatever_the_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = client();
    for (strategy, target) in [
        ("early-filter", "NaN"),
        ("early-filter", "inf"),
        ("best-of-n", "-inf"),
        ("adaptive", "NaN"),
    ] {
        let r = client
            .post(server.url("/v1/edits"))
            .multipart(form(
                &[("prompt", "x"), ("strategy", strategy), ("target", target)],
                png(64, 64),
            ))
            .send()
            .await
            .unwrap();
        let (status, param, message) = refusal(r).await;
        assert_eq!(
            (status, param.as_str()),
            (400, Some("target")),
            "{strategy} {target}: {message}"
        );
        assert!(message.contains("target"), "{message}");
    }
    // JSON carries it as text.
    let b64 = base64::engine::general_purpose::STANDARD.encode(png(64, 64));
    let r = client
        .post(server.url("/v1/edits"))
        .json(&json!({"prompt": "x", "image": b64, "target": "Infinity"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "target");
    assert!(journal(&out).is_empty(), "nothing refused is journaled");
}

#[tokio::test]
async fn half_sent_heads_and_idle_connections_are_closed_at_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("out"),
        &["--header-timeout-s", "1", "--idle-timeout-s", "1"],
        &[],
    );
    // Half a request head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    slow.write_all(b"POST /v1/edits HTTP/1.1\r\nHost: localhost\r\nContent-Ty")
        .await
        .unwrap();
    read_to_close(&mut slow, "half a request head").await;
    // A connection that never says anything.
    let mut silent = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    read_to_close(&mut silent, "a silent connection").await;
    // A kept-alive connection after its answer.
    let mut kept = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut kept, "an idle kept-alive connection").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // The server still answers.
    let r = client().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_closed_at_the_body_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &["--body-timeout-s", "1"], &[]);
    let mut stalled = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/edits HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 100000\r\n\r\n{\"prompt\": \"x\", \"image\": \"iVBO",
        )
        .await
        .unwrap();
    let text = read_to_close(&mut stalled, "a stalled upload").await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let body: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        body["error"]["message"].as_str().unwrap().contains("body"),
        "{body}"
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_are_answered_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &["--max-connections", "2"], &[]);
    // Two connections held open (accepted in the order they were made).
    let _a = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let _b = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut third, "a connection over the cap").await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
    assert!(text.contains("\"error\""), "{text}");
    assert!(text.contains("\"too_many_connections\""), "{text}");
}

#[tokio::test]
async fn sigterm_ends_the_server_past_a_half_sent_head_and_a_running_edit_resumes_after() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let client = client();
    let server = Server::start(
        &out,
        &[
            "--in-flight",
            "1",
            "--max-seeds",
            "256",
            "--max-steps",
            "1000",
            "--shutdown-deadline-s",
            "0",
        ],
        &[],
    );
    // A: 256 candidates with live previews (a decode and a PNG each, every step). The
    // generator once ran such an edit to its end before the server could exit (minutes, so
    // `wait_exit` calls it a hang); now it stops at the next step boundary.
    let long_live: Vec<(&str, &str)> = LONG
        .into_iter()
        .map(|(k, v)| if k == "seeds" { (k, "256") } else { (k, v) })
        .chain([("live_previews", "true")])
        .collect();
    let a = submit(&client, &server, &long_live).await;
    events(&client, &server, &a, Some("step")).await; // A is running
    let b = submit(&client, &server, &SHORT).await; // B waits behind it
    let mut slow = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    slow.write_all(b"POST /v1/edits HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    server.sigterm();
    let mut server = server;
    let status = server.wait_exit(HANG);
    assert!(status.success(), "{status:?}: {}", server.log());
    let records = journal(&out);
    assert_eq!(records_of(&records, "ended", &a), 0, "A was not waited on");
    assert_eq!(
        records_of(&records, "interrupted", &a),
        1,
        "A is journaled as interrupted: {records:?}"
    );
    assert_eq!(records_of(&records, "ended", &b), 0);
    drop(server);
    drop(slow);

    // The next start runs A again (then it is cancelled) and B after it, each ending once.
    let server = Server::start(
        &out,
        &[
            "--in-flight",
            "1",
            "--max-seeds",
            "256",
            "--max-steps",
            "1000",
        ],
        &[],
    );
    let again = events(&client, &server, &a, Some("step")).await;
    assert!(again.iter().any(|e| e.event == "started"), "{again:?}");
    let r = client
        .delete(server.url(&format!("/v1/edits/{a}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a_end = events(&client, &server, &a, None).await;
    assert_eq!(a_end.last().unwrap().event, "cancelled");
    let b_end = events(&client, &server, &b, None).await;
    assert_eq!(b_end.last().unwrap().event, "done");
    let records = journal(&out);
    for id in [&a, &b] {
        assert_eq!(records_of(&records, "accepted", id), 1);
        assert_eq!(
            records_of(&records, "ended", id),
            1,
            "{id} ends exactly once"
        );
    }
}

#[tokio::test]
async fn a_full_queue_refuses_before_decoding_and_racing_cancels_end_an_edit_once() {
    // On a disk (not tmpfs), where each journal append takes a real fsync.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = dir.path().join("out");
    let server = Server::start(
        &out,
        &[
            "--max-queue",
            "1",
            "--in-flight",
            "1",
            "--max-steps",
            "1000",
            "--max-seeds",
            "64",
        ],
        &[],
    );
    let client = client();
    let a = submit(&client, &server, &LONG).await;
    events(&client, &server, &a, Some("step")).await; // A is running: the queue is empty
    let b = submit(&client, &server, &SHORT).await; // the queue is full

    // Eight DELETEs of the queued edit at once: it ends once.
    let deletes = (0..8).map(|_| {
        let (client, url) = (client.clone(), server.url(&format!("/v1/edits/{b}")));
        async move { client.delete(url).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures::future::join_all(deletes).await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 409),
        "{statuses:?}"
    );
    assert_eq!(records_of(&journal(&out), "ended", &b), 1);
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("icedit_edits_total{status=\"cancelled\"} 1\n"),
        "{metrics}"
    );
    let b_events = events(&client, &server, &b, None).await;
    let names: Vec<&str> = b_events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["queued", "cancelled"]);

    // Full again; a PNG whose header is fine but whose pixels are cut off: the queue
    // answers first (a decode would have refused it 400).
    submit(&client, &server, &SHORT).await;
    let mut cut = png(64, 64);
    cut.truncate(60);
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&SHORT, cut))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());

    // Three DELETEs of the running edit at once: one is told it is cancelling, the others
    // that it already is, and it ends cancelled (it was stepping, far from its end).
    let deletes = (0..3).map(|_| {
        let (client, url) = (client.clone(), server.url(&format!("/v1/edits/{a}")));
        async move { client.delete(url).send().await.unwrap().status().as_u16() }
    });
    let mut statuses = futures::future::join_all(deletes).await;
    statuses.sort();
    assert_eq!(statuses, [200, 409, 409]);
    let a_events = events(&client, &server, &a, None).await;
    assert_eq!(a_events.last().unwrap().event, "cancelled");
}

/// A refusal's status, its `x-should-retry` header and its body.
async fn answer_of(r: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("x-should-retry")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().await.unwrap())
}

#[tokio::test]
async fn a_waiting_openai_client_is_never_told_to_resend_an_edit_that_failed_or_was_cancelled() {
    // openai-python and the other Stainless SDKs resend 408, 409, 429 and 5xx unless the
    // answer says `x-should-retry: false`; every resend is a new edit.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(
        &out,
        &[
            "--in-flight",
            "1",
            "--max-steps",
            "1000",
            "--max-seeds",
            "64",
        ],
        &[],
    );
    let client = client();

    // A portrait upload whose refine would be taller than the 1536 px limit: refused at
    // submission naming `size` (the image header tells), so nothing is accepted and no
    // `x-should-retry` is needed (a 422 after the queue was the old behaviour).
    for size in ["1024", "1024x2048"] {
        let r = client
            .post(server.url("/v1/images/edits"))
            .multipart(form(
                &[
                    ("prompt", "x"),
                    ("seeds", "2"),
                    ("steps", "6"),
                    ("size", size),
                ],
                png(128, 256),
            ))
            .send()
            .await
            .unwrap();
        let (status, retry, body) = answer_of(r).await;
        assert_eq!((status, retry.as_deref()), (400, None), "{body}");
        assert_eq!(body["error"]["param"], "size", "{body}");
        assert_eq!(body["error"]["code"], "invalid_value", "{body}");
        assert!(journal(&out).is_empty(), "{body}");
    }

    // A long edit its client waits for, cancelled by a DELETE while it runs.
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), server.url("/v1/images/edits"));
        async move {
            let r = client
                .post(url)
                .multipart(form(&LONG, png(192, 128)))
                .send()
                .await
                .unwrap();
            answer_of(r).await
        }
    });
    // Its id, once the server has accepted it (no answer carries it before the end).
    let id = server.accepted_edit(1).await;
    events(&client, &server, &id, Some("step")).await;
    let r = client
        .delete(server.url(&format!("/v1/edits/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, retry, body) = tokio::time::timeout(HANG, waiting)
        .await
        .expect("the waiting client was never answered")
        .unwrap();
    assert_eq!((status, retry.as_deref()), (499, Some("false")), "{body}");
    assert_eq!(body["error"]["code"], "edit_cancelled", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&id),
        "{body}"
    );

    // A long edit whose client leaves while it runs: nobody else knows its id, so it is
    // cancelled (it would hold the worker for nobody, and a resend would run it twice).
    let leaving = tokio::spawn({
        let (client, url) = (client.clone(), server.url("/v1/images/edits"));
        async move {
            client
                .post(url)
                .multipart(form(&LONG, png(192, 128)))
                .send()
                .await
        }
    });
    let id = server.accepted_edit(2).await;
    events(&client, &server, &id, Some("step")).await;
    leaving.abort();
    let all = tokio::time::timeout(HANG, events(&client, &server, &id, None))
        .await
        .expect("the abandoned edit never ended");
    let last = &all[all.len() - 1];
    assert_eq!(last.event, "cancelled", "{last:?}");

    // One edit per call, each ended once.
    let records = journal(&out);
    let accepted: Vec<&Value> = records
        .iter()
        .filter(|r| r["record"] == "accepted")
        .collect();
    assert_eq!(accepted.len(), 2, "{records:?}");
    for a in accepted {
        assert_eq!(records_of(&records, "ended", a["id"].as_str().unwrap()), 1);
    }
}

/// The peak resident memory of process `pid`, in bytes (Linux).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test]
async fn image_decodes_are_bounded_so_big_uploads_do_not_pile_up_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("out"),
        &["--max-decodes", "2", "--in-flight", "1"],
        &[],
    );
    // 7000 x 7000 (49 MP, under the 50 MP cap): a 160 KB file, 147 MB decoded.
    let big = {
        let image = image::RgbImage::from_pixel(7000, 7000, image::Rgb([90, 120, 200]));
        let mut bytes = Vec::new();
        image
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    };
    assert!(big.len() < 2 << 20, "{} bytes", big.len());
    let client = client();
    let posts = (0..8).map(|_| {
        let (client, url, big) = (client.clone(), server.url("/v1/edits"), big.clone());
        async move {
            let r = client
                .post(url)
                .multipart(form(
                    &[("prompt", "x"), ("strategy", "random"), ("steps", "2")],
                    big,
                ))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    });
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|&s| s == 202), "{statuses:?}");
    // Eight decodes at once reach 750 MB here (up to 8 x 147 MB); two at a time and the
    // worker's own stay near 450 MB.
    let peak = peak_rss(server.pid());
    eprintln!("peak RSS of the server: {} MB", peak >> 20);
    assert!(peak < 640 << 20, "peak RSS {} MB", peak >> 20);
}

#[tokio::test]
async fn an_oversized_upload_is_drained_and_answered_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &["--max-upload-mb", "1"], &[]);
    let client = client();
    // 40 MB: far over the limit; the client must read the 413, not a broken pipe.
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&[("prompt", "x")], vec![7u8; 40 << 20]))
        .send()
        .await
        .expect("the 413 reaches the client");
    let (status, param, _) = refusal(r).await;
    assert_eq!((status, param.as_str()), (413, Some("image")));
    // 40 MB of prompt beside a small image, streamed (no declared length, so the server
    // reads up to its limit): the 413 names the field that crossed it.
    let chunks = (0..40).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1 << 20]));
    let prompt =
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(futures::stream::iter(chunks)));
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&[], vec![7u8; 1000]).part("prompt", prompt))
        .send()
        .await
        .expect("the 413 reaches the client");
    let (status, param, message) = refusal(r).await;
    assert_eq!((status, param.as_str()), (413, Some("prompt")), "{message}");
    assert!(message.contains("`prompt`"), "{message}");
    let r = client
        .post(server.url("/v1/edits"))
        .header("content-type", "application/json")
        .body(vec![b' '; 40 << 20])
        .send()
        .await
        .expect("the 413 reaches the client");
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn prompts_and_user_ids_beyond_their_limits_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = client();
    let long = "make it snow ".repeat(2_000);
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&[("prompt", &long)], png(64, 64)))
        .send()
        .await
        .unwrap();
    let (status, param, message) = refusal(r).await;
    assert_eq!((status, param.as_str()), (400, Some("prompt")), "{message}");
    assert!(message.contains("characters"), "{message}");
    let user = "u".repeat(10_000);
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&[("prompt", "x"), ("user", &user)], png(64, 64)))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "user");
    drop(server);
    let server = Server::start(&out, &["--max-prompt-chars", "10"], &[]);
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&[("prompt", "eleven char")], png(64, 64)))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "prompt");
    assert!(journal(&out).is_empty());
}

#[tokio::test]
async fn a_token_the_server_cannot_read_refuses_the_start_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // (flags, environment, the variable the refusal names)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["--token-env", "ICEDIT_TEST_NO_SUCH_VAR"],
            &[],
            "ICEDIT_TEST_NO_SUCH_VAR",
        ),
        (
            &["--token-env", "ICEDIT_TEST_BLANK"],
            &[("ICEDIT_TEST_BLANK", "  ")],
            "ICEDIT_TEST_BLANK",
        ),
        (&[], &[("ICEDIT_SERVE_TOKEN", "")], "ICEDIT_SERVE_TOKEN"),
    ];
    for (args, env, needle) in cases {
        let (code, stderr) = refused_start("127.0.0.1:0", &out, args, env);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{needle} not in: {stderr}");
    }
    // A variable that is set is used.
    let server = Server::start(
        &out,
        &["--token-env", "ICEDIT_TEST_TOKEN"],
        &[("ICEDIT_TEST_TOKEN", "t0k")],
    );
    let client = client();
    let r = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(server.url("/metrics"))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn a_server_reachable_from_other_machines_needs_a_token_or_insecure_no_auth() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, stderr) = refused_start("0.0.0.0:0", &out, &[], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    assert!(stderr.contains("ICEDIT_SERVE_TOKEN"), "{stderr}");
    // Either one lets it start.
    drop(Server::start_at(
        "0.0.0.0:0",
        &out,
        &["--insecure-no-auth"],
        &[],
    ));
    drop(Server::start_at(
        "0.0.0.0:0",
        &out,
        &[],
        &[("ICEDIT_SERVE_TOKEN", "t0k")],
    ));
}

/// Runs one short edit to the end; returns its id.
async fn finished_edit(client: &reqwest::Client, server: &Server) -> String {
    let id = submit(client, server, &SHORT).await;
    let all = events(client, server, &id, None).await;
    assert_eq!(all.last().unwrap().event, "done");
    id
}

#[tokio::test]
async fn the_files_route_never_follows_a_symlink_out_of_the_edit_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("key.txt"), "TOP-SECRET-7731").unwrap();
    let server = Server::start(&out, &[], &[]);
    let client = client();
    let id = finished_edit(&client, &server).await;
    let folder = out.join("edits").join(&id);
    std::os::unix::fs::symlink(secret.join("key.txt"), folder.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(&secret, folder.join("previews/leak")).unwrap();
    for path in ["leak.txt", "previews/leak/key.txt"] {
        let r = client
            .get(server.url(&format!("/v1/edits/{id}/files/{path}")))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(!text.contains("TOP-SECRET"), "{path}: {status} {text}");
        assert!(status.is_client_error(), "{path}: {status}");
    }
    // Its own files are still served.
    let r = client
        .get(server.url(&format!("/v1/edits/{id}/files/report.json")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn url_answers_name_the_server_not_the_clients_host_header() {
    let dir = tempfile::tempdir().unwrap();
    // With a token (without one, a loopback server refuses a foreign Host outright).
    let token = "t-host";
    let server = Server::start(
        &dir.path().join("out"),
        &[],
        &[("ICEDIT_SERVE_TOKEN", token)],
    );
    let client = client();
    let mut fields = SHORT.to_vec();
    fields.push(("response_format", "url"));
    let r: Value = client
        .post(server.url("/v1/images/edits"))
        .bearer_auth(token)
        .header("host", "evil.example")
        .multipart(form(&fields, png(64, 64)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = r["data"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(url.starts_with(&server.base), "{url}");
    // `--public-url` names the address clients reach it by (behind a proxy).
    drop(server);
    let server = Server::start(
        &dir.path().join("out"),
        &["--public-url", "https://edits.example.org/base"],
        &[],
    );
    let r: Value = client
        .post(server.url("/v1/images/edits"))
        .multipart(form(&fields, png(64, 64)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = r["data"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(
        url.starts_with("https://edits.example.org/base/v1/edits/"),
        "{url}"
    );
}

/// A loopback server without a token is reachable by every web page in this machine's
/// browser: a cross-site form POST needs no preflight, and DNS rebinding makes a page
/// same-origin. It refuses a foreign `Host` and a foreign `Origin` (403), and still
/// answers its own page and clients that are not web pages.
#[tokio::test]
async fn a_tokenless_loopback_server_refuses_other_sites_hosts_and_origins() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = client();
    let own = server.addr().to_string();
    // DNS rebinding: the page's own name, resolved to 127.0.0.1.
    for path in ["/v1/edits", "/healthz", "/"] {
        let r = client
            .get(server.url(path))
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden_host")),
            "{path}: {body}"
        );
    }
    // A cross-site form POST.
    let r = client
        .post(server.url("/v1/edits"))
        .header("origin", "http://evil.example")
        .multipart(form(&SHORT, png(64, 64)))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden_origin")),
        "{body}"
    );
    assert!(journal(&out).is_empty(), "{body}");
    let r = client
        .delete(server.url("/v1/edits/ed_0"))
        .header("origin", "http://evil.example:1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Its own page (Host and Origin its own), and a client with no Origin.
    let r = client
        .post(server.url("/v1/edits"))
        .header("host", &own)
        .header("origin", &server.base)
        .multipart(form(&SHORT, png(64, 64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let r = client
        .get(server.url("/v1/edits"))
        .header("host", own.replace("127.0.0.1", "localhost"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    submit(&client, &server, &SHORT).await;
    // With a token, the token is the guard: other hosts reach it (a proxy's name).
    drop(server);
    let server = Server::start(&out, &[], &[("ICEDIT_SERVE_TOKEN", "t")]);
    let r = client
        .get(server.url("/v1/edits"))
        .bearer_auth("t")
        .header("host", "edits.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `--judge none` runs only `random`: a request for a strategy that needs a judge is
/// refused naming `strategy` before it is journaled, not failed with a 422 after the queue.
#[tokio::test]
async fn a_server_without_a_judge_refuses_strategies_that_need_one_at_submission() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--judge", "none", "--strategy", "random"], &[]);
    let client = client();
    for strategy in ["tournament", "best-of-n", "early-filter"] {
        let r = client
            .post(server.url("/v1/edits"))
            .multipart(form(
                &[
                    ("prompt", "x"),
                    ("strategy", strategy),
                    ("seeds", "4"),
                    ("size", "64"),
                ],
                png(64, 64),
            ))
            .send()
            .await
            .unwrap();
        let (status, param, message) = refusal(r).await;
        assert_eq!(
            (status, param.as_str()),
            (400, Some("strategy")),
            "{message}"
        );
        assert!(!message.contains("--"), "{message}");
    }
    assert!(journal(&out).is_empty());
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(
            &[
                ("prompt", "x"),
                ("strategy", "random"),
                ("steps", "6"),
                ("size", "64"),
            ],
            png(64, 64),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn a_budget_larger_than_the_seed_limit_needs_is_capped_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &["--max-seeds", "8"], &[]);
    let client = client();
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(
            &[
                ("prompt", "x"),
                ("budget_nfe", "5000"),
                ("steps", "6"),
                ("size", "64"),
            ],
            png(64, 64),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let s: Value = client
        .get(server.url(&format!("/v1/edits/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["strategy"]["seeds"], 8, "{s}");
    assert_eq!(s["strategy"]["budget_nfe"], 5000, "{s}");
}

#[tokio::test]
async fn fields_of_the_wrong_type_or_encoding_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = client();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png(64, 64));
    for (field, value) in [
        ("prompt", Value::Null),
        ("prompt", json!(["make it snow"])),
        ("prompt", json!({"text": "make it snow"})),
        ("prompt", json!(42)),
        ("size", json!({"w": 64})),
        ("n", json!([1, 2])),
        ("strategy", json!(["best-of-n"])),
    ] {
        let mut body = json!({"prompt": "make it snow", "image": b64});
        body[field] = value.clone();
        let r = client
            .post(server.url("/v1/edits"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, param, message) = refusal(r).await;
        assert_eq!(
            (status, param.as_str()),
            (400, Some(field)),
            "{field}: {value}: {message}"
        );
    }
    // A prompt that is not UTF-8 is refused, not patched.
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png(64, 64)).file_name("x.png"),
        )
        .part(
            "prompt",
            reqwest::multipart::Part::bytes(vec![b'a', 0xff, 0xfe, b'b']),
        );
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, param, message) = refusal(r).await;
    assert_eq!((status, param.as_str()), (400, Some("prompt")), "{message}");
    assert!(journal(&out).is_empty());
}

#[tokio::test]
async fn tokens_in_the_query_are_percent_decoded_and_the_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let token = "a+b/c==";
    let server = Server::start(
        &dir.path().join("out"),
        &[],
        &[("ICEDIT_SERVE_TOKEN", token)],
    );
    let client = client();
    let status = |r: reqwest::Response| r.status().as_u16();
    let get = |path: &str| client.get(server.url(path));
    assert_eq!(
        status(
            get("/metrics?access_token=a%2Bb%2Fc%3D%3D")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            get("/metrics?x=1&access_token=a%2Bb%2Fc%3D%3D")
                .send()
                .await
                .unwrap()
        ),
        200
    );
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = get("/metrics")
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(status(r), 200, "{scheme}");
    }
    assert_eq!(
        status(get("/metrics?access_token=a%2Bb").send().await.unwrap()),
        401
    );
    assert_eq!(
        status(
            get("/metrics")
                .header("authorization", "Basic a+b/c==")
                .send()
                .await
                .unwrap()
        ),
        401
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_openai_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &[], &[]);
    let client = client();
    for (method, path, code) in [
        (reqwest::Method::GET, "/v1/nope", 404),
        (reqwest::Method::GET, "/v1/images/generations", 404),
        (reqwest::Method::PUT, "/v1/edits", 405),
        (reqwest::Method::DELETE, "/healthz", 405),
    ] {
        let r = client
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code, "{method} {path}");
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(
            body["error"]["message"].as_str().unwrap().contains(path),
            "{body}"
        );
        assert!(body["error"]["type"].is_string(), "{body}");
    }
}

#[tokio::test]
async fn images_whose_panel_cannot_be_made_are_refused_at_submission() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = client();
    // 4096 x 8 at width 64: its height rounds to 0. 16 x 2000 at 512: 64000 px high.
    for (image, size) in [(png(4096, 8), "64x64"), (png(16, 2000), "512x512")] {
        let r = client
            .post(server.url("/v1/edits"))
            .multipart(form(&[("prompt", "x"), ("size", size)], image))
            .send()
            .await
            .unwrap();
        let (status, param, message) = refusal(r).await;
        assert_eq!((status, param.as_str()), (400, Some("image")), "{message}");
    }
    assert!(journal(&out).is_empty());
}
