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
        RewardModel::load(&files, weights, token, DType::F32, &Device::Cpu).unwrap(),
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
