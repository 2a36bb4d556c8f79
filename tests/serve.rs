//! `serve` end to end on the testbed generator and judge: the server binary runs as a child
//! process and is driven over HTTP like any client. Nothing here waits on the clock: the
//! tests read the server's "listening on" line to learn its port and follow each edit's
//! events to know where it is.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use support::server::{events, events_after, form, journal, png, submit, Server, Sse};

fn ints(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[tokio::test]
async fn the_openai_python_clients_request_gets_an_openai_shaped_answer() {
    // The exact bytes openai-python 3.60 sends (tests/fixtures/serve/make_openai_request.py),
    // with its bearer token, which this server is told to require.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/serve");
    let body = std::fs::read(fixtures.join("openai_request.body")).unwrap();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("openai_request.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "sk-test-not-a-real-key";
    let server = Server::start(
        &dir.path().join("out"),
        &[],
        &[("ICEDIT_SERVE_TOKEN", token)],
    );
    let client = icedit_scale::http::client_builder().build().unwrap();
    let r = client
        .post(server.url(meta["path"].as_str().unwrap()))
        .header(
            "content-type",
            meta["headers"]["content-type"].as_str().unwrap(),
        )
        .header(
            "authorization",
            meta["headers"]["authorization"].as_str().unwrap(),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert!(answer["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(answer["output_format"], "png");
    let icedit = &answer["icedit"];
    let finished = icedit["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "completed")
        .count();
    // n = 2: the pick and the next finished candidate, when two finished.
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), finished.min(2));
    assert!(!data.is_empty());
    for item in data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(item["b64_json"].as_str().unwrap())
            .unwrap();
        let image = image::load_from_memory(&bytes).unwrap();
        assert_eq!(image.width(), 256, "size 256x192 sets the panel width");
    }
    // The fields the request carried beyond OpenAI's reached the strategy.
    assert_eq!(icedit["candidates"].as_array().unwrap().len(), 4);
    let nfe = icedit["nfe"].as_u64().unwrap();
    assert!(nfe > 0 && nfe < icedit["best_of_n_nfe"].as_u64().unwrap());
    assert_eq!(icedit["best_of_n_nfe"], 4 * 12);
    let pick = icedit["pick"]["index"].as_u64().unwrap();
    // The pick's VIE record: a score, or the judge's failure as it happened (the testbed
    // judge fails 2% of calls by design; this scene's scoring is one of them).
    let vie = &icedit["vie"];
    assert!(
        vie["ok"]["overall"].is_number() || vie["failed"].is_object(),
        "{icedit}"
    );
    let report: Value = client
        .get(server.url(icedit["report_url"].as_str().unwrap()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["pick"]["index"].as_u64(), Some(pick));
    assert_eq!(report["strategy"]["probe_steps"], 3);
    // The token never reaches the log.
    assert!(!server.stop_and_log().contains(token));
}

#[tokio::test]
async fn a_size_wider_than_the_edit_answers_with_the_refined_images_at_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &[], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    for format in ["url", "b64_json"] {
        // 576 is wider than the edit's 512: the pick and (refine_best 2) one runner-up
        // are refined to it; n = 3 returns the third finished candidate too.
        let r = client
            .post(server.url("/v1/images/edits"))
            .multipart(form(
                &[
                    ("prompt", "x"),
                    ("strategy", "best-of-n"),
                    ("seeds", "3"),
                    ("steps", "6"),
                    ("n", "3"),
                    ("size", "576"),
                    ("refine_best", "2"),
                    ("response_format", format),
                ],
                png(192, 128),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answer: Value = r.json().await.unwrap();
        let data = answer["data"].as_array().unwrap();
        assert_eq!(data.len(), 3, "{answer}");
        let mut images = Vec::new();
        for item in data {
            let bytes = match format {
                "url" => {
                    let url = item["url"].as_str().unwrap();
                    client
                        .get(url)
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap()
                        .to_vec()
                }
                _ => base64::engine::general_purpose::STANDARD
                    .decode(item["b64_json"].as_str().unwrap())
                    .unwrap(),
            };
            images.push(image::load_from_memory(&bytes).unwrap());
        }
        if format == "url" {
            let url = data[0]["url"].as_str().unwrap();
            assert!(url.ends_with("/files/final.png"), "{url}");
        }
        // The pick is the refined final.png, and `size` is its real size.
        let pick = &images[0];
        assert_eq!(pick.width(), 576);
        assert_eq!(
            answer["size"],
            format!("{}x{}", pick.width(), pick.height())
        );
        let widths: Vec<u32> = images.iter().map(|i| i.width()).collect();
        let mut sorted = widths.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [512, 576, 576], "{widths:?}");
    }
}

/// `size`'s height follows the image: one the image does not have at that width (or its
/// refine at a wider one) is refused naming `size` before the edit is queued or journaled.
#[tokio::test]
async fn a_size_height_the_image_does_not_have_is_refused_before_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    let post = |size: &'static str, image: Vec<u8>| {
        client
            .post(server.url("/v1/edits"))
            .multipart(form(
                &[
                    ("prompt", "x"),
                    ("seeds", "2"),
                    ("steps", "6"),
                    ("size", size),
                ],
                image,
            ))
            .send()
    };
    for (size, image) in [
        ("64x128", png(64, 64)),
        ("1024", png(128, 256)),
        ("1024x2048", png(128, 256)),
        ("576x576", png(192, 128)),
    ] {
        let r = post(size, image).await.unwrap();
        assert_eq!(r.status(), 400, "{size}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["param"], "size", "{size}: {body}");
        assert_eq!(body["error"]["code"], "invalid_value", "{size}: {body}");
        assert!(journal(&out).is_empty(), "{size}: {body}");
    }
    // The image's own height at that width is accepted, as is the width alone.
    for (size, image) in [
        ("64x64", png(64, 64)),
        ("64", png(64, 64)),
        ("128x80", png(192, 128)),
    ] {
        let r = post(size, image).await.unwrap();
        assert_eq!(r.status(), 202, "{size}: {}", r.text().await.unwrap());
    }
}

/// The memory plan covers refines up to `--max-refine` (a square panel of that width); a
/// request whose refine has more pixels is refused before the queue, naming the field that
/// asked for it, and `--max-refine 0` refuses every refine. A default `--refine` wider than
/// `--max-refine` stops the start.
#[tokio::test]
async fn a_refine_beyond_what_the_server_planned_is_refused_before_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let client = icedit_scale::http::client_builder().build().unwrap();
    for (max_refine, refused, accepted) in [
        (
            "576",
            &[("size", "640"), ("refine", "640")][..],
            &[("size", "576")][..],
        ),
        (
            "0",
            &[("size", "576"), ("refine", "576")][..],
            &[("size", "512")][..],
        ),
    ] {
        let out = dir.path().join(format!("out-{max_refine}"));
        let server = Server::start(&out, &["--max-refine", max_refine], &[]);
        let post = |field: &'static str, value: &'static str| {
            client
                .post(server.url("/v1/edits"))
                .multipart(form(
                    &[
                        ("prompt", "x"),
                        ("seeds", "2"),
                        ("steps", "6"),
                        (field, value),
                    ],
                    png(64, 64),
                ))
                .send()
        };
        for &(field, value) in refused {
            let r = post(field, value).await.unwrap();
            assert_eq!(
                r.status(),
                400,
                "--max-refine {max_refine}: {field} {value}"
            );
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["param"], field, "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            let expected = if max_refine == "0" {
                "does not refine"
            } else {
                "more than the 576x576 this server planned for"
            };
            assert!(message.contains(expected), "{message}");
        }
        assert!(journal(&out).is_empty());
        for &(field, value) in accepted {
            let r = post(field, value).await.unwrap();
            assert_eq!(
                r.status(),
                202,
                "{field} {value}: {}",
                r.text().await.unwrap()
            );
        }
    }
    let start = std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .args(["serve", "--refine", "768", "--max-refine", "576", "--out"])
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&start.stderr);
    assert_eq!(start.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--refine 768 is wider than --max-refine 576"),
        "{stderr}"
    );
}

/// `GET /v1/edits/{id}` shows what the client asked for under the request's names, and the
/// same after a restart (a client sent there by the retry table learns its `n`, `size` and
/// format back).
#[tokio::test]
async fn an_edit_shows_its_request_before_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    let fields = [
        ("prompt", "make the sky night"),
        ("n", "3"),
        ("size", "128x80"),
        ("response_format", "url"),
        ("live_previews", "true"),
        ("user", "user-7"),
        ("strategy", "best-of-n"),
        ("seeds", "3"),
        ("seed", "11"),
        ("steps", "6"),
    ];
    let id = submit(&client, &server, &fields).await;
    events(&client, &server, &id, Some("done")).await;
    let get = |server: &Server| {
        let url = server.url(&format!("/v1/edits/{id}"));
        let client = client.clone();
        async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let before = get(&server).await;
    let request = &before["request"];
    assert_eq!(request["prompt"], "make the sky night", "{before}");
    assert_eq!(request["n"], 3, "{before}");
    assert_eq!(request["size"], "128x80", "{before}");
    assert_eq!(request["response_format"], "url", "{before}");
    assert_eq!(request["live_previews"], true, "{before}");
    assert_eq!(request["user"], "user-7", "{before}");
    assert_eq!(request["strategy"], "best-of-n", "{before}");
    assert_eq!(
        (request["seeds"].as_u64(), request["seed"].as_u64()),
        (Some(3), Some(11))
    );
    assert_eq!(request["steps"], 6, "{before}");
    drop(server);
    let server = Server::start(&out, &[], &[]);
    let after = get(&server).await;
    assert_eq!(after["request"], before["request"]);
}

/// A tournament's stream shows what it judges: every seed's short run (its image, written
/// before the event) and each comparison's decision in words.
#[tokio::test]
async fn a_tournament_streams_each_short_run_and_each_decision() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &[], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    let id = submit(
        &client,
        &server,
        &[
            ("prompt", "make the sky night"),
            ("strategy", "tournament"),
            ("seeds", "4"),
            ("probe_steps", "2"),
            ("steps", "8"),
            ("size", "128"),
        ],
    )
    .await;
    let all = events(&client, &server, &id, None).await;
    let short: Vec<&Sse> = all.iter().filter(|e| e.event == "short_run").collect();
    assert_eq!(short.len(), 4, "{all:?}");
    for e in &short {
        let url = e.data["url"].as_str().unwrap();
        let r = client.get(server.url(url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
    }
    let compared: Vec<&Sse> = all.iter().filter(|e| e.event == "compared").collect();
    assert_eq!(compared.len(), 3, "{all:?}");
    assert!(
        compared
            .iter()
            .all(|e| !e.data["decision"].as_str().unwrap().is_empty()),
        "{compared:?}"
    );
    assert_eq!(all.last().unwrap().event, "done");
}

#[tokio::test]
async fn an_async_edit_streams_every_event_in_order_and_accounts_for_every_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &[], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    let id = submit(
        &client,
        &server,
        &[
            ("prompt", "make the sky night"),
            ("strategy", "early-filter"),
            ("seeds", "6"),
            ("probe_steps", "3"),
            ("keep", "2"),
            ("steps", "10"),
            ("size", "128"),
            ("live_previews", "true"),
        ],
    )
    .await;
    let all = events(&client, &server, &id, None).await;
    // Numbered 0, 1, 2, ... without a gap; queued first, done last.
    assert!(
        all.iter().enumerate().all(|(i, e)| e.id == i as u64),
        "{all:?}"
    );
    let names: Vec<&str> = all.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(&names[..3], ["queued", "started", "spawned"]);
    assert_eq!(names.last(), Some(&"done"));
    let spawned = &all[2].data["candidates"];
    let candidates: BTreeSet<usize> = spawned
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(candidates, (0..6).collect());
    // Probe steps 1..=3 for all six, then the survivors' completion steps 4..=10.
    let steps: Vec<(String, usize, usize)> = all
        .iter()
        .filter(|e| e.event == "step")
        .map(|e| {
            (
                e.data["phase"].as_str().unwrap().to_string(),
                e.data["step"].as_u64().unwrap() as usize,
                e.data["candidates"].as_array().unwrap().len(),
            )
        })
        .collect();
    let probe: Vec<usize> = steps
        .iter()
        .filter(|s| s.0 == "probe")
        .map(|s| s.1)
        .collect();
    assert_eq!(probe, [1, 2, 3]);
    assert!(steps.iter().filter(|s| s.0 == "probe").all(|s| s.2 == 6));
    // A live preview of each stepped candidate at each step.
    let lives = all.iter().filter(|e| e.event == "live").count();
    assert_eq!(lives, steps.iter().map(|s| s.2).sum::<usize>());
    // Every candidate screened once at step 3, then split into kept and dropped.
    let screened: BTreeSet<usize> = all
        .iter()
        .filter(|e| e.event == "screened")
        .map(|e| {
            assert_eq!(e.data["step"], 3);
            e.data["candidate"].as_u64().unwrap() as usize
        })
        .collect();
    assert_eq!(screened, candidates);
    let selected: Vec<&Sse> = all.iter().filter(|e| e.event == "selected").collect();
    assert_eq!(selected.len(), 1);
    let (kept, dropped) = (
        ints(&selected[0].data["kept"]),
        ints(&selected[0].data["dropped"]),
    );
    let union: BTreeSet<usize> = kept.iter().chain(&dropped).copied().collect();
    assert_eq!(union, candidates);
    assert!(!kept.is_empty() && kept.len() <= 2);
    // The kept ones complete (steps 4..=10), finish and are scored; nothing else is.
    let complete: Vec<usize> = steps
        .iter()
        .filter(|s| s.0 == "complete")
        .map(|s| s.1)
        .collect();
    assert_eq!(complete, (4..=10).collect::<Vec<_>>());
    let finished: BTreeSet<usize> = all
        .iter()
        .filter(|e| e.event == "finished")
        .map(|e| e.data["candidate"].as_u64().unwrap() as usize)
        .collect();
    let scored: BTreeSet<usize> = all
        .iter()
        .filter(|e| e.event == "scored")
        .map(|e| e.data["candidate"].as_u64().unwrap() as usize)
        .collect();
    let kept_set: BTreeSet<usize> = kept.iter().copied().collect();
    assert_eq!(finished, kept_set);
    assert_eq!(scored, kept_set);
    // The done event accounts for all six with the statuses the stream implied.
    let done = &all.last().unwrap().data;
    let statuses: BTreeMap<usize, String> = done["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().unwrap() as usize,
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for i in 0..6 {
        let expected = if kept_set.contains(&i) {
            "completed"
        } else {
            "pruned"
        };
        assert_eq!(statuses[&i], expected, "candidate {i}");
    }
    assert!(kept_set.contains(&(done["pick"]["index"].as_u64().unwrap() as usize)));
    // Every file an event names exists.
    for e in &all {
        if let Some(url) = e.data["url"].as_str().or(e.data["final_url"].as_str()) {
            let r = client.get(server.url(url)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
        }
    }
    let status: Value = client
        .get(server.url(&format!("/v1/edits/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "done");
    assert_eq!(status["report"]["nfe"]["total"], done["nfe"]);
    // A client that reconnects with Last-Event-ID gets the rest only.
    let r = client
        .get(server.url(&format!("/v1/edits/{id}/events")))
        .header("last-event-id", (all.len() - 2).to_string())
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("event:").count(), 1, "{text}");
    assert!(text.contains("event: done"));
    // The largest id there is: the client has everything (no overflow, no replay).
    let r = client
        .get(server.url(&format!("/v1/edits/{id}/events")))
        .header("last-event-id", u64::MAX.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("event:").count(), 0, "{text}");
    // Paths never leave the edit's folder.
    let r = client
        .get(server.url(&format!("/v1/edits/{id}/files/../journal.jsonl")))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
}

#[tokio::test]
async fn a_full_queue_answers_429_and_queued_and_running_edits_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("out"),
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
    let client = icedit_scale::http::client_builder().build().unwrap();
    // A: 64 full runs of 1000 steps (minutes of work), so it is still running when we
    // cancel it; a cancel takes effect within one step.
    let long = [
        ("prompt", "x"),
        ("strategy", "best-of-n"),
        ("seeds", "64"),
        ("steps", "1000"),
        ("size", "128"),
    ];
    let a = submit(&client, &server, &long).await;
    events(&client, &server, &a, Some("step")).await; // A is running: the queue is empty
    let b = submit(&client, &server, &long).await; // waits: the queue is full
    let r = client
        .post(server.url("/v1/edits"))
        .multipart(form(&long, png(64, 64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    let health: Value = client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["queue_depth"], 1);

    // Cancelling the queued edit ends it at once; the running one at a step boundary.
    let r: Value = client
        .delete(server.url(&format!("/v1/edits/{b}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "cancelled");
    let r: Value = client
        .delete(server.url(&format!("/v1/edits/{a}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "running");
    let a_events = events(&client, &server, &a, None).await;
    assert_eq!(a_events.last().unwrap().event, "cancelled");
    let b_events = events(&client, &server, &b, None).await;
    let b_names: Vec<&str> = b_events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(b_names, ["queued", "cancelled"]);
    for id in [&a, &b] {
        let s: Value = client
            .get(server.url(&format!("/v1/edits/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(s["status"], "cancelled");
        let r = client
            .delete(server.url(&format!("/v1/edits/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409, "an edit that is over cannot be cancelled");
    }
    // Room again: a new edit is accepted.
    submit(
        &client,
        &server,
        &[
            ("prompt", "x"),
            ("seeds", "2"),
            ("steps", "6"),
            ("size", "64"),
        ],
    )
    .await;
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("icedit_edits_total{status=\"cancelled\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_requests_get_401_400_and_413_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-3f9a1c";
    let server = Server::start(
        &dir.path().join("out"),
        &[
            "--max-upload-mb",
            "1",
            "--max-megapixels",
            "1",
            "--max-seeds",
            "8",
        ],
        &[("ICEDIT_SERVE_TOKEN", token)],
    );
    let client = icedit_scale::http::client_builder().build().unwrap();
    let ok_fields = [("prompt", "make it snow")];
    // 401 without the token or with a wrong one; the page and health stay open.
    for auth in [None, Some("wrong")] {
        let mut req = client
            .post(server.url("/v1/edits"))
            .multipart(form(&ok_fields, png(64, 64)));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["code"], "invalid_token", "{body}");
    }
    assert_eq!(
        client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client.get(server.url("/")).send().await.unwrap().status(),
        200
    );

    let post = |fields: Vec<(&'static str, String)>, image: Option<Vec<u8>>| {
        let mut form = reqwest::multipart::Form::new();
        if let Some(bytes) = image {
            form = form.part(
                "image",
                reqwest::multipart::Part::bytes(bytes).file_name("x.png"),
            );
        }
        for (k, v) in fields {
            form = form.text(k, v);
        }
        client
            .post(server.url("/v1/edits"))
            .bearer_auth(token)
            .multipart(form)
            .send()
    };
    // (fields, image, status, the field the error names)
    type Case = (
        Vec<(&'static str, String)>,
        Option<Vec<u8>>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (vec![], Some(png(64, 64)), 400, "prompt"),
        (vec![("prompt", "x".into())], None, 400, "image"),
        (
            vec![("prompt", "x".into())],
            Some(b"not an image at all".to_vec()),
            400,
            "image",
        ),
        (
            vec![("prompt", "x".into()), ("seeds", "9".into())],
            Some(png(64, 64)),
            400,
            "seeds",
        ),
        (
            vec![("prompt", "x".into()), ("probe_steps", "0".into())],
            Some(png(64, 64)),
            400,
            "probe_steps",
        ),
        (
            vec![("prompt", "x".into()), ("strategy", "fastest".into())],
            Some(png(64, 64)),
            400,
            "strategy",
        ),
        (
            vec![("prompt", "x".into()), ("size", "100x100".into())],
            Some(png(64, 64)),
            400,
            "size",
        ),
        (
            vec![("prompt", "x".into()), ("guidance", "3".into())],
            Some(png(64, 64)),
            400,
            "guidance",
        ),
        // 1.2 MB of bytes: over the 1 MB upload limit.
        (
            vec![("prompt", "x".into())],
            Some(vec![7u8; 1_200_000]),
            413,
            "image",
        ),
        // 1100 x 1000 pixels: over the 1 megapixel limit (a small file).
        (
            vec![("prompt", "x".into())],
            Some(png(1100, 1000)),
            413,
            "image",
        ),
    ];
    for (fields, image, status, param) in cases {
        let described = format!("{fields:?} -> {status} {param}");
        let r = post(fields, image).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{described}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{described}: {body}");
        // `code` names the condition as a string (OpenAI's errors carry a string or null).
        let code = if status == 413 {
            "too_large"
        } else {
            "invalid_value"
        };
        assert_eq!(body["error"]["code"], code, "{described}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(param), "{described}: {message}");
    }
    // A mask sent as a file, as OpenAI clients send it, is refused as a mask, not as text.
    let form = form(&[("prompt", "x")], png(64, 64)).part(
        "mask",
        reqwest::multipart::Part::bytes(png(64, 64)).file_name("mask.png"),
    );
    let r = client
        .post(server.url("/v1/images/edits"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "mask", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"),
        "{body}"
    );
    // Nothing refused was journaled.
    assert!(journal(&dir.path().join("out")).is_empty());
    assert!(!server.stop_and_log().contains(token));
}

#[tokio::test]
async fn after_kill_9_and_a_restart_every_accepted_edit_finishes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let client = icedit_scale::http::client_builder().build().unwrap();
    let fields = [
        ("prompt", "make the sky night"),
        ("seeds", "4"),
        ("steps", "50"),
        ("size", "128"),
    ];
    let server = Server::start(&out, &["--in-flight", "1"], &[]);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit(&client, &server, &fields).await);
    }
    // The first is running (and maybe done); the others are queued or running.
    events(&client, &server, &ids[0], Some("step")).await;
    server.kill_9();
    // One worker ran one edit at a time: edits were left unfinished for the restart.
    let unfinished = 5 - journal(&out)
        .iter()
        .filter(|r| r["record"] == "ended")
        .count();
    assert!(unfinished >= 3, "{unfinished}");

    let server = Server::start(&out, &["--in-flight", "2"], &[]);
    // A client that had events of the last edit's first run (its `queued`, maybe more)
    // reconnects: the run after the restart is numbered after them, so it gets that run
    // whole, from its first event.
    let last = ids.last().unwrap();
    let resumed = events_after(&client, &server, last, Some(40), None).await;
    // It waits in the queue again first, and says so.
    assert_eq!(resumed[0].event, "queued", "{resumed:?}");
    assert!(resumed[0].id >= 1 << 32, "{resumed:?}");
    assert_eq!(resumed[1].event, "started", "{resumed:?}");
    assert_eq!(resumed.last().unwrap().event, "done", "{resumed:?}");
    for id in &ids {
        let all = events(&client, &server, id, None).await;
        assert_eq!(all.last().unwrap().event, "done", "{id}: {all:?}");
        let s: Value = client
            .get(server.url(&format!("/v1/edits/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(s["status"], "done");
        assert!(out.join("edits").join(id).join("final.png").is_file());
    }
    let records = journal(&out);
    for id in &ids {
        let count = |kind: &str| {
            records
                .iter()
                .filter(|r| r["record"] == kind && r["id"] == id.as_str())
                .count()
        };
        assert_eq!(count("accepted"), 1, "{id}");
        assert_eq!(count("ended"), 1, "{id} ended exactly once");
    }
    // Five accepted and five ended, and the restart's note that edits ran again.
    assert_eq!(records.len(), 11, "{records:?}");
    assert_eq!(
        records.iter().filter(|r| r["record"] == "resumed").count(),
        1,
        "{records:?}"
    );
    // Edits that ended before the restart are still served, events included.
    drop(server);
    let server = Server::start(&out, &[], &[]);
    let replay = events(&client, &server, &ids[4], None).await;
    assert_eq!(replay.last().unwrap().event, "done");
    let list: Value = client
        .get(server.url("/v1/edits"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 5);
}

/// An ended edit's event stream ends after a `kill -9` however its `events.jsonl` was left:
/// whole (written before the journal's end), cut short or missing (as a kill during the
/// write used to leave it), the stream a client reads after the restart ends with the
/// journal's ending, so an EventSource does not reconnect forever.
#[tokio::test]
async fn after_kill_9_an_ended_edits_stream_ends_whatever_its_events_file_holds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let client = icedit_scale::http::client_builder().build().unwrap();
    let fields = [
        ("prompt", "make it snow"),
        ("seeds", "2"),
        ("steps", "6"),
        ("size", "64"),
    ];
    let server = Server::start(&out, &[], &[]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = submit(&client, &server, &fields).await;
        events(&client, &server, &id, Some("done")).await;
        ids.push(id);
    }
    // The journal has each edit's end; its stream was on disk before that record.
    let ended = journal(&out)
        .iter()
        .filter(|r| r["record"] == "ended")
        .count();
    assert_eq!(ended, 3);
    server.kill_9();
    let file = |id: &str| out.join("edits").join(id).join("events.jsonl");
    let whole = std::fs::read_to_string(file(&ids[0])).unwrap();
    assert!(
        whole.lines().last().unwrap().contains("\"done\""),
        "{whole}"
    );
    // Cut short before its last line, and lost altogether.
    let lines: Vec<&str> = whole.lines().collect();
    let cut = std::fs::read_to_string(file(&ids[1])).unwrap();
    let cut: Vec<&str> = cut.lines().collect();
    std::fs::write(file(&ids[1]), cut[..cut.len() - 1].join("\n") + "\n").unwrap();
    std::fs::remove_file(file(&ids[2])).unwrap();

    let server = Server::start(&out, &[], &[]);
    for (i, id) in ids.iter().enumerate() {
        let all = events(&client, &server, id, None).await;
        let last = all
            .last()
            .unwrap_or_else(|| panic!("{id}: an empty stream"));
        assert_eq!(last.event, "done", "{id}: {all:?}");
        assert!(last.data["pick"].is_object(), "{id}: {last:?}");
        if i == 0 {
            assert_eq!(all.len(), lines.len());
        }
        if i == 1 {
            // The made end follows the stream's last stored event.
            assert_eq!(all.len(), cut.len());
            assert_eq!(all[all.len() - 2].id + 1, last.id);
        }
    }
}

#[tokio::test]
async fn several_generator_workers_share_one_queue() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--devices", "cpu,cpu,cpu", "--in-flight", "1"], &[]);
    let client = icedit_scale::http::client_builder().build().unwrap();
    let health: Value = client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        health["workers"],
        serde_json::json!(["cpu#0", "cpu#1", "cpu#2"])
    );
    assert_eq!(health["defaults"]["kind"], "early-filter");
    let fields = [
        ("prompt", "make it snow"),
        ("seeds", "2"),
        ("steps", "60"),
        ("size", "64"),
    ];
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(submit(&client, &server, &fields).await);
    }
    let mut workers = BTreeSet::new();
    for id in &ids {
        let all = events(&client, &server, id, None).await;
        assert_eq!(all.last().unwrap().event, "done");
        let started = all.iter().find(|e| e.event == "started").unwrap();
        workers.insert(started.data["worker"].as_str().unwrap().to_string());
    }
    // Edits were submitted faster than one finishes: more than one worker took them.
    assert!(workers.len() >= 2, "{workers:?}");
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for w in &workers {
        assert!(
            metrics.contains(&format!("icedit_nfe_total{{worker=\"{w}\"}}")),
            "{metrics}"
        );
        assert!(metrics.contains(&format!("icedit_generator_busy_fraction{{worker=\"{w}\"}}")));
    }
    assert!(metrics.contains("icedit_judge_seconds_count{call=\"screen\"}"));
    assert!(metrics.contains("icedit_edits_total{status=\"done\"} 6"));
    // `response_format=url`: an absolute URL on this server that serves the PNG.
    let r: Value = client
        .post(server.url("/v1/images/edits"))
        .multipart(form(
            &[
                ("prompt", "x"),
                ("seeds", "2"),
                ("steps", "8"),
                ("size", "64"),
                ("response_format", "url"),
            ],
            png(64, 64),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = r["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&server.base), "{url}");
    let image = client.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(image::load_from_memory(&image).unwrap().width(), 64);
    assert_eq!(journal(&out).len(), 14);
}

#[tokio::test]
async fn sigterm_finishes_the_running_edit_and_leaves_queued_ones_for_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let client = icedit_scale::http::client_builder().build().unwrap();
    let fields = [
        ("prompt", "make it snow"),
        ("seeds", "4"),
        ("steps", "50"),
        ("size", "128"),
    ];
    // A deadline far beyond the edit's time: the running edit is waited on.
    let mut server = Server::start(
        &out,
        &["--in-flight", "1", "--shutdown-deadline-s", "600"],
        &[],
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&client, &server, &fields).await);
    }
    // A synchronous OpenAI client's edit, queued behind them.
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), server.url("/v1/images/edits"));
        async move {
            let r = client
                .post(url)
                .multipart(form(&fields, png(192, 128)))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            (status, headers, r.json::<Value>().await.unwrap())
        }
    });
    let sync_id = server.accepted_edit(4).await;
    events(&client, &server, &ids[0], Some("step")).await;
    server.sigterm();
    // The queued synchronous edit is journaled and runs after the restart: its client is
    // told so, and told not to resend it (openai-python resends a 503 otherwise, and the
    // resend would be a second edit).
    let (code, headers, body) = waiting.await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(headers["x-should-retry"], "false");
    assert!(headers.get("retry-after").is_none(), "{headers:?}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&sync_id),
        "{body}"
    );
    ids.push(sync_id);
    let status = server.wait_exit(std::time::Duration::from_secs(600));
    assert!(status.success(), "{status:?}: {}", server.log());
    let records = journal(&out);
    let ended = |id: &str| {
        records
            .iter()
            .filter(|r| r["record"] == "ended" && r["id"] == id)
            .count()
    };
    assert_eq!(
        ended(&ids[0]),
        1,
        "the running edit finished before the exit"
    );
    assert_eq!(
        ended(&ids[2]),
        0,
        "the last queued edit waits for the restart"
    );
    drop(server);
    let server = Server::start(&out, &[], &[]);
    for id in &ids {
        assert_eq!(
            events(&client, &server, id, None)
                .await
                .last()
                .unwrap()
                .event,
            "done"
        );
    }
    let records = journal(&out);
    for id in &ids {
        assert_eq!(
            records
                .iter()
                .filter(|r| r["record"] == "ended" && r["id"] == id.as_str())
                .count(),
            1
        );
    }
}

#[test]
fn bench_serve_reports_every_edit_answered_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let run = Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .args([
            "bench",
            "serve",
            "--edits",
            "6",
            "--clients",
            "1,3",
            "--time-scale",
            "0.002",
            "--out",
        ])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("serve.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row["edits"], 6);
        assert_eq!(
            (
                row["errors"].as_u64(),
                row["lost"].as_u64(),
                row["duplicated"].as_u64()
            ),
            (Some(0), Some(0), Some(0))
        );
        let (p50, p95) = (
            row["p50_s"].as_f64().unwrap(),
            row["p95_s"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p95);
        assert!(row["busy_fraction"].as_f64().unwrap() > 0.0);
    }
    assert!(std::fs::read_to_string(out.join("serve.md"))
        .unwrap()
        .contains("| clients |"));
}
