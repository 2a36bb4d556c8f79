//! Tiled VAE passes against diffusers' `AutoencoderKL.enable_tiling()` on the tiny FLUX
//! autoencoder (tests/fixtures/flux/make_vae_tiling.py), and a tiled pass of one tile
//! against the plain pass.

mod support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_scale::models::flux::vae::{Autoencoder, VaeConfig};
use icedit_scale::models::flux::vae_tiling::VaeTiling;
use icedit_scale::models::flux::weights::KeyLayout;
use icedit_scale::models::weight_use::UnusedWeights;
use support::max_abs_diff;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux")
}

fn tiny_vae() -> Autoencoder {
    let dir = fixtures().join("tiny/vae");
    let config: VaeConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Autoencoder::load(
        &[dir.join("diffusion_pytorch_model.safetensors")],
        KeyLayout::Diffusers,
        &config,
        DType::F32,
        &Device::Cpu,
        UnusedWeights::Refuse,
    )
    .unwrap()
}

fn reference() -> (std::collections::HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("vae_tiling");
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    (tensors, meta)
}

/// Decode within 1/255 and the encode's mean within 1e-4 of diffusers, on images that span
/// 3 to 4 tiles across and 2 to 3 down (partial tiles at the edges), at two tile sizes.
#[test]
fn tiled_passes_match_diffusers_enable_tiling() {
    let vae = tiny_vae();
    let (r, meta) = reference();
    // The tiny config's sample_size is diffusers' default tile.
    assert_eq!(vae.config().sample_size, 32);
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let tiling = VaeTiling::new(case["tile"].as_u64().unwrap() as usize);
        let image = &r[&format!("{name}_image")];
        let (_, _, h, w) = image.dims4().unwrap();
        assert!(tiling.applies(h, w));

        let mean = vae.encode_mean_with(image, Some(&tiling)).unwrap();
        let encode_err = max_abs_diff(&mean, &r[&format!("{name}_encoded_mean")]);
        let latents = &r[&format!("{name}_latents")];
        let decoded = vae.decode_with(latents, Some(&tiling)).unwrap();
        let decode_err = max_abs_diff(&decoded, &r[&format!("{name}_decoded")]);
        eprintln!(
            "{name} ({w}x{h}, {} px tiles): encode max err {encode_err:.2e}, decode max err {decode_err:.2e}",
            tiling.tile
        );
        assert!(encode_err < 1e-4, "{name}: encode {encode_err}");
        // Decoded images are in [-1, 1]: 1/255 of [0, 1] is 2/255 here; held to 1/255.
        assert!(decode_err < 1.0 / 255.0, "{name}: decode {decode_err}");

        // The tiles matter: the untiled passes are far from the tiled ones on tiles this
        // small (the reference records how far diffusers' are).
        let plain = max_abs_diff(&vae.decode(latents).unwrap(), &decoded);
        assert!(plain > 0.1, "{name}: untiled decode only {plain} away");
        let recorded = case["tiled_vs_untiled_decode_max_abs"].as_f64().unwrap() as f32;
        assert!((plain - recorded).abs() < 1e-3, "{plain} vs {recorded}");
    }
}

/// A tiled pass whose image fits one tile step goes through the walk (one tile, nothing
/// blended, nothing cropped) and equals the plain pass; without tiling, or with a tile the
/// image does not exceed, the plain pass runs.
#[test]
fn a_tiled_pass_of_one_tile_equals_the_plain_pass() {
    let vae = tiny_vae();
    let (r, _) = reference();
    // 48x40 px: within one 64 px tile's step (48 px), so one tile.
    let image = r["tile64_image"]
        .narrow(2, 0, 40)
        .unwrap()
        .narrow(3, 0, 48)
        .unwrap();
    let latents = r["tile64_latents"]
        .narrow(2, 0, 5)
        .unwrap()
        .narrow(3, 0, 6)
        .unwrap();
    let one = VaeTiling::new(64);
    let plain_mean = vae.encode_mean(&image).unwrap();
    let plain_image = vae.decode(&latents).unwrap();
    let tiled_mean = vae.encode_mean_tiled(&image, &one).unwrap();
    let tiled_image = vae.decode_tiled(&latents, &one).unwrap();
    assert_eq!(tiled_mean.dims(), plain_mean.dims());
    assert_eq!(tiled_image.dims(), plain_image.dims());
    assert_eq!(max_abs_diff(&tiled_mean, &plain_mean), 0.0);
    assert_eq!(max_abs_diff(&tiled_image, &plain_image), 0.0);
    assert!(!one.applies(40, 48));
    assert_eq!(
        max_abs_diff(
            &vae.decode_with(&latents, Some(&one)).unwrap(),
            &plain_image
        ),
        0.0
    );
    // Two tiles across (56 px > 48): the walk blends, so the result moves.
    let wider = r["tile64_latents"]
        .narrow(2, 0, 5)
        .unwrap()
        .narrow(3, 0, 7)
        .unwrap();
    let two = vae.decode_tiled(&wider, &one).unwrap();
    assert_eq!(two.dims(), &[1, 3, 40, 56]);
    assert!(max_abs_diff(&two, &vae.decode(&wider).unwrap()) > 0.0);
}

/// A tile whose kept parts would not abut is refused by size, not run into a wrong shape.
#[test]
fn a_tile_that_does_not_divide_is_refused() {
    let vae = tiny_vae();
    let (r, _) = reference();
    let err = vae
        .decode_tiled(&r["tile32_latents"], &VaeTiling::new(40))
        .unwrap_err()
        .to_string();
    assert!(err.contains("VAE tile 40 px"), "{err}");
}
