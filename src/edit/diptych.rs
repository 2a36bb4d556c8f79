//! Panel resize, the `[source | blank]` diptych with its mask, and cropping the result.

use image::{imageops, imageops::FilterType, GrayImage, Luma, RgbImage};

use crate::error::EditError;

/// ICEdit's panel width: the source is scaled to 512 px wide.
pub const DEFAULT_PANEL_WIDTH: u32 = 512;

/// Both panel sides must be multiples of this (VAE /8, then 2x2 token packing).
pub const PANEL_MULTIPLE: u32 = 16;

/// The largest panel side, from memory. The diptych of a `s x s` panel has
/// `2 * (s/16)^2` image tokens plus 512 text tokens, and one FLUX attention map (24 heads,
/// bf16, one candidate) holds `24 * tokens^2 * 2` bytes: 0.3 GB at 512 px, 3.6 GB at
/// 1024, 17 GB at 1536, 53 GB at 2048, beyond any single GPU's working room next to the
/// 24 GB of weights. 1536 is the largest side that still runs on an 80 GB card.
pub const MAX_PANEL_SIDE: u32 = 1536;

/// Why a panel width is refused, if it is (`None`: usable).
pub fn panel_width_error(width: u32) -> Option<String> {
    (width == 0 || !width.is_multiple_of(PANEL_MULTIPLE) || width > MAX_PANEL_SIDE).then(|| {
        format!(
            "panel width {width} must be a multiple of {PANEL_MULTIPLE} between {PANEL_MULTIPLE} and {MAX_PANEL_SIDE} (a larger panel's attention maps outgrow any GPU)"
        )
    })
}

/// The panel an image of `w` x `h` becomes at `width`: the height scaled by the aspect
/// ratio and rounded down to a multiple of 16, refused when that is 0 or above
/// [`MAX_PANEL_SIDE`]. Known from the image header alone, before any decode.
pub fn panel_size(w: u32, h: u32, width: u32) -> Result<(u32, u32), EditError> {
    if let Some(reason) = panel_width_error(width) {
        return Err(EditError::Invalid(reason));
    }
    if w == 0 || h == 0 {
        return Err(EditError::Invalid(format!("image {w}x{h} is empty")));
    }
    let scaled = (h as u64 * width as u64 / w as u64).min(u32::MAX as u64) as u32;
    let height = scaled / PANEL_MULTIPLE * PANEL_MULTIPLE;
    if height == 0 {
        return Err(EditError::Invalid(format!(
            "image {w}x{h} is too wide: at width {width} its height rounds to 0"
        )));
    }
    if height > MAX_PANEL_SIDE {
        return Err(EditError::Invalid(format!(
            "image {w}x{h} is too tall: at width {width} the panel would be {height} px high, above {MAX_PANEL_SIDE}; give a smaller --width"
        )));
    }
    Ok((width, height))
}

/// Scales `image` to `width` (a multiple of 16), height scaled by the aspect ratio and
/// rounded down to a multiple of 16; both sides at most [`MAX_PANEL_SIDE`].
pub fn resize_to_panel(image: &RgbImage, width: u32) -> Result<RgbImage, EditError> {
    let (w, h) = image.dimensions();
    let (width, height) = panel_size(w, h, width)?;
    if (w, h) == (width, height) {
        return Ok(image.clone());
    }
    Ok(imageops::resize(image, width, height, FilterType::Lanczos3))
}

/// The diptych input of ICEdit: source on the left, blank on the right, and the mask
/// that tells the Fill model which half to regenerate.
#[derive(Debug, Clone)]
pub struct Diptych {
    /// `[source | black]`, 2W x H.
    pub image: RgbImage,
    /// 0 (keep) on the left half, 255 (regenerate) on the right, 2W x H.
    pub mask: GrayImage,
}

/// Builds the diptych and mask for a source panel.
///
/// The right half of the image is black: FLUX Fill multiplies the image by `1 - mask`
/// anyway, so the blank's content never reaches the model.
pub fn make_diptych(source: &RgbImage) -> Diptych {
    let (w, h) = source.dimensions();
    let mut image = RgbImage::new(2 * w, h);
    imageops::replace(&mut image, source, 0, 0);
    let mask = GrayImage::from_fn(2 * w, h, |x, _| Luma([if x >= w { 255 } else { 0 }]));
    Diptych { image, mask }
}

/// Crops the right panel (x from W to 2W) out of a decoded 2W x H diptych.
pub fn crop_right_panel(diptych: &RgbImage) -> RgbImage {
    let (w2, h) = diptych.dimensions();
    let w = w2 / 2;
    imageops::crop_imm(diptych, w, 0, w, h).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn resize_keeps_width_and_rounds_height_down_to_16() {
        let src = RgbImage::new(1000, 750);
        let out = resize_to_panel(&src, 512).unwrap();
        // 750 * 512 / 1000 = 384 exactly.
        assert_eq!(out.dimensions(), (512, 384));
        let src = RgbImage::new(640, 479);
        // 479 * 512 / 640 = 383.2 -> 383 -> 368.
        assert_eq!(resize_to_panel(&src, 512).unwrap().dimensions(), (512, 368));
        let square = RgbImage::new(512, 512);
        assert_eq!(
            resize_to_panel(&square, 512).unwrap().dimensions(),
            (512, 512)
        );
    }

    #[test]
    fn resize_rejects_bad_widths_and_panoramas() {
        assert!(resize_to_panel(&RgbImage::new(10, 10), 500).is_err());
        assert!(resize_to_panel(&RgbImage::new(10, 10), 0).is_err());
        let err = resize_to_panel(&RgbImage::new(4000, 10), 512).unwrap_err();
        assert!(err.to_string().contains("4000x10"), "{err}");
    }

    #[test]
    fn diptych_mask_and_crop_line_up() {
        let src = RgbImage::from_fn(32, 16, |x, y| Rgb([x as u8, y as u8, 7]));
        let d = make_diptych(&src);
        assert_eq!(d.image.dimensions(), (64, 16));
        assert_eq!(d.mask.dimensions(), (64, 16));
        assert_eq!(d.image.get_pixel(5, 3), &Rgb([5, 3, 7]));
        assert_eq!(d.image.get_pixel(40, 3), &Rgb([0, 0, 0]));
        assert_eq!(d.mask.get_pixel(31, 0)[0], 0);
        assert_eq!(d.mask.get_pixel(32, 0)[0], 255);
        // Cropping the right half of a diptych whose right half is the source gives it back.
        let mut full = d.image.clone();
        imageops::replace(&mut full, &src, 32, 0);
        assert_eq!(crop_right_panel(&full), src);
    }
}
