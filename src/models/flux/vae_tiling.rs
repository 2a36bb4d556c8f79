//! Tiled VAE passes: an image (or its latents) too large for one pass's working memory is
//! encoded (decoded) a tile at a time, the tiles overlapping, each one's edge blended
//! linearly into its upper and left neighbours, and each cropped to what it adds. Working
//! memory is then one tile's, whatever the image size.
//!
//! The semantics are diffusers' `AutoencoderKL` with `enable_tiling()` (0.42.1,
//! `models/autoencoders/autoencoder_kl.py`: `_tiled_encode`, `tiled_decode`, `blend_v`,
//! `blend_h`):
//! - the tile is `tile_sample_min_size` pixels (default: the config's `sample_size`), or
//!   that over the downscale in latent cells (`tile_latent_min_size`); the overlap factor is
//!   `tile_overlap_factor` (0.25);
//! - tiles start every `int(tile_in * (1 - overlap))` input cells, from 0 to the input's
//!   end (the last ones cut short by the edge);
//! - a tile's first `int(tile_out * overlap)` output rows (then columns) are
//!   `prev * (1 - k/e) + tile * (k/e)` with the neighbour's last `e` rows, where `e` is that
//!   extent capped by both tiles' sizes, and the neighbour is already blended itself;
//! - each tile keeps its first `tile_out - extent` rows and columns;
//! - a pass is tiled only when the input exceeds the tile on either side.
//!
//! Each tile sees only itself (its group norms' statistics and mid-block attention are the
//! tile's), so a tiled pass approximates the whole-image pass: close away from the seams,
//! visibly different near them on small tiles. Rows of tiles are blended as they are made,
//! so only the previous row's tiles are held (diffusers holds them all; the result is the
//! same).

use candle_core::{Result, Tensor};

use super::vae::{Autoencoder, VaeConfig};

/// diffusers' `tile_overlap_factor`.
pub const DEFAULT_OVERLAP: f64 = 0.25;

/// Where a tile size came from, for an error about it: `--vae-tile` when given, else the
/// VAE config's `sample_size` (the default tile), which the user may never have set.
pub fn tile_source(vae_tile: Option<usize>) -> &'static str {
    match vae_tile {
        Some(_) => "--vae-tile",
        None => "the VAE config's `sample_size` (the default tile: give --vae-tile, or --vae-tiling off)",
    }
}

/// How a tiled pass cuts its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Tile side in pixels (diffusers `tile_sample_min_size`).
    pub tile: usize,
    /// Fraction of a tile shared with each neighbour (diffusers `tile_overlap_factor`).
    pub overlap: f64,
}

/// One tiled pass's walk, in the input's and the output's cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Walk {
    /// Tile side in input cells.
    size: usize,
    /// Input cells between tile starts.
    stride: usize,
    /// Output rows (columns) blended with the neighbour.
    blend: usize,
    /// Output rows (columns) each tile keeps.
    keep: usize,
}

impl VaeTiling {
    /// Tiles of `tile` pixels with diffusers' overlap.
    pub fn new(tile: usize) -> Self {
        Self {
            tile,
            overlap: DEFAULT_OVERLAP,
        }
    }

    /// diffusers' default: tiles of the config's `sample_size` (1024 px for the FLUX AE).
    pub fn of_config(config: &VaeConfig) -> Self {
        Self::new(config.sample_size)
    }

    /// Whether a pass over an image of `height` x `width` pixels is tiled: when it exceeds
    /// the tile on either side (diffusers' `_encode` / `_decode` test).
    pub fn applies(&self, height: usize, width: usize) -> bool {
        height > self.tile || width > self.tile
    }

    /// The decoder's walk: latent tiles in, pixel tiles out.
    fn decoding(&self, downscale: usize) -> Walk {
        let latent = self.tile / downscale;
        let blend = (self.tile as f64 * self.overlap) as usize;
        Walk {
            size: latent,
            stride: (latent as f64 * (1.0 - self.overlap)) as usize,
            blend,
            keep: self.tile - blend,
        }
    }

    /// The encoder's walk: pixel tiles in, latent tiles out.
    fn encoding(&self, downscale: usize) -> Walk {
        let latent = self.tile / downscale;
        let blend = (latent as f64 * self.overlap) as usize;
        Walk {
            size: self.tile,
            stride: (self.tile as f64 * (1.0 - self.overlap)) as usize,
            blend,
            keep: latent - blend,
        }
    }

    /// Refuses tilings whose kept parts would not abut (the output would not be the input's
    /// size times the scale), naming the tile and overlap.
    pub fn check(&self, downscale: usize) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(format!(
                "VAE tile overlap {}: must be in [0, 1)",
                self.overlap
            ));
        }
        let (dec, enc) = (self.decoding(downscale), self.encoding(downscale));
        let abut = self.tile.is_multiple_of(downscale)
            && dec.stride > 0
            && enc.stride > 0
            && dec.keep == dec.stride * downscale
            && enc.keep * downscale == enc.stride;
        if abut {
            return Ok(());
        }
        let hint = if self.overlap == DEFAULT_OVERLAP {
            format!(
                " (at overlap 0.25, any multiple of {} px does)",
                4 * downscale
            )
        } else {
            String::new()
        };
        Err(format!(
            "VAE tile {} px with overlap {}: the tiles' kept parts would not abut{hint}",
            self.tile, self.overlap
        ))
    }
}

/// Blends `tile`'s first output rows (`dim` 2) or columns (`dim` 3) with the last ones of
/// its already-blended neighbour `prev` (diffusers `blend_v` / `blend_h`).
fn blend(prev: &Tensor, tile: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let (prev_len, len) = (prev.dim(dim)?, tile.dim(dim)?);
    let e = extent.min(prev_len).min(len);
    if e == 0 {
        return Ok(tile.clone());
    }
    // The weights in f64 then the compute dtype, as the reference's Python floats are.
    let ramp = |f: fn(f64) -> f64| -> Result<Tensor> {
        let w: Vec<f32> = (0..e).map(|k| f(k as f64 / e as f64) as f32).collect();
        let shape = if dim == 2 { (1, 1, e, 1) } else { (1, 1, 1, e) };
        Tensor::from_vec(w, shape, tile.device())?.to_dtype(tile.dtype())
    };
    let (from_prev, to_tile) = (ramp(|t| 1.0 - t)?, ramp(|t| t)?);
    let blended = (prev
        .narrow(dim, prev_len - e, e)?
        .broadcast_mul(&from_prev)?
        + tile.narrow(dim, 0, e)?.broadcast_mul(&to_tile)?)?;
    if e == len {
        return Ok(blended);
    }
    Tensor::cat(&[blended, tile.narrow(dim, e, len - e)?], dim)
}

/// Runs `pass` on each tile of `input` `[B, C, H, W]` along `walk` and assembles the result.
fn tiled(input: &Tensor, walk: Walk, pass: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (_, _, h, w) = input.dims4()?;
    let mut above: Vec<Tensor> = Vec::new();
    let mut bands = Vec::new();
    for top in (0..h).step_by(walk.stride) {
        let rows = input.narrow(2, top, walk.size.min(h - top))?;
        let mut row: Vec<Tensor> = Vec::new();
        let mut kept = Vec::new();
        for (j, left) in (0..w).step_by(walk.stride).enumerate() {
            let mut tile = pass(&rows.narrow(3, left, walk.size.min(w - left))?)?;
            if let Some(up) = above.get(j) {
                tile = blend(up, &tile, 2, walk.blend)?;
            }
            if let Some(prev) = row.last() {
                tile = blend(prev, &tile, 3, walk.blend)?;
            }
            let (th, tw) = (tile.dim(2)?, tile.dim(3)?);
            kept.push(
                tile.narrow(2, 0, walk.keep.min(th))?
                    .narrow(3, 0, walk.keep.min(tw))?,
            );
            row.push(tile);
        }
        bands.push(Tensor::cat(&kept, 3)?);
        above = row;
    }
    Tensor::cat(&bands, 2)
}

impl Autoencoder {
    /// [`Autoencoder::encode_mean`] tile by tile, always (even an image within one tile
    /// goes through the walk); `tiling` must pass [`VaeTiling::check`].
    pub fn encode_mean_tiled(&self, image: &Tensor, tiling: &VaeTiling) -> Result<Tensor> {
        let downscale = self.config().downscale();
        tiling.check(downscale).map_err(candle_core::Error::msg)?;
        tiled(image, tiling.encoding(downscale), |tile| {
            self.encode_mean(tile)
        })
    }

    /// [`Autoencoder::decode`] tile by tile, always; `tiling` must pass [`VaeTiling::check`].
    pub fn decode_tiled(&self, latents: &Tensor, tiling: &VaeTiling) -> Result<Tensor> {
        let downscale = self.config().downscale();
        tiling.check(downscale).map_err(candle_core::Error::msg)?;
        tiled(latents, tiling.decoding(downscale), |tile| {
            self.decode(tile)
        })
    }

    /// The latent mean, tiled when `tiling` is given and the image exceeds its tile.
    pub fn encode_mean_with(&self, image: &Tensor, tiling: Option<&VaeTiling>) -> Result<Tensor> {
        let (_, _, h, w) = image.dims4()?;
        match tiling {
            Some(t) if t.applies(h, w) => self.encode_mean_tiled(image, t),
            _ => self.encode_mean(image),
        }
    }

    /// The decoded image, tiled when `tiling` is given and the image exceeds its tile.
    pub fn decode_with(&self, latents: &Tensor, tiling: Option<&VaeTiling>) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let f = self.config().downscale();
        match tiling {
            Some(t) if t.applies(h * f, w * f) => self.decode_tiled(latents, t),
            _ => self.decode(latents),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_tiles_walk_as_diffusers_computes_them() {
        // FLUX: 1024 px tiles, 8x downscale. diffusers' tiled_decode: overlap_size
        // int(128 * 0.75) = 96 latent cells, blend_extent int(1024 * 0.25) = 256 px,
        // row_limit 768 px; _tiled_encode: 768 px, 32 latent cells, 96.
        let t = VaeTiling::of_config(&VaeConfig::flux());
        assert_eq!(t.tile, 1024);
        assert_eq!(
            t.decoding(8),
            Walk {
                size: 128,
                stride: 96,
                blend: 256,
                keep: 768
            }
        );
        assert_eq!(
            t.encoding(8),
            Walk {
                size: 1024,
                stride: 768,
                blend: 32,
                keep: 96
            }
        );
        assert!(t.check(8).is_ok());
        // A 1024x512 diptych is not tiled, a 2048x1024 one is.
        assert!(!t.applies(512, 1024));
        assert!(t.applies(1024, 2048));
    }

    #[test]
    fn tiles_whose_parts_would_not_abut_are_refused_by_size() {
        for bad in [40, 8, 100] {
            let err = VaeTiling::new(bad).check(8).unwrap_err();
            assert!(err.contains(&format!("VAE tile {bad} px")), "{err}");
            assert!(err.contains("multiple of 32"), "{err}");
        }
        assert!(VaeTiling {
            tile: 64,
            overlap: 1.0
        }
        .check(8)
        .unwrap_err()
        .contains("overlap"));
        for good in [32, 64, 512, 1024] {
            assert!(VaeTiling::new(good).check(8).is_ok());
        }
    }

    #[test]
    fn blending_ramps_from_the_neighbour_to_the_tile() {
        let dev = candle_core::Device::Cpu;
        let prev = Tensor::full(1f32, (1, 1, 4, 2), &dev).unwrap();
        let tile = Tensor::full(3f32, (1, 1, 3, 2), &dev).unwrap();
        let out = blend(&prev, &tile, 2, 2).unwrap();
        let rows: Vec<f32> = out
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Row 0: all neighbour; row 1: half way; row 2: the tile's own.
        assert_eq!(rows, vec![1.0, 2.0, 3.0]);
    }
}
