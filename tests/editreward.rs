//! EditReward's reward model on a tiny random checkpoint with its layout (made by
//! tests/fixtures/editreward/make_fixtures.py, which runs EditReward's own model class under
//! transformers 4.57): the pooled hidden state, each head and the fused reward within 1e-4,
//! and our prompt, chat and image path producing the reference inputs exactly.

mod support;
use support::max_abs_diff;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_scale::models::qwen_vl::image::PreparedImage;
use icedit_scale::models::qwen_vl::reward::reward_weights;
use icedit_scale::models::qwen_vl::{
    EncodedPrompt, PositionMode, Qwen2VlFiles, RewardModel, REWARD_TOKEN,
};
use icedit_scale::models::weight_use::UnusedWeights;

const TOL: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        root().join("tests/fixtures/editreward/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn base() -> Qwen2VlFiles {
    Qwen2VlFiles::discover(&root().join("tests/fixtures/qwen2vl/tiny/qwen2_5_vl")).unwrap()
}

/// The reference inputs of `key` (`ab_if`, ...), as EditReward fed them.
fn inputs(refs: &HashMap<String, Tensor>, key: &str) -> EncodedPrompt {
    let ids = refs[&format!("{key}_input_ids")]
        .get(0)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let grids = refs[&format!("{key}_image_grid_thw")]
        .to_vec2::<i64>()
        .unwrap();
    let pixels = &refs[&format!("{key}_pixel_values")];
    let mut row = 0;
    let images = grids
        .iter()
        .map(|g| {
            let grid_thw = [g[0] as usize, g[1] as usize, g[2] as usize];
            let n: usize = grid_thw.iter().product();
            let pixel_values = pixels
                .narrow(0, row, n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            row += n;
            PreparedImage {
                pixel_values,
                grid_thw,
            }
        })
        .collect();
    EncodedPrompt {
        ids: ids.into_iter().map(|t| t as u32).collect(),
        images,
    }
}

fn model() -> (RewardModel, u32) {
    let files = base();
    let mut chat = files.chat_format().unwrap();
    let token = chat.add_special_token(REWARD_TOKEN);
    let weights = reward_weights(&root().join("tests/fixtures/editreward/tiny")).unwrap();
    (
        RewardModel::load(
            &files,
            weights,
            token,
            DType::F32,
            &Device::Cpu,
            UnusedWeights::Refuse,
        )
        .unwrap(),
        token,
    )
}

#[test]
fn the_reward_model_matches_editreward_s_own_class() {
    let refs = reference();
    let (model, token) = model();
    assert_eq!(
        token, 343,
        "{REWARD_TOKEN} takes the next free id, as in transformers"
    );
    for case in ["ab", "ba"] {
        let (fi, vq) = (
            inputs(&refs, &format!("{case}_if")),
            inputs(&refs, &format!("{case}_vq")),
        );
        for (key, prompt) in [("if", &fi), ("vq", &vq)] {
            let hidden = model.pooled_hidden(prompt).unwrap();
            let err = max_abs_diff(&hidden, &refs[&format!("{case}_{key}_hidden")]);
            println!("{case} {key}: pooled hidden off by {err:.2e}");
            assert!(err < TOL, "{case} {key}: hidden off by {err}");
        }
        let out = model.score(&fi, &vq).unwrap();
        let want = |k: &str| refs[k].to_vec1::<f32>().unwrap();
        for (got, k) in [
            (out.instruction_following, format!("{case}_if_head")),
            (out.visual_quality, format!("{case}_vq_head")),
        ] {
            let w = want(&k);
            let err = (got[0] - w[0]).abs().max((got[1] - w[1]).abs());
            println!("{k}: {got:?} vs {w:?}");
            assert!(err < TOL, "{k}: off by {err}");
        }
        let fused = want(&format!("{case}_fused"));
        assert!((out.reward() - fused[0]).abs() < TOL && (out.log_sigma() - fused[1]).abs() < TOL);
    }
    // The position numbering matters: the model's own 3-D ids give EditReward's "mrope"
    // variant, not its trained reading.
    let fi = inputs(&refs, "ab_if");
    let at = fi.ids.iter().position(|&t| t == token).unwrap();
    let mrope = model
        .backbone()
        .final_hidden(&fi, PositionMode::Multimodal)
        .unwrap()
        .get(at)
        .unwrap();
    assert!(max_abs_diff(&mrope, &refs["ab_if_hidden_mrope"]) < TOL);
    assert!(max_abs_diff(&mrope, &refs["ab_if_hidden"]) > 1e-3);
}

#[test]
fn our_prompts_chat_and_images_give_editreward_s_inputs() {
    let refs = reference();
    let files = base();
    let mut chat = files.chat_format().unwrap();
    let token = chat.add_special_token(REWARD_TOKEN);
    let mut processor = files.image.clone();
    // EditReward resizes every image to min_pixels = max_pixels (200704 for the released
    // models; 4704 for the tiny one).
    processor.min_pixels = 4704;
    processor.max_pixels = 4704;
    let fixtures = root().join("tests/fixtures/qwen2vl");
    let a = image::open(fixtures.join("image_a.png")).unwrap().to_rgb8();
    let b = image::open(fixtures.join("image_b.png")).unwrap().to_rgb8();
    for (case, source, edited) in [("ab", &a, &b), ("ba", &b, &a)] {
        for (key, file) in [
            ("if", "prompt_instruction_following.txt"),
            ("vq", "prompt_visual_quality.txt"),
        ] {
            let template =
                std::fs::read_to_string(root().join("judges/editreward").join(file)).unwrap();
            let text = template.replace("{instruction}", "make the sky night");
            let rendered = chat.render(2, &text).unwrap();
            let images = vec![
                processor.preprocess(source).unwrap(),
                processor.preprocess(edited).unwrap(),
            ];
            let ours = chat.encode(&rendered, images).unwrap();
            let want = inputs(&refs, &format!("{case}_{key}"));
            assert_eq!(ours.ids, want.ids, "{case} {key}: token ids");
            assert!(ours.ids.contains(&token));
            for (o, w) in ours.images.iter().zip(&want.images) {
                assert_eq!(o.grid_thw, w.grid_thw);
                let err = o
                    .pixel_values
                    .iter()
                    .zip(&w.pixel_values)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "{case} {key}: pixels off by {err}");
            }
        }
    }
}

fn gradient(w: u32, h: u32, phase: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 4 + phase) as u8,
            (y * 5) as u8,
            ((x + y + phase) * 3) as u8,
        ])
    })
}

/// A reward preset over the tiny fixture in `dir`.
fn tiny_preset(dir: &std::path::Path, extra: &str) -> PathBuf {
    let path = dir.join("reward.toml");
    std::fs::write(
        &path,
        format!(
            "kind = \"reward\"\nmodel_dir = {:?}\nweights = {:?}\ndevice = \"cpu\"\ndtype = \"f32\"\nimage_pixels = 4704\n{extra}\n",
            root().join("tests/fixtures/qwen2vl/tiny/qwen2_5_vl"),
            root().join("tests/fixtures/editreward/tiny").display().to_string(),
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reward_judge_screens_and_compares_by_reward_and_gives_no_vie_scores() {
    use icedit_scale::edit::EditContext;
    use icedit_scale::judge::{Judge, JudgeError, Preference, PreviewStage, ScoreKind};

    let refs = reference();
    let fixtures = root().join("tests/fixtures/qwen2vl");
    let a = image::open(fixtures.join("image_a.png")).unwrap().to_rgb8();
    let b = image::open(fixtures.join("image_b.png")).unwrap().to_rgb8();
    let dir = tempfile::tempdir().unwrap();
    let judge = reward_judge(&tiny_preset(dir.path(), "pass_reward = 0.2759")).unwrap();
    assert_eq!(judge.score_kind(), ScoreKind::Reward);
    // EditReward's "ab" case: source a, edited b.
    let edit = EditContext::new("ab", a.clone(), "make the sky night");
    let r = judge.reward(&edit, &b).await.unwrap();
    let want = refs["ab_fused"].to_vec1::<f32>().unwrap();
    assert!(
        (r.reward - want[0]).abs() < TOL,
        "{} vs {}",
        r.reward,
        want[0]
    );
    assert!(r.usage.prompt_tokens > 3000);
    let stage = PreviewStage { step: 4, steps: 28 };
    let screened = judge.screen(&edit, &b, stage).await.unwrap();
    assert_eq!(screened.score, r.reward);
    assert_eq!(screened.pass, r.reward >= 0.2759);
    // Comparing two edits is by reward difference, P(first) the sigmoid of it.
    let other = gradient(60, 44, 90);
    let r2 = judge.reward(&edit, &other).await.unwrap();
    let cmp = judge.compare(&edit, &b, &other).await.unwrap();
    assert_eq!(cmp.preferred == Preference::First, r.reward > r2.reward);
    let p = cmp.p_first.unwrap();
    assert!((p - 1.0 / (1.0 + (r2.reward - r.reward).exp())).abs() < 1e-6);
    // No VIE scores: a configuration error naming the way out.
    match judge.semantic_consistency(&edit, &b).await {
        Err(JudgeError::Config(m)) => assert!(m.contains("composite"), "{m}"),
        other => panic!("a reward model gave VIE scores: {other:?}"),
    }
}

#[test]
fn reward_judges_are_refused_where_vie_scores_are_needed_and_measured_in_judge_eval() {
    let dir = tempfile::tempdir().unwrap();
    let preset = tiny_preset(dir.path(), "");
    let bin = env!("CARGO_BIN_EXE_icedit-scale");
    // edit: refused before any work (exit 2), naming the composite way.
    let out = std::process::Command::new(bin)
        .args(["edit", "--instruction", "make the sky night", "--image"])
        .arg(root().join("tests/fixtures/qwen2vl/image_a.png"))
        .arg("--judge")
        .arg(&preset)
        .arg("--out")
        .arg(dir.path().join("edit"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reward model") && err.contains("composite"),
        "{err}"
    );

    // judge-eval: ratings by reward, labelled as such.
    let fixtures = root().join("tests/fixtures/qwen2vl");
    let data = dir.path().join("data.jsonl");
    let line = |id: &str, src: &str, edit: &str, score: f64| {
        format!(
            "{{\"id\":\"{id}\",\"source\":{:?},\"instruction\":\"make the sky night\",\"edit\":{:?},\"score\":{score}}}\n",
            fixtures.join(src),
            fixtures.join(edit)
        )
    };
    let pair = format!(
        "{{\"id\":\"p\",\"source\":{:?},\"instruction\":\"make the sky night\",\"edit_a\":{:?},\"edit_b\":{:?},\"preference\":\"a\"}}\n",
        fixtures.join("image_a.png"),
        fixtures.join("image_b.png"),
        fixtures.join("image_a.png")
    );
    std::fs::write(
        &data,
        line("r1", "image_a.png", "image_b.png", 2.0)
            + &line("r2", "image_b.png", "image_a.png", 1.0)
            + &pair,
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["judge-eval", "--width", "64", "--data"])
        .arg(&data)
        .arg("--judge")
        .arg(&preset)
        .arg("--out")
        .arg(dir.path().join("je"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("je/results.json")).unwrap())
            .unwrap();
    assert_eq!(json["ratings"]["judge_score"], "reward");
    assert_eq!(json["ratings"]["answered"], 2);
    assert_eq!(json["pairs"]["answered"], 1);
    // A reward model has no position to favour: both orders agree.
    assert_eq!(json["pairs"]["position_bias"]["mean"], 0.0);
    let md = std::fs::read_to_string(dir.path().join("je/report.md")).unwrap();
    assert!(md.contains("not a 0-10 VIE score"), "{md}");
}

#[test]
fn reward_presets_name_what_is_wrong() {
    use icedit_scale::judge::Judge;
    let dir = tempfile::tempdir().unwrap();
    let err = |extra: &str| match reward_judge(&tiny_preset(dir.path(), extra)) {
        Ok(_) => panic!("{extra:?} was accepted"),
        Err(e) => e.to_string(),
    };
    let e = err("pass_reward = 0.1\npass_quantile = 0.5");
    assert!(e.contains("pass_quantile") && e.contains("keep one"), "{e}");
    let e = err("pass_quantile = 1.5");
    assert!(e.contains("pass_quantile") && e.contains("1.5"), "{e}");
    std::fs::write(dir.path().join("cal.json"), "{\"pass_reward\": 0.25}").unwrap();
    let judge = reward_judge(&tiny_preset(dir.path(), "calibration = \"cal.json\"")).unwrap();
    assert!(judge.screen_quantile().is_none());
    let judge = reward_judge(&tiny_preset(dir.path(), "pass_quantile = 0.75")).unwrap();
    assert_eq!(judge.screen_quantile(), Some(0.75));
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        format!(
            "kind = \"reward\"\nmodel_dir = {:?}\nweights = \"nobody/nothing\"\ndevice = \"cpu\"\n",
            root().join("tests/fixtures/qwen2vl/tiny/qwen2_5_vl")
        ),
    )
    .unwrap();
    let e = reward_judge(&missing).err().unwrap().to_string();
    assert!(
        e.contains("nobody/nothing") && e.contains("download"),
        "{e}"
    );
}

/// The reward checkpoint is accounted for as a whole: backbone and heads read, anything else
/// (here a third head the published class does not have) refused by name.
#[test]
fn a_reward_checkpoint_with_a_tensor_nobody_reads_is_refused() {
    let files = base();
    let mut chat = files.chat_format().unwrap();
    let token = chat.add_special_token(REWARD_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    let original = root().join("tests/fixtures/editreward/tiny/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&original, &Device::Cpu).unwrap();
    tensors.insert(
        "rm_heads.head_2.0.bias".into(),
        Tensor::ones(1024, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let load = |unused| {
        RewardModel::load(
            &files,
            vec![weights.clone()],
            token,
            DType::F32,
            &Device::Cpu,
            unused,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let err = load(UnusedWeights::Refuse).unwrap_err();
    assert!(
        err.contains("model.safetensors: `rm_heads.head_2.0.bias`") && err.contains("1 tensor"),
        "{err}"
    );
    load(UnusedWeights::Allow).unwrap();
}

/// A reward judge from a preset file read the way a run reads it.
fn reward_judge(
    path: &std::path::Path,
) -> Result<icedit_scale::judge::reward::RewardJudge, icedit_scale::judge::JudgeError> {
    use icedit_scale::backends::{JudgeKind, JudgeSpec};
    use icedit_scale::judge::reward::RewardJudge;
    match JudgeSpec::from_file(path)?.kind {
        JudgeKind::Reward(preset) => RewardJudge::new(preset, path),
        other => panic!("not a reward preset: {other:?}"),
    }
}
