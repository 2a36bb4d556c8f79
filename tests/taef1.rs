//! TAEF1 (diffusers `AutoencoderTiny`, decoder only) against diffusers on tiny random weights
//! made by tests/fixtures/taef1/make_fixtures.py, in f32 on the CPU through the loading code
//! real weights take: a diffusers folder, a single file in either key layout, a Hugging Face
//! cache entry. Then the FLUX generator's choice of decoder per decode purpose.
//!
//! Tolerance: 1e-4 max abs error on outputs of magnitude ~4 (the decoder is 16 convolutions
//! deep; f32 sums in a different order differ by about 1e-6).

mod support;
use support::max_abs_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_scale::edit::{crop_right_panel, EditContext};
use icedit_scale::generate::flux::{FluxGenerator, FluxOptions, PreviewDecoder};
use icedit_scale::generate::noise::seeded_noise;
use icedit_scale::generate::{DecodePurpose, Generator};
use icedit_scale::models::flux::latents::{tensor_to_unit, unit_to_image, unpack};
use icedit_scale::models::flux::FluxPaths;
use icedit_scale::models::taef1::{TinyConfig, TinyDecoderFiles, TinyLayout};
use icedit_scale::models::weight_use::UnusedWeights;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/taef1")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture's configuration as its config.json gives it.
fn fixture_config() -> TinyConfig {
    TinyConfig {
        class_name: Some("AutoencoderTiny".into()),
        decoder_block_out_channels: vec![8; 4],
        num_decoder_blocks: vec![2, 1, 2, 1],
        scaling_factor: 1.5,
        shift_factor: 0.25,
        ..TinyConfig::taef1()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn the_decoder_matches_diffusers_in_f32() {
    let r = reference();
    let files = TinyDecoderFiles::discover(&fixtures().join("tiny")).unwrap();
    assert_eq!(files.layout, TinyLayout::Diffusers);
    assert_eq!(files.config, fixture_config());
    assert_eq!(
        files.config_path.as_deref(),
        Some(fixtures().join("tiny/config.json").as_path())
    );
    let decoder = files
        .load(DType::F32, &Device::Cpu, UnusedWeights::Refuse)
        .unwrap();

    // AutoencoderTiny.decode on its own input space.
    let decoded = decoder.decode(&r["latents"]).unwrap();
    assert_eq!(decoded.dims(), [2, 3, 48, 40]);
    let err = max_abs_diff(&decoded, &r["decoded"]);
    eprintln!("AutoencoderTiny.decode: max abs error {err:.2e}");
    assert!(err <= TOLERANCE, "decode: max abs error {err}");

    // The transformer's latents, unscaled with the model's own factors as FluxPipeline does.
    let from_model = decoder.decode_model_latents(&r["model_latents"]).unwrap();
    let err = max_abs_diff(&from_model, &r["from_model"]);
    eprintln!("FluxPipeline with AutoencoderTiny as its vae: max abs error {err:.2e}");
    assert!(
        err <= TOLERANCE,
        "decode_model_latents: max abs error {err}"
    );
    // The fixture's factors are not 1 and 0, so dropping them would show.
    let unscaled = decoder.decode(&r["model_latents"]).unwrap();
    assert!(max_abs_diff(&unscaled, &r["from_model"]) > 1e-2);
}

#[test]
fn single_files_in_either_layout_are_read_with_their_configuration_off_the_shapes() {
    let r = reference();
    let inferred = TinyConfig {
        class_name: None,
        scaling_factor: 1.0,
        shift_factor: 0.0,
        ..fixture_config()
    };
    for (file, layout) in [
        (
            "tiny/diffusion_pytorch_model.safetensors",
            TinyLayout::Diffusers,
        ),
        ("taesd_decoder.safetensors", TinyLayout::Taesd),
    ] {
        let files = TinyDecoderFiles::discover(&fixtures().join(file)).unwrap();
        assert_eq!(files.layout, layout, "{file}");
        assert_eq!(files.config, inferred, "{file}");
        assert!(files.config_path.is_none());
        let decoder = files
            .load(DType::F32, &Device::Cpu, UnusedWeights::Refuse)
            .unwrap();
        let err = max_abs_diff(&decoder.decode(&r["latents"]).unwrap(), &r["decoded"]);
        eprintln!("{file} ({layout:?}): max abs error {err:.2e}");
        assert!(err <= TOLERANCE, "{file}: max abs error {err}");
    }

    // A folder with only the taesd.py file is found through it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("taesd_decoder.safetensors"),
        dir.path().join("taef1_decoder.safetensors"),
    )
    .unwrap();
    let files = TinyDecoderFiles::discover(dir.path()).unwrap();
    assert_eq!(files.layout, TinyLayout::Taesd);
}

#[test]
fn a_hub_id_is_found_in_the_hugging_face_cache() {
    let cache = tempfile::tempdir().unwrap();
    let entry = cache.path().join("models--madebyollin--taef1");
    copy_dir(&fixtures().join("tiny"), &entry.join("snapshots/0123abc"));
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abc").unwrap();
    // The only test in this binary that reads the Hub settings.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let files = TinyDecoderFiles::discover(Path::new("madebyollin/taef1")).unwrap();
    assert_eq!(
        files.weights,
        entry.join("snapshots/0123abc/diffusion_pytorch_model.safetensors")
    );
    assert_eq!(files.config, fixture_config());
    // The cache entry itself resolves to its snapshot too.
    assert_eq!(
        TinyDecoderFiles::discover(&entry).unwrap().weights,
        files.weights
    );
    let err = TinyDecoderFiles::discover(Path::new("madebyollin/not-there"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("madebyollin/not-there") && err.contains("download"),
        "{err}"
    );
}

#[test]
fn missing_keys_bad_shapes_and_wrong_configs_are_named() {
    let dir = tempfile::tempdir().unwrap();

    // A tensor missing from a diffusers folder: the key and the file are named.
    let folder = dir.path().join("missing");
    copy_dir(&fixtures().join("tiny"), &folder);
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.remove("decoder.layers.9.conv.2.weight").unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = TinyDecoderFiles::discover(&folder)
        .unwrap()
        .load(DType::F32, &Device::Cpu, UnusedWeights::Refuse)
        .unwrap_err()
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("decoder.layers.9.conv.2.weight")
            && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );

    // A config asking for more blocks than the file has: the first absent key is named.
    let folder = dir.path().join("more_blocks");
    copy_dir(&fixtures().join("tiny"), &folder);
    let config = std::fs::read_to_string(folder.join("config.json"))
        .unwrap()
        .replace(
            "\"num_decoder_blocks\": [\n    2,",
            "\"num_decoder_blocks\": [\n    3,",
        );
    std::fs::write(folder.join("config.json"), config).unwrap();
    let err = TinyDecoderFiles::discover(&folder)
        .unwrap()
        .load(DType::F32, &Device::Cpu, UnusedWeights::Refuse)
        .unwrap_err()
        .to_string();
    assert!(err.contains("decoder.layers.4.conv.0.weight"), "{err}");

    // A wrong shape in a taesd.py file: named with the file's own key.
    let file = dir.path().join("taef1_decoder.safetensors");
    let mut tensors =
        candle_core::safetensors::load(fixtures().join("taesd_decoder.safetensors"), &Device::Cpu)
            .unwrap();
    tensors.insert(
        "3.conv.2.weight".into(),
        Tensor::zeros((8, 4, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = TinyDecoderFiles::discover(&file)
        .unwrap()
        .load(DType::F32, &Device::Cpu, UnusedWeights::Refuse)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3.conv.2.weight") && err.contains("taef1_decoder.safetensors"),
        "{err}"
    );

    // Another autoencoder's folder is refused by its config's class name.
    let folder = dir.path().join("kl");
    copy_dir(&fixtures().join("tiny"), &folder);
    let config = std::fs::read_to_string(folder.join("config.json"))
        .unwrap()
        .replace("\"AutoencoderTiny\"", "\"AutoencoderKL\"");
    std::fs::write(folder.join("config.json"), config).unwrap();
    let err = TinyDecoderFiles::discover(&folder).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("_class_name"),
        "{err}"
    );

    // A file without decoder weights, and a path that is not there.
    let file = dir.path().join("encoder_only.safetensors");
    let mut tensors = HashMap::new();
    tensors.insert(
        "encoder.layers.0.weight".to_string(),
        Tensor::zeros((8, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = TinyDecoderFiles::discover(&file).unwrap_err().to_string();
    assert!(
        err.contains("encoder_only.safetensors") && err.contains("decoder.layers.0.weight"),
        "{err}"
    );
    let err = TinyDecoderFiles::discover(&dir.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
}

fn flux_options(tiny: Option<PathBuf>, preview: PreviewDecoder) -> FluxOptions {
    let mut o = FluxOptions::new(FluxPaths {
        model_dir: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux/tiny")),
        ..Default::default()
    });
    o.t5_tokens = 48;
    o.tiny_decoder = tiny;
    o.preview_decoder = preview;
    o
}

#[test]
fn the_flux_generator_decodes_live_previews_with_the_tiny_decoder() {
    let source =
        image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux/source.png"))
            .unwrap()
            .to_rgb8();
    let edit = EditContext::new("fixture", source, "make the sky night");
    let decode_all = |mut generator: FluxGenerator| {
        let prepared = generator.prepare(&edit).unwrap();
        let latents = seeded_noise(7, &prepared.latent_shape, &Device::Cpu).unwrap();
        let images: Vec<_> = [
            DecodePurpose::Live,
            DecodePurpose::Preview,
            DecodePurpose::Final,
        ]
        .into_iter()
        .map(|purpose| generator.decode(&prepared, &latents, purpose).unwrap())
        .collect();
        (generator, prepared, latents, images)
    };

    let tiny = Some(fixtures().join("tiny"));
    let (generator, _prepared, latents, images) =
        decode_all(FluxGenerator::load(flux_options(tiny.clone(), PreviewDecoder::Full)).unwrap());
    let [live, preview, last] = &images[..] else {
        unreachable!()
    };
    assert_ne!(live, last, "live previews go through the tiny decoder");
    assert_eq!(
        preview, last,
        "the judge's previews stay on the FLUX autoencoder"
    );
    // The live image is the tiny decoder's decode of the transformer's latents as they are
    // (unpacked: the 48 x 32 panel's diptych is 4 x 12 latent cells), cropped to the panel.
    let z = unpack(&latents.unsqueeze(0).unwrap(), 4, 12).unwrap();
    let image = generator
        .tiny_decoder()
        .unwrap()
        .decode_model_latents(&z)
        .unwrap();
    let expected = crop_right_panel(&unit_to_image(&tensor_to_unit(&image).unwrap()).unwrap());
    assert_eq!(*live, expected);
    assert!(generator.info().detail.contains("tiny decoder"));

    let (_, _, _, images) =
        decode_all(FluxGenerator::load(flux_options(tiny.clone(), PreviewDecoder::Tiny)).unwrap());
    assert_eq!(
        images[1], *live,
        "previews through the tiny decoder when asked"
    );
    assert_eq!(
        images[2], *last,
        "final images always through the FLUX autoencoder"
    );

    let (_, _, _, images) =
        decode_all(FluxGenerator::load(flux_options(None, PreviewDecoder::Full)).unwrap());
    assert_eq!(
        images[0], *last,
        "without a tiny decoder, live previews use the VAE"
    );

    // The tiny preview decoder without a tiny decoder, and one for another latent space.
    let err = FluxGenerator::load(flux_options(None, PreviewDecoder::Tiny))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tiny decoder"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny"), dir.path());
    let config = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"latent_channels\": 16", "\"latent_channels\": 4");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let err = FluxGenerator::load(flux_options(
        Some(dir.path().to_path_buf()),
        PreviewDecoder::Full,
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("config.json") && err.contains("4 latent channels"),
        "{err}"
    );
    assert_eq!("tiny".parse::<PreviewDecoder>(), Ok(PreviewDecoder::Tiny));
    assert!("fast".parse::<PreviewDecoder>().is_err());
}

/// The tiny encoder beside the decoder is left unread as diffusers' decode leaves it; any
/// other tensor the decoder does not read is refused with the file and key named.
#[test]
fn a_tensor_the_decoder_does_not_read_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("extra");
    copy_dir(&fixtures().join("tiny"), &folder);
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    assert!(tensors.keys().any(|k| k.starts_with("encoder.layers.")));
    tensors.insert(
        "decoder.layers.18.weight".into(),
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let files = TinyDecoderFiles::discover(&folder).unwrap();
    let err = files
        .load(DType::F32, &Device::Cpu, UnusedWeights::Refuse)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("diffusion_pytorch_model.safetensors: `decoder.layers.18.weight`")
            && err.contains("1 tensor"),
        "{err}"
    );
    files
        .load(DType::F32, &Device::Cpu, UnusedWeights::Allow)
        .unwrap();
}
