//! fp8 (e4m3, the `float8_e4m3fn` of PyTorch and NVIDIA's `__nv_fp8_e4m3`) quantization as
//! the fp8 GEMM does it, in plain f32 on the CPU: the reference the CUDA quantize kernel
//! (`cuda/fp8.cu`) and the fp8 GEMM's CPU emulation (`cuda::gemm`) follow, tested against
//! the `float8` crate (a port of CUDA's own conversion, the one candle uses) and
//! hand-computed cases.
//!
//! The scheme: one scale per tensor, `amax / 448`, so the largest magnitude lands on e4m3's
//! largest finite value; every value is divided by the scale, rounded to the nearest e4m3
//! value (ties to even) and saturated at +-448 (never to NaN: e4m3fn has no infinities and
//! its one NaN pattern would poison a whole GEMM row). NaN stays NaN. A tensor of zeros (or
//! one whose largest magnitude is not finite) gets scale 1, so nothing is divided by 0.
//!
//! The activations of a FLUX linear are quantized the same way one row (token) at a time
//! ([`quantize_rows`]): each row gets its own scale. That costs nothing extra on the GPU
//! (the fused modulate kernel holds a row when it writes it; cuBLASLt applies a scale per
//! column of its B operand, "outer vector" scaling) and keeps every candidate of a batch
//! independent of the others: a per-tensor scale would let one candidate's largest
//! activation decide another's rounding.

/// The largest finite e4m3 magnitude (`S.1111.110` = 1.75 x 2^8).
pub const E4M3_MAX: f32 = 448.0;

/// The smallest normal e4m3 magnitude, 2^-6; below it the step is the subnormal one.
const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;

/// e4m3's mantissa bits.
const MANTISSA_BITS: i32 = 3;

/// `x` rounded to the nearest e4m3 value (ties to even), saturated at +-448; NaN stays NaN
/// and the sign of zero is kept. The result is exactly representable in e4m3.
pub fn round_e4m3(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return E4M3_MAX.copysign(x);
    }
    // The spacing of e4m3 values around `a`: 2^(e - 3) for a in [2^e, 2^(e+1)), and the
    // subnormal spacing 2^-9 below 2^-6. Both are powers of two, so `a / step` is exact and
    // only the `round_ties_even` rounds.
    let step = if a < E4M3_MIN_NORMAL {
        E4M3_MIN_NORMAL / (1 << MANTISSA_BITS) as f32
    } else {
        let exponent = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        2f32.powi(exponent - MANTISSA_BITS)
    };
    let q = (a / step).round_ties_even() * step;
    // Rounding up at the top binade can only reach 448 (the next step, 480, is not a value).
    q.min(E4M3_MAX).copysign(x)
}

/// The largest finite magnitude in `values`, NaNs skipped (0 for none).
pub fn amax(values: &[f32]) -> f32 {
    values
        .iter()
        .filter(|v| !v.is_nan())
        .fold(0f32, |m, v| m.max(v.abs()))
}

/// The per-tensor scale for a largest magnitude `amax`: `amax / 448`, or 1 when `amax` is 0
/// or not finite.
pub fn scale_for(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / E4M3_MAX
    } else {
        1.0
    }
}

/// `values` quantized with one scale: `(q, scale)` with every `q[i] = round_e4m3(values[i] /
/// scale)` (an e4m3 value held in f32) and `values[i] ~ q[i] * scale`.
pub fn quantize(values: &[f32]) -> (Vec<f32>, f32) {
    let scale = scale_for(amax(values));
    (
        values.iter().map(|v| round_e4m3(v / scale)).collect(),
        scale,
    )
}

/// `values` (rows of `cols`) quantized one row at a time: `(q, scales)` with one scale per
/// row, each row as [`quantize`] does it. `cols` must divide `values.len()`.
pub fn quantize_rows(values: &[f32], cols: usize) -> (Vec<f32>, Vec<f32>) {
    assert!(
        cols > 0 && values.len().is_multiple_of(cols),
        "{} values are not rows of {cols}",
        values.len()
    );
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / cols);
    for row in values.chunks(cols) {
        let (qr, scale) = quantize(row);
        q.extend(qr);
        scales.push(scale);
    }
    (q, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use float8::F8E4M3;

    fn reference(x: f32) -> f32 {
        F8E4M3::from_f32(x).to_f32()
    }

    fn same(a: f32, b: f32) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    /// Every e4m3 value, each midpoint between neighbours (the ties) and points just either
    /// side of the midpoints, and every bf16 bit pattern (infinities and NaNs included): our
    /// rounding equals float8's (CUDA's `__nv_cvt_float_to_fp8` with saturation).
    #[test]
    fn rounding_equals_the_float8_crates_conversion() {
        let mut values: Vec<f32> = (0u8..=255)
            .map(|b| F8E4M3::from_bits(b).to_f32())
            .filter(|v| !v.is_nan())
            .collect();
        values.sort_by(f32::total_cmp);
        let mut probes = values.clone();
        for w in values.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            probes.extend([mid, mid.next_up(), mid.next_down()]);
        }
        probes.extend((0u16..=u16::MAX).map(|b| half::bf16::from_bits(b).to_f32()));
        let mut checked = 0;
        for x in probes {
            let (ours, theirs) = (round_e4m3(x), reference(x));
            assert!(
                same(ours, theirs),
                "{x:e}: ours {ours:e}, float8 {theirs:e}"
            );
            checked += 1;
        }
        assert!(checked > 65_536, "{checked}");
    }

    #[test]
    fn hand_computed_cases() {
        let cases = [
            (0.0, 0.0),
            (1.0, 1.0),
            // 1.0625 is halfway between 1 and 1.125: ties to the even mantissa (1.000).
            (1.0625, 1.0),
            // 1.1875 is halfway between 1.125 and 1.25: to 1.25 (mantissa 010).
            (1.1875, 1.25),
            (1.19, 1.25),
            (-3.3, -3.25),
            // Top binade [256, 448]: step 32.
            (447.0, 448.0),
            (300.0, 288.0),
            // Saturation, never NaN.
            (448.0, 448.0),
            (449.0, 448.0),
            (1e6, 448.0),
            (f32::INFINITY, 448.0),
            (-1e6, -448.0),
            // Subnormals: step 2^-9; 2^-10 ties to 0, 3 x 2^-10 ties to 2 x 2^-9.
            (2f32.powi(-9), 2f32.powi(-9)),
            (2f32.powi(-10), 0.0),
            (3.0 * 2f32.powi(-10), 2f32.powi(-8)),
            (1e-8, 0.0),
        ];
        for (x, want) in cases {
            assert!(same(round_e4m3(x), want), "{x:e} -> {:e}", round_e4m3(x));
        }
        assert!(round_e4m3(f32::NAN).is_nan());
        assert!(round_e4m3(-0.0).is_sign_negative());
        assert!(
            round_e4m3(-1e-8).is_sign_negative(),
            "underflow keeps the sign"
        );
    }

    #[test]
    fn the_scale_maps_the_largest_magnitude_to_448() {
        let values = [0.5f32, -3.5, 1.25, 0.0, 2.0];
        let (q, scale) = quantize(&values);
        assert_eq!(scale, 3.5 / 448.0);
        assert_eq!(q[1], -448.0);
        for (v, q) in values.iter().zip(&q) {
            // Within half a step of e4m3 (2^-4 relative) of the value.
            assert!((q * scale - v).abs() <= v.abs() / 16.0 + 1e-9, "{v} -> {q}");
            assert!(same(*q, reference(v / scale)));
        }
        // Zeros: scale 1, zeros out. NaN: skipped by the scale, kept in place.
        assert_eq!(quantize(&[0.0, 0.0]), (vec![0.0, 0.0], 1.0));
        let (q, scale) = quantize(&[f32::NAN, 2.0, -1.0]);
        assert_eq!(scale, 2.0 / 448.0);
        assert!(q[0].is_nan() && q[1] == 448.0 && q[2] == -224.0);
        // A non-finite largest magnitude: scale 1, saturated.
        let (q, scale) = quantize(&[f32::INFINITY, 1.0]);
        assert_eq!((scale, q), (1.0, vec![448.0, 1.0]));
    }

    #[test]
    fn rows_are_quantized_each_with_its_own_scale() {
        // Two rows whose magnitudes differ by 10^5 (more than e4m3's 2^15 normal range):
        // per row, the small one keeps its precision; one scale for both pushes it into
        // e4m3's subnormals or to zero.
        let small = [1e-5f32, -2.3e-5, 7e-6, 0.0];
        let large = [1.0f32, -3.5, 2.25, 0.5];
        let values: Vec<f32> = small.iter().chain(&large).copied().collect();
        let (q, scales) = quantize_rows(&values, 4);
        assert_eq!(scales, [2.3e-5 / 448.0, 3.5 / 448.0]);
        assert_eq!(
            (&q[..4], scales[0]),
            (&quantize(&small).0[..], quantize(&small).1)
        );
        assert_eq!(
            (&q[4..], scales[1]),
            (&quantize(&large).0[..], quantize(&large).1)
        );
        for (v, (q, s)) in small.iter().zip(q.iter().zip([scales[0]; 4])) {
            assert!((q * s - v).abs() <= v.abs() / 16.0, "{v} -> {q} x {s}");
        }
        // One scale for the whole tensor loses the small row: 7e-6 / (3.5 / 448) is below
        // half of e4m3's smallest step (2^-9), so it becomes 0.
        let (whole, _) = quantize(&values);
        assert_eq!(whole[2], 0.0);
        // A row of zeros gets scale 1.
        assert_eq!(
            quantize_rows(&[0.0, 0.0, 1.0, 2.0], 2).1,
            [1.0, 2.0 / 448.0]
        );
    }
}
