//! FLUX.1 Fill in candle against diffusers/transformers reference outputs on tiny random
//! weights (made by tests/fixtures/flux/make_fixtures.py). Everything runs in f32 on the
//! CPU through the same loading code as real weights.
//!
//! Tolerances (max abs error, outputs of magnitude ~4): transformer forward 5e-4 against
//! diffusers as is, and 2e-5 against the same diffusers forward with correctly rounded
//! timestep frequencies (torch's float32 `exp` is off by one ulp for 2 of the 128
//! frequencies, and at guidance 50 the angles reach 5e4 rad, which alone moves the output by
//! 3.1e-4; the fixture script shows this). VAE and text encoders 1e-4; end-to-end latents
//! 1e-3 and image 2e-3 (three steps, then a VAE decode).

mod support;
use support::{cli, max_abs_diff};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_scale::edit::EditContext;
use icedit_scale::generate::flux::{FluxGenerator, FluxOptions};
use icedit_scale::generate::{advance_to, CandidateState, Generator};
use icedit_scale::models::flux::embeddings::rope_tables;
use icedit_scale::models::flux::held_weight::{Weight, WeightFormat};
use icedit_scale::models::flux::latents::joint_ids;
use icedit_scale::models::flux::text::{load_tokenizer, token_ids};
use icedit_scale::models::flux::transformer::{StepInputs, TextConditioning};
use icedit_scale::models::flux::FluxPaths;
use icedit_scale::models::weight_use::UnusedWeights;

const PROMPT: &str = "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the same as on the left but make the sky night";
const T5_TOKENS: usize = 48;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn options(paths: FluxPaths, lora: Option<&str>) -> FluxOptions {
    let mut o = FluxOptions::new(paths);
    o.lora = lora.map(|l| fixtures().join(l));
    o.t5_tokens = T5_TOKENS;
    o
}

fn diffusers_folder() -> FluxPaths {
    FluxPaths {
        model_dir: Some(fixtures().join("tiny")),
        ..Default::default()
    }
}

fn bfl_files() -> FluxPaths {
    FluxPaths {
        model_dir: None,
        transformer: Some(fixtures().join("bfl/flux1-fill-dev.safetensors")),
        vae: Some(fixtures().join("bfl/ae.safetensors")),
        text_encoders: Some(fixtures().join("tiny")),
        t5: None,
    }
}

/// Runs the reference transformer forward (batch 2, per-row text) through `generator`.
fn forward(generator: &FluxGenerator, r: &HashMap<String, Tensor>) -> Tensor {
    let img_ids: Vec<Vec<f32>> = r["fwd_img_ids"].to_vec2().unwrap();
    let n_txt = r["fwd_context"].dim(1).unwrap();
    let rows = img_ids.iter().map(|i| i[1] as usize).max().unwrap() + 1;
    let cols = img_ids.iter().map(|i| i[2] as usize).max().unwrap() + 1;
    let ids = joint_ids(n_txt, rows, cols);
    let axes = generator.transformer().config().axes_dims_rope.clone();
    let rope = rope_tables(&ids, &axes, 10000.0, &Device::Cpu).unwrap();
    let text = TextConditioning {
        t5: r["fwd_context"].clone(),
        pooled: r["fwd_pooled"].clone(),
    };
    let step = StepInputs {
        img: &r["fwd_hidden"],
        text: &text,
        sigma: r["fwd_sigma"].to_vec1::<f32>().unwrap()[0] as f64,
        guidance: r["fwd_guidance"].to_vec1::<f32>().unwrap()[0] as f64,
        rope: &rope,
    };
    generator.transformer().forward(&step).unwrap()
}

#[test]
fn transformer_forward_matches_diffusers_in_both_layouts_with_and_without_lora() {
    let r = reference();
    let cases: [(&str, FluxPaths, Option<&str>, f64, &str); 6] = [
        ("diffusers", diffusers_folder(), None, 1.0, "fwd_out_base"),
        ("bfl", bfl_files(), None, 1.0, "fwd_out_base"),
        (
            "diffusers + plain LoRA",
            diffusers_folder(),
            Some("lora_plain.safetensors"),
            1.0,
            "fwd_out_plain",
        ),
        (
            "bfl + plain LoRA",
            bfl_files(),
            Some("lora_plain.safetensors"),
            1.0,
            "fwd_out_plain",
        ),
        (
            "plain LoRA at 0.5",
            diffusers_folder(),
            Some("lora_plain.safetensors"),
            0.5,
            "fwd_out_plain_half",
        ),
        (
            "bfl + MoE LoRA",
            bfl_files(),
            Some("lora_moe.safetensors"),
            1.0,
            "fwd_out_moe",
        ),
    ];
    for (name, paths, lora, scale, expected) in cases {
        let mut o = options(paths, lora);
        o.lora_scale = scale;
        let generator = FluxGenerator::load(o).unwrap();
        let out = forward(&generator, &r);
        let err = max_abs_diff(&out, &r[expected]);
        eprintln!("{name}: max abs error {err:.2e}");
        assert!(err < 5e-4, "{name}: max abs error {err}");
        let rounded = format!("{expected}_rounded_exp");
        if let Some(exact) = r.get(&rounded) {
            let err = max_abs_diff(&out, exact);
            eprintln!("{name}: max abs error {err:.2e} with correctly rounded frequencies");
            assert!(err < 2e-5, "{name}: max abs error {err} against {rounded}");
        }
        if lora.is_some() {
            // The LoRA must change the output: the base reference is far away.
            assert!(
                max_abs_diff(&out, &r["fwd_out_base"]) > 1e-2,
                "{name}: LoRA had no effect"
            );
        }
    }
    // The MoE layers stay unmerged: 2 double-block ff.net.2 + 2 single-block proj_out.
    let moe =
        FluxGenerator::load(options(diffusers_folder(), Some("lora_moe.safetensors"))).unwrap();
    let report = moe.lora_report().unwrap();
    assert_eq!(report.moe_layers, 4);
    assert_eq!(report.merged, 25 - 4); // x_embedder + 6 per double block + 6 per single block
    assert!(report.unused.is_empty() && report.unknown_keys.is_empty());
}

#[test]
fn vae_matches_diffusers_in_both_layouts() {
    let r = reference();
    for paths in [diffusers_folder(), bfl_files()] {
        let generator = FluxGenerator::load(options(paths, None)).unwrap();
        let mean = generator.vae().encode_mean(&r["vae_image"]).unwrap();
        let err = max_abs_diff(&mean, &r["vae_encoded_mean"]);
        eprintln!("VAE encode: max abs error {err:.2e}");
        assert!(err < 1e-4, "encode: max abs error {err}");
        let decoded = generator.vae().decode(&r["vae_latents"]).unwrap();
        let err = max_abs_diff(&decoded, &r["vae_decoded"]);
        eprintln!("VAE decode: max abs error {err:.2e}");
        assert!(err < 1e-4, "decode: max abs error {err}");
    }
}

#[test]
fn text_encoders_match_transformers() {
    let r = reference();
    let mut generator = FluxGenerator::load(options(diffusers_folder(), None)).unwrap();
    let text = generator.text_encoders().unwrap();
    let t5_ids: Vec<i64> = r["t5_ids"].squeeze(0).unwrap().to_vec1().unwrap();
    let clip_ids: Vec<i64> = r["clip_ids"].squeeze(0).unwrap().to_vec1().unwrap();
    let ours_t5: Vec<i64> = text
        .t5_ids(PROMPT, T5_TOKENS)
        .unwrap()
        .iter()
        .map(|&i| i as i64)
        .collect();
    let ours_clip: Vec<i64> = text
        .clip_ids(PROMPT)
        .unwrap()
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(ours_t5, t5_ids, "T5 token ids");
    assert_eq!(ours_clip, clip_ids, "CLIP token ids (truncated to 77)");
    let (t5, pooled) = text.encode(PROMPT, T5_TOKENS).unwrap();
    let err = max_abs_diff(&t5, &r["t5_hidden"]);
    eprintln!("T5: max abs error {err:.2e}");
    assert!(err < 1e-4, "T5: max abs error {err}");
    let err = max_abs_diff(&pooled, &r["clip_pooled"]);
    eprintln!("CLIP pooled: max abs error {err:.2e}");
    assert!(err < 1e-4, "CLIP pooled: max abs error {err}");

    // CLIP's tokenizer rebuilt from vocab.json + merges.txt gives the same ids.
    let rebuilt = load_tokenizer(&fixtures().join("clip_tokenizer_files")).unwrap();
    let pad = rebuilt.token_to_id("<|endoftext|>").unwrap();
    let ids: Vec<i64> = token_ids(&rebuilt, PROMPT, 77, pad)
        .unwrap()
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(ids, clip_ids);
}

/// transformers' CLIPTokenizer honours the added tokens' flags in tokenizer_config.json: a
/// checkpoint marking them `normalized` matches them after lowercasing. Rebuilt from
/// vocab.json + merges.txt, ours gives transformers' ids with the flags and without them
/// (clip_tokenizer_normalized/, made by make_clip_normalized.py).
#[test]
fn the_clip_tokenizer_reads_its_special_tokens_flags_like_transformers() {
    let dir = fixtures().join("clip_tokenizer_normalized");
    let ids: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("ids.json")).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(ids["prompts"].clone()).unwrap();
    for (folder, key) in [
        (dir.clone(), "normalized"),
        (fixtures().join("clip_tokenizer_files"), "not_normalized"),
    ] {
        let tokenizer = load_tokenizer(&folder).unwrap();
        let expected: Vec<Vec<u32>> = serde_json::from_value(ids[key].clone()).unwrap();
        for (prompt, want) in prompts.iter().zip(&expected) {
            let got = tokenizer
                .encode(prompt.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(&got, want, "{key}: {prompt:?}");
        }
    }
    // The flag changes the ids here, so the test can tell the two apart.
    assert_ne!(ids["normalized"][1], ids["not_normalized"][1]);
}

#[test]
fn full_edit_from_given_latents_matches_the_diffusers_pipeline() {
    let r = reference();
    let mut generator =
        FluxGenerator::load(options(diffusers_folder(), Some("lora_plain.safetensors"))).unwrap();
    let source = image::open(fixtures().join("source.png"))
        .unwrap()
        .to_rgb8();
    let edit = EditContext::new("fixture", source, "make the sky night");
    let prepared = generator.prepare(&edit).unwrap();
    assert_eq!(prepared.latent_shape, vec![12, 64]);

    let init = generator
        .read_init_latents(&fixtures().join("init_latents.safetensors"), &prepared)
        .unwrap();
    let expected_packed = r["e2e_init_packed"].squeeze(0).unwrap();
    assert_eq!(
        max_abs_diff(&init, &expected_packed),
        0.0,
        "packing of the initial latents"
    );

    let schedule = prepared.schedule(3);
    let sigmas: Vec<f32> = r["e2e_sigmas"].to_vec1().unwrap();
    for (i, s) in sigmas.iter().enumerate() {
        assert!((schedule.sigma(i) as f32 - s).abs() < 1e-6, "sigma {i}");
    }
    let mut states = vec![CandidateState::from_given(&generator, &prepared, 0, &init).unwrap()];
    advance_to(&mut generator, &prepared, &schedule, &mut states, 3, |_| {}).unwrap();
    let err = max_abs_diff(
        &states[0].latents,
        &r["e2e_final_latents"].squeeze(0).unwrap(),
    );
    eprintln!("end-to-end final latents: max abs error {err:.2e}");
    assert!(err < 1e-3, "final latents: max abs error {err}");

    let unit = generator
        .decode_unit(&prepared, &states[0].latents)
        .unwrap();
    let err = max_abs_diff(&unit, &r["e2e_image"].squeeze(0).unwrap());
    eprintln!("end-to-end image in [0, 1]: max abs error {err:.2e}");
    assert!(err < 2e-3, "decoded image: max abs error {err}");
}

/// A hi-res refine pass (image-to-image on `[source | init]`, the right half masked) equals
/// diffusers' FluxFillPipeline called with `strength`, at two strengths and a non-square
/// panel: the same start step and sigmas, the image latents noised the same way, the same
/// final image within 1/255 (refine/, made by make_refine_fixtures.py; the noise and the
/// VAE's mean fed to both sides).
#[test]
fn a_refine_pass_matches_the_diffusers_pipeline_with_strength() {
    let dir = fixtures().join("refine");
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let steps = settings["steps"].as_u64().unwrap() as usize;
    let mut generator =
        FluxGenerator::load(options(diffusers_folder(), Some("lora_plain.safetensors"))).unwrap();
    let load = |name: &str| image::open(dir.join(name)).unwrap().to_rgb8();
    let (source, init) = (load("source.png"), load("init.png"));
    assert_eq!(source.dimensions(), (96, 64), "a non-square panel");
    let edit = EditContext::new("refine", source, "make the sky night");
    let prepared = generator.prepare(&edit).unwrap();
    let start = generator.encode_start(&prepared, &init).unwrap();
    let noise = icedit_scale::models::flux::latents::pack(&r["noise"])
        .unwrap()
        .squeeze(0)
        .unwrap();
    let schedule = prepared.schedule(steps);
    let mut moved = Vec::new();
    for strength in settings["strengths"].as_array().unwrap() {
        let s = strength.as_f64().unwrap();
        let start_step = schedule.start_for_strength(s).unwrap();
        let sigmas: Vec<f32> = r[&format!("sigmas_{s}")].to_vec1().unwrap();
        assert_eq!(
            sigmas.len(),
            steps - start_step + 1,
            "strength {s}: steps run"
        );
        for (i, sigma) in sigmas.iter().enumerate() {
            let ours = schedule.sigma(start_step + i) as f32;
            assert!(
                (ours - sigma).abs() < 1e-6,
                "strength {s}: sigma {i}: {ours} vs {sigma}"
            );
        }
        let mut states = vec![CandidateState::from_image_and_noise(
            &prepared, &schedule, 0, &start, &noise, start_step,
        )
        .unwrap()];
        advance_to(
            &mut generator,
            &prepared,
            &schedule,
            &mut states,
            steps,
            |_| {},
        )
        .unwrap();
        let err = max_abs_diff(
            &states[0].latents,
            &r[&format!("final_latents_{s}")].squeeze(0).unwrap(),
        );
        eprintln!("refine at strength {s}: final latents max abs error {err:.2e}");
        assert!(
            err < 1e-3,
            "strength {s}: final latents: max abs error {err}"
        );
        let unit = generator
            .decode_unit(&prepared, &states[0].latents)
            .unwrap();
        let err = max_abs_diff(&unit, &r[&format!("image_{s}")]);
        eprintln!(
            "refine at strength {s}: image max abs error {:.3}/255",
            err * 255.0
        );
        assert!(err < 1.0 / 255.0, "strength {s}: image max abs error {err}");
        moved.push(unit);
    }
    // The two strengths give different images, so the check tells them apart.
    let apart = max_abs_diff(&moved[0], &moved[1]);
    assert!(apart > 2.0 / 255.0, "strengths barely differ: {apart}");
}

#[test]
fn missing_files_and_bad_loras_are_named() {
    let err = FluxGenerator::load(options(
        FluxPaths {
            model_dir: Some(fixtures().join("no-such-model")),
            ..Default::default()
        },
        None,
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no-such-model"), "{err}");

    // A LoRA file whose keys match no layer is an error naming the file.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.safetensors");
    let a = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((32, 4), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([
            ("transformer.nowhere.lora_A.weight".to_string(), a),
            ("transformer.nowhere.lora_B.weight".to_string(), b),
        ]),
        &bogus,
    )
    .unwrap();
    let mut o = options(diffusers_folder(), None);
    o.lora = Some(bogus);
    let err = FluxGenerator::load(o).err().unwrap().to_string();
    assert!(
        err.contains("bogus.safetensors") && err.contains("matches no layer"),
        "{err}"
    );

    // A transformer whose tensor has the wrong shape names the key.
    let tiny = fixtures().join("bfl/flux1-fill-dev.safetensors");
    let mut tensors = candle_core::safetensors::load(&tiny, &Device::Cpu).unwrap();
    tensors.insert(
        "img_in.weight".into(),
        Tensor::zeros((32, 100), DType::F32, &Device::Cpu).unwrap(),
    );
    let broken = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&tensors, &broken).unwrap();
    let mut paths = bfl_files();
    paths.transformer = Some(broken);
    let err = FluxGenerator::load(options(paths, None))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("img_in.weight") && err.contains("broken.safetensors"),
        "{err}"
    );
}

#[test]
fn cli_runs_early_filter_end_to_end_through_flux() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let result = cli(&[
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--width",
        "48",
        "--model-dir",
        "tests/fixtures/flux/tiny",
        "--lora",
        "tests/fixtures/flux/lora_moe.safetensors",
        "--t5-tokens",
        "48",
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
        "--guidance",
        "30",
        "--lora-scale",
        "0.75",
        // A real judge path (the tiny random Qwen2-VL): the testbed judge refuses FLUX.
        "--judge",
        "tests/fixtures/qwen2vl/judge-tiny.toml",
        "--out",
        out_dir,
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert!(report["generator"]
        .as_str()
        .unwrap()
        .starts_with("flux-fill"));
    // The settings that shape the images beyond the strategy are recorded as values.
    let settings = &report["generator_settings"];
    assert_eq!(settings["guidance"], 30.0, "{settings}");
    assert_eq!(settings["lora_scale"], 0.75, "{settings}");
    assert_eq!(settings["t5_tokens"], 48, "{settings}");
    assert_eq!(settings["dtype"], "f32", "{settings}");
    // 4 candidates x 2 probe steps + each survivor (1 or 2, as the random judge passes
    // them) x 4 remaining steps.
    let survivors = report["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "completed")
        .count();
    assert!((1..=2).contains(&survivors), "{survivors} survivors");
    assert_eq!(report["nfe"]["total"], 4 * 2 + survivors * 4);
    let final_image = image::open(out.path().join("final.png")).unwrap().to_rgb8();
    assert_eq!(final_image.dimensions(), (48, 32));
    // T5 and the transformer share the device here: T5 loads, encodes and is dropped
    // before the transformer is read, so the two are never resident together.
    let log = String::from_utf8_lossy(&result.stderr);
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the log: {log}"))
    };
    assert!(
        at("loading the T5 and CLIP text encoders (resident with the VAE until dropped)")
            < at("dropped the T5 and CLIP")
    );
    assert!(
        at("dropped the T5 and CLIP") < at("loading the FLUX transformer"),
        "{log}"
    );
    assert!(log.contains("resident: transformer and VAE"), "{log}");
}

#[test]
fn cli_reproduces_the_diffusers_edit_from_its_initial_latents() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let args = [
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--width",
        "48",
        "--model-dir",
        "tests/fixtures/flux/tiny",
        "--lora",
        "tests/fixtures/flux/lora_plain.safetensors",
        "--t5-tokens",
        "48",
        "--strategy",
        "random",
        // A plain ICEdit edit: one candidate, nothing to judge.
        "--judge",
        "none",
        "--steps",
        "3",
        "--init-latents",
        "tests/fixtures/flux/init_latents.safetensors",
        "--out",
        out_dir,
    ];
    let result = cli(&args);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let ours = image::open(out.path().join("final.png")).unwrap().to_rgb8();
    // diffusers' image in [0, 1], right half, quantised as diffusers does.
    let reference = reference()["e2e_image"].squeeze(0).unwrap();
    let right = reference.narrow(1, 48, 48).unwrap();
    let expected: Vec<f32> = (right * 255.0)
        .unwrap()
        .round()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = ours
        .as_raw()
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| (a as f32 - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1.0,
        "final.png differs from diffusers by up to {worst} levels"
    );

    // One candidate's latents saved without the candidate dimension, [16, h, w], are read
    // as that candidate's: the same image (they were read as 16 packed candidates).
    let unbatched = out.path().join("unbatched.safetensors");
    let latents = candle_core::safetensors::load(
        "tests/fixtures/flux/init_latents.safetensors",
        &candle_core::Device::Cpu,
    )
    .unwrap()["latents"]
        .squeeze(0)
        .unwrap();
    candle_core::safetensors::save(&[("latents", latents)].into_iter().collect(), &unbatched)
        .unwrap();
    let again = out.path().join("again");
    let args: Vec<String> = args
        .iter()
        .map(|a| match *a {
            "tests/fixtures/flux/init_latents.safetensors" => unbatched.display().to_string(),
            a if a == out_dir => again.display().to_string(),
            a => a.to_string(),
        })
        .collect();
    let result = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let from_unbatched = image::open(again.join("final.png")).unwrap().to_rgb8();
    assert_eq!(from_unbatched.as_raw(), ours.as_raw());
}

#[test]
fn bench_flux_times_a_small_random_model() {
    let out = tempfile::tempdir().unwrap();
    let result = cli(&[
        "bench",
        "flux",
        "--size",
        "small",
        "--width",
        "64",
        "--height",
        "64",
        "--t5-tokens",
        "16",
        "--batch",
        "1,2",
        "--iters",
        "1",
        "--steps",
        "4",
        "--formats",
        "dense,q8_0,q4_k,fp8",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("flux.json")).unwrap()).unwrap();
    let formats = json["formats"].as_array().unwrap();
    let names: Vec<_> = formats
        .iter()
        .map(|f| f["format"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dense", "q8_0", "q4_k", "fp8"]);
    for f in formats {
        assert_eq!(f["steps"].as_array().unwrap().len(), 2);
    }
    // Quantized weights are smaller: Q8_0 ~ 8.5 bits and Q4_K 4.5 bits per weight against
    // 32, for the layers whose rows fit the blocks (the small model's all but a few).
    let bytes: Vec<f64> = formats
        .iter()
        .map(|f| f["linear_weight_bytes"].as_f64().unwrap())
        .collect();
    assert!(
        bytes[1] < 0.3 * bytes[0] && bytes[2] < 0.2 * bytes[0],
        "{bytes:?}"
    );
    assert!(formats[2]["quantized_layers"].as_u64().unwrap() > 50);
    // fp8 layers count as held quantized too (they were counted 0).
    assert!(formats[3]["quantized_layers"].as_u64().unwrap() > 50);
    assert_eq!(json["image_tokens"], 32);
    assert!(json["parameters"].as_u64().unwrap() > 1_000_000);
    assert!(json["full_edit_s"].as_f64().unwrap() > 0.0);
}

/// `--vae-only` builds no transformer (for comparing builds' convolutions): no format is
/// timed, the autoencoder is; with `--cache` it is refused by name.
#[test]
fn bench_flux_vae_only_times_the_autoencoder_alone() {
    let out = tempfile::tempdir().unwrap();
    let args = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "flux",
            "--size",
            "small",
            "--width",
            "64",
            "--height",
            "64",
            "--t5-tokens",
            "16",
            "--iters",
            "1",
            "--no-tiny",
            "--vae-only",
            "--out",
            out.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let result = args(&[]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("flux.json")).unwrap()).unwrap();
    assert_eq!(json["formats"].as_array().unwrap().len(), 0);
    assert_eq!(json["parameters"], 0);
    assert!(json["vae_encode_s"].as_f64().unwrap() > 0.0);
    assert!(json["vae_decode_s"].as_f64().unwrap() > 0.0);
    let refused = args(&["--cache", "fbc:0.12"]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--vae-only") && stderr.contains("--cache"),
        "{stderr}"
    );
}

#[test]
fn finds_the_snapshot_of_a_hugging_face_cache_entry() {
    let cache = tempfile::tempdir().unwrap();
    let entry = cache
        .path()
        .join("models--black-forest-labs--FLUX.1-Fill-dev");
    std::fs::create_dir_all(entry.join("snapshots")).unwrap();
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::os::unix::fs::symlink(fixtures().join("tiny"), entry.join("snapshots/0123abcd")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abcd").unwrap();
    let generator = FluxGenerator::load(options(
        FluxPaths {
            model_dir: Some(entry),
            ..Default::default()
        },
        None,
    ))
    .unwrap();
    let err = max_abs_diff(
        &forward(&generator, &reference()),
        &reference()["fwd_out_base"],
    );
    assert!(err < 5e-4, "max abs error {err}");
}

#[test]
fn runs_in_bf16() {
    let r = reference();
    let mut o = options(bfl_files(), Some("lora_moe.safetensors"));
    o.dtype = DType::BF16;
    let generator = FluxGenerator::load(o).unwrap();
    let mut bf16 = r.clone();
    for key in ["fwd_hidden", "fwd_context", "fwd_pooled"] {
        bf16.insert(key.into(), r[key].to_dtype(DType::BF16).unwrap());
    }
    let out = forward(&generator, &bf16);
    assert_eq!(out.dtype(), DType::BF16);
    // bf16 keeps ~3 significant digits; outputs are of magnitude ~4.
    let err = max_abs_diff(&out, &r["fwd_out_moe"]);
    eprintln!("bf16 MoE forward: max abs error {err:.2e}");
    assert!(err < 0.25, "max abs error {err}");
}

/// The tiny diffusers folder copied to `to`, with `edit` applied to one component's
/// `config.json`.
fn tiny_with_config(to: &Path, component: &str, edit: impl Fn(&mut serde_json::Value)) {
    support::copy_dir(&fixtures().join("tiny"), to);
    let config = to.join(component).join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&config, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

#[test]
fn config_fields_that_change_the_math_are_honoured_or_refused_by_name() {
    use icedit_scale::models::flux::text::TextEncoders;
    use icedit_scale::models::flux::FluxFiles;
    let discover = |dir: &Path| {
        FluxFiles::discover(&FluxPaths {
            model_dir: Some(dir.to_path_buf()),
            ..FluxPaths::default()
        })
    };
    let encoders = |dir: &Path| {
        let files = discover(dir).unwrap();
        TextEncoders::load(
            &files.clip,
            &files.t5,
            DType::F32,
            &Device::Cpu,
            UnusedWeights::Refuse,
        )
        .map(|_| ())
    };
    /// (component, config change, what the error must say, refused when loading rather than
    /// when discovering).
    type Case = (
        &'static str,
        Box<dyn Fn(&mut serde_json::Value)>,
        &'static str,
        bool,
    );
    let cases: Vec<Case> = vec![
        (
            "transformer",
            Box::new(|c| c["patch_size"] = 2.into()),
            "patch_size 2",
            false,
        ),
        (
            "transformer",
            Box::new(|c| c["in_channels"] = 7.into()),
            "in_channels",
            false,
        ),
        (
            "vae",
            Box::new(|c| c["act_fn"] = "gelu".into()),
            "`act_fn` = \"gelu\"",
            false,
        ),
        (
            "vae",
            Box::new(|c| c["use_quant_conv"] = true.into()),
            "`use_quant_conv`",
            false,
        ),
        (
            "vae",
            Box::new(|c| c["up_block_types"][0] = "AttnUpDecoderBlock2D".into()),
            "`up_block_types`",
            false,
        ),
        (
            "vae",
            Box::new(|c| c["mid_block_add_attention"] = false.into()),
            "mid_block_add_attention",
            false,
        ),
        (
            "text_encoder_2",
            Box::new(|c| c["dense_act_fn"] = "relu".into()),
            "`dense_act_fn` = \"relu\"",
            true,
        ),
        (
            "text_encoder",
            Box::new(|c| c["layer_norm_eps"] = 1e-6.into()),
            "`layer_norm_eps`",
            true,
        ),
        (
            "text_encoder",
            Box::new(|c| c["hidden_act"] = "gelu".into()),
            "hidden_act `gelu`",
            true,
        ),
    ];
    for (component, edit, needle, at_load) in cases {
        let dir = tempfile::tempdir().unwrap();
        tiny_with_config(dir.path(), component, edit);
        let err = if at_load {
            encoders(dir.path()).unwrap_err().to_string()
        } else {
            discover(dir.path()).map(|_| ()).unwrap_err().to_string()
        };
        let config = dir.path().join(component).join("config.json");
        assert!(err.contains(needle), "{component}: {err}");
        assert!(
            err.contains(&config.display().to_string()),
            "{component}: names the file: {err}"
        );
    }
}

/// A transformer config found in the --text-encoders folder (FLUX.1-dev's, beside a Fill
/// file) is used only when it is this transformer's: otherwise the weights say what the
/// transformer is, or the error names the borrowed config and why.
#[test]
fn a_borrowed_transformer_config_that_does_not_fit_the_weights_is_not_used() {
    use icedit_scale::models::flux::FluxFiles;
    // Text encoders whose folder holds another model's transformer config.
    let text = tempfile::tempdir().unwrap();
    tiny_with_config(text.path(), "transformer", |c| c["in_channels"] = 64.into());
    let borrowed = text.path().join("transformer").join("config.json");
    let paths = |transformer: PathBuf| FluxPaths {
        model_dir: None,
        transformer: Some(transformer),
        vae: Some(fixtures().join("bfl/ae.safetensors")),
        text_encoders: Some(text.path().to_path_buf()),
        t5: None,
    };

    // A FLUX.1-family BFL file (128-wide heads): its config is read from its shapes. Only
    // the shapes matter to discovery, so the tensors are tiny zeros.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flux1-fill-dev.safetensors");
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = [
        ("img_in.weight", zeros(&[256, 12])),
        ("txt_in.weight", zeros(&[256, 16])),
        ("vector_in.in_layer.weight", zeros(&[256, 8])),
        ("final_layer.linear.weight", zeros(&[6, 256])),
        ("double_blocks.0.img_attn.qkv.weight", zeros(&[768, 256])),
        (
            "double_blocks.0.img_attn.norm.query_norm.scale",
            zeros(&[128]),
        ),
        ("single_blocks.0.norm.query_norm.scale", zeros(&[128])),
        ("single_blocks.1.norm.query_norm.scale", zeros(&[128])),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t))
    .collect();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let files = FluxFiles::discover(&paths(file)).unwrap();
    let config = &files.transformer_config;
    assert_eq!(
        (
            config.in_channels,
            config.num_attention_heads,
            config.num_layers,
            config.num_single_layers
        ),
        (12, 2, 1, 2)
    );

    // The tiny BFL file has narrower heads, whose config no shape tells: refused, naming the
    // borrowed config and the mismatch.
    let err = FluxFiles::discover(&paths(fixtures().join("bfl/flux1-fill-dev.safetensors")))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&borrowed.display().to_string())
            && err.contains("in_channels")
            && err.contains("img_in.weight"),
        "{err}"
    );
}

/// The tiny transformer as a GGUF file written by the `gguf` package (make_gguf.py), with
/// the diffusers-layout VAE and text encoders.
fn gguf_files(kind: &str) -> FluxPaths {
    FluxPaths {
        model_dir: None,
        transformer: Some(fixtures().join(format!("gguf/flux1-fill-tiny-{kind}.gguf"))),
        vae: Some(fixtures().join("bfl/ae.safetensors")),
        text_encoders: Some(fixtures().join("tiny")),
        t5: None,
    }
}

/// Largest absolute error relative to the reference's largest magnitude.
fn relative_error(out: &Tensor, reference: &Tensor) -> f64 {
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    max_abs_diff(out, reference) as f64 / scale
}

/// The three GGUF conversions with the bound each must meet against the f32 reference
/// forward, as the largest absolute error over the reference's largest magnitude.
///
/// Where the bounds come from: a weight quantized with block scale `d` errs by at most
/// `d / 2`: `amax / 254` of its 32-weight block for Q8_0, `amax / 16` for Q4_0 and
/// `(max - min) / 62` for Q5_1; candle's quantized matmul also rounds the activations to
/// 8 bits per block (`amax / 254`). Through two double and two single blocks with
/// residuals and the guidance-50 embedding, this tiny model turns a per-element error `e`
/// into an output error of about `7 e` relative (measured: f32 -> bf16, `e = 2^-9`, gives
/// 1.4e-2). So Q8_0 (`e` ~ 2 x 1/254 with the activations) lands near 2.7e-2 and must stay
/// under 4e-2; Q5_1 (`e` ~ 1/62) near 0.1, under 0.15; Q4_0 (`e` ~ 1/16) near 0.2, under
/// 0.35. Measured values are printed.
const GGUF_BOUNDS: [(&str, candle_core::quantized::GgmlDType, f64); 3] = [
    ("q8_0", candle_core::quantized::GgmlDType::Q8_0, 4e-2),
    ("q5_1", candle_core::quantized::GgmlDType::Q5_1, 0.15),
    ("q4_0", candle_core::quantized::GgmlDType::Q4_0, 0.35),
];

#[test]
fn gguf_transformers_run_quantized_within_their_bounds_of_the_f32_reference() {
    let r = reference();
    let dense = FluxGenerator::load(options(bfl_files(), None)).unwrap();
    let (dense_bytes, none) = dense.transformer().linear_weight_bytes();
    assert_eq!(none, 0);
    for (kind, _, bound) in GGUF_BOUNDS {
        let g = FluxGenerator::load(options(gguf_files(kind), None)).unwrap();
        let (bytes, quantized) = g.transformer().linear_weight_bytes();
        // Every linear layer stays quantized in memory, at a fraction of its f32 size.
        assert_eq!(quantized, g.transformer().linears().len(), "{kind}");
        assert!(
            bytes * 3 < dense_bytes,
            "{kind}: {bytes} vs {dense_bytes} bytes"
        );
        let err = relative_error(&forward(&g, &r), &r["fwd_out_base"]);
        eprintln!(
            "{kind}: relative error {err:.3e} (bound {bound}), {bytes} vs {dense_bytes} bytes"
        );
        assert!(err < bound, "{kind}: relative error {err}");
    }
}

#[test]
fn a_k_quant_gguf_holds_its_q4_k_layers_quantized_and_stays_within_its_bound() {
    use candle_core::quantized::GgmlDType;
    let r = reference();
    let g = FluxGenerator::load(options(gguf_files("q4_k"), None)).unwrap();
    // Q4_K needs 256-wide rows: in the tiny model only the timestep and guidance
    // embedders' first layers (256 sinusoidal features in) have them; they are Q4_K, the
    // rest F16 read dense, as the community's K-quant files fall back where rows do not fit.
    let types: Vec<_> = g
        .transformer()
        .linears()
        .iter()
        .filter_map(|l| l.base().weight().ggml_dtype())
        .collect();
    assert_eq!(types, vec![GgmlDType::Q4K; 2]);
    // Q4_K rounds each weight to half a step of its 32-value sub-block, (max - min) / 15 /
    // 2, plus the 6-bit rounding of the sub-block's scale and offset; candle rounds the
    // activations to 8 bits (Q8_K, amax / 254). Only two layers are quantized here, so
    // the output moves far less than Q4_0's everywhere: bound 0.1, measured value printed.
    let err = relative_error(&forward(&g, &r), &r["fwd_out_base"]);
    eprintln!("q4_k: relative error {err:.3e}");
    assert!(err < 0.1, "q4_k: relative error {err}");
    assert!(err > 0.0);
    // Quantizing the f32 weights to Q4_K on load (candle's ggml quantizer, which searches
    // for better scales than the fixture's min/max rule) quantizes the same two layers
    // and keeps the others dense.
    let mut o = options(bfl_files(), None);
    o.hold_as = Some(WeightFormat::Quantized(GgmlDType::Q4K));
    let q = FluxGenerator::load(o).unwrap();
    assert_eq!(q.transformer().linear_weight_bytes().1, 2);
    let on_load = relative_error(&forward(&q, &r), &r["fwd_out_base"]);
    eprintln!("q4_k on load: relative error {on_load:.3e}");
    assert!(on_load < 0.1, "q4_k on load: relative error {on_load}");
}

#[test]
fn quantizing_on_load_equals_loading_the_gguf_of_the_same_type() {
    let r = reference();
    for (kind, dtype, _) in GGUF_BOUNDS {
        let g = FluxGenerator::load(options(gguf_files(kind), None)).unwrap();
        let mut o = options(bfl_files(), None);
        o.hold_as = Some(WeightFormat::Quantized(dtype));
        let q = FluxGenerator::load(o).unwrap();
        // The same bytes (candle's quantizer and the gguf package's agree), so the same output.
        assert_eq!(
            max_abs_diff(&forward(&g, &r), &forward(&q, &r)),
            0.0,
            "{kind}"
        );
        assert_eq!(
            g.transformer().linear_weight_bytes(),
            q.transformer().linear_weight_bytes()
        );
    }
}

#[test]
fn a_plain_lora_over_a_gguf_base_runs_as_a_side_branch_within_the_quantization_bound() {
    let r = reference();
    let lora = "lora_plain.safetensors";
    let held = FluxGenerator::load(options(gguf_files("q8_0"), Some(lora))).unwrap();
    let report = held.lora_report().unwrap();
    assert_eq!(
        (report.merged, report.side_branches, report.moe_layers),
        (0, 25, 0),
        "nothing can be merged into quantized weights"
    );
    // y = Wq x + s B (A x); the reference merges the LoRA into f32 weights in diffusers, so
    // the difference is the base's quantization, within the Q8_0 bound.
    let out = forward(&held, &r);
    let err = relative_error(&out, &r["fwd_out_plain"]);
    eprintln!("plain LoRA as side branches over Q8_0: relative error {err:.3e}");
    assert!(err < GGUF_BOUNDS[0].2, "{err}");
    assert!(
        max_abs_diff(&out, &r["fwd_out_base"]) > 1e-1,
        "the LoRA had no effect"
    );
    // Asked to dequantize, the same file takes the dense path and merges the LoRA.
    let mut o = options(gguf_files("q8_0"), Some(lora));
    o.hold_as = Some(WeightFormat::Dense);
    let merged = FluxGenerator::load(o).unwrap();
    assert_eq!(merged.transformer().linear_weight_bytes().1, 0);
    assert_eq!(merged.lora_report().unwrap().merged, 25);
    let err = relative_error(&forward(&merged, &r), &r["fwd_out_plain"]);
    assert!(err < GGUF_BOUNDS[0].2, "dequantized and merged: {err}");
}

/// A LoRA whose adapter does not fit its layer, over a GGUF base (where it runs beside the
/// weights), is refused naming the LoRA file and the module.
#[test]
fn a_lora_that_does_not_fit_a_gguf_layer_is_refused_naming_file_and_module() {
    let bytes = std::fs::read(fixtures().join("lora_plain.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let module = "single_transformer_blocks.0.attn.to_q";
    let mut tensors: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .map(|k| {
            let t = candle_core::safetensors::Load::load(&file.tensor(k).unwrap(), &Device::Cpu)
                .unwrap();
            (k.to_string(), t)
        })
        .collect();
    for (k, t) in tensors.iter_mut() {
        if k == &format!("transformer.{module}.lora_A.weight") {
            // One input column short: an adapter made for another width.
            *t = t.narrow(1, 0, t.dim(1).unwrap() - 1).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let misfit = dir.path().join("lora-misfit.safetensors");
    candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &misfit)
        .unwrap();
    let err = FluxGenerator::load(options(gguf_files("q8_0"), Some(misfit.to_str().unwrap())))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("lora-misfit.safetensors"), "{err}");
    assert!(err.contains(&format!("`{module}`")), "{err}");
}

#[test]
fn an_moe_lora_over_a_quantized_base_routes_on_the_quantized_activations() {
    let r = reference();
    let lora = "lora_moe.safetensors";
    let held = FluxGenerator::load(options(gguf_files("q8_0"), Some(lora))).unwrap();
    let report = held.lora_report().unwrap();
    assert_eq!(
        (report.merged, report.side_branches, report.moe_layers),
        (0, 21, 4)
    );
    let out = forward(&held, &r);
    // Quantizing on load merges the plain layers first and quantizes the merged weights
    // (no side branches); its MoE layers run over the quantized base the same way.
    let mut o = options(bfl_files(), Some(lora));
    o.hold_as = Some(WeightFormat::Quantized(
        candle_core::quantized::GgmlDType::Q8_0,
    ));
    let on_load = FluxGenerator::load(o).unwrap();
    let report = on_load.lora_report().unwrap();
    assert_eq!(
        (report.merged, report.side_branches, report.moe_layers),
        (21, 0, 4)
    );
    assert_eq!(
        on_load.transformer().linear_weight_bytes().1,
        on_load.transformer().linears().len()
    );
    // Against the f32 reference the error is larger than for plain LoRA: the base's
    // rounding moves some tokens to another expert (the router's top-1 flips), which no
    // continuous bound covers. Measured 0.21 relative on this tiny model (its experts are
    // random, so a flip changes a token's output by the full expert difference); bf16
    // stays under the bf16 bound (`runs_in_bf16`), so this is routing, not arithmetic.
    for (how, out) in [("GGUF", &out), ("on load", &forward(&on_load, &r))] {
        let err = relative_error(out, &r["fwd_out_moe"]);
        eprintln!("MoE LoRA over Q8_0 ({how}): relative error {err:.3e}");
        assert!(err < 0.3, "{how}: {err}");
    }
    assert!(
        max_abs_diff(&out, &forward(&held_base(), &r)) > 1e-1,
        "the LoRA had no effect"
    );
}

/// The Q8_0 GGUF transformer without a LoRA.
fn held_base() -> FluxGenerator {
    FluxGenerator::load(options(gguf_files("q8_0"), None)).unwrap()
}

/// The tiny transformer as an fp8 (float8_e4m3fn) safetensors file written by make_fp8.py.
fn fp8_files(kind: &str) -> FluxPaths {
    FluxPaths {
        model_dir: None,
        transformer: Some(fixtures().join(format!("fp8/flux1-fill-tiny-fp8-{kind}.safetensors"))),
        vae: Some(fixtures().join("bfl/ae.safetensors")),
        text_encoders: Some(fixtures().join("tiny")),
        t5: None,
    }
}

/// fp8 checkpoints in both community layouts load with every linear weight held in fp8
/// (one byte per weight) and run within a stated bound of the f32 reference.
///
/// Where the bounds come from: e4m3 keeps 3 mantissa bits, so a weight is off by at most
/// 2^-4 of its magnitude (2^-5 on average); the activations stay f32. Through this tiny
/// model an element error `e` becomes about `7 e` at the output (see GGUF_BOUNDS), so the
/// scaled file (weights only in fp8, norms in bf16) lands near 7 x 2^-5 / 2 ~ 0.1 and must
/// stay under 0.15; the plain file also rounds the biases and RMSNorm scales to fp8, which
/// the weights' bound does not cover, so its bound is 0.2. Measured: 7.5e-2 and 7.3e-2.
#[test]
fn fp8_checkpoints_hold_their_weights_in_fp8_and_stay_within_their_bounds() {
    let r = reference();
    let dense = FluxGenerator::load(options(bfl_files(), None)).unwrap();
    let (dense_bytes, _) = dense.transformer().linear_weight_bytes();
    for (kind, bound) in [("scaled", 0.15), ("e4m3fn", 0.2)] {
        let g = FluxGenerator::load(options(fp8_files(kind), None)).unwrap();
        let linears = g.transformer().linears();
        let fp8 = linears
            .iter()
            .filter(|l| matches!(l.base().weight(), Weight::Fp8 { .. }))
            .count();
        assert_eq!(fp8, linears.len(), "{kind}: every linear layer in fp8");
        let (bytes, _) = g.transformer().linear_weight_bytes();
        // One byte per weight against four.
        assert_eq!(bytes * 4, dense_bytes, "{kind}");
        if kind == "scaled" {
            // The per-tensor scales were read (an unscaled read would be off by ~amax/448).
            assert!(linears.iter().all(|l| matches!(
                l.base().weight(),
                Weight::Fp8 { scale, .. } if *scale != 1.0
            )));
        }
        let err = relative_error(&forward(&g, &r), &r["fwd_out_base"]);
        eprintln!("fp8 {kind}: relative error {err:.3e} (bound {bound})");
        assert!(err < bound, "fp8 {kind}: relative error {err}");
        assert!(err > 0.0);
    }
}

/// `--quantize fp8` holds a dense checkpoint's linear weights as fp8 with one scale per
/// tensor (amax / 448, the scaled files' scheme), after merging a plain LoRA: within the
/// scaled file's bound of the f32 reference (weights rounded alike, norms and biases kept
/// dense here), with and without the LoRA.
#[test]
fn quantizing_to_fp8_on_load_stays_within_the_scaled_files_bound() {
    let r = reference();
    let dense = FluxGenerator::load(options(bfl_files(), None)).unwrap();
    let (dense_bytes, _) = dense.transformer().linear_weight_bytes();
    for (lora, expected) in [
        (None, "fwd_out_base"),
        (Some("lora_plain.safetensors"), "fwd_out_plain"),
    ] {
        let mut o = options(bfl_files(), lora);
        o.hold_as = Some(WeightFormat::Fp8);
        let g = FluxGenerator::load(o).unwrap();
        let linears = g.transformer().linears();
        assert!(linears.iter().all(|l| matches!(
            l.base().weight(),
            Weight::Fp8 { scale, .. } if *scale != 1.0
        )));
        assert_eq!(g.transformer().linear_weight_bytes().0 * 4, dense_bytes);
        if lora.is_some() {
            let report = g.lora_report().unwrap();
            assert_eq!(
                (report.merged, report.side_branches),
                (25, 0),
                "merged first"
            );
        }
        let err = relative_error(&forward(&g, &r), &r[expected]);
        eprintln!("--quantize fp8 ({expected}): relative error {err:.3e}");
        assert!(err < 0.15 && err > 0.0, "{expected}: {err}");
    }
}

/// ComfyUI's newer files spell the per-tensor scale `<m>.weight_scale`; the same checkpoint
/// under that spelling loads to the same model.
#[test]
fn fp8_scales_are_read_under_either_spelling() {
    let r = reference();
    let path = fixtures().join("fp8/flux1-fill-tiny-fp8-scaled.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| (k.replace(".scale_weight", ".weight_scale"), v))
        .collect();
    assert!(renamed.iter().any(|(k, _)| k.ends_with(".weight_scale")));
    let dir = tempfile::tempdir().unwrap();
    let respelled = dir
        .path()
        .join("flux1-fill-tiny-fp8-weight-scale.safetensors");
    safetensors::serialize_to_file(renamed, None, &respelled).unwrap();
    let mut paths = fp8_files("scaled");
    let original = forward(
        &FluxGenerator::load(options(paths.clone(), None)).unwrap(),
        &r,
    );
    paths.transformer = Some(respelled);
    let again = forward(&FluxGenerator::load(options(paths, None)).unwrap(), &r);
    assert_eq!(max_abs_diff(&original, &again), 0.0);
}

/// A scaled fp8 file with one weight's scale cut out is refused, naming the weight: read at
/// scale 1, that layer would run at the wrong size without a word.
#[test]
fn a_scaled_fp8_file_missing_one_scale_is_refused_naming_the_weight() {
    let path = fixtures().join("fp8/flux1-fill-tiny-fp8-scaled.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let cut = tensors
        .iter()
        .position(|(k, _)| k.ends_with(".scale_weight"))
        .expect("a scaled file");
    let (cut_key, _) = tensors.remove(cut);
    let weight = cut_key.replace(".scale_weight", ".weight");
    let dir = tempfile::tempdir().unwrap();
    let incomplete = dir
        .path()
        .join("flux1-fill-tiny-fp8-incomplete.safetensors");
    safetensors::serialize_to_file(tensors, None, &incomplete).unwrap();
    let mut paths = fp8_files("scaled");
    paths.transformer = Some(incomplete);
    let err = FluxGenerator::load(options(paths, None))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains(&format!("`{weight}`")), "{err}");
    assert!(
        err.contains("scale_weight") && err.contains("incomplete"),
        "{err}"
    );
}

/// A `.gguf` file that does not start with GGUF's magic is named as a damaged GGUF file, by
/// the loader and by the plan, not as a safetensors file with a bad header.
#[test]
fn a_gguf_file_without_its_magic_is_named_as_a_damaged_gguf() {
    let mut bytes = std::fs::read(fixtures().join("gguf/flux1-fill-tiny-q8_0.gguf")).unwrap();
    bytes[..4].copy_from_slice(b"XXXX");
    let dir = tempfile::tempdir().unwrap();
    let damaged = dir.path().join("flux1-fill-tiny-q8_0.gguf");
    std::fs::write(&damaged, &bytes).unwrap();
    let mut paths = gguf_files("q8_0");
    paths.transformer = Some(damaged.clone());
    let err = FluxGenerator::load(options(paths, None))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("GGUF's magic") && !err.contains("safetensors"),
        "{err}"
    );
    let err = icedit_scale::plan::peek::transformer_format(&[damaged]).unwrap_err();
    assert!(
        err.contains("GGUF's magic") && !err.contains("safetensors"),
        "{err}"
    );
}

/// T5 from GGUF files named the llama.cpp way (make_gguf_t5.py): the F32 file gives the
/// transformers states to float rounding; Q8_0 keeps its linear layers quantized and stays
/// within its bound. Q8_0 rounds each weight by at most amax/254 of its 32-wide block and
/// candle's quantized matmul rounds the activations the same way: ~1% per element, which
/// two blocks and the final RMS norm carry to the states at about 2x, so the bound on the
/// largest error over the states' largest magnitude is 5e-2.
#[test]
fn t5_loads_from_gguf_files_with_llama_cpp_names() {
    let r = reference();
    for (kind, bound) in [("f32", 1e-5), ("q8_0", 5e-2)] {
        let paths = FluxPaths {
            t5: Some(fixtures().join(format!("gguf/t5-tiny-encoder-{kind}.gguf"))),
            ..diffusers_folder()
        };
        let mut generator = FluxGenerator::load(options(paths, None)).unwrap();
        let (t5, _) = generator
            .text_encoders()
            .unwrap()
            .encode(PROMPT, T5_TOKENS)
            .unwrap();
        let err = relative_error(&t5, &r["t5_hidden"]);
        eprintln!("T5 GGUF {kind}: relative error {err:.2e} (bound {bound})");
        assert!(err < bound, "T5 GGUF {kind}: relative error {err}");
    }
    // A file that is not there is named.
    let paths = FluxPaths {
        t5: Some(fixtures().join("gguf/no-such-t5.gguf")),
        ..diffusers_folder()
    };
    let err = FluxGenerator::load(options(paths, None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no-such-t5.gguf"), "{err}");
}

/// `--random-weights` runs an edit end to end without any weight file (what the GPU
/// acceptance run does at full size), dense and quantized on load, with exact NFE.
#[test]
fn an_edit_runs_with_random_weights_dense_and_quantized() {
    for quantize in [None, Some("q8_0")] {
        let out = tempfile::tempdir().unwrap();
        let mut args = vec![
            "edit",
            "--image",
            "tests/fixtures/flux/source.png",
            "--instruction",
            "make the sky night",
            "--width",
            "64",
            "--random-weights",
            "small",
            "--t5-tokens",
            "32",
            "--strategy",
            "early-filter",
            "--seeds",
            "4",
            "--probe-steps",
            "2",
            "--keep",
            "2",
            "--steps",
            "4",
            "--judge",
            "tests/fixtures/qwen2vl/judge-tiny.toml",
            "--out",
            out.path().to_str().unwrap(),
        ];
        if let Some(q) = quantize {
            args.extend(["--quantize", q]);
        }
        let result = cli(&args);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap())
                .unwrap();
        let generator = report["generator"].as_str().unwrap();
        assert!(
            generator.contains("random weights, small configuration"),
            "{generator}"
        );
        // The linear layers are counted by the format they are held in.
        assert_eq!(
            generator.contains(" q8_0"),
            quantize.is_some(),
            "{generator}"
        );
        assert!(generator.contains("linear layers "), "{generator}");
        assert!(generator.contains("f32 on cpu"), "{generator}");
        let survivors = report["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "completed")
            .count();
        assert_eq!(report["nfe"]["total"], 4 * 2 + survivors * 2);
        assert!(out.path().join("final.png").is_file());
    }
}

/// A copy of the safetensors file `from` at `to` with `extra` tensors added (or replaced).
fn with_tensors(from: &Path, to: &Path, extra: &[(&str, Tensor)]) {
    let mut tensors = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
    for (k, t) in extra {
        tensors.insert(k.to_string(), t.clone());
    }
    candle_core::safetensors::save(&tensors, to).unwrap();
}

/// Every FLUX loader compares what its model read with what its files hold: one tensor too
/// many is refused with its file and key, whatever the layout, and loads under
/// `UnusedWeights::Allow`; a fused BFL tensor must be read in full, not only the rows the
/// model asked for; tensors the reference leaves unread too (T5's decoder, fp8 input
/// scales, the tiny encoder) are accepted.
#[test]
fn every_flux_loader_refuses_a_tensor_its_model_does_not_read() {
    use icedit_scale::models::flux::text::TextEncoders;
    use icedit_scale::models::flux::FluxFiles;
    let dir = tempfile::tempdir().unwrap();
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let load = |paths: FluxPaths, unused: UnusedWeights| {
        let mut o = options(paths, None);
        o.unused_weights = unused;
        FluxGenerator::load(o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };

    // The BFL transformer: an extra norm.
    let extra = dir.path().join("flux1-fill-extra.safetensors");
    let key = "double_blocks.0.img_attn.norm.extra_norm.scale";
    with_tensors(
        &fixtures().join("bfl/flux1-fill-dev.safetensors"),
        &extra,
        &[(key, ones(16))],
    );
    let mut paths = bfl_files();
    paths.transformer = Some(extra);
    let err = load(paths.clone(), UnusedWeights::Refuse).unwrap_err();
    assert!(
        err.contains(&format!("flux1-fill-extra.safetensors: `{key}`")) && err.contains("1 tensor"),
        "{err}"
    );
    load(paths, UnusedWeights::Allow).unwrap();

    // A fused q/k/v matrix with a fourth block of rows the model never reads.
    let bfl = candle_core::safetensors::load(
        fixtures().join("bfl/flux1-fill-dev.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let qkv = &bfl["double_blocks.0.img_attn.qkv.weight"];
    let (rows, cols) = qkv.dims2().unwrap();
    let longer = Tensor::cat(&[qkv, &qkv.narrow(0, 0, rows / 3).unwrap()], 0).unwrap();
    let fused = dir.path().join("flux1-fill-fused.safetensors");
    with_tensors(
        &fixtures().join("bfl/flux1-fill-dev.safetensors"),
        &fused,
        &[("double_blocks.0.img_attn.qkv.weight", longer)],
    );
    let mut paths = bfl_files();
    paths.transformer = Some(fused);
    let err = load(paths, UnusedWeights::Refuse).unwrap_err();
    assert!(
        err.contains(&format!(
            "`double_blocks.0.img_attn.qkv.weight` (rows {rows}..{})",
            rows + rows / 3
        )),
        "{err} ({cols} columns)"
    );

    // The diffusers transformer and the BFL autoencoder.
    let transformer = dir.path().join("transformer.safetensors");
    with_tensors(
        &fixtures().join("tiny/transformer/diffusion_pytorch_model.safetensors"),
        &transformer,
        &[("transformer_blocks.0.attn.to_out.1.bias", ones(32))],
    );
    let mut paths = bfl_files();
    paths.transformer = Some(transformer);
    let err = load(paths, UnusedWeights::Refuse).unwrap_err();
    assert!(
        err.contains("`transformer_blocks.0.attn.to_out.1.bias`"),
        "{err}"
    );
    let ae = dir.path().join("ae.safetensors");
    with_tensors(
        &fixtures().join("bfl/ae.safetensors"),
        &ae,
        &[("quant_conv.bias", ones(32))],
    );
    let mut paths = bfl_files();
    paths.vae = Some(ae);
    let err = load(paths, UnusedWeights::Refuse).unwrap_err();
    assert!(err.contains("ae.safetensors: `quant_conv.bias`"), "{err}");

    // Text encoders: CLIP with a stray tensor is refused; T5 with a whole decoder beside the
    // encoder loads, as transformers' T5EncoderModel ignores `decoder.*`.
    let files = FluxFiles::discover(&diffusers_folder()).unwrap();
    let encoders = |clip: &Path, t5: &Path| {
        let mut c = files.clip.clone();
        c.weights = vec![clip.to_path_buf()];
        let mut t = files.t5.clone();
        t.weights = vec![t5.to_path_buf()];
        TextEncoders::load(&c, &t, DType::F32, &Device::Cpu, UnusedWeights::Refuse)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let clip = dir.path().join("clip.safetensors");
    with_tensors(&files.clip.weights[0], &clip, &[("logit_scale", ones(1))]);
    let err = encoders(&clip, &files.t5.weights[0]).unwrap_err();
    assert!(err.contains("clip.safetensors: `logit_scale`"), "{err}");
    let t5 = dir.path().join("t5.safetensors");
    with_tensors(
        &files.t5.weights[0],
        &t5,
        &[("decoder.final_layer_norm.weight", ones(32))],
    );
    encoders(&files.clip.weights[0], &t5).unwrap();
    with_tensors(&files.t5.weights[0], &t5, &[("lm_head.weight", ones(32))]);
    let err = encoders(&files.clip.weights[0], &t5).unwrap_err();
    assert!(err.contains("t5.safetensors: `lm_head.weight`"), "{err}");

    // The fp8 files' input scales and marker are unread by ComfyUI's forward too.
    load(fp8_files("scaled"), UnusedWeights::Refuse).unwrap();
}

/// A LoRA entry that is never applied (an adapter for a layer the transformer lacks, or a
/// key that is no LoRA key) is an error naming it, not a warning; `Allow` loads the rest.
#[test]
fn a_lora_entry_that_is_never_applied_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("lora.safetensors");
    with_tensors(
        &fixtures().join("lora_plain.safetensors"),
        &lora,
        &[(
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude",
            Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
        )],
    );
    let mut o = options(diffusers_folder(), None);
    o.lora = Some(lora.clone());
    let err = FluxGenerator::load(o.clone()).err().unwrap().to_string();
    assert!(
        err.contains("lora.safetensors")
            && err.contains("`text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude` (not a LoRA key)"),
        "{err}"
    );
    o.unused_weights = UnusedWeights::Allow;
    let g = FluxGenerator::load(o).unwrap();
    let report = g.lora_report().unwrap();
    assert_eq!(report.unknown_keys.len(), 1);
    assert!(report.merged > 0);
}

/// A scaled fp8 file read dense (`--dequantize`) multiplies each weight by its stored scale
/// as the held path does, so both give the same model (the scale keys are read, not left).
#[test]
fn a_scaled_fp8_file_read_dense_applies_its_scales() {
    let r = reference();
    let held = forward(
        &FluxGenerator::load(options(fp8_files("scaled"), None)).unwrap(),
        &r,
    );
    let mut o = options(fp8_files("scaled"), None);
    o.hold_as = Some(WeightFormat::Dense);
    let dense = forward(&FluxGenerator::load(o).unwrap(), &r);
    let err = max_abs_diff(&held, &dense);
    eprintln!("scaled fp8, dequantized vs held: max abs difference {err:.2e}");
    assert!(err < 1e-4, "{err}");
    let bound = relative_error(&dense, &r["fwd_out_base"]);
    assert!(bound < 0.15, "{bound}");
}

/// A copy of the GGUF file `from` at `to` with one more (f32) tensor, `extra`.
fn gguf_with_extra(from: &Path, to: &Path, extra: &str) {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut file = std::fs::File::open(from).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|k| {
            (
                k.clone(),
                content.tensor(&mut file, k, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let ones = Tensor::ones(32, DType::F32, &Device::Cpu).unwrap();
    tensors.push((
        extra.to_string(),
        QTensor::quantize(&ones, candle_core::quantized::GgmlDType::F32).unwrap(),
    ));
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(to).unwrap();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

/// GGUF files are held to the same account: the transformer's and T5's.
#[test]
fn gguf_files_with_a_tensor_the_model_does_not_read_are_refused_by_name() {
    use icedit_scale::models::flux::t5::T5Encoder;
    use icedit_scale::models::flux::FluxFiles;
    let dir = tempfile::tempdir().unwrap();
    let transformer = dir.path().join("flux-extra.gguf");
    gguf_with_extra(
        &fixtures().join("gguf/flux1-fill-tiny-q8_0.gguf"),
        &transformer,
        "double_blocks.0.img_attn.extra.bias",
    );
    let mut paths = gguf_files("q8_0");
    paths.transformer = Some(transformer);
    let err = FluxGenerator::load(options(paths.clone(), None))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("flux-extra.gguf: `double_blocks.0.img_attn.extra.bias`"),
        "{err}"
    );
    let mut o = options(paths, None);
    o.unused_weights = UnusedWeights::Allow;
    FluxGenerator::load(o).unwrap();

    let config = FluxFiles::discover(&diffusers_folder()).unwrap().t5.config;
    let t5 = dir.path().join("t5-extra.gguf");
    gguf_with_extra(
        &fixtures().join("gguf/t5-tiny-encoder-q8_0.gguf"),
        &t5,
        "enc.extra.weight",
    );
    let err = match T5Encoder::load(
        std::slice::from_ref(&t5),
        &config,
        DType::F32,
        &Device::Cpu,
        UnusedWeights::Refuse,
    ) {
        Ok(_) => panic!("loaded a T5 GGUF with an unread tensor"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("t5-extra.gguf: `enc.extra.weight`"), "{err}");
    // A whole T5's decoder (llama.cpp's `dec.*`) is unread by T5EncoderModel too.
    gguf_with_extra(
        &fixtures().join("gguf/t5-tiny-encoder-q8_0.gguf"),
        &t5,
        "dec.output_norm.weight",
    );
    assert!(T5Encoder::load(
        &[t5],
        &config,
        DType::F32,
        &Device::Cpu,
        UnusedWeights::Refuse
    )
    .is_ok());
}

/// `edit` through the tiny diffusers folder at `model`: a 48 px panel, random strategy, two
/// steps, no judge, into `out`, with `extra` flags.
fn tiny_random_edit(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--width",
        "48",
        "--model-dir",
        model.to_str().unwrap(),
        "--t5-tokens",
        "48",
        "--strategy",
        "random",
        "--steps",
        "2",
        "--judge",
        "none",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cli(&args)
}

/// `--allow-unused-weights` on the command line: a transformer file holding a tensor the
/// model never reads is refused by name (exit 2, before any work), and loads with the flag.
#[test]
fn cli_refuses_an_unread_tensor_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    support::copy_dir(&fixtures().join("tiny"), &model);
    let file = model.join("transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.insert(
        "transformer_blocks.0.attn.extra_gate".into(),
        Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let run = |extra: &[&str]| {
        let out = dir.path().join(format!("out{}", extra.len()));
        (tiny_random_edit(&model, &out, extra), out)
    };
    let (refused, out) = run(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("transformer_blocks.0.attn.extra_gate"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-unused-weights"), "{stderr}");
    assert!(!out.join("report.json").exists());
    let (allowed, out) = run(&["--allow-unused-weights"]);
    let stderr = String::from_utf8_lossy(&allowed.stderr);
    assert!(allowed.status.success(), "{stderr}");
    assert!(
        stderr.contains("transformer_blocks.0.attn.extra_gate"),
        "logged: {stderr}"
    );
    assert!(out.join("report.json").is_file());
}

/// A checkpoint tensor short of rows is refused by key whatever the format it is held in:
/// quantizing it (`--quantize q8_0`, `fp8`) once tiled its rows to fill the layer and ran.
#[test]
fn a_tensor_short_of_rows_is_refused_by_key_when_quantized_too() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    support::copy_dir(&fixtures().join("tiny"), &model);
    let file = model.join("transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let key = "transformer_blocks.0.ff.net.2.weight";
    let rows = tensors[key].dim(0).unwrap();
    let short = tensors[key].narrow(0, 0, rows / 2).unwrap();
    tensors.insert(key.into(), short);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    for format in [None, Some("q8_0"), Some("fp8")] {
        let out = dir
            .path()
            .join(format!("out-{}", format.unwrap_or("dense")));
        let quantize = format.map(|f| ["--quantize", f]);
        let result = tiny_random_edit(&model, &out, quantize.as_ref().map_or(&[], |q| q));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{format:?}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains("the model needs"),
            "{format:?}: {stderr}"
        );
    }
}

/// Every key of a LoRA file is applied or reported: the same tensor under two names is
/// refused (which one won was left to a hash map's order), an alpha without its adapter
/// and a lone half of an extra expert are reported as never applied.
#[test]
fn lora_keys_that_would_never_apply_are_refused_or_reported() {
    use icedit_scale::models::flux::lora::LoraSet;
    let dir = tempfile::tempdir().unwrap();
    let variant = |fixture: &str, name: &str, extra: &[(&str, Tensor)]| {
        let mut tensors =
            candle_core::safetensors::load(fixtures().join(fixture), &Device::Cpu).unwrap();
        for (key, t) in extra {
            tensors.insert(key.to_string(), t.clone());
        }
        let path = dir.path().join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    };
    let plain =
        candle_core::safetensors::load(fixtures().join("lora_plain.safetensors"), &Device::Cpu)
            .unwrap();
    let (prefixed, b) = plain
        .iter()
        .find(|(k, _)| k.starts_with("transformer.") && k.ends_with(".lora_B.weight"))
        .expect("a prefixed lora_B key in the fixture");
    let bare = prefixed.strip_prefix("transformer.").unwrap();

    let twice = variant(
        "lora_plain.safetensors",
        "twice.safetensors",
        &[(bare, b.clone())],
    );
    let e = LoraSet::load(&twice, 1.0).expect_err("refused").to_string();
    assert!(e.contains(bare) && e.contains(prefixed.as_str()), "{e}");

    let alpha = Tensor::new(&[4f32], &Device::Cpu).unwrap();
    let orphan = variant(
        "lora_plain.safetensors",
        "orphan.safetensors",
        &[("transformer.transformer_blocks.0.attn.to_qq.alpha", alpha)],
    );
    let set = LoraSet::load(&orphan, 1.0).unwrap();
    assert!(
        set.unknown_keys.iter().any(|k| k.ends_with("to_qq.alpha")),
        "{:?}",
        set.unknown_keys
    );

    let moe = candle_core::safetensors::load(fixtures().join("lora_moe.safetensors"), &Device::Cpu)
        .unwrap();
    let (half, t) = moe
        .iter()
        .find(|(k, _)| k.contains(".lora_A.expert_0."))
        .expect("an expert key in the MoE fixture");
    // The half of the expert right after the last complete one: the loop that gathers
    // experts once took it out and dropped it unreported.
    let experts = (0..)
        .take_while(|e| moe.contains_key(&half.replace(".expert_0.", &format!(".expert_{e}."))))
        .count();
    let stray_key = half.replace(".expert_0.", &format!(".expert_{experts}."));
    let stray = variant(
        "lora_moe.safetensors",
        "stray.safetensors",
        &[(&stray_key, t.clone())],
    );
    let e = LoraSet::load(&stray, 1.0).expect_err("refused").to_string();
    assert!(e.contains(&format!("expert {experts}")), "{e}");
}
