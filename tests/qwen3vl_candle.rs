//! Does `candle_transformers::models::qwen3_vl` (candle-transformers 0.11.1) compute the same
//! logits as Hugging Face transformers' `Qwen3VLForConditionalGeneration`?
//!
//! Reference: a tiny random Qwen3-VL written by tests/fixtures/qwen3vl/make_fixtures.py
//! (transformers 5.24, f32, CPU). Everything here runs in f32 on the CPU.
//!
//! Findings for candle-transformers 0.11.1 (recorded by `candle_qwen3_vl_known_defects`, which
//! passes today; `candle_qwen3_vl_matches_transformers` is what should pass once it is fixed):
//!
//! * config.json as transformers 5 writes it does not deserialize into `qwen3_vl::Config`:
//!   `text_config` lacks `rope_theta` (it is `text_config.rope_parameters.rope_theta`) and
//!   `tie_word_embeddings` (it is top-level only).
//! * With `tie_word_embeddings: false`, `Qwen3VLModel::new` wants a `lm_head.bias` that
//!   Qwen3-VL does not have (`candle_nn::linear` instead of `linear_no_bias`).
//! * Prefill has no causal mask: candle's logits equal transformers' run with an all-zero
//!   (bidirectional) mask.
//! * Text RoPE is plain 1-D RoPE: for the image prompt candle equals transformers run with a
//!   bidirectional mask *and* 1-D position ids 0..n, not with the 3-D interleaved M-RoPE ids.
//! * The KV cache is never cleared: a second `forward` attends to the first prompt's keys.
//!   (Re-running the *same* prompt hides this, because duplicating every key/value leaves a
//!   softmax-weighted average unchanged; running a different prompt first exposes it.)
//! * The patch mergers use tanh-GELU where transformers uses erf-GELU (`nn.GELU()`); on these
//!   weights that alone moves the image logits by ~2e-4.
//!
//! Measured (max abs, last-position logits): (a) text 1.069, (b) image 1.673, (c) text again
//! 1.069, (d) text after image 1.739. Against transformers with the defects reproduced:
//! (a) 1.7e-6, (b) 3.3e-6, (c) 1.9e-6, (d) 2.2e-6.

mod support;
use support::max_abs_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen3_vl::{Config, Qwen3VLModel};

const LOGIT_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3vl")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn raw_config() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Fill in the `text_config` fields candle wants from where transformers 5 keeps them.
fn patched_config() -> Config {
    let mut v = raw_config();
    let tie = v["tie_word_embeddings"].clone();
    let tc = v["text_config"].as_object_mut().unwrap();
    if !tc.contains_key("rope_theta") {
        let theta = tc["rope_parameters"]["rope_theta"].clone();
        tc.insert("rope_theta".into(), theta);
    }
    if !tc.contains_key("tie_word_embeddings") {
        tc.insert("tie_word_embeddings".into(), tie);
    }
    serde_json::from_value(v).unwrap()
}

fn load_mmaped(cfg: &Config) -> candle_core::Result<Qwen3VLModel> {
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[fixtures().join("tiny/model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    Qwen3VLModel::new(cfg, vb)
}

/// Load the model; if candle still demands a `lm_head.bias`, supply zeros (== no bias).
fn load_model(cfg: &Config) -> Qwen3VLModel {
    match load_mmaped(cfg) {
        Ok(m) => m,
        Err(_) => {
            let mut ts = candle_core::safetensors::load(
                fixtures().join("tiny/model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            let vocab = cfg.text_config.vocab_size;
            ts.insert(
                "lm_head.bias".into(),
                Tensor::zeros(vocab, DType::F32, &Device::Cpu).unwrap(),
            );
            Qwen3VLModel::new(cfg, VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)).unwrap()
        }
    }
}

fn forward_text(model: &Qwen3VLModel, ids: &Tensor) -> Tensor {
    let n = ids.dim(1).unwrap();
    model
        .forward(
            ids,
            None,
            None,
            None,
            None,
            vec![n],
            vec![vec![]],
            vec![vec![]],
            &[0],
        )
        .unwrap()
}

fn forward_image(model: &Qwen3VLModel, cfg: &Config, r: &HashMap<String, Tensor>) -> Tensor {
    let ids = &r["image_input_ids"];
    let n = ids.dim(1).unwrap();
    let ids_v = ids.i(0).unwrap().to_vec1::<i64>().unwrap();
    let pad = cfg.image_token_id as i64;
    let start = ids_v.iter().position(|&t| t == pad).unwrap();
    let end = start + ids_v[start..].iter().take_while(|&&t| t == pad).count();
    assert!(
        ids_v[end..].iter().all(|&t| t != pad),
        "one contiguous image span expected"
    );
    let grid = r["image_image_grid_thw"].to_dtype(DType::U32).unwrap();
    model
        .forward(
            ids,
            Some(r["image_pixel_values"].clone()),
            None,
            Some(grid),
            None,
            vec![n],
            vec![vec![(start, end)]],
            vec![vec![]],
            &[0],
        )
        .unwrap()
}

fn last(r: &HashMap<String, Tensor>, key: &str) -> Tensor {
    let t = &r[key];
    let n = t.dim(1).unwrap();
    t.i((.., n - 1, ..)).unwrap()
}

struct Measured {
    /// (a) text-only prompt, fresh model, vs transformers
    text: f32,
    /// (b) image prompt, fresh model, vs transformers
    image: f32,
    /// (c) text-only prompt again on the model of (a), vs transformers
    text_again: f32,
    /// (d) text-only prompt on the model of (b) (stale image-prompt cache), vs transformers
    text_after_image: f32,
    // Same candle outputs against transformers run the way candle appears to compute.
    text_vs_nocausal: f32,
    image_vs_nocausal_1d: f32,
    image_vs_nocausal_1d_tanh: f32,
    text_again_vs_stale_cache: f32,
    text_after_image_vs_stale_cache: f32,
}

fn measure() -> Measured {
    let cfg = patched_config();
    let r = reference();
    let text_ids = &r["text_input_ids"];

    let model_a = load_model(&cfg);
    let a = forward_text(&model_a, text_ids);
    let c = forward_text(&model_a, text_ids);

    let model_b = load_model(&cfg);
    let b = forward_image(&model_b, &cfg, &r);
    let d = forward_text(&model_b, text_ids);

    let ref_text = last(&r, "text_logits");
    let ref_image = last(&r, "image_logits");
    let m = Measured {
        text: max_abs_diff(&a, &ref_text),
        image: max_abs_diff(&b, &ref_image),
        text_again: max_abs_diff(&c, &ref_text),
        text_after_image: max_abs_diff(&d, &ref_text),
        text_vs_nocausal: max_abs_diff(&a, &r["text_last_logits_nocausal"]),
        image_vs_nocausal_1d: max_abs_diff(&b, &r["image_last_logits_nocausal_1d"]),
        image_vs_nocausal_1d_tanh: max_abs_diff(&b, &r["image_last_logits_nocausal_1d_tanhmerger"]),
        text_again_vs_stale_cache: max_abs_diff(&c, &r["text_last_logits_second_nocausal_cache"]),
        text_after_image_vs_stale_cache: max_abs_diff(
            &d,
            &r["text_last_logits_after_image_nocausal_cache"],
        ),
    };
    eprintln!("max abs error vs transformers (last-position logits, |logit| ~ 1-5):");
    eprintln!("  (a) text prompt, fresh model          {:.3e}", m.text);
    eprintln!("  (b) image prompt, fresh model         {:.3e}", m.image);
    eprintln!(
        "  (c) text prompt again, same model     {:.3e}",
        m.text_again
    );
    eprintln!(
        "  (d) text prompt after image prompt    {:.3e}",
        m.text_after_image
    );
    eprintln!("candle vs transformers run the way candle computes:");
    eprintln!(
        "  (a) vs bidirectional mask                          {:.3e}",
        m.text_vs_nocausal
    );
    eprintln!(
        "  (b) vs bidirectional + 1-D positions               {:.3e}",
        m.image_vs_nocausal_1d
    );
    eprintln!(
        "  (b) vs bidirectional + 1-D positions + tanh merger {:.3e}",
        m.image_vs_nocausal_1d_tanh
    );
    eprintln!(
        "  (c) vs bidirectional over stale cache of (a)       {:.3e}",
        m.text_again_vs_stale_cache
    );
    eprintln!(
        "  (d) vs bidirectional over stale cache of (b)       {:.3e}",
        m.text_after_image_vs_stale_cache
    );
    m
}

#[test]
fn config_json_from_transformers5_needs_patching() {
    let err = serde_json::from_value::<Config>(raw_config())
        .unwrap_err()
        .to_string();
    eprintln!("raw config.json: {err}");
    assert!(err.contains("missing field"), "{err}");
    // Both are missing; serde reports the first one it meets.
    let tc = raw_config()["text_config"].clone();
    assert!(tc.get("rope_theta").is_none() && tc.get("tie_word_embeddings").is_none());
    let cfg = patched_config();
    assert_eq!(cfg.text_config.rope_theta, 5e6);
    assert!(!cfg.text_config.tie_word_embeddings);
    assert_eq!(cfg.vision_config.deepstack_visual_indexes, vec![0]);
    assert_eq!(cfg.vision_config.num_position_embeddings, 16);
}

#[test]
fn untied_lm_head_wants_a_bias() {
    let err = match load_mmaped(&patched_config()) {
        Ok(_) => panic!("candle now loads an untied Qwen3-VL checkpoint; update this test"),
        Err(e) => e.to_string(),
    };
    eprintln!("from_mmaped_safetensors: {err}");
    assert!(err.contains("lm_head.bias"), "{err}");
}

/// Passes today and pins down *why* candle differs: its outputs equal transformers run with a
/// bidirectional prefill mask, 1-D text positions, tanh-GELU patch mergers and a stale KV cache.
#[test]
fn candle_qwen3_vl_known_defects() {
    let m = measure();
    // Far from the real model ...
    assert!(m.text > 0.5, "text prompt now matches? {}", m.text);
    assert!(m.image > 0.5, "image prompt now matches? {}", m.image);
    assert!(m.text_again > 0.5);
    assert!(m.text_after_image > 0.5);
    // ... but equal to transformers with the suspected defects reproduced.
    assert!(m.text_vs_nocausal < LOGIT_TOL, "{}", m.text_vs_nocausal);
    assert!(
        m.image_vs_nocausal_1d_tanh < LOGIT_TOL,
        "{}",
        m.image_vs_nocausal_1d_tanh
    );
    assert!(
        m.text_again_vs_stale_cache < LOGIT_TOL,
        "{}",
        m.text_again_vs_stale_cache
    );
    assert!(
        m.text_after_image_vs_stale_cache < LOGIT_TOL,
        "{}",
        m.text_after_image_vs_stale_cache
    );
    // Without the tanh merger the image prompt is still ~2e-4 off.
    assert!(
        m.image_vs_nocausal_1d > LOGIT_TOL,
        "{}",
        m.image_vs_nocausal_1d
    );
}

#[test]
#[ignore = "candle-transformers 0.11.1 qwen3_vl does not match transformers: max abs logit error \
            (a) text 1.07, (b) image 1.67, (c) text again 1.07, (d) text after image 1.74; \
            (no causal prefill mask, 1-D RoPE instead of interleaved M-RoPE, uncleared KV cache, \
            tanh-GELU mergers)"]
fn candle_qwen3_vl_matches_transformers() {
    let m = measure();
    assert!(m.text < LOGIT_TOL, "(a) {}", m.text);
    assert!(m.image < LOGIT_TOL, "(b) {}", m.image);
    assert!(m.text_again < LOGIT_TOL, "(c) {}", m.text_again);
    assert!(m.text_after_image < LOGIT_TOL, "(d) {}", m.text_after_image);
}
