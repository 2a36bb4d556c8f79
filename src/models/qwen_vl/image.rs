//! Image preprocessing for Qwen2-VL / Qwen2.5-VL: `smart_resize` to a multiple of the
//! merged patch side, PIL bicubic resampling, rescale and normalise, and flattening into
//! the vision tower's patch rows.
//!
//! The reference is transformers' `Qwen2VLImageProcessorPil` (the PIL backend). Its resize
//! goes through Pillow's integer fixed-point resampler, so [`resize_bicubic`] reimplements
//! `src/libImaging/Resample.c` step by step (same coefficients, same rounding, same
//! intermediate 8-bit image) and gives the same bytes. The float steps then follow the
//! backend's arithmetic exactly: rescale in float64 and round to float32, normalise in
//! float32. On the fixtures and on random images up to 4000x3000 the output is
//! bit-identical to the reference (transformers 5.24, Pillow 13.0).
//!
//! Two caveats about "the reference": the torchvision backend (`Qwen2VLImageProcessor`)
//! resizes with its own float bicubic kernel, so its values differ slightly from PIL's; and
//! Pillow before 13 always ran the horizontal pass first, so for images whose height shrinks
//! much more than their width older Pillows give slightly different bytes (see
//! [`resize_bicubic`]; one 1/255 step on some pixels of smooth images, more on pixel noise).

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ModelError;

/// OpenAI CLIP mean, transformers' `OPENAI_CLIP_MEAN` (the Qwen2-VL default).
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP standard deviation, transformers' `OPENAI_CLIP_STD`.
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// transformers' `smart_resize` refuses images more elongated than this.
const MAX_ASPECT_RATIO: f64 = 200.0;
/// `PILImageResampling.BICUBIC`, the only filter implemented here (and Qwen's default).
const RESAMPLE_BICUBIC: u32 = 3;
/// Image channels; the processor always converts to RGB.
const CHANNELS: usize = 3;

/// `preprocessor_config.json` of a Qwen2-VL checkpoint.
///
/// Hub checkpoints (transformers 4) store the pixel budget as top-level `min_pixels` /
/// `max_pixels`; transformers 5 writes `size.shortest_edge` / `size.longest_edge`. Both are
/// read; as in transformers' constructor the legacy keys win when both are present. Unknown
/// keys (`image_processor_type`, `processor_class`, ...) are ignored. Deserialising validates
/// the values, so every instance built from JSON is usable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "JsonObject")]
pub struct ImageProcessorConfig {
    /// Lower bound on resized height × width (default 56·56).
    pub min_pixels: usize,
    /// Upper bound on resized height × width (default 28·28·1280).
    pub max_pixels: usize,
    /// Side of a vision patch in pixels (default 14).
    pub patch_size: usize,
    /// Frames per temporal patch; a still image is repeated this many times (default 2).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one language-model token (default 2).
    pub merge_size: usize,
    /// Per-channel mean subtracted after rescaling (default: CLIP mean).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean (default: CLIP std).
    pub image_std: [f32; 3],
    /// Resize with `smart_resize` + bicubic (default true). When false the image must
    /// already have sides that are multiples of `patch_size * merge_size`.
    pub do_resize: bool,
    /// Multiply the 8-bit values by `rescale_factor` (default true).
    pub do_rescale: bool,
    /// Rescale factor (default 1/255). Kept in f64 because the reference multiplies in
    /// float64 before rounding to float32.
    pub rescale_factor: f64,
    /// Subtract `image_mean` and divide by `image_std` (default true).
    pub do_normalize: bool,
    /// PIL resampling filter id; only 3 (bicubic) is supported.
    pub resample: u32,
}

impl Default for ImageProcessorConfig {
    /// The class defaults of transformers' Qwen2-VL image processor.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            resample: RESAMPLE_BICUBIC,
        }
    }
}

/// The parsed JSON object, converted field by field so that every error names its field
/// (serde's derived errors say "invalid type" without saying where).
type JsonObject = serde_json::Map<String, Value>;

/// Reads an optional field; `null` counts as absent, as `None` does in transformers.
fn field<T: serde::de::DeserializeOwned>(
    object: &JsonObject,
    name: &str,
) -> Result<Option<T>, String> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value)
            .map(Some)
            .map_err(|e| format!("`{name}`: {e}")),
    }
}

impl TryFrom<JsonObject> for ImageProcessorConfig {
    type Error = String;

    fn try_from(object: JsonObject) -> Result<Self, String> {
        let d = Self::default();
        // transformers 5's `size` dict; some hand-edited configs put `min_pixels` /
        // `max_pixels` inside it, meaning the same.
        let size: JsonObject = field(&object, "size")?.unwrap_or_default();
        let size_field =
            |name: &str| field::<usize>(&size, name).map_err(|e| format!("in `size`, {e}"));
        let size_min = size_field("shortest_edge")?.or(size_field("min_pixels")?);
        let size_max = size_field("longest_edge")?.or(size_field("max_pixels")?);
        let config = Self {
            min_pixels: field(&object, "min_pixels")?
                .or(size_min)
                .unwrap_or(d.min_pixels),
            max_pixels: field(&object, "max_pixels")?
                .or(size_max)
                .unwrap_or(d.max_pixels),
            patch_size: field(&object, "patch_size")?.unwrap_or(d.patch_size),
            temporal_patch_size: field(&object, "temporal_patch_size")?
                .unwrap_or(d.temporal_patch_size),
            merge_size: field(&object, "merge_size")?.unwrap_or(d.merge_size),
            image_mean: per_channel("image_mean", object.get("image_mean"), CLIP_MEAN)?,
            image_std: per_channel("image_std", object.get("image_std"), CLIP_STD)?,
            do_resize: field(&object, "do_resize")?.unwrap_or(d.do_resize),
            do_rescale: field(&object, "do_rescale")?.unwrap_or(d.do_rescale),
            rescale_factor: field(&object, "rescale_factor")?.unwrap_or(d.rescale_factor),
            do_normalize: field(&object, "do_normalize")?.unwrap_or(d.do_normalize),
            resample: field(&object, "resample")?.unwrap_or(d.resample),
        };
        config.check()?;
        Ok(config)
    }
}

/// Reads a per-channel constant given as a number or a list of three numbers. The JSON
/// value is parsed as f64 and then rounded to f32, which is what `np.array(mean,
/// dtype=np.float32)` does in the reference.
fn per_channel(name: &str, value: Option<&Value>, default: [f64; 3]) -> Result<[f32; 3], String> {
    let values = match value {
        None | Some(Value::Null) => default,
        Some(Value::Number(n)) => {
            let v = n
                .as_f64()
                .ok_or_else(|| format!("`{name}` is not a finite number"))?;
            [v; 3]
        }
        Some(Value::Array(items)) if items.len() == CHANNELS => {
            let mut out = [0.0; 3];
            for (slot, item) in out.iter_mut().zip(items) {
                *slot = item
                    .as_f64()
                    .ok_or_else(|| format!("`{name}` must hold numbers, got {item}"))?;
            }
            out
        }
        Some(other) => {
            return Err(format!(
                "`{name}` must be a number or a list of {CHANNELS} numbers, got {other}"
            ))
        }
    };
    Ok(values.map(|v| v as f32))
}

impl ImageProcessorConfig {
    /// Reads and validates the file; errors name the path and the field.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Config(format!("cannot read {}: {e}", path.display())))?;
        // Conversion and validation messages name the field (see `TryFrom<JsonObject>`).
        serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks the values the processing relies on; the message names the field.
    fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("merge_size", self.merge_size),
            ("min_pixels", self.min_pixels),
            ("max_pixels", self.max_pixels),
        ] {
            if value == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if self.min_pixels > self.max_pixels {
            return Err(format!(
                "`min_pixels` ({}) exceeds `max_pixels` ({})",
                self.min_pixels, self.max_pixels
            ));
        }
        if !self.rescale_factor.is_finite() {
            return Err("`rescale_factor` must be finite".to_string());
        }
        if self.image_mean.iter().any(|v| !v.is_finite()) {
            return Err("`image_mean` must be finite".to_string());
        }
        if self.image_std.iter().any(|v| !v.is_finite() || *v == 0.0) {
            return Err("`image_std` must be finite and non-zero".to_string());
        }
        if self.resample != RESAMPLE_BICUBIC {
            return Err(format!(
                "`resample` {} is not supported (only {RESAMPLE_BICUBIC}, bicubic)",
                self.resample
            ));
        }
        Ok(())
    }

    /// The side every resized dimension is a multiple of: one merged token in pixels.
    fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// transformers' smart_resize: (height, width) rounded to multiples of patch*merge
    /// within [min,max] pixels; errors (ModelError::Config) for aspect ratio > 200 or zero
    /// size, like the reference.
    ///
    /// The float expressions are evaluated in the same order as the Python (f64 throughout,
    /// `round` with ties to even like Python's `round`), so borderline sizes land on the
    /// same multiple.
    pub fn smart_resize(&self, height: usize, width: usize) -> Result<(usize, usize), ModelError> {
        if height == 0 || width == 0 {
            return Err(ModelError::Config(format!(
                "cannot resize an empty image ({width}x{height})"
            )));
        }
        let factor = self.factor();
        if factor == 0 {
            return Err(ModelError::Config(
                "`patch_size` and `merge_size` must be positive".to_string(),
            ));
        }
        let (h, w, f) = (height as f64, width as f64, factor as f64);
        let ratio = h.max(w) / h.min(w);
        if ratio > MAX_ASPECT_RATIO {
            return Err(ModelError::Config(format!(
                "absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} \
                 ({width}x{height})"
            )));
        }
        let mut h_bar = (h / f).round_ties_even() as usize * factor;
        let mut w_bar = (w / f).round_ties_even() as usize * factor;
        if h_bar * w_bar > self.max_pixels {
            let beta = ((h * w) / self.max_pixels as f64).sqrt();
            h_bar = factor.max((h / beta / f).floor() as usize * factor);
            w_bar = factor.max((w / beta / f).floor() as usize * factor);
        } else if h_bar * w_bar < self.min_pixels {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            h_bar = (h * beta / f).ceil() as usize * factor;
            w_bar = (w * beta / f).ceil() as usize * factor;
        }
        // Unreachable with min_pixels >= 1, but a zero side would only fail later, obscurely.
        if h_bar == 0 || w_bar == 0 {
            return Err(ModelError::Config(format!(
                "smart_resize of {width}x{height} gave an empty image (min_pixels {})",
                self.min_pixels
            )));
        }
        Ok((h_bar, w_bar))
    }

    /// Resize (PIL bicubic), rescale, normalise, repeat the frame over the temporal patch
    /// and flatten into patches in Qwen's order.
    ///
    /// The input is taken as already RGB; callers decoding images with alpha should
    /// convert them the way they want first (transformers composites onto white).
    pub fn preprocess(&self, image: &RgbImage) -> Result<PreparedImage, ModelError> {
        self.check().map_err(ModelError::Config)?;
        let (height, width) = (image.height() as usize, image.width() as usize);
        let factor = self.factor();
        let resized;
        let image = if self.do_resize {
            let (h, w) = self.smart_resize(height, width)?;
            resized = resize_bicubic(image, w as u32, h as u32);
            &resized
        } else {
            // The reference's reshape into merge blocks fails on any other size.
            if height == 0 || width == 0 || height % factor != 0 || width % factor != 0 {
                return Err(ModelError::Config(format!(
                    "with `do_resize` false the image ({width}x{height}) must have sides that \
                     are positive multiples of {factor}"
                )));
            }
            image
        };
        let (height, width) = (image.height() as usize, image.width() as usize);
        let planes = normalized_planes(self, image);

        let (patch, merge, temporal) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (grid_h, grid_w) = (height / patch, width / patch);
        let row_len = CHANNELS * temporal * patch * patch;
        let mut pixel_values = Vec::with_capacity(grid_h * grid_w * row_len);
        // Rows in transformers' order: merge block (row, col), then the patch inside the
        // block (row, col), so the merger's 2x2 groups are consecutive rows. Inside a row:
        // channel, temporal copy, pixel row, pixel column.
        for block_y in 0..grid_h / merge {
            for block_x in 0..grid_w / merge {
                for in_y in 0..merge {
                    for in_x in 0..merge {
                        let y0 = (block_y * merge + in_y) * patch;
                        let x0 = (block_x * merge + in_x) * patch;
                        for plane in &planes {
                            // A still image fills every temporal slot with the same frame.
                            for _ in 0..temporal {
                                for y in y0..y0 + patch {
                                    let start = y * width + x0;
                                    pixel_values.extend_from_slice(&plane[start..start + patch]);
                                }
                            }
                        }
                    }
                }
            }
        }
        debug_assert_eq!(pixel_values.len(), grid_h * grid_w * row_len);
        Ok(PreparedImage {
            pixel_values,
            grid_thw: [1, grid_h, grid_w],
        })
    }
}

/// Converts the 8-bit image into three float planes (channel-first), rescaled and
/// normalised with the reference's arithmetic: `(u8 as f64 * factor) as f32` (numpy upcasts
/// to float64 for the rescale, then casts down), then `(x - mean) / std` in float32.
fn normalized_planes(config: &ImageProcessorConfig, image: &RgbImage) -> [Vec<f32>; 3] {
    // Only 256 inputs per channel: build lookup tables once.
    let tables: [[f32; 256]; 3] = std::array::from_fn(|c| {
        std::array::from_fn(|v| {
            let mut x = if config.do_rescale {
                (v as f64 * config.rescale_factor) as f32
            } else {
                v as f32
            };
            if config.do_normalize {
                x = (x - config.image_mean[c]) / config.image_std[c];
            }
            x
        })
    });
    let pixels = image.width() as usize * image.height() as usize;
    let mut planes: [Vec<f32>; 3] = std::array::from_fn(|_| Vec::with_capacity(pixels));
    for rgb in image.as_raw().chunks_exact(CHANNELS) {
        for c in 0..CHANNELS {
            planes[c].push(tables[c][rgb[c] as usize]);
        }
    }
    planes
}

/// One image ready for the vision tower.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Flattened patches, row-major [grid_t*grid_h*grid_w, channels*temporal*patch*patch]
    /// (C, T, ph, pw inner order), in the order transformers emits them (t, h-block,
    /// w-block, merge-row, merge-col).
    pub pixel_values: Vec<f32>,
    /// Patch grid (t, h, w).
    pub grid_thw: [usize; 3],
}

impl PreparedImage {
    /// Rows of `pixel_values`: t·h·w patches.
    pub fn patch_count(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Values per patch row (channels·temporal·patch²; 1176 for Qwen2-VL).
    pub fn row_len(&self) -> usize {
        match self.patch_count() {
            0 => 0,
            n => self.pixel_values.len() / n,
        }
    }

    /// Tokens in the language model after merging = t*h*w/merge^2.
    pub fn token_count(&self, merge_size: usize) -> usize {
        self.patch_count() / (merge_size * merge_size).max(1)
    }
}

// ------------------------------------------------------------------------------------------
// Pillow's resampler (src/libImaging/Resample.c), bicubic, 8 bits per channel.

/// Fixed-point fraction bits of the coefficients: 32 bits minus 8 for the pixel value and
/// 2 for overflow headroom (negative lobes can push sums below 0 or above 1).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of the bicubic kernel at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's `bicubic_filter` with a = -0.5, with its exact operation order.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Resampling weights for one axis: for each output pixel the first input pixel and the
/// fixed-point weights of the following ones.
struct AxisCoeffs {
    /// Per output pixel: (first input index, number of taps).
    bounds: Vec<(usize, usize)>,
    /// `bounds.len() * ksize` fixed-point weights; row `i` starts at `i * ksize`.
    weights: Vec<i32>,
    /// Stride of `weights`.
    ksize: usize,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole axis
/// (box 0..in_size). The kernel is stretched by the downscale factor so downscaling
/// averages over all covered pixels (antialiasing); weights are normalised to sum to 1 in
/// f64 and then rounded half away from zero to `PRECISION_BITS` fixed point.
fn precompute_coeffs(in_size: usize, out_size: usize) -> AxisCoeffs {
    // Pillow computes `in1 - in0` in float from the float box; exact for real image sizes.
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = 0.0 + (xx as f64 + 0.5) * scale;
        // C casts to int (truncation toward zero) to "round"; `as i64` truncates the same way.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, taps) = (xmin as usize, xmax.max(0) as usize);
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(taps) {
            let w = bicubic_filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *slot = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (out, &w) in row.iter_mut().zip(&k).take(taps) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *out = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, taps));
    }
    AxisCoeffs {
        bounds,
        weights,
        ksize,
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift, i.e. floor, after the
/// +0.5 bias the sums start from) and saturate to a byte.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Initial value of every accumulator: one half in fixed point, so `clip8` rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// PIL's BICUBIC resize of an 8-bit RGB image, byte-exact with Pillow's
/// `Image.resize(..., Image.BICUBIC)`.
///
/// As in Pillow, the resize is two separable passes, each rounded and clipped to an 8-bit
/// intermediate image; an axis whose size does not change is not resampled at all. The pass
/// order matters for the bytes: Pillow 13 runs the vertical pass first when the height
/// shrinks by more than twice as many pixels as the width does (Resample.c,
/// `ImagingResampleInner`), otherwise horizontal first (always, before Pillow 13). This
/// follows Pillow 13, the reference environment's version. An empty source or target gives
/// a black image of the requested size (Pillow refuses both).
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let src = image.as_raw();

    let height_drop = in_h as i64 - out_h as i64;
    let width_drop = in_w as i64 - out_w as i64;
    let horizontal_first = !(height_drop > 0 && height_drop > width_drop * 2);

    let pixels = if horizontal_first {
        let vert = precompute_coeffs(in_h, out_h);
        // The horizontal pass only covers the source rows the vertical pass will read.
        let first_row = vert.bounds[0].0;
        let (last_min, last_taps) = vert.bounds[out_h - 1];
        let rows = first_row..last_min + last_taps;
        let (temp, temp_w, row_offset) = if need_horizontal {
            let horiz = precompute_coeffs(in_w, out_w);
            (horizontal_pass(src, in_w, rows, &horiz), out_w, first_row)
        } else {
            (src.to_vec(), in_w, 0)
        };
        if need_vertical {
            vertical_pass(&temp, temp_w, row_offset, &vert)
        } else {
            // Without a vertical change the rows above span the whole image.
            temp
        }
    } else {
        // Vertical first; only chosen when the height shrinks, so that pass always runs.
        let vert = precompute_coeffs(in_h, out_h);
        let temp = vertical_pass(src, in_w, 0, &vert);
        if need_horizontal {
            let horiz = precompute_coeffs(in_w, out_w);
            horizontal_pass(&temp, in_w, 0..out_h, &horiz)
        } else {
            temp
        }
    };
    RgbImage::from_raw(width, height, pixels).expect("buffer matches the size")
}

/// Pillow's `_ImagingResampleHorizontal_8bpc` for RGB: resamples rows `rows` of `src`
/// (`src_w` pixels wide) to `coeffs.bounds.len()` pixels per row.
fn horizontal_pass(
    src: &[u8],
    src_w: usize,
    rows: std::ops::Range<usize>,
    coeffs: &AxisCoeffs,
) -> Vec<u8> {
    let out_w = coeffs.bounds.len();
    let mut out = vec![0u8; rows.len() * out_w * CHANNELS];
    for (y, out_row) in rows.zip(out.chunks_exact_mut(out_w * CHANNELS)) {
        let in_row = &src[y * src_w * CHANNELS..][..src_w * CHANNELS];
        for (xx, (&(xmin, taps), out_px)) in coeffs
            .bounds
            .iter()
            .zip(out_row.chunks_exact_mut(CHANNELS))
            .enumerate()
        {
            let k = &coeffs.weights[xx * coeffs.ksize..][..taps];
            let mut sums = [HALF; CHANNELS];
            for (px, &kx) in in_row[xmin * CHANNELS..][..taps * CHANNELS]
                .chunks_exact(CHANNELS)
                .zip(k)
            {
                for (sum, &value) in sums.iter_mut().zip(px) {
                    *sum += i32::from(value) * kx;
                }
            }
            for (value, sum) in out_px.iter_mut().zip(sums) {
                *value = clip8(sum);
            }
        }
    }
    out
}

/// Pillow's `_ImagingResampleVertical_8bpc` for RGB: resamples the columns of `src`
/// (`width` pixels wide, its first row being source row `row_offset`) to
/// `coeffs.bounds.len()` rows.
fn vertical_pass(src: &[u8], width: usize, row_offset: usize, coeffs: &AxisCoeffs) -> Vec<u8> {
    let stride = width * CHANNELS;
    let mut out = vec![0u8; coeffs.bounds.len() * stride];
    for (yy, (&(ymin, taps), out_row)) in coeffs
        .bounds
        .iter()
        .zip(out.chunks_exact_mut(stride))
        .enumerate()
    {
        let k = &coeffs.weights[yy * coeffs.ksize..][..taps];
        let first = (ymin - row_offset) * stride;
        for (i, out_value) in out_row.iter_mut().enumerate() {
            let mut sum = HALF;
            for (y, &ky) in k.iter().enumerate() {
                sum += i32::from(src[first + y * stride + i]) * ky;
            }
            *out_value = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2vl");

    /// The fixtures' processor: tiny pixel budget (max 28·28·64), otherwise Qwen defaults.
    fn fixture_config() -> ImageProcessorConfig {
        ImageProcessorConfig {
            max_pixels: 28 * 28 * 64,
            ..ImageProcessorConfig::default()
        }
    }

    fn reference() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{FIXTURES}/reference.safetensors"), &Device::Cpu)
            .expect("reference.safetensors")
    }

    fn fixture_image(name: &str) -> RgbImage {
        image::open(format!("{FIXTURES}/{name}"))
            .expect("fixture image")
            .to_rgb8()
    }

    fn grids(reference: &HashMap<String, Tensor>, key: &str) -> Vec<Vec<i64>> {
        reference[key]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    fn max_abs_diff(ours: &[f32], reference: &[f32]) -> f32 {
        assert_eq!(ours.len(), reference.len());
        ours.iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn smart_resize_gives_the_fixture_grids() {
        let reference = reference();
        let config = fixture_config();
        let expected = grids(&reference, "two_image_grid_thw");
        assert_eq!(grids(&reference, "one_image_grid_thw"), expected[..1]);
        for (name, grid) in [("image_a.png", &expected[0]), ("image_b.png", &expected[1])] {
            let image = fixture_image(name);
            let (h, w) = config
                .smart_resize(image.height() as usize, image.width() as usize)
                .unwrap();
            let ours = [1, h / config.patch_size, w / config.patch_size];
            assert_eq!(ours.map(|v| v as i64).to_vec(), *grid, "{name}");
        }
        // 60x44 and 90x70 sit below min_pixels / above max_pixels respectively.
        assert_eq!(config.smart_resize(44, 60).unwrap(), (56, 56));
        assert_eq!(config.smart_resize(70, 90).unwrap(), (56, 84));
    }

    #[test]
    fn smart_resize_rejects_like_the_reference() {
        let config = ImageProcessorConfig::default();
        assert!(config.smart_resize(0, 10).is_err());
        assert!(config.smart_resize(1, 201).is_err());
        // Exactly 200 is allowed (the reference tests `> 200`).
        assert!(config.smart_resize(1, 200).is_ok());
        // Python's round() ties to even: 70 / 28 = 2.5 -> 2 (half away from zero gives 84).
        assert_eq!(config.smart_resize(42, 70).unwrap(), (56, 56));
    }

    #[test]
    fn preprocess_matches_transformers_pil_backend() {
        let reference = reference();
        let config = fixture_config();
        let one: Vec<f32> = reference["one_pixel_values"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let two: Vec<f32> = reference["two_pixel_values"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let a = config.preprocess(&fixture_image("image_a.png")).unwrap();
        let b = config.preprocess(&fixture_image("image_b.png")).unwrap();
        assert_eq!(a.grid_thw, [1, 4, 4]);
        assert_eq!(b.grid_thw, [1, 4, 6]);
        assert_eq!((a.patch_count(), a.row_len()), (16, 1176));
        assert_eq!((b.patch_count(), b.row_len()), (24, 1176));
        assert_eq!(a.token_count(config.merge_size), 4);
        assert_eq!(b.token_count(config.merge_size), 6);

        // Measured: 0.0 for all three comparisons (all 47040 values bit-identical): the resize
        // is byte-exact and the float steps use the reference's dtypes and order. image_b
        // (90x70 -> 84x56) takes Pillow 13's vertical-first path (height drops 14 > 2 * 6);
        // with the pass order of older Pillows its error here is 0.0142 (one 1/255 step).
        let split = a.pixel_values.len();
        let errors = [
            max_abs_diff(&a.pixel_values, &one),
            max_abs_diff(&a.pixel_values, &two[..split]),
            max_abs_diff(&b.pixel_values, &two[split..]),
        ];
        for error in errors {
            assert!(error <= 1e-5, "max abs error {errors:?}");
        }
    }

    #[test]
    fn resize_is_identity_at_the_same_size() {
        let image = fixture_image("image_a.png");
        assert_eq!(resize_bicubic(&image, 60, 44), image);
    }

    #[test]
    fn load_reads_the_tiny_checkpoint() {
        let path = Path::new(FIXTURES).join("tiny/qwen2_vl/preprocessor_config.json");
        let config = ImageProcessorConfig::load(&path).unwrap();
        assert_eq!(config, fixture_config());
        assert_eq!((config.min_pixels, config.max_pixels), (3136, 50176));

        // Only the transformers-5 `size` dict: same budget.
        let json = r#"{"size": {"shortest_edge": 3136, "longest_edge": 50176}}"#;
        let config: ImageProcessorConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config, fixture_config());
        // Legacy keys win over `size`, as in transformers' constructor.
        let json = r#"{"max_pixels": 1000, "size": {"shortest_edge": 10, "longest_edge": 50176}}"#;
        let config: ImageProcessorConfig = serde_json::from_str(json).unwrap();
        assert_eq!((config.min_pixels, config.max_pixels), (10, 1000));
    }

    #[test]
    fn bad_file_errors_name_the_path_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");

        std::fs::write(&path, r#"{"patch_size": 0}"#).unwrap();
        let message = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("patch_size"), "{message}");

        std::fs::write(&path, r#"{"image_std": [0.5, 0.5]}"#).unwrap();
        let message = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("image_std"), "{message}");

        std::fs::write(&path, r#"{"merge_size": "two"}"#).unwrap();
        let message = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("merge_size"), "{message}");

        std::fs::write(&path, r#"{"size": {"longest_edge": -1}}"#).unwrap();
        let message = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains("longest_edge"), "{message}");

        std::fs::write(&path, "{not json").unwrap();
        let message = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");

        let missing = dir.path().join("absent.json");
        let message = ImageProcessorConfig::load(&missing)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
    }
}
