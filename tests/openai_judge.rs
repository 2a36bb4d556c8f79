//! The remote judge against a local mock server (wiremock on 127.0.0.1).

use std::sync::Arc;
use std::time::Duration;

use icedit_scale::backends::{JudgeKind, JudgeSpec};
use icedit_scale::edit::EditContext;
use icedit_scale::judge::openai::{OpenAiConfig, OpenAiJudge};
use icedit_scale::judge::{Judge, JudgeError, Preference, PreviewStage};
use image::{Rgb, RgbImage};
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn config(server: &MockServer, cache: Option<&std::path::Path>) -> OpenAiConfig {
    OpenAiConfig {
        name: None,
        max_concurrency: None,
        model: "test-vlm".into(),
        api_base: format!("{}/v1", server.uri()),
        api_key_env: None,
        timeout_s: 5.0,
        max_attempts: 3,
        backoff_s: 0.01,
        max_backoff_s: 2.0,
        temperature: 0.0,
        max_tokens: 100,
        logprobs: false,
        top_logprobs: 5,
        prompts_dir: None,
        // An empty path disables the cache.
        cache_dir: Some(cache.map_or_else(Default::default, |p| p.to_path_buf())),
    }
}

fn completion(content: &str, logprobs: Option<Value>) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "test-vlm",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "logprobs": logprobs,
        }],
        "usage": {"prompt_tokens": 812, "completion_tokens": 31, "total_tokens": 843}
    })
}

fn edit() -> EditContext {
    EditContext::new(
        "e",
        RgbImage::from_pixel(32, 32, Rgb([10, 20, 30])),
        "make it red",
    )
}

fn edited() -> RgbImage {
    RgbImage::from_pixel(32, 32, Rgb([200, 20, 30]))
}

#[tokio::test]
async fn a_normal_reply_is_parsed_with_usage_and_images_are_sent() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "```json\n{\"score\": [8, 6], \"reasoning\": \"red, but the border changed\"}\n```",
            None,
        )))
        .expect(1)
        .mount(&server)
        .await;
    let judge = OpenAiJudge::new(config(&server, None)).unwrap();
    let s = judge
        .semantic_consistency(&edit(), &edited())
        .await
        .unwrap();
    assert_eq!(s.scores, [8.0, 6.0]);
    assert_eq!(s.reasoning, "red, but the border changed");
    assert_eq!(
        (s.usage.prompt_tokens, s.usage.completion_tokens),
        (812, 31)
    );
    assert_eq!((s.usage.attempts, s.usage.cached), (1, false));
    // The request carried the model, the instruction and two PNG data URLs (source, edited).
    let requests = server.received_requests().await.unwrap();
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(body["model"], "test-vlm");
    let parts = body["messages"][0]["content"].as_array().unwrap();
    let images: Vec<&Value> = parts.iter().filter(|p| p["type"] == "image_url").collect();
    assert_eq!(images.len(), 2);
    assert!(images[0]["image_url"]["url"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));
    let text = parts.iter().find(|p| p["type"] == "text").unwrap();
    assert!(text["text"].as_str().unwrap().contains("\"make it red\""));
}

#[tokio::test]
async fn logprobs_turn_score_tokens_into_expected_scores() {
    let server = MockServer::start().await;
    let lp = |t: &str, top: &[(&str, f32)]| {
        json!({"token": t, "logprob": top[0].1, "bytes": null,
               "top_logprobs": top.iter().map(|(tok, p)| json!({"token": tok, "logprob": p, "bytes": null})).collect::<Vec<_>>()})
    };
    let ln = |p: f32| p.ln();
    let tokens = vec![
        lp("{\"", &[("{\"", 0.0)]),
        lp("score", &[("score", 0.0)]),
        lp("\":", &[("\":", 0.0)]),
        lp(" [", &[(" [", 0.0)]),
        lp("8", &[("8", ln(0.6)), ("7", ln(0.3)), ("9", ln(0.1))]),
        lp(",", &[(",", 0.0)]),
        lp(" 6", &[(" 6", ln(0.5)), (" 5", ln(0.5))]),
        lp("]}", &[("]}", 0.0)]),
    ];
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "{\"score\": [8, 6]}",
            Some(json!({"content": tokens, "refusal": null})),
        )))
        .mount(&server)
        .await;
    let mut cfg = config(&server, None);
    cfg.logprobs = true;
    let judge = OpenAiJudge::new(cfg).unwrap();
    let s = judge.perceptual_quality(&edit(), &edited()).await.unwrap();
    assert!(
        (s.scores[0] - (8.0 * 0.6 + 7.0 * 0.3 + 9.0 * 0.1)).abs() < 1e-4,
        "{:?}",
        s.scores
    );
    assert!((s.scores[1] - 5.5).abs() < 1e-4, "{:?}", s.scores);
    let body: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        (body["logprobs"].clone(), body["top_logprobs"].clone()),
        (json!(true), json!(5))
    );
}

/// Qwen2's tokenizer writes every digit as a token of its own (vLLM's Qwen2.5-VL preset
/// asks for logprobs): `[10, 9]` must read as about 9.9 and 8.7, not as a first digit's
/// expectation and a "0" taken for the second score.
#[tokio::test]
async fn logprobs_of_scores_written_digit_by_digit() {
    let server = MockServer::start().await;
    let lp = |t: &str, top: &[(&str, f32)]| {
        json!({"token": t, "logprob": top[0].1.ln(), "bytes": null,
               "top_logprobs": top.iter().map(|(tok, p)| json!({"token": tok, "logprob": p.ln(), "bytes": null})).collect::<Vec<_>>()})
    };
    let tokens = vec![
        lp("{\"", &[("{\"", 1.0)]),
        lp("score", &[("score", 1.0)]),
        lp("\":", &[("\":", 1.0)]),
        lp(" [", &[(" [", 1.0)]),
        lp("1", &[("1", 0.8), ("9", 0.2)]),
        lp("0", &[("0", 0.95), (",", 0.05)]),
        lp(",", &[(",", 1.0)]),
        lp(" ", &[(" ", 1.0)]),
        lp("9", &[("9", 0.7), ("8", 0.3)]),
        lp("]}", &[("]}", 1.0)]),
    ];
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "{\"score\": [10, 9]}",
            Some(json!({"content": tokens, "refusal": null})),
        )))
        .mount(&server)
        .await;
    let mut cfg = config(&server, None);
    cfg.logprobs = true;
    let judge = OpenAiJudge::new(cfg).unwrap();
    let s = judge.perceptual_quality(&edit(), &edited()).await.unwrap();
    // P(10) = 0.8 * 0.95, P(1) = 0.8 * 0.05, P(9) = 0.2.
    let first = 10.0 * 0.76 + 1.0 * 0.04 + 9.0 * 0.2;
    assert!((s.scores[0] - first).abs() < 1e-4, "{:?}", s.scores);
    assert!((s.scores[1] - 8.7).abs() < 1e-4, "{:?}", s.scores);
}

#[tokio::test]
async fn malformed_replies_are_parse_errors_never_scores() {
    for content in [
        "I'd give it a solid eight out of ten.",
        "{\"score\": [8]}",
        "{\"score\": [12, 3], \"reasoning\": \"great\"}",
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(completion(content, None)))
            .mount(&server)
            .await;
        let judge = OpenAiJudge::new(config(&server, None)).unwrap();
        let err = judge
            .semantic_consistency(&edit(), &edited())
            .await
            .unwrap_err();
        assert!(matches!(err, JudgeError::Parse { .. }), "{content}: {err}");
        // The reply could not be used, but it was billed: its cost travels with the failure.
        let spent = err.usage().expect("the failed reply's usage");
        assert_eq!((spent.prompt_tokens, spent.completion_tokens), (812, 31));
    }
    // A body that is not a chat completion at all.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>gateway</html>"))
        .mount(&server)
        .await;
    let judge = OpenAiJudge::new(config(&server, None)).unwrap();
    let err = judge
        .perceptual_quality(&edit(), &edited())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a chat completion"), "{err}");
}

#[tokio::test]
async fn a_429_with_retry_after_is_honoured_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .set_body_string("slow down"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "{\"score\": 7, \"pass\": true, \"reasoning\": \"on track\"}",
            None,
        )))
        .with_priority(2)
        .mount(&server)
        .await;
    let mut cfg = config(&server, None);
    // Without Retry-After the backoff would be 10 s (capped at 3 s): a wait of exactly 1 s
    // is the server's.
    cfg.backoff_s = 10.0;
    cfg.max_backoff_s = 3.0;
    let judge = OpenAiJudge::new(cfg).unwrap();
    let stage = PreviewStage { step: 4, steps: 50 };
    let v = judge.screen(&edit(), &edited(), stage).await.unwrap();
    assert!(v.pass && v.score == 7.0);
    assert_eq!(v.usage.attempts, 2);
    assert_eq!(v.usage.retry_wait_ms, 1000);
    assert!(v.usage.latency_ms >= 1000, "{:?}", v.usage);
}

#[tokio::test]
async fn a_500_then_success_retries_and_exhausted_retries_report_the_status() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream exploded"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "{\"better\": 2, \"reasoning\": \"second is redder\"}",
            None,
        )))
        .with_priority(2)
        .mount(&server)
        .await;
    let judge = OpenAiJudge::new(config(&server, None)).unwrap();
    let c = judge
        .compare(&edit(), &edit().source, &edited())
        .await
        .unwrap();
    assert_eq!(c.preferred, Preference::Second);
    assert_eq!(c.usage.attempts, 2);

    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("maintenance"))
        .expect(3)
        .mount(&down)
        .await;
    let judge = OpenAiJudge::new(config(&down, None)).unwrap();
    match judge.perceptual_quality(&edit(), &edited()).await {
        Err(JudgeError::Http { status, body }) => {
            assert_eq!(status, 503);
            assert!(body.contains("maintenance"));
        }
        other => panic!("expected an HTTP failure, got {other:?}"),
    }
    // A 400 is not retried.
    let bad = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("bad image"))
        .expect(1)
        .mount(&bad)
        .await;
    let judge = OpenAiJudge::new(config(&bad, None)).unwrap();
    assert!(judge.perceptual_quality(&edit(), &edited()).await.is_err());
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(completion("{\"score\": [1, 1]}", None))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let mut cfg = config(&server, None);
    cfg.timeout_s = 0.3;
    cfg.max_attempts = 2;
    let judge = OpenAiJudge::new(cfg).unwrap();
    let err = judge
        .perceptual_quality(&edit(), &edited())
        .await
        .unwrap_err();
    assert!(matches!(err, JudgeError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn the_cache_prevents_a_second_call() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "{\"score\": [9, 8], \"reasoning\": \"clean\"}",
            None,
        )))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let judge = Arc::new(OpenAiJudge::new(config(&server, Some(dir.path()))).unwrap());
    let first = judge.perceptual_quality(&edit(), &edited()).await.unwrap();
    // A new judge over the same cache folder: a rerun.
    let again = OpenAiJudge::new(config(&server, Some(dir.path()))).unwrap();
    let second = again.perceptual_quality(&edit(), &edited()).await.unwrap();
    assert_eq!(first.scores, second.scores);
    assert!(!first.usage.cached && second.usage.cached);
    assert_eq!(second.usage.prompt_tokens, 0);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    // A different image is a different key.
    let other = RgbImage::from_pixel(32, 32, Rgb([0, 0, 0]));
    let _ = again.perceptual_quality(&edit(), &other).await.unwrap();
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn the_api_key_is_sent_but_never_shown() {
    let secret = "sk-test-very-secret-0123456789";
    std::env::set_var("ICEDIT_TEST_KEY_A", secret);
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", format!("Bearer {secret}").as_str()))
        .respond_with(
            ResponseTemplate::new(401).set_body_string(format!("invalid key {secret} for org")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let mut cfg = config(&server, None);
    cfg.api_key_env = Some("ICEDIT_TEST_KEY_A".into());
    let judge = OpenAiJudge::new(cfg).unwrap();
    assert!(!format!("{judge:?}").contains(secret));
    assert!(!judge.name().contains(secret));
    let err = judge
        .perceptual_quality(&edit(), &edited())
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("401") && shown.contains("***"), "{shown}");
    assert!(!shown.contains(secret), "{shown}");

    let mut cfg = config(&server, None);
    cfg.api_key_env = Some("ICEDIT_TEST_KEY_UNSET".into());
    let err = OpenAiJudge::new(cfg).unwrap_err();
    assert!(err.to_string().contains("ICEDIT_TEST_KEY_UNSET"), "{err}");
}

#[test]
fn presets_load_and_typos_are_named() {
    for preset in ["gpt-4o", "vllm-qwen2.5-vl-72b", "ollama-qwen2.5vl"] {
        let path = std::path::PathBuf::from(format!("judges/{preset}.toml"));
        let spec = JudgeSpec::from_file(&path).unwrap();
        assert!(matches!(spec.kind, JudgeKind::Remote(_)), "{spec:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("typo.toml");
    std::fs::write(&p, "kind = \"openai\"\nmodel = \"m\"\ntemprature = 0.1\n").unwrap();
    let err = JudgeSpec::from_file(&p).unwrap_err().to_string();
    assert!(
        err.contains("typo.toml") && err.contains("temprature"),
        "{err}"
    );
}

// Issue 34: what a hostile or broken endpoint must not do to a run's records.

#[tokio::test]
async fn an_unparseable_reply_quoting_the_api_key_is_stored_redacted() {
    let secret = "sk-test-echoed-secret-987654";
    std::env::set_var("ICEDIT_TEST_KEY_ECHO", secret);
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            &format!("As you asked with key {secret}, I rate it highly."),
            None,
        )))
        .mount(&server)
        .await;
    let mut cfg = config(&server, None);
    cfg.api_key_env = Some("ICEDIT_TEST_KEY_ECHO".into());
    let judge = OpenAiJudge::new(cfg).unwrap();
    let err = judge
        .perceptual_quality(&edit(), &edited())
        .await
        .unwrap_err();
    assert!(matches!(err, JudgeError::Parse { .. }), "{err}");
    // What a report stores: the error serialized.
    let stored = serde_json::to_string(&err).unwrap();
    assert!(!stored.contains(secret), "{stored}");
    assert!(stored.contains("***"), "{stored}");
}

#[tokio::test]
async fn an_empty_reply_keeps_the_usage_it_was_billed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("", None)))
        .mount(&server)
        .await;
    let judge = OpenAiJudge::new(config(&server, None)).unwrap();
    let err = judge
        .semantic_consistency(&edit(), &edited())
        .await
        .unwrap_err();
    let spent = err.usage().unwrap_or_else(|| panic!("no usage on {err:?}"));
    assert_eq!((spent.prompt_tokens, spent.completion_tokens), (812, 31));
}

#[tokio::test]
async fn a_truncated_200_reply_is_retried() {
    let server = MockServer::start().await;
    let whole = completion("{\"score\": [7, 6], \"reasoning\": \"ok\"}", None).to_string();
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string(&whole[..whole.len() / 2]))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string(whole.clone()))
        .with_priority(2)
        .mount(&server)
        .await;
    let judge = OpenAiJudge::new(config(&server, None)).unwrap();
    let s = judge
        .semantic_consistency(&edit(), &edited())
        .await
        .unwrap();
    assert_eq!(s.scores, [7.0, 6.0]);
    assert_eq!(s.usage.attempts, 2);
}

#[tokio::test]
async fn the_cache_keeps_no_reply_that_could_not_be_used() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(completion("I cannot judge this image.", None)),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            "{\"score\": [9, 8], \"reasoning\": \"clean\"}",
            None,
        )))
        .with_priority(2)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let judge = OpenAiJudge::new(config(&server, Some(dir.path()))).unwrap();
    assert!(judge.perceptual_quality(&edit(), &edited()).await.is_err());
    // The rerun asks again instead of replaying the failure, and keeps the good answer.
    let rerun = OpenAiJudge::new(config(&server, Some(dir.path()))).unwrap();
    let s = rerun.perceptual_quality(&edit(), &edited()).await.unwrap();
    assert_eq!(s.scores, [9.0, 8.0]);
    assert!(!s.usage.cached);
    let third = OpenAiJudge::new(config(&server, Some(dir.path()))).unwrap();
    assert!(
        third
            .perceptual_quality(&edit(), &edited())
            .await
            .unwrap()
            .usage
            .cached
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}
