//! A fixed, weight-free map between diptych images and FLUX-shaped packed latents.
//!
//! Encode: 8x8 average pooling to RGB in [-1, 1], a fixed 3 -> 16 channel projection, and
//! the 2x2 token packing of FLUX (`[N, 64]`, channel = c * 4 + dy * 2 + dx). The projection
//! has full column rank, so the low-resolution RGB is recovered exactly by its
//! pseudo-inverse.

use image::RgbImage;

/// Latent channels (as the FLUX VAE).
pub const LATENT_CHANNELS: usize = 16;
/// Pixels per latent cell side (as the FLUX VAE).
pub const CELL: u32 = 8;

/// Latent scale. It sets how far apart outcomes are relative to the unit noise, hence how
/// early in the schedule a seed commits to one (the posterior separates with
/// `(1 - s)^2 / s^2 * |mu_a - mu_b|^2`). 6 makes step-4-of-50 previews at 512 px agree
/// with the final outcome most of the time, as ICEdit's early previews do; it is a
/// modelling choice of the simulator, not a property of FLUX.
pub const LATENT_SCALE: f32 = 6.0;

/// The fixed projection and its pseudo-inverse.
pub struct LatentMap {
    proj: [[f32; 3]; LATENT_CHANNELS],
    pinv: [[f32; LATENT_CHANNELS]; 3],
}

impl Default for LatentMap {
    fn default() -> Self {
        let mut proj = [[0f32; 3]; LATENT_CHANNELS];
        for (c, row) in proj.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                // Not separable in (c, k): rows like sin(a c + b k) span only two dimensions.
                *v = 0.5 * (((7 * c + 3) * (k + 1)) as f32 * 0.61).sin();
            }
        }
        // pinv = (P^T P)^-1 P^T, with a 3x3 inverse.
        let mut g = [[0f32; 3]; 3];
        for row in &proj {
            for i in 0..3 {
                for j in 0..3 {
                    g[i][j] += row[i] * row[j];
                }
            }
        }
        let gi = invert3(g);
        let mut pinv = [[0f32; LATENT_CHANNELS]; 3];
        for (i, out) in pinv.iter_mut().enumerate() {
            for (c, v) in out.iter_mut().enumerate() {
                *v = (0..3).map(|j| gi[i][j] * proj[c][j]).sum();
            }
        }
        Self { proj, pinv }
    }
}

// Index loops read as the cofactor formula.
#[allow(clippy::needless_range_loop)]
fn invert3(m: [[f32; 3]; 3]) -> [[f32; 3]; 3] {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let mut r = [[0f32; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let (a, b) = ((j + 1) % 3, (j + 2) % 3);
            let (c, d) = ((i + 1) % 3, (i + 2) % 3);
            r[i][j] = (m[a][c] * m[b][d] - m[a][d] * m[b][c]) / det;
        }
    }
    r
}

/// Packed token grid of a diptych of `width` x `height` pixels: (token rows, token cols).
pub fn token_grid(width: u32, height: u32) -> (usize, usize) {
    (
        (height / (2 * CELL)) as usize,
        (width / (2 * CELL)) as usize,
    )
}

impl LatentMap {
    /// Encodes a diptych (both sides multiples of 16) to packed latents `[N * 64]`.
    pub fn encode(&self, image: &RgbImage) -> Vec<f32> {
        let (w, h) = image.dimensions();
        let (th, tw) = token_grid(w, h);
        let mut out = vec![0f32; th * tw * 64];
        for ty in 0..th {
            for tx in 0..tw {
                for dy in 0..2 {
                    for dx in 0..2 {
                        let rgb = self.pool(image, (tx * 2 + dx) as u32, (ty * 2 + dy) as u32);
                        let base = (ty * tw + tx) * 64;
                        for (c, row) in self.proj.iter().enumerate() {
                            let v: f32 =
                                LATENT_SCALE * (0..3).map(|k| row[k] * rgb[k]).sum::<f32>();
                            out[base + c * 4 + dy * 2 + dx] = v;
                        }
                    }
                }
            }
        }
        out
    }

    /// Mean colour of latent cell (cx, cy) in [-1, 1].
    fn pool(&self, image: &RgbImage, cx: u32, cy: u32) -> [f32; 3] {
        let mut sum = [0f32; 3];
        for y in cy * CELL..(cy + 1) * CELL {
            for x in cx * CELL..(cx + 1) * CELL {
                let p = image.get_pixel(x, y);
                for k in 0..3 {
                    sum[k] += p[k] as f32;
                }
            }
        }
        let n = (CELL * CELL) as f32;
        sum.map(|s| s / n / 127.5 - 1.0)
    }

    /// The low-resolution RGB (in [-1, 1]) of latent cell (cx, cy) from packed latents of
    /// a grid `tw` tokens wide.
    pub fn cell_rgb(&self, latents: &[f32], tw: usize, cx: usize, cy: usize) -> [f32; 3] {
        let base = ((cy / 2) * tw + cx / 2) * 64 + (cy % 2) * 2 + (cx % 2);
        std::array::from_fn(|k| {
            (0..LATENT_CHANNELS)
                .map(|c| self.pinv[k][c] * latents[base + c * 4])
                .sum::<f32>()
                / LATENT_SCALE
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn encode_then_pseudo_inverse_recovers_cell_means() {
        let img = RgbImage::from_fn(64, 32, |x, y| Rgb([(x * 4) as u8, (y * 8) as u8, 100]));
        let map = LatentMap::default();
        let z = map.encode(&img);
        assert_eq!(z.len(), 2 * 4 * 64);
        let (_, tw) = token_grid(64, 32);
        let rgb = map.cell_rgb(&z, tw, 5, 3);
        let expect = map.pool(&img, 5, 3);
        for k in 0..3 {
            assert!((rgb[k] - expect[k]).abs() < 1e-4, "{rgb:?} {expect:?}");
        }
    }
}
