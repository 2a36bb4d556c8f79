//! Properties of the server under random requests, like tests/properties.rs for the CLI:
//! whatever fields, values, headers and bodies a client sends, the server never panics and
//! never answers 5xx, every refusal is in OpenAI's error shape, and a refusal of a field
//! names it. And a chaos test: `kill -9` in the middle of a burst of good and bad
//! requests, a restart, and every acknowledged edit ends exactly once.
//!
//! One server per test (its "listening on" line gives the port); the property cases run
//! against it one after another. Nothing waits on the clock.

mod support;

use std::collections::BTreeSet;

use base64::Engine as _;
use icedit_scale::engine::strategy::StrategyField;
use icedit_scale::serve::request::{IGNORED, KNOWN};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use support::server::{events, form, journal, png, records_of, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every field a request may carry (OpenAI's and ours: the server's own list, so a knob
/// added there is fuzzed here too), the ones accepted and ignored, and one the server does
/// not know. The image travels apart.
fn fields() -> Vec<&'static str> {
    let mut fields: Vec<&'static str> = KNOWN.iter().copied().filter(|f| *f != "image").collect();
    fields.extend(IGNORED);
    fields.push("bogus_field");
    fields
}

/// Values as clients and fuzzers write them: numbers small and huge, negative, special,
/// words the fields know, and any text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..40).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| x.to_string()),
        prop::sample::select(vec![
            "NaN",
            "inf",
            "-inf",
            "-0",
            "1e400",
            "0x10",
            "",
            " 8",
            "1_000",
            "٣",
            "true",
            "false",
            "null",
            "[1, 2]",
            "{}",
            "[]",
            "64x64",
            "128x128",
            "auto",
            "1536x1536",
            "url",
            "b64_json",
            "png",
            "jpeg",
            "random",
            "best-of-n",
            "early-filter",
            "tournament",
            "successive-halving",
            "adaptive",
            "1,2,3",
            "3,3",
            "-1",
            "4.5",
        ])
        .prop_map(str::to_string),
        "[a-z0-9.,x -]{0,10}",
        "\\PC{0,16}",
    ]
}

/// What the request carries as its image.
#[derive(Debug, Clone)]
enum Image {
    Png,
    Missing,
    Garbage(Vec<u8>),
    /// A PNG cut after its header.
    Truncated,
    /// 2048 x 16: at a small panel width its height rounds to 0.
    Wide,
}

fn image() -> impl Strategy<Value = Image> {
    prop_oneof![
        6 => Just(Image::Png),
        1 => Just(Image::Missing),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Image::Garbage),
        1 => Just(Image::Truncated),
        1 => Just(Image::Wide),
    ]
}

fn image_bytes(image: &Image) -> Option<Vec<u8>> {
    match image {
        Image::Png => Some(png(64, 48)),
        Image::Missing => None,
        Image::Garbage(bytes) => Some(bytes.clone()),
        Image::Truncated => Some(png(64, 48)[..60].to_vec()),
        Image::Wide => Some(png(2048, 16)),
    }
}

/// One random edit request.
#[derive(Debug, Clone)]
struct EditRequest {
    json: bool,
    images_route: bool,
    fields: Vec<(&'static str, String)>,
    image: Image,
    authorization: Option<String>,
}

fn edit_request() -> impl Strategy<Value = EditRequest> {
    (
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::collection::vec((prop::sample::select(fields()), value()), 0..5),
        image(),
        prop::option::of("\\PC{0,20}"),
    )
        .prop_map(|(json, images_route, picks, image, authorization)| {
            // A prompt unless the picks set one; every field once.
            let mut fields: Vec<(&'static str, String)> = Vec::new();
            for (k, v) in picks {
                if !fields.iter().any(|(f, _)| *f == k) {
                    fields.push((k, v));
                }
            }
            if !fields.iter().any(|(f, _)| *f == "prompt") {
                fields.push(("prompt", "make the sky night".into()));
            }
            EditRequest {
                json,
                images_route,
                fields,
                image,
                authorization,
            }
        })
}

/// A field value as JSON: what it parses as when it is JSON (a number, a list), else text.
fn json_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()))
}

async fn send_edit(
    client: &reqwest::Client,
    server: &Server,
    r: &EditRequest,
) -> reqwest::Response {
    let path = if r.images_route {
        "/v1/images/edits"
    } else {
        "/v1/edits"
    };
    let mut req = client.post(server.url(path));
    if let Some(a) = &r.authorization {
        if let Ok(v) = reqwest::header::HeaderValue::from_str(a) {
            req = req.header("authorization", v);
        }
    }
    let image = image_bytes(&r.image);
    if r.json {
        let mut body = serde_json::Map::new();
        for (k, v) in &r.fields {
            body.insert(k.to_string(), json_value(v));
        }
        if let Some(bytes) = image {
            body.insert(
                "image".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
        req = req.json(&body);
    } else {
        let mut form = reqwest::multipart::Form::new();
        if let Some(bytes) = image {
            form = form.part(
                "image",
                reqwest::multipart::Part::bytes(bytes).file_name("x.png"),
            );
        }
        for (k, v) in &r.fields {
            form = form.text(k.to_string(), v.clone());
        }
        req = req.multipart(form);
    }
    req.send().await.expect("an answer")
}

/// A request's answer: its status and, for errors, the OpenAI error object.
async fn answer(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

fn the_server(out: &std::path::Path) -> Server {
    Server::start(
        out,
        &[
            "--max-queue",
            "4",
            "--max-seeds",
            "3",
            "--max-steps",
            "8",
            "--seeds",
            "2",
            "--steps",
            "6",
            "--probe-steps",
            "2",
            "--keep",
            "1",
            "--max-prompt-chars",
            "200",
            "--header-timeout-s",
            "2",
        ],
        &[],
    )
}

#[test]
fn random_requests_never_get_a_5xx_and_every_refusal_names_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = the_server(&out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = icedit_scale::http::client_builder().build().unwrap();
    let knobs: BTreeSet<&str> = StrategyField::ALL.iter().map(|f| f.key()).collect();
    let accepted = std::sync::Mutex::new(Vec::<String>::new());
    let mut runner = TestRunner::new(Config {
        cases: 160,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&edit_request(), |r| {
            let (status, body) = rt.block_on(async {
                let response = send_edit(&client, &server, &r).await;
                answer(response).await
            });
            prop_assert!(status < 500, "{r:?} -> {status} {body}");
            if status < 300 {
                let id = body["id"]
                    .as_str()
                    .or(body["icedit"]["id"].as_str())
                    .unwrap_or_else(|| panic!("{body}"));
                accepted.lock().unwrap().push(id.to_string());
                return Ok(());
            }
            let error = &body["error"];
            prop_assert!(error["message"].is_string(), "{r:?} -> {status} {body}");
            prop_assert!(error["type"].is_string(), "{r:?} -> {status} {body}");
            if matches!(status, 400 | 413) {
                // A refusal names a field the request sent, the image, or a strategy knob
                // its fields set (M above the N it asked for).
                let param = error["param"].as_str();
                prop_assert!(param.is_some(), "{r:?} -> {status} {body}");
                let param = param.unwrap();
                let sent = r.fields.iter().any(|(k, _)| *k == param);
                prop_assert!(
                    sent || param == "image" || knobs.contains(param),
                    "{r:?} -> {status} names {param}"
                );
                let message = error["message"].as_str().unwrap();
                prop_assert!(message.contains(param), "{param} not in {message}");
            } else {
                prop_assert!(
                    matches!(status, 401 | 404 | 409 | 429),
                    "{r:?} -> {status} {body}"
                );
            }
            Ok(())
        })
        .unwrap();

    // Every edit the server took ends, none as a failure the request could have caused.
    let accepted = accepted.into_inner().unwrap();
    rt.block_on(async {
        for id in &accepted {
            let all = events(&client, &server, id, None).await;
            assert_eq!(all.last().unwrap().event, "done", "{id}: {all:?}");
        }
        let health = client.get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    });
    let log = server.stop_and_log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!accepted.is_empty(), "no random request was accepted");
}

/// A random request of any route, method, headers and body.
#[derive(Debug, Clone)]
struct RawRequest {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn raw_request() -> impl Strategy<Value = RawRequest> {
    let path = prop_oneof![
        Just("/v1/edits".to_string()),
        Just("/v1/images/edits".to_string()),
        Just("/healthz".to_string()),
        Just("/metrics".to_string()),
        Just("/".to_string()),
        "[a-z0-9]{1,12}".prop_map(|id| format!("/v1/edits/ed_{id}")),
        "[a-z0-9]{1,12}".prop_map(|id| format!("/v1/edits/ed_{id}/events")),
        ("[a-z0-9]{1,12}", "[a-z0-9./%]{0,16}")
            .prop_map(|(id, p)| format!("/v1/edits/ed_{id}/files/{p}")),
        "/[a-z0-9/._%?=&-]{0,24}",
    ];
    let header = prop_oneof![
        prop::sample::select(vec![
            "application/json",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "multipart/form-data; boundary=",
            "text/plain",
            "application/x-www-form-urlencoded",
            "image/png",
        ])
        .prop_map(|v| ("content-type", v.to_string())),
        "\\PC{0,24}".prop_map(|v| ("authorization", v)),
        "[0-9a-z-]{0,12}".prop_map(|v| ("last-event-id", v)),
        "\\PC{0,24}".prop_map(|v| ("x-anything", v)),
    ];
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "\\PC{0,64}".prop_map(String::into_bytes),
        Just(b"{\"prompt\": \"x\", \"image\": \"%%%\"}".to_vec()),
        Just(b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--x--".to_vec()),
        Just(b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n".to_vec()),
    ];
    (
        prop::sample::select(vec!["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"]),
        path,
        prop::collection::vec(header, 0..4),
        body,
    )
        .prop_map(|(method, path, headers, body)| RawRequest {
            method,
            path,
            headers,
            body,
        })
}

#[test]
fn random_routes_headers_and_bodies_never_get_a_5xx_and_errors_keep_their_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = the_server(&dir.path().join("out"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = icedit_scale::http::client_builder().build().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 160,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&raw_request(), |r| {
            let Ok(method) = reqwest::Method::from_bytes(r.method.as_bytes()) else {
                return Ok(());
            };
            let mut req = client.request(method, server.url(&r.path));
            for (k, v) in &r.headers {
                if let Ok(v) = reqwest::header::HeaderValue::from_str(v) {
                    req = req.header(*k, v);
                }
            }
            let sent = rt.block_on(req.body(r.body.clone()).send());
            // A path reqwest cannot send is not the server's to answer.
            let Ok(response) = sent else { return Ok(()) };
            let status = response.status().as_u16();
            let (_, body) = rt.block_on(answer(response));
            prop_assert!(status < 500, "{r:?} -> {status} {body}");
            if status >= 400 && r.method != "HEAD" {
                prop_assert!(
                    body["error"]["message"].is_string(),
                    "{r:?} -> {status} {body}"
                );
            }
            Ok(())
        })
        .unwrap();
    // Bytes that are not HTTP at all: answered 400 or closed; the server keeps serving.
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
            rt.block_on(async {
                let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
                let _ = stream.write_all(&bytes).await;
                let _ = stream.write_all(b"\r\n\r\n").await;
                let _ = stream.shutdown().await;
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer).await;
                let text = String::from_utf8_lossy(&answer);
                assert!(
                    text.is_empty()
                        || text.starts_with("HTTP/1.1 4")
                        || text.starts_with("HTTP/1.1 2"),
                    "{text}"
                );
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        let health = client.get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    });
    let log = server.stop_and_log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The edit of a good request in the burst.
const GOOD: [(&str, &str); 4] = [
    ("prompt", "make the sky night"),
    ("seeds", "2"),
    ("steps", "6"),
    ("size", "64x64"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_a_burst_of_good_and_bad_requests_loses_and_repeats_no_acknowledged_edit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--in-flight", "2", "--max-queue", "200"], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..60 {
        let (client, url, acks) = (client.clone(), server.url("/v1/edits"), acks.clone());
        burst.spawn(async move {
            let (fields, image): (Vec<(&str, &str)>, Vec<u8>) = match i % 4 {
                // Refused: a bad value, no prompt, not an image.
                1 => (vec![("prompt", "x"), ("seeds", "0")], png(64, 64)),
                2 => (vec![("size", "64x64")], png(64, 64)),
                3 if i % 8 == 3 => (GOOD.to_vec(), b"not an image".to_vec()),
                _ => (GOOD.to_vec(), png(64, 64)),
            };
            let sent = client
                .post(url)
                .multipart(form(&fields, image))
                .send()
                .await;
            let Ok(r) = sent else { return None };
            if r.status() != 202 {
                return None;
            }
            let body: Value = r.json().await.ok()?;
            let id = body["id"].as_str()?.to_string();
            let _ = acks.send(id.clone());
            Some(id)
        });
    }
    // Kill it once some edits are acknowledged and the rest of the burst is in flight.
    for _ in 0..10 {
        acked.recv().await.expect("acknowledgements");
    }
    server.kill_9();
    let mut ids = Vec::new();
    while let Some(done) = burst.join_next().await {
        ids.extend(done.unwrap());
    }
    assert!(ids.len() >= 10, "{ids:?}");

    let server = Server::start(&out, &["--in-flight", "2"], &[]);
    let records = journal(&out);
    let accepted: BTreeSet<String> = records
        .iter()
        .filter(|r| r["record"] == "accepted")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        assert!(
            accepted.contains(id),
            "acknowledged {id} is not in the journal"
        );
    }
    // Every accepted edit (acknowledged or not) runs to its end after the restart.
    for id in &accepted {
        let all = events(&client, &server, id, None).await;
        assert_eq!(all.last().unwrap().event, "done", "{id}: {all:?}");
    }
    let records = journal(&out);
    for id in &accepted {
        assert_eq!(records_of(&records, "accepted", id), 1, "{id}");
        assert_eq!(
            records_of(&records, "ended", id),
            1,
            "{id} ends exactly once"
        );
    }
    let ended: BTreeSet<&str> = records
        .iter()
        .filter(|r| r["record"] == "ended")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(ended.iter().all(|id| accepted.contains(*id)));
}
