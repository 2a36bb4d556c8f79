//! peft LoRA adapters on the local judge's models, against transformers + peft: each tiny
//! random Qwen2-VL / Qwen2.5-VL (rsLoRA) / Qwen3-VL gets a random adapter over both towers
//! (made by tests/fixtures/qwen_vl_lora/make_fixtures.py), and the merged model's logits
//! must match peft's `merge_and_unload()` model within 1e-4 (f32).

mod support;
use support::{max_abs_diff, reference_prompt};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use icedit_scale::models::qwen_vl::{PeftAdapter, Qwen2VlFiles};
use icedit_scale::models::weight_use::UnusedWeights;

const LOGIT_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Logits of `base` with the adapter in `adapter` against `<name>_<case>_logits`.
fn check(base: &Path, inputs: &Path, adapter: &Path, name: &str, cases: &[&str]) {
    let files = Qwen2VlFiles::discover(base).unwrap();
    let adapter = Arc::new(PeftAdapter::load(adapter, 1.0).unwrap());
    assert!(adapter.len() >= 24, "{} adapted linears", adapter.len());
    let model = files
        .load_adapted(
            DType::F32,
            &Device::Cpu,
            Some(adapter),
            UnusedWeights::Refuse,
        )
        .unwrap();
    let plain = files.load(DType::F32, &Device::Cpu).unwrap();
    let inputs = load(inputs);
    let refs = load(&fixtures().join("qwen_vl_lora/reference.safetensors"));
    for case in cases {
        let prompt = reference_prompt(&inputs, case);
        let logits = model.forward_all(std::slice::from_ref(&prompt)).unwrap();
        let want = &refs[&format!("{name}_{case}_logits")];
        let err = max_abs_diff(&logits, want);
        let base_err = max_abs_diff(
            &plain.forward_all(std::slice::from_ref(&prompt)).unwrap(),
            want,
        );
        println!(
            "{name} {case}: max abs logit error {err:.2e} (without the adapter {base_err:.2})"
        );
        assert!(err < LOGIT_TOL, "{name} {case}: logits off by {err}");
        assert!(
            base_err > 0.1,
            "{name} {case}: the adapter changes too little to test"
        );
    }
}

fn qwen2(model: &str) -> (PathBuf, PathBuf) {
    (
        fixtures().join("qwen2vl/tiny").join(model),
        fixtures().join("qwen2vl/reference.safetensors"),
    )
}

#[test]
fn a_lora_over_both_towers_of_qwen2_vl_matches_peft() {
    let (base, inputs) = qwen2("qwen2_vl");
    check(
        &base,
        &inputs,
        &fixtures().join("qwen_vl_lora/qwen2_vl"),
        "qwen2_vl",
        &["one", "two"],
    );
}

#[test]
fn an_rslora_adapter_on_qwen2_5_vl_matches_peft_in_every_saved_layout() {
    let (base, inputs) = qwen2("qwen2_5_vl");
    let lora = fixtures().join("qwen_vl_lora");
    // As peft saves it, under a named adapter's sub folder, and with the key names of
    // adapters trained before transformers 4.52.
    for folder in [
        "qwen2_5_vl",
        "qwen2_5_vl_named/judge",
        "qwen2_5_vl_legacy_keys",
    ] {
        check(
            &base,
            &inputs,
            &lora.join(folder),
            "qwen2_5_vl",
            &["one", "two"],
        );
    }
}

#[test]
fn a_lora_on_qwen3_vl_with_deepstack_mergers_matches_peft() {
    let base = fixtures().join("qwen3vl/tiny");
    let inputs = fixtures().join("qwen3vl/reference.safetensors");
    check(
        &base,
        &inputs,
        &fixtures().join("qwen_vl_lora/qwen3_vl"),
        "qwen3_vl",
        &["text", "image"],
    );
}

#[test]
fn adapters_that_cannot_apply_are_refused_with_the_file_named() {
    let lora = fixtures().join("qwen_vl_lora");
    // A folder holding only named sub folders says which.
    let err = PeftAdapter::load(&lora.join("qwen2_5_vl_named"), 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("judge"),
        "{err}"
    );

    // The Qwen3-VL adapter on the Qwen2-VL model: its vision modules are not there.
    let files = Qwen2VlFiles::discover(&qwen2("qwen2_vl").0).unwrap();
    let adapter = Arc::new(PeftAdapter::load(&lora.join("qwen3_vl"), 1.0).unwrap());
    let err = match files.load_adapted(
        DType::F32,
        &Device::Cpu,
        Some(adapter),
        UnusedWeights::Refuse,
    ) {
        Ok(_) => panic!("a Qwen3-VL adapter loaded onto Qwen2-VL"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("match no weight")
            && err.contains("`model.visual.deepstack_merger_list.0.linear_fc1.lora_A/lora_B`"),
        "{err}"
    );
    // The escape hatch loads the base model with what does apply, and says what did not.
    let adapter = Arc::new(PeftAdapter::load(&lora.join("qwen3_vl"), 1.0).unwrap());
    files
        .load_adapted(
            DType::F32,
            &Device::Cpu,
            Some(adapter),
            UnusedWeights::Allow,
        )
        .unwrap();

    // DoRA and a missing weights file are named.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(lora.join("qwen2_vl/adapter_config.json")).unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        config.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let err = PeftAdapter::load(dir.path(), 1.0).unwrap_err().to_string();
    assert!(err.contains("use_dora"), "{err}");
    std::fs::write(dir.path().join("adapter_config.json"), &config).unwrap();
    let err = PeftAdapter::load(dir.path(), 1.0).unwrap_err().to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn adapter_scale_zero_is_the_base_model() {
    let (base, inputs) = qwen2("qwen2_vl");
    let files = Qwen2VlFiles::discover(&base).unwrap();
    let adapter =
        Arc::new(PeftAdapter::load(&fixtures().join("qwen_vl_lora/qwen2_vl"), 0.0).unwrap());
    let model = files
        .load_adapted(
            DType::F32,
            &Device::Cpu,
            Some(adapter),
            UnusedWeights::Refuse,
        )
        .unwrap();
    let refs = load(&inputs);
    let prompt = reference_prompt(&refs, "one");
    let err = max_abs_diff(
        &model.forward_all(std::slice::from_ref(&prompt)).unwrap(),
        &refs["one_logits"],
    );
    assert!(err < LOGIT_TOL, "{err}");
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

/// A local judge preset over the tiny Qwen2.5-VL, with `extra` lines.
fn preset(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("judge.toml");
    std::fs::write(
        &path,
        format!(
            "kind = \"qwen2vl\"\nmodel_dir = {:?}\ndevice = \"cpu\"\ndtype = \"f32\"\nmin_answer_mass = 0.0\n{extra}\n",
            qwen2("qwen2_5_vl").0
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_preset_with_an_adapter_judges_with_the_merged_model() {
    use icedit_scale::edit::EditContext;
    use icedit_scale::judge::Judge;

    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("qwen_vl_lora/qwen2_5_vl");
    // Relative to the preset's folder, like model_dir.
    support::copy_dir(&lora, &dir.path().join("my-adapter"));
    let edit = EditContext::new("t", gradient(64, 48, 0), "make the sky night");
    let edited = gradient(64, 48, 50);
    let score = |extra: &str| {
        let path = preset(dir.path(), extra);
        let judge = support::local_judge(&path).unwrap();
        let (edit, edited) = (edit.clone(), edited.clone());
        async move {
            let name = judge.name();
            (
                name,
                judge
                    .semantic_consistency(&edit, &edited)
                    .await
                    .unwrap()
                    .scores,
            )
        }
    };
    let (plain_name, plain) = score("").await;
    let (name, adapted) = score("adapter = \"my-adapter\"").await;
    let (_, off) = score("adapter = \"my-adapter\"\nadapter_scale = 0.0").await;
    assert!(
        name.contains("my-adapter") && !plain_name.contains("my-adapter"),
        "{name}"
    );
    assert_ne!(plain, adapted, "the adapter changes the judge's reading");
    assert_eq!(plain, off, "scale 0 is the base model");

    // A missing adapter is named when the judge is built, not at its first call.
    let path = preset(dir.path(), "adapter = \"nowhere/at-all\"");
    let err = support::local_judge(&path).unwrap_err().to_string();
    assert!(
        err.contains("nowhere/at-all") && err.contains("download"),
        "{err}"
    );
    let path = preset(dir.path(), "adapter = \"my-adapter\"\nadapter_scale = -1");
    let err = support::local_judge(&path).unwrap_err().to_string();
    assert!(err.contains("adapter_scale"), "{err}");
}
