//! The EditScore judge presets: their prompts and chat layout render byte for byte as the
//! published `editscore` package renders them (tests/fixtures/editscore/prompts.json, made
//! with the package's own code), and the 7B preset's whole path runs on the tiny Qwen2.5-VL
//! with a tiny peft adapter (the scores are meaningless, the path is real).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use icedit_scale::edit::EditContext;
use icedit_scale::judge::prompts::PromptSet;
use icedit_scale::judge::qwen_vl::Qwen2VlJudge;
use icedit_scale::judge::{vie_score, Judge, JudgeError, PreviewStage};
use icedit_scale::models::qwen_vl::{ChatFormat, Qwen2VlFiles};
use image::RgbImage;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/editscore/prompts.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn editscore_prompts_render_byte_for_byte_as_its_package_renders_them() {
    let fixture = fixture();
    assert_eq!(fixture["score_range"], 25);
    let prompts = PromptSet::load(Some(&root().join("judges/editscore"))).unwrap();
    let files =
        Qwen2VlFiles::discover(&root().join("tests/fixtures/qwen2vl/tiny/qwen2_5_vl")).unwrap();
    let template =
        std::fs::read_to_string(root().join("judges/editscore/chat_template_qwen2_5_vl.jinja"))
            .unwrap();
    let chat = ChatFormat::new(&files.tokenizer, Some(template), &files.config).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let instruction = case["instruction"].as_str().unwrap();
        let sc = prompts.vie_sc_for(instruction);
        assert_eq!(
            sc,
            case["sc_prompt"].as_str().unwrap(),
            "SC prompt for {instruction:?}"
        );
        assert_eq!(prompts.vie_pq, case["pq_prompt"].as_str().unwrap());
        assert_eq!(
            chat.render(2, &sc).unwrap(),
            case["qwen25_chat_sc"].as_str().unwrap()
        );
        assert_eq!(
            chat.render(1, &prompts.vie_pq).unwrap(),
            case["qwen25_chat_pq"].as_str().unwrap()
        );
    }
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

/// judges/editscore-7b-local.toml pointed at the tiny Qwen2.5-VL and a tiny adapter, on the
/// CPU in f32, with `changes` (key = value lines) laid over it.
fn tiny_editscore(dir: &Path, changes: &[(&str, &str)]) -> PathBuf {
    let text = std::fs::read_to_string(root().join("judges/editscore-7b-local.toml")).unwrap();
    let mut table: toml::Table = toml::from_str(&text).unwrap();
    let set = |table: &mut toml::Table, k: &str, v: toml::Value| {
        table.insert(k.to_string(), v);
    };
    table.remove("model");
    let s = |p: PathBuf| toml::Value::String(p.display().to_string());
    set(
        &mut table,
        "model_dir",
        s(root().join("tests/fixtures/qwen2vl/tiny/qwen2_5_vl")),
    );
    set(
        &mut table,
        "adapter",
        s(root().join("tests/fixtures/qwen_vl_lora/qwen2_5_vl")),
    );
    set(
        &mut table,
        "prompts_dir",
        s(root().join("judges/editscore")),
    );
    set(
        &mut table,
        "chat_template",
        s(root().join("judges/editscore/chat_template_qwen2_5_vl.jinja")),
    );
    set(&mut table, "device", toml::Value::String("cpu".into()));
    set(&mut table, "dtype", toml::Value::String("f32".into()));
    set(&mut table, "max_new_tokens", toml::Value::Integer(24));
    for (k, v) in changes {
        table.insert(
            k.to_string(),
            toml::from_str::<toml::Table>(&format!("v = {v}")).unwrap()["v"].clone(),
        );
    }
    let path = dir.join("editscore-tiny.toml");
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_editscore_preset_runs_end_to_end_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let edit = EditContext::new("t", gradient(64, 48, 0), "make the sky night");
    let (a, b) = (gradient(64, 48, 30), gradient(64, 48, 90));
    let stage = PreviewStage { step: 4, steps: 28 };

    // Scores read off the next-token distribution over "0".."25" (random weights put their
    // mass everywhere, so the answer-mass check is off).
    let path = tiny_editscore(
        dir.path(),
        &[
            ("reasoning", "false"),
            ("min_answer_mass", "0.0"),
            ("score_prime", "\"{\\n\\\"score\\\" : [\""),
        ],
    );
    let judge = local_judge(&path).unwrap();
    assert!(judge.name().contains("EditScore-7B"), "{}", judge.name());
    let vie = vie_score(&judge, &edit, &a).await.unwrap();
    for s in vie.semantic.scores.iter().chain(&vie.perceptual.scores) {
        assert!((0.0..=10.0).contains(s), "{s} is not on 0-10 after / 2.5");
    }
    // Screening is by SC, comparing by O.
    let screened = judge.screen(&edit, &a, stage).await.unwrap();
    assert!(
        (screened.score - vie.sc()).abs() < 1e-4,
        "{} vs {}",
        screened.score,
        vie.sc()
    );
    assert_eq!(screened.pass, screened.score >= 5.0);
    let compared = judge.compare(&edit, &a, &b).await.unwrap();
    let other = vie_score(&judge, &edit, &b).await.unwrap();
    assert!(
        compared
            .reasoning
            .contains(&format!("{:.2}", vie.overall())),
        "{}",
        compared.reasoning
    );
    assert_eq!(
        compared.preferred == icedit_scale::judge::Preference::First,
        vie.overall() > other.overall()
    );
    assert!(
        compared.usage.prompt_tokens > 4 * 30,
        "four calls are counted"
    );

    // The published setting: sampled JSON replies, four passes. Random weights write no JSON,
    // so every VIE call fails, and the failure carries the reply and its cost: never a score.
    let path = tiny_editscore(dir.path(), &[("passes", "4")]);
    let judge = local_judge(&path).unwrap();
    match judge.semantic_consistency(&edit, &a).await {
        Err(e @ JudgeError::Parse { .. }) => {
            let usage = e.usage().expect("the failed call's cost is kept");
            assert!(
                usage.completion_tokens > 24,
                "four sampled passes: {usage:?}"
            );
        }
        other => panic!("random weights gave a usable reply: {other:?}"),
    }
}

#[test]
fn passes_need_sampled_replies() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_editscore(dir.path(), &[("passes", "4"), ("reasoning", "false")]);
    let err = local_judge(&path).unwrap_err().to_string();
    assert!(
        err.contains("passes") && err.contains("temperature"),
        "{err}"
    );
    let path = tiny_editscore(dir.path(), &[("score_range", "0")]);
    let err = local_judge(&path).unwrap_err().to_string();
    assert!(err.contains("score_range"), "{err}");
}

/// A local judge from a preset file read the way a run reads it, on the CPU in f32.
fn local_judge(path: &Path) -> Result<Qwen2VlJudge, JudgeError> {
    use icedit_scale::backends::{JudgeKind, JudgeSpec};
    match JudgeSpec::from_file(path)?.kind {
        JudgeKind::Local(config) => Qwen2VlJudge::new(config, Device::Cpu, DType::F32),
        other => panic!("not a local preset: {other:?}"),
    }
}
