//! Qwen2-VL and Qwen2.5-VL in candle against transformers on tiny random weights (made by
//! tests/fixtures/qwen2vl/make_fixtures.py). Everything runs in f32 on the CPU through the
//! same discovery and loading code as real checkpoints.
//!
//! Tolerances: logits (magnitude ~5) within 1e-4 max abs; position ids exact; the rendered
//! chat prompt and its token ids exact; pixel values within 1e-5 (tested in `image.rs`).

mod support;
use support::{cli, cli_env, max_abs_diff, reference_prompt};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use icedit_scale::edit::EditContext;
use icedit_scale::judge::qwen_vl::Qwen2VlJudge;
use icedit_scale::judge::{vie_score, Judge, JudgeError, Preference, PreviewStage};
use icedit_scale::models::qwen_vl::{EncodedPrompt, Qwen2Vl, Qwen2VlFiles};
use image::RgbImage;

const LOGIT_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// Copies the files of a fixture checkpoint into `to`.
fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load(name: &str) -> (Qwen2VlFiles, Qwen2Vl) {
    let files = Qwen2VlFiles::discover(&fixtures().join("tiny").join(name)).unwrap();
    let model = files.load(DType::F32, &Device::Cpu).unwrap();
    (files, model)
}

fn check_model(name: &str, prefix: &str) {
    let refs = reference();
    let (_, model) = load(name);
    for case in ["one", "two"] {
        let prompt = reference_prompt(&refs, case);
        let (positions, next) = model.positions(&prompt).unwrap();
        let expected = refs[&format!("{prefix}{case}_position_ids")]
            .to_vec2::<i64>()
            .unwrap();
        for (s, p) in positions.iter().enumerate() {
            assert_eq!(
                *p,
                [expected[0][s], expected[1][s], expected[2][s]],
                "{name} {case}: position {s}"
            );
        }
        let delta = refs[&format!("{prefix}{case}_rope_deltas")]
            .to_vec1::<i64>()
            .unwrap()[0];
        assert_eq!(
            next,
            prompt.ids.len() as i64 + delta,
            "{name} {case}: rope delta"
        );

        let logits = model.forward_all(std::slice::from_ref(&prompt)).unwrap();
        let err = max_abs_diff(&logits, &refs[&format!("{prefix}{case}_logits")]);
        println!("{name} {case}: max abs logit error {err:.2e}");
        assert!(err < LOGIT_TOL, "{name} {case}: logits off by {err}");
    }
}

#[test]
fn qwen2_vl_matches_transformers_with_one_and_two_images() {
    check_model("qwen2_vl", "");
}

#[test]
fn qwen2_5_vl_matches_transformers_with_window_attention() {
    check_model("qwen2_5_vl", "qwen25_");
}

#[test]
fn chat_template_and_processor_reproduce_the_reference_inputs() {
    let refs = reference();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
            .unwrap();
    let files = Qwen2VlFiles::discover(&fixtures().join("tiny/qwen2_vl")).unwrap();
    let format = files.chat_format().unwrap();
    let image = |n: &str| image::open(fixtures().join(n)).unwrap().to_rgb8();
    let cases = [
        (
            "one",
            "What color is the image? Answer yes or no 0123456789.",
            vec!["image_a.png"],
        ),
        (
            "two",
            "Are these two images the same? Answer yes or no.",
            vec!["image_a.png", "image_b.png"],
        ),
    ];
    for (case, text, names) in cases {
        let rendered = format.render(names.len(), text).unwrap();
        assert_eq!(rendered, meta["prompts"][case].as_str().unwrap(), "{case}");
        let images = names
            .iter()
            .map(|n| files.image.preprocess(&image(n)).unwrap())
            .collect();
        let prompt = format.encode(&rendered, images).unwrap();
        let expected = reference_prompt(&refs, case);
        assert_eq!(prompt.ids, expected.ids, "{case}: token ids");
        for (got, want) in prompt.images.iter().zip(&expected.images) {
            assert_eq!(got.grid_thw, want.grid_thw);
            let err = got
                .pixel_values
                .iter()
                .zip(&want.pixel_values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{case}: pixels off by {err}");
        }
    }
}

#[test]
fn kv_cache_and_batched_prefill_agree_with_the_full_forward() {
    let refs = reference();
    let (_, model) = load("qwen2_5_vl");
    let prompt = reference_prompt(&refs, "two");
    let full = &refs["qwen25_two_logits"];
    let n = prompt.ids.len();

    // Prefill all but the last 3 tokens, then feed them one by one through the cache.
    let head = EncodedPrompt {
        ids: prompt.ids[..n - 3].to_vec(),
        images: prompt.images.clone(),
    };
    let (_, mut sessions) = model.prefill(&[head]).unwrap();
    let mut session = sessions.remove(0);
    for k in (n - 3)..n {
        let logits = model.extend(&mut session, &[prompt.ids[k]]).unwrap();
        let err = max_abs_diff(&logits, &full.i((0, k)).unwrap());
        assert!(err < LOGIT_TOL, "cached step {k}: off by {err}");
    }
    assert_eq!(session.len(), n);

    // A batch of two prompts gives each prompt's own answer.
    let one = reference_prompt(&refs, "one");
    assert_eq!(
        one.ids.len(),
        n,
        "the two fixture prompts have equal length"
    );
    let (logits, sessions) = model.prefill(&[prompt.clone(), one]).unwrap();
    assert_eq!(sessions.len(), 2);
    let err_two = max_abs_diff(&logits.i(0).unwrap(), &full.i((0, n - 1)).unwrap());
    let err_one = max_abs_diff(
        &logits.i(1).unwrap(),
        &refs["qwen25_one_logits"].i((0, n - 1)).unwrap(),
    );
    assert!(
        err_two < LOGIT_TOL && err_one < LOGIT_TOL,
        "{err_two} {err_one}"
    );
}

/// Greedy decoding with the KV cache (the judge's free-text path) writes the same tokens as
/// transformers' `generate(do_sample=False)`, whose decode steps use the M-RoPE position
/// deltas after the images (greedy.json, made by make_greedy_reference.py).
#[test]
fn greedy_generation_writes_the_tokens_transformers_writes() {
    let greedy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("greedy.json")).unwrap())
            .unwrap();
    let max_new = greedy["max_new_tokens"].as_u64().unwrap() as usize;
    let qwen3 = fixtures().join("../qwen3vl");
    let qwen3_refs =
        candle_core::safetensors::load(qwen3.join("reference.safetensors"), &Device::Cpu).unwrap();
    let cases = [
        (
            "qwen2_vl",
            fixtures().join("tiny/qwen2_vl"),
            reference(),
            "one",
        ),
        (
            "qwen2_vl",
            fixtures().join("tiny/qwen2_vl"),
            reference(),
            "two",
        ),
        (
            "qwen2_5_vl",
            fixtures().join("tiny/qwen2_5_vl"),
            reference(),
            "two",
        ),
        ("qwen3_vl", qwen3.join("tiny"), qwen3_refs.clone(), "image"),
        ("qwen3_vl", qwen3.join("tiny"), qwen3_refs, "text"),
    ];
    for (name, dir, refs, case) in cases {
        let want: Vec<u32> = greedy["models"][name][case]
            .as_array()
            .unwrap_or_else(|| panic!("greedy.json lacks {name}/{case}"))
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let files = Qwen2VlFiles::discover(&dir).unwrap();
        // Generation stops at the end of turn even where config.json names no eos (Qwen3-VL).
        let im_end = tokenizers::Tokenizer::from_file(&files.tokenizer)
            .unwrap()
            .token_to_id("<|im_end|>")
            .unwrap();
        assert!(files.config.eos_token_ids.contains(&im_end), "{name}");
        let model = files.load(DType::F32, &Device::Cpu).unwrap();
        let (logits, mut sessions) = model.prefill(&[reference_prompt(&refs, case)]).unwrap();
        let got = model
            .greedy(&mut sessions[0], logits.i(0).unwrap(), max_new)
            .unwrap();
        assert_eq!(got, want, "{name} {case}");
    }
}

#[test]
fn missing_files_and_mismatched_configs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Qwen2VlFiles::discover(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");

    // A config whose hidden size disagrees with the weights: the error names the tensor.
    copy_files(&fixtures().join("tiny/qwen2_vl"), dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["intermediate_size"] = 96.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let files = Qwen2VlFiles::discover(dir.path()).unwrap();
    let err = files
        .load(DType::F32, &Device::Cpu)
        .err()
        .expect("a wrong intermediate_size must not load")
        .to_string();
    assert!(err.contains("mlp") && err.contains("shape"), "{err}");

    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = Qwen2VlFiles::discover(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

fn tiny_judge(extra: &str) -> (tempfile::TempDir, Qwen2VlJudge) {
    tiny_judge_of(&fixtures().join("tiny/qwen2_vl"), extra)
}

fn tiny_judge_of(model: &Path, extra: &str) -> (tempfile::TempDir, Qwen2VlJudge) {
    let dir = tempfile::tempdir().unwrap();
    let preset = std::fs::read_to_string(fixtures().join("judge-tiny.toml"))
        .unwrap()
        .replace(
            "model_dir = \"tiny/qwen2_vl\"",
            &format!("model_dir = {model:?}"),
        )
        .replace("min_answer_mass = 0.0\n", "");
    let path = dir.path().join("judge.toml");
    std::fs::write(&path, format!("{preset}\n{extra}\n")).unwrap();
    let judge = support::local_judge(&path).unwrap();
    (dir, judge)
}

fn gradient(w: u32, h: u32, phase: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 4 + phase) as u8,
            (y * 5) as u8,
            ((x + y + phase) * 3) as u8,
        ])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn judge_methods_run_end_to_end_and_batching_changes_nothing() {
    let (_dir, judge) = tiny_judge("min_answer_mass = 0.0");
    let edit = EditContext::new("t", gradient(64, 48, 0), "make the sky night");
    let stage = PreviewStage { step: 4, steps: 28 };
    let previews: Vec<RgbImage> = (0..3).map(|i| gradient(64, 48, 40 * i + 7)).collect();

    // Alone, then all three at once (one batched prefill).
    let alone = judge.screen(&edit, &previews[1], stage).await.unwrap();
    let together =
        futures::future::join_all(previews.iter().map(|p| judge.screen(&edit, p, stage))).await;
    let together: Vec<_> = together.into_iter().map(Result::unwrap).collect();
    assert!(
        (alone.score - together[1].score).abs() < 1e-4,
        "{} vs {}",
        alone.score,
        together[1].score
    );
    for v in &together {
        assert!((0.0..=10.0).contains(&v.score), "{}", v.score);
        assert!(v.usage.prompt_tokens > 30 && v.usage.completion_tokens > 0);
        assert!(v.reasoning.contains("P(pass)"));
    }
    // Different previews give different readings: the images reach the model.
    assert!((together[0].score - together[2].score).abs() > 1e-6);

    let cmp = judge
        .compare(&edit, &previews[0], &previews[2])
        .await
        .unwrap();
    let p = cmp.p_first.unwrap();
    assert!((0.0..=1.0).contains(&p));
    assert_eq!(
        cmp.preferred == Preference::First,
        p >= 0.5 && cmp.preferred != Preference::Tie
    );

    let vie = vie_score(&judge, &edit, &previews[0]).await.unwrap();
    for s in vie.semantic.scores.iter().chain(&vie.perceptual.scores) {
        assert!((0.0..=10.0).contains(s), "{s}");
    }
    let again = vie_score(&judge, &edit, &previews[0]).await.unwrap();
    assert_eq!(
        vie.overall(),
        again.overall(),
        "the local judge is deterministic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_that_is_not_answering_fails_instead_of_scoring() {
    // With the default answer-mass check the random model's spread-out distribution is
    // recognised as "not an answer".
    let (_dir, judge) = tiny_judge("min_answer_mass = 0.5");
    let edit = EditContext::new("t", gradient(64, 48, 0), "make the sky night");
    let err = judge
        .perceptual_quality(&edit, &gradient(64, 48, 9))
        .await
        .unwrap_err();
    assert!(matches!(err, JudgeError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("probability"), "{err}");

    // Free-text mode generates greedily; random weights write no JSON, which is a parse
    // failure naming the reply.
    let (_dir, judge) = tiny_judge("min_answer_mass = 0.0\nreasoning = true\nmax_new_tokens = 12");
    let err = judge
        .perceptual_quality(&edit, &gradient(64, 48, 9))
        .await
        .unwrap_err();
    assert!(matches!(err, JudgeError::Parse { .. }), "{err}");
}

#[test]
fn cli_edit_runs_with_the_local_judge_on_the_testbed_generator() {
    let out = tempfile::tempdir().unwrap();
    let result = cli(&[
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--width",
        "48",
        "--judge",
        "tests/fixtures/qwen2vl/judge-tiny.toml",
        "--strategy",
        "early-filter",
        "--seeds",
        "4",
        "--probe-steps",
        "2",
        "--keep",
        "2",
        "--steps",
        "6",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["judge"], "tiny random Qwen2-VL");
    assert!(out.path().join("final.png").is_file());
    let text = report.to_string();
    assert!(
        text.contains("P(pass)"),
        "screen verdicts come from the local judge"
    );
}

#[test]
fn the_judge_loads_after_the_generator_has_dropped_its_text_encoders() {
    // FLUX (tiny) generator + local judge in one process: the log shows T5/CLIP freed
    // before the judge's weights are read, so the two never need memory at once.
    let out = tempfile::tempdir().unwrap();
    let result = cli_env(
        &[("RUST_LOG", "info")],
        &[
            "edit",
            "--image",
            "tests/fixtures/flux/source.png",
            "--instruction",
            "make the sky night",
            "--width",
            "48",
            "--model-dir",
            "tests/fixtures/flux/tiny",
            "--t5-tokens",
            "48",
            "--judge",
            "tests/fixtures/qwen2vl/judge-tiny.toml",
            "--seeds",
            "2",
            "--probe-steps",
            "1",
            "--keep",
            "1",
            "--steps",
            "3",
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    let log = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{log}");
    let dropped = log
        .find("dropped the T5 and CLIP text encoders")
        .expect("encoders dropped");
    let loaded = log
        .find("loading the Qwen2-VL judge")
        .expect("judge loaded");
    assert!(dropped < loaded, "{log}");
}

#[test]
fn bf16_and_hugging_face_cache_entries_load_through_the_same_code() {
    // A cache entry: models--org--name/{refs/main, snapshots/<rev>/...}.
    let cache = tempfile::tempdir().unwrap();
    let entry = cache.path().join("models--Qwen--tiny-qwen2.5-vl");
    let snapshot = entry.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abcd").unwrap();
    copy_files(&fixtures().join("tiny/qwen2_5_vl"), &snapshot);
    let files = Qwen2VlFiles::discover(&entry).unwrap();
    assert_eq!(files.root, snapshot);
    let model = files.load(DType::BF16, &Device::Cpu).unwrap();
    let refs = reference();
    let logits = model
        .forward_all(&[reference_prompt(&refs, "two")])
        .unwrap();
    let err = max_abs_diff(&logits, &refs["qwen25_two_logits"]);
    println!("qwen2_5_vl bf16: max abs logit error {err:.2e}");
    assert!(err < 0.25, "bf16 logits off by {err}");
}

#[test]
fn every_local_preset_parses_and_a_missing_download_is_explained() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("judges");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with("-local.toml") {
            continue;
        }
        let config = support::local_judge_config(&path).unwrap();
        let model = config.model.clone().expect("presets name a Hub id");
        assert!(model.starts_with("Qwen/Qwen"), "{model}");
        seen += 1;
        // Not downloaded: the error says what to do.
        let mut c = config.clone();
        c.model = Some("Qwen/not-downloaded-anywhere".into());
        let err = c.checkpoint_dir().unwrap_err().to_string();
        assert!(err.contains("huggingface-cli download"), "{err}");
    }
    assert!(seen >= 11, "{seen} local presets");
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        "kind = \"qwen2vl\"\nmodel = \"x\"\nmax_btach = 2\n",
    )
    .unwrap();
    let err = support::local_judge_config(bad.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_btach"), "{err}");
}

#[test]
fn qwen3_vl_matches_transformers_with_deepstack_and_interleaved_mrope() {
    let root = fixtures().join("../qwen3vl");
    let refs =
        candle_core::safetensors::load(root.join("reference.safetensors"), &Device::Cpu).unwrap();
    let files = Qwen2VlFiles::discover(&root.join("tiny")).unwrap();
    let model = files.load(DType::F32, &Device::Cpu).unwrap();

    // The processor path: PNG -> pixels, bit for bit.
    let png = image::open(root.join("image.png")).unwrap().to_rgb8();
    let prepared = files.image.preprocess(&png).unwrap();
    let expected = reference_prompt(&refs, "image");
    assert_eq!(prepared.grid_thw, expected.images[0].grid_thw);
    let err = prepared
        .pixel_values
        .iter()
        .zip(&expected.images[0].pixel_values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-5, "pixels off by {err}");

    let (positions, _) = model.positions(&expected).unwrap();
    let want = refs["image_position_ids"].to_vec2::<i64>().unwrap();
    for (s, p) in positions.iter().enumerate() {
        assert_eq!(*p, [want[0][s], want[1][s], want[2][s]], "position {s}");
    }
    for case in ["text", "image"] {
        let prompt = reference_prompt(&refs, case);
        let logits = model.forward_all(std::slice::from_ref(&prompt)).unwrap();
        let err = max_abs_diff(&logits, &refs[&format!("{case}_logits")]);
        println!("qwen3_vl {case}: max abs logit error {err:.2e}");
        assert!(err < LOGIT_TOL, "qwen3_vl {case}: logits off by {err}");
    }
    // Sessions are independent: the text prompt after the image prompt is unchanged.
    let (after, _) = model.prefill(&[reference_prompt(&refs, "text")]).unwrap();
    let n = refs["text_input_ids"].dim(1).unwrap();
    let err = max_abs_diff(
        &after.i(0).unwrap(),
        &refs["text_logits"].i((0, n - 1)).unwrap(),
    );
    assert!(err < LOGIT_TOL, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3_vl_and_qwen2_5_vl_judge_too() {
    for model in [
        fixtures().join("../qwen3vl/tiny"),
        fixtures().join("tiny/qwen2_5_vl"),
    ] {
        let (_dir, judge) = tiny_judge_of(&model, "min_answer_mass = 0.0");
        let edit = EditContext::new("t", gradient(64, 48, 0), "make the sky night");
        let vie = vie_score(&judge, &edit, &gradient(64, 48, 5))
            .await
            .unwrap();
        assert!((0.0..=10.0).contains(&vie.overall()), "{}", vie.overall());
        let stage = PreviewStage { step: 2, steps: 10 };
        let v = judge
            .screen(&edit, &gradient(64, 48, 9), stage)
            .await
            .unwrap();
        assert!(v.usage.prompt_tokens > 30);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_that_do_not_fit_the_config_fail_every_call_with_the_tensor_named() {
    // Discovery passes (the files are there); the first call loads and fails.
    let dir = tempfile::tempdir().unwrap();
    copy_files(&fixtures().join("tiny/qwen2_vl"), dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["intermediate_size"] = 96.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (_preset, judge) = tiny_judge_of(dir.path(), "min_answer_mass = 0.0");
    let edit = EditContext::new("t", gradient(64, 48, 0), "make the sky night");
    for _ in 0..2 {
        let err = judge
            .perceptual_quality(&edit, &gradient(64, 48, 3))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, JudgeError::Config(_)), "{text}");
        assert!(text.contains("mlp") && text.contains("shape"), "{text}");
        assert_eq!(text.matches("judge config").count(), 1, "{text}");
    }
}

#[test]
fn qwen3_vl_with_attention_bias_reads_every_projection_bias_as_transformers() {
    // tests/fixtures/qwen3vl/make_bias_fixture.py: `attention_bias: true` gives q, k, v and
    // o_proj random biases in transformers.
    let root = fixtures().join("../qwen3vl");
    let refs =
        candle_core::safetensors::load(root.join("reference_bias.safetensors"), &Device::Cpu)
            .unwrap();
    let files = Qwen2VlFiles::discover(&root.join("bias")).unwrap();
    assert!(files.config.text.qkv_bias && files.config.text.o_bias);
    let model = files.load(DType::F32, &Device::Cpu).unwrap();
    for case in ["text", "image"] {
        let prompt = reference_prompt(&refs, case);
        let logits = model.forward_all(std::slice::from_ref(&prompt)).unwrap();
        let err = max_abs_diff(&logits, &refs[&format!("{case}_logits")]);
        println!("qwen3_vl attention_bias {case}: max abs logit error {err:.2e}");
        assert!(
            err < LOGIT_TOL,
            "attention_bias {case}: logits off by {err}"
        );
    }
    // The check can fail: a model that skipped o_proj's bias would be this far off.
    let skipped = max_abs_diff(&refs["text_logits_without_o_bias"], &refs["text_logits"]);
    println!("without o_proj's bias the logits move by {skipped:.3}");
    assert!(skipped > 100.0 * LOGIT_TOL, "{skipped}");
}

#[test]
fn a_checkpoint_with_one_extra_tensor_is_refused_with_its_name() {
    use icedit_scale::models::weight_use::UnusedWeights;
    // The case: o_proj biases in the file, a config without `attention_bias`.
    let dir = tempfile::tempdir().unwrap();
    copy_files(&fixtures().join("../qwen3vl/tiny"), dir.path());
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let extra = "model.language_model.layers.1.self_attn.o_proj.bias";
    tensors.insert(
        extra.into(),
        Tensor::ones(64, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let files = Qwen2VlFiles::discover(dir.path()).unwrap();
    let err = match files.load(DType::F32, &Device::Cpu) {
        Ok(_) => panic!("a checkpoint with an unread tensor loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("model.safetensors: `{extra}`"))
            && err.contains("1 tensor")
            && err.contains("--allow-unused-weights"),
        "{err}"
    );
    // The escape hatch loads it (and the model is the one without the bias).
    let model = files
        .load_adapted(DType::F32, &Device::Cpu, None, UnusedWeights::Allow)
        .unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join("../qwen3vl/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prompt = reference_prompt(&refs, "text");
    let err = max_abs_diff(
        &model.forward_all(std::slice::from_ref(&prompt)).unwrap(),
        &refs["text_logits"],
    );
    assert!(err < LOGIT_TOL, "{err}");
}
