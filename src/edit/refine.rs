//! The image side of a hi-res refine (`--refine WIDTH`): the size the picked edit is
//! refined at, its Lanczos upscale, and the blend that keeps the source wherever the edit
//! changed nothing (`--refine-keep-unchanged`).
//!
//! ICEdit's LoRA was trained on 512-wide panels, so the edit is made there; the refine then
//! re-runs FLUX Fill image-to-image on a diptych at WIDTH, `[source | upscaled edit]` with
//! the right half masked, starting part-way down the schedule (see
//! `generate::schedule::Schedule::start_for_strength`).

use image::{imageops, imageops::FilterType, GrayImage, Luma, Rgb, RgbImage};

use super::diptych::{panel_width_error, MAX_PANEL_SIDE, PANEL_MULTIPLE};
use crate::error::EditError;

/// A per-channel difference (0-255) above which a pixel counts as changed by the edit.
/// FLUX never reproduces a pixel exactly, so "unchanged" means within a few levels; 24 sits
/// above the VAE round trip's typical error and below any visible edit.
pub const CHANGED_ABOVE: u8 = 24;

/// How far, in edit-size pixels, a change spreads into its neighbours before the blend: an
/// edit's soft borders are kept with it.
pub const CHANGE_MARGIN: u32 = 4;

/// The refine size of an edit panel `(w, h)` at `width`: the height scaled by the aspect
/// ratio and rounded down to a multiple of 16, both sides within the panel limits. The
/// refine width must be larger than the edit's.
pub fn refine_size(panel: (u32, u32), width: u32) -> Result<(u32, u32), EditError> {
    let (w, h) = panel;
    if let Some(reason) = panel_width_error(width) {
        return Err(EditError::Invalid(format!("--refine {width}: {reason}")));
    }
    if width <= w {
        return Err(EditError::Invalid(format!(
            "--refine {width}: the edit is already {w} px wide; refine to a larger width (or drop --refine)"
        )));
    }
    let height = (h as u64 * width as u64 / w as u64) as u32 / PANEL_MULTIPLE * PANEL_MULTIPLE;
    if height == 0 || height > MAX_PANEL_SIDE {
        return Err(EditError::Invalid(format!(
            "--refine {width}: a {w}x{h} panel would be {height} px high at that width (between {PANEL_MULTIPLE} and {MAX_PANEL_SIDE} allowed)"
        )));
    }
    Ok((width, height))
}

/// `image` scaled to `size` with a Lanczos filter (the picked edit, up to the refine size).
pub fn upscale(image: &RgbImage, size: (u32, u32)) -> RgbImage {
    if image.dimensions() == size {
        return image.clone();
    }
    imageops::resize(image, size.0, size.1, FilterType::Lanczos3)
}

/// Where the edit changed the source, at the refine size: 0 where source and edit agree
/// (within [`CHANGED_ABOVE`] per channel, [`CHANGE_MARGIN`] pixels away from any change),
/// 255 where they differ, feathered in between. Both panels are at the edit size.
pub fn change_mask(source: &RgbImage, edit: &RgbImage, size: (u32, u32)) -> GrayImage {
    let (w, h) = source.dimensions();
    let changed = GrayImage::from_fn(w, h, |x, y| {
        let (a, b) = (source.get_pixel(x, y), edit.get_pixel(x, y));
        let differs = (0..3).any(|c| a[c].abs_diff(b[c]) > CHANGED_ABOVE);
        Luma([if differs { 255 } else { 0 }])
    });
    // Feathered by a 3x3 box and the bilinear upscale; both only mix neighbours, so an area
    // more than a few pixels from any change stays exactly 0 and keeps the source.
    let grown = box3(&dilate(&changed, CHANGE_MARGIN));
    imageops::resize(&grown, size.0, size.1, FilterType::Triangle)
}

/// The mean over each pixel's 3x3 neighbourhood (edges clamped), rounded: a flat 0 or 255
/// area stays exactly 0 or 255.
fn box3(mask: &GrayImage) -> GrayImage {
    let (w, h) = mask.dimensions();
    GrayImage::from_fn(w, h, |x, y| {
        let mut sum = 0u32;
        for dy in [-1i64, 0, 1] {
            for dx in [-1i64, 0, 1] {
                let xi = (x as i64 + dx).clamp(0, w as i64 - 1) as u32;
                let yi = (y as i64 + dy).clamp(0, h as i64 - 1) as u32;
                sum += mask.get_pixel(xi, yi)[0] as u32;
            }
        }
        Luma([((sum + 4) / 9) as u8])
    })
}

/// The binary maximum of `mask` over a `(2r + 1)` square around each pixel.
fn dilate(mask: &GrayImage, r: u32) -> GrayImage {
    let (w, h) = mask.dimensions();
    // Rows then columns: a square's maximum is the maximum of row maxima.
    let rows = GrayImage::from_fn(w, h, |x, y| {
        let (lo, hi) = (x.saturating_sub(r), (x + r).min(w - 1));
        Luma([(lo..=hi)
            .map(|i| mask.get_pixel(i, y)[0])
            .max()
            .unwrap_or(0)])
    });
    GrayImage::from_fn(w, h, |x, y| {
        let (lo, hi) = (y.saturating_sub(r), (y + r).min(h - 1));
        Luma([(lo..=hi)
            .map(|j| rows.get_pixel(x, j)[0])
            .max()
            .unwrap_or(0)])
    })
}

/// `refined` where `mask` is 255, `source` where it is 0, mixed linearly between: the
/// source keeps its full resolution where the edit did not touch it. All three at the
/// refine size.
pub fn blend_unchanged(refined: &RgbImage, source: &RgbImage, mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(refined.width(), refined.height(), |x, y| {
        let m = mask.get_pixel(x, y)[0];
        let (r, s) = (refined.get_pixel(x, y), source.get_pixel(x, y));
        match m {
            0 => *s,
            255 => *r,
            _ => {
                let t = m as f32 / 255.0;
                let mix = |c: usize| (s[c] as f32 + t * (r[c] as f32 - s[c] as f32)).round() as u8;
                Rgb([mix(0), mix(1), mix(2)])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
        })
    }

    #[test]
    fn the_refine_size_keeps_the_aspect_and_the_panel_rules() {
        assert_eq!(refine_size((512, 512), 1024).unwrap(), (1024, 1024));
        // A portrait panel: 512 x 768 at 1024 wide is 1024 x 1536, the limit.
        assert_eq!(refine_size((512, 768), 1024).unwrap(), (1024, 1536));
        // 512 x 352 at 768: 528 high.
        assert_eq!(refine_size((512, 352), 768).unwrap(), (768, 528));
        let err = |panel, width| refine_size(panel, width).unwrap_err().to_string();
        assert!(err((512, 512), 1000).contains("multiple of 16"));
        assert!(err((512, 512), 512).contains("larger width"));
        assert!(err((512, 800), 1024).contains("px high"));
        assert!(err((512, 512), 2048).contains("1536"));
    }

    #[test]
    fn the_blend_keeps_the_source_exactly_where_the_edit_changed_nothing() {
        let (w, h) = (32, 24);
        let source = gradient(w, h);
        let mut edit = source.clone();
        // The edit changes a block in the middle and leaves a few levels of noise elsewhere.
        for y in 0..h {
            for x in 0..w {
                let p = edit.get_pixel_mut(x, y);
                if (12..20).contains(&x) && (8..16).contains(&y) {
                    *p = Rgb([250, 10, 10]);
                } else {
                    p[0] = p[0].saturating_add(3);
                }
            }
        }
        let size = (64, 48);
        let mask = change_mask(&source, &edit, size);
        let source_hi = upscale(&source, size);
        let refined = RgbImage::from_pixel(size.0, size.1, Rgb([1, 2, 3]));
        let out = blend_unchanged(&refined, &source_hi, &mask);
        // Every refined pixel whose edit pixel lies more than the margin (plus one for the
        // box and one for the bilinear upscale) from the changed block keeps the source.
        let far = |x: u32, y: u32| {
            let (ex, ey) = (x as i64 / 2, y as i64 / 2);
            let dx = (12 - ex).max(ex - 19).max(0);
            let dy = (8 - ey).max(ey - 15).max(0);
            dx.max(dy) > CHANGE_MARGIN as i64 + 2
        };
        let mut far_pixels = 0;
        for (x, y, m) in mask.enumerate_pixels() {
            if far(x, y) {
                far_pixels += 1;
                assert_eq!(m[0], 0, "({x}, {y}) is far from the change");
            }
            // Wherever the mask is 0 the output is the source, wherever 255 the refine.
            match m[0] {
                0 => assert_eq!(out.get_pixel(x, y), source_hi.get_pixel(x, y), "({x}, {y})"),
                255 => assert_eq!(out.get_pixel(x, y), &Rgb([1, 2, 3]), "({x}, {y})"),
                _ => {}
            }
        }
        assert!(far_pixels > 0);
        // Inside the change: the refined pixels.
        assert_eq!(mask.get_pixel(32, 24)[0], 255);
        assert_eq!(out.get_pixel(32, 24), &Rgb([1, 2, 3]));
        let untouched = mask.pixels().filter(|m| m[0] == 0).count();
        assert!(untouched > (size.0 * size.1) as usize / 2, "{untouched}");
    }
}
