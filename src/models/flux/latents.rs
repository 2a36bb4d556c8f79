//! Token packing of latents and masks, position ids, and image <-> tensor conversion.

use candle_core::{DType, Device, Result, Tensor};
use image::{GrayImage, RgbImage};

/// `[B, C, h, w]` -> `[B, (h/2)(w/2), 4C]`: 2x2 latent patches become tokens.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack`] for a latent grid of `h x w` cells.
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, d) = tokens.dims3()?;
    let c = d / 4;
    tokens
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

/// A binary mask `H x W` (255 = regenerate) to Fill's mask tokens `[1, tokens, 4 f^2]`:
/// pixel-unshuffled by the VAE factor `f`, then packed 2x2 (diffusers
/// `FluxFillPipeline.prepare_mask_latents`).
pub fn pack_mask(mask: &GrayImage, f: usize, dev: &Device) -> Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let values: Vec<f32> = mask
        .pixels()
        .map(|p| if p.0[0] >= 128 { 1.0 } else { 0.0 })
        .collect();
    let (lh, lw) = (h / f, w / f);
    let m = Tensor::from_vec(values, (1, lh, f, lw, f), dev)?
        .permute((0, 2, 4, 1, 3))?
        .reshape((1, f * f, lh, lw))?;
    pack(&m)
}

/// Image position ids `[row, col]` over a `rows x cols` token grid, text ids zero:
/// the joint `[text; image]` id list.
pub fn joint_ids(text_tokens: usize, rows: usize, cols: usize) -> Vec<[f32; 3]> {
    let mut ids = vec![[0.0; 3]; text_tokens];
    for r in 0..rows {
        for c in 0..cols {
            ids.push([0.0, r as f32, c as f32]);
        }
    }
    ids
}

/// An RGB image to `[1, 3, H, W]` in [-1, 1] (f32).
pub fn image_to_tensor(image: &RgbImage, dev: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Tensor::from_vec(data, (h, w, 3), dev)?
        .permute((2, 0, 1))?
        .unsqueeze(0)
}

/// `[1, 3, H, W]` in about [-1, 1] to the float image in [0, 1], `[H, W, 3]` (diffusers'
/// postprocessing before quantisation).
pub fn tensor_to_unit(image: &Tensor) -> Result<Tensor> {
    ((image.squeeze(0)?.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))
}

/// A `[H, W, 3]` float image in [0, 1] to 8-bit RGB, rounding as diffusers does.
pub fn unit_to_image(unit: &Tensor) -> Result<RgbImage> {
    let (h, w, _) = unit.dims3()?;
    let bytes: Vec<u8> = (unit * 255.0)?
        .round()?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v.clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| candle_core::Error::Msg("image buffer size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_groups_2x2_cells() {
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 4, 6))
            .unwrap();
        let p = pack(&x).unwrap();
        assert_eq!(p.dims(), &[1, 6, 8]);
        // Token 0 holds channel 0's cells (0,0),(0,1),(1,0),(1,1) first.
        let t0: Vec<f32> = p.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(&t0[..4], &[0.0, 1.0, 6.0, 7.0]);
        let back = unpack(&p, 4, 6).unwrap();
        let diff = (back - x)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn mask_tokens_mark_the_right_half() {
        let mask = GrayImage::from_fn(64, 32, |x, _| image::Luma([if x >= 32 { 255 } else { 0 }]));
        let m = pack_mask(&mask, 8, &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[1, 8, 256]);
        let rows: Vec<Vec<f32>> = m.squeeze(0).unwrap().to_vec2().unwrap();
        // Token grid 2 x 4: columns 2 and 3 are the right half.
        assert!(rows[0].iter().all(|&v| v == 0.0));
        assert!(rows[2].iter().all(|&v| v == 1.0));
    }
}
