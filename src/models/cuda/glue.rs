//! The FLUX block's glue as fused ops (f32 arithmetic, the model dtype in and out, one
//! rounding): the AdaLN modulation (layer norm without affine + shift/scale), the gated
//! residual, and the q/k RMS norm + RoPE written in the attention layout.
//!
//! Each is a candle custom op: on CUDA it launches its kernel (`kernels.cu`), on the CPU it
//! runs a plain f32 reference of the same arithmetic ([`cpu`]); the tests hold the
//! references to candle's unfused tensor operations, and `bench flux`'s device check holds
//! the kernels to the same operations on the GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::fp8_rows::Fp8Rows;

/// AdaLN's layer-norm epsilon in FLUX.
pub const LAYER_NORM_EPS: f32 = 1e-6;
/// The q/k RMS norms' epsilon in FLUX.
pub const RMS_NORM_EPS: f32 = 1e-6;

/// `layer_norm(xs) * (1 + scale) + shift` with xs `[B, S, C]` and shift, scale `[B, C]`.
pub fn modulated_layer_norm(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    check_modulation(xs, shift, scale)?;
    xs.contiguous()?.apply_op3_no_bwd(
        &shift.contiguous()?,
        &scale.contiguous()?,
        &ModulatedLayerNorm,
    )
}

/// [`modulated_layer_norm`] and its output as fp8 e4m3 rows for the fp8 GEMM: on CUDA the
/// same kernel pass writes both (the row is in shared memory as it is written); elsewhere
/// the reference, then [`Fp8Rows::quantize`]. Both quantize the rounded output, so the
/// rows are exactly `Fp8Rows::quantize` of the returned tensor either way.
pub fn modulated_layer_norm_fp8(
    xs: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
) -> Result<(Tensor, Fp8Rows)> {
    check_modulation(xs, shift, scale)?;
    #[cfg(feature = "cuda")]
    if xs.device().is_cuda() && matches!(xs.dtype(), DType::BF16 | DType::F16) {
        use candle_core::op::BackpropOp;
        use candle_core::Storage;
        let (xs, shift, scale) = (xs.contiguous()?, shift.contiguous()?, scale.contiguous()?);
        let (b, s, c) = xs.dims3()?;
        let (y, q, scales) = {
            let (xs_storage, xl) = xs.storage_and_layout();
            let (sh_storage, shl) = shift.storage_and_layout();
            let (sc_storage, scl) = scale.storage_and_layout();
            let (Storage::Cuda(x), Storage::Cuda(sh), Storage::Cuda(sc)) =
                (&*xs_storage, &*sh_storage, &*sc_storage)
            else {
                candle_core::bail!("modulated layer norm: inputs on different devices")
            };
            let (y, rows) = super::fused_launch::modulated_layer_norm(
                (x, xl),
                (sh, shl),
                (sc, scl),
                (b * s, s, c, LAYER_NORM_EPS),
                true,
            )?;
            let (q, scales) = rows.expect("asked for fp8 rows");
            (y, q, scales)
        };
        let shape = xs.shape().clone();
        let y = Tensor::from_storage(Storage::Cuda(y), shape.clone(), BackpropOp::none(), false);
        return Ok((y, Fp8Rows::from_cuda(q, scales, shape, b * s)));
    }
    let y = modulated_layer_norm(xs, shift, scale)?;
    let rows = Fp8Rows::quantize(&y)?;
    Ok((y, rows))
}

/// Shift and scale must be `[B, C]` in xs's dtype for xs `[B, S, C]`.
fn check_modulation(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<()> {
    let (b, _, c) = xs.dims3()?;
    for (name, t) in [("shift", shift), ("scale", scale)] {
        if t.dims() != [b, c] || t.dtype() != xs.dtype() {
            candle_core::bail!(
                "modulated layer norm: {name} is {:?} {:?}, expected [{b}, {c}] {:?}",
                t.dims(),
                t.dtype(),
                xs.dtype()
            );
        }
    }
    Ok(())
}

/// `xs + gate * ys` with xs, ys `[B, S, C]` and gate `[B, C]`.
pub fn gated_residual(xs: &Tensor, ys: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, _, c) = xs.dims3()?;
    if ys.dims() != xs.dims() || gate.dims() != [b, c] {
        candle_core::bail!(
            "gated residual: x {:?}, y {:?}, gate {:?}",
            xs.dims(),
            ys.dims(),
            gate.dims()
        );
    }
    xs.contiguous()?
        .apply_op3_no_bwd(&ys.contiguous()?, &gate.contiguous()?, &GatedResidual)
}

/// Per-head RMS norm (`weight` `[D]`) and interleaved-pair RoPE (`cos`, `sin` `[S, D/2]`,
/// f32) of xs `[B, S, heads * D]`, written in the same layout (`[B, S, heads, D]`, what the
/// flash attention reads): no transposes.
pub fn qk_norm_rope(
    xs: &Tensor,
    weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (_, s, hd) = xs.dims3()?;
    if heads == 0 || !hd.is_multiple_of(heads) || !(hd / heads).is_multiple_of(2) {
        candle_core::bail!("qk norm + rope: {hd} columns do not split into {heads} even heads");
    }
    let d = hd / heads;
    if weight.dims() != [d] || cos.dims() != [s, d / 2] || sin.dims() != [s, d / 2] {
        candle_core::bail!(
            "qk norm + rope: weight {:?}, cos {:?}, sin {:?} for {s} rows of {heads} heads of {d}",
            weight.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let op = QkNormRope {
        weight: weight.to_dtype(xs.dtype())?.contiguous()?,
        heads,
    };
    xs.contiguous()?.apply_op3_no_bwd(
        &cos.to_dtype(DType::F32)?.contiguous()?,
        &sin.to_dtype(DType::F32)?.contiguous()?,
        &op,
    )
}

/// The plain f32 references the CPU runs (and tests check against candle's operations).
pub mod cpu {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, DType, Layout, Result};

    /// The contiguous elements of a CPU storage, as f32.
    pub fn to_f32(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused op reference: non-contiguous input")
        };
        Ok(match storage {
            CpuStorage::F32(v) => v[start..end].to_vec(),
            CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
            other => candle_core::bail!(
                "fused op reference: f32, f16 or bf16, not {:?}",
                other.dtype()
            ),
        })
    }

    /// f32 values as a storage of `dtype`, each rounded once.
    pub fn from_f32(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
            other => candle_core::bail!("fused op reference: f32, f16 or bf16, not {other:?}"),
        })
    }

    /// Layer norm (no affine, `eps`) of each `c`-row, then `* (1 + scale[b]) + shift[b]`,
    /// `s` rows per batch entry.
    pub fn modulated_layer_norm(
        x: &[f32],
        shift: &[f32],
        scale: &[f32],
        s: usize,
        c: usize,
        eps: f32,
    ) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for (r, row) in x.chunks(c).enumerate() {
            let b = r / s;
            let mean = row.iter().sum::<f32>() / c as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            let (sh, sc) = (&shift[b * c..(b + 1) * c], &scale[b * c..(b + 1) * c]);
            out.extend(
                row.iter()
                    .zip(sh.iter().zip(sc))
                    .map(|(v, (sh, sc))| (v - mean) * rstd * (1.0 + sc) + sh),
            );
        }
        out
    }

    /// `x + gate[b] * y` over `c`-rows, `s` rows per batch entry.
    pub fn gated_residual(x: &[f32], y: &[f32], gate: &[f32], s: usize, c: usize) -> Vec<f32> {
        x.iter()
            .zip(y)
            .enumerate()
            .map(|(i, (x, y))| x + gate[(i / c / s) * c + i % c] * y)
            .collect()
    }

    /// RMS norm (`weight`, `eps`) of each `d`-row of `[B, S, H, D]`, then interleaved RoPE
    /// with `cos`, `sin` `[S, D/2]` of the row's position.
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope(
        x: &[f32],
        weight: &[f32],
        cos: &[f32],
        sin: &[f32],
        s: usize,
        heads: usize,
        d: usize,
        eps: f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (r, (row, dst)) in x.chunks(d).zip(out.chunks_mut(d)).enumerate() {
            let pos = (r / heads) % s;
            let rstd = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            for p in 0..d / 2 {
                let a = row[2 * p] * rstd * weight[2 * p];
                let b = row[2 * p + 1] * rstd * weight[2 * p + 1];
                let (c, sn) = (cos[pos * d / 2 + p], sin[pos * d / 2 + p]);
                dst[2 * p] = a * c - b * sn;
                dst[2 * p + 1] = a * sn + b * c;
            }
        }
        out
    }
}

struct ModulatedLayerNorm;

impl CustomOp3 for ModulatedLayerNorm {
    fn name(&self) -> &'static str {
        "icedit-modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        shift: &CpuStorage,
        shl: &Layout,
        scale: &CpuStorage,
        scl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, s, c) = xl.shape().dims3()?;
        let out = cpu::modulated_layer_norm(
            &cpu::to_f32(x, xl)?,
            &cpu::to_f32(shift, shl)?,
            &cpu::to_f32(scale, scl)?,
            s,
            c,
            LAYER_NORM_EPS,
        );
        Ok((cpu::from_f32(out, x.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        shift: &candle_core::CudaStorage,
        shl: &Layout,
        scale: &candle_core::CudaStorage,
        scl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, s, c) = xl.shape().dims3()?;
        let (out, _) = super::fused_launch::modulated_layer_norm(
            (x, xl),
            (shift, shl),
            (scale, scl),
            (b * s, s, c, LAYER_NORM_EPS),
            false,
        )?;
        Ok((out, xl.shape().clone()))
    }
}

struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "icedit-gated-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        gate: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, s, c) = xl.shape().dims3()?;
        let out = cpu::gated_residual(
            &cpu::to_f32(x, xl)?,
            &cpu::to_f32(y, yl)?,
            &cpu::to_f32(gate, gl)?,
            s,
            c,
        );
        Ok((cpu::from_f32(out, x.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        gate: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, s, c) = xl.shape().dims3()?;
        let out = super::fused_launch::gated_residual((x, xl), (y, yl), (gate, gl), b * s, s, c)?;
        Ok((out, xl.shape().clone()))
    }
}

struct QkNormRope {
    /// `[D]`, in the input's dtype, on its device.
    weight: Tensor,
    heads: usize,
}

impl CustomOp3 for QkNormRope {
    fn name(&self) -> &'static str {
        "icedit-qk-norm-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, s, hd) = xl.shape().dims3()?;
        let weight = self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let out = cpu::qk_norm_rope(
            &cpu::to_f32(x, xl)?,
            &weight,
            &cpu::to_f32(cos, cl)?,
            &cpu::to_f32(sin, sl)?,
            s,
            self.heads,
            hd / self.heads,
            RMS_NORM_EPS,
        );
        Ok((cpu::from_f32(out, x.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, s, hd) = xl.shape().dims3()?;
        let d = hd / self.heads;
        let out = super::fused_launch::qk_norm_rope(
            (x, xl),
            &self.weight,
            (cos, cl),
            (sin, sl),
            b * s * self.heads,
            s,
            self.heads,
            d,
            RMS_NORM_EPS,
        )?;
        Ok((out, xl.shape().clone()))
    }
}

/// Candle's unfused operations for the same three computations, as the FLUX blocks ran them
/// before these ops (the device check and the tests compare against them).
pub mod unfused {
    use super::*;

    /// Layer norm in f32, rounded, then `* (1 + scale) + shift` in the dtype.
    pub fn modulated_layer_norm(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + LAYER_NORM_EPS as f64)?.sqrt()?)?
            .to_dtype(dtype)?
            .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
            .broadcast_add(&shift.unsqueeze(1)?)
    }

    /// `xs + ys * gate` with broadcasts.
    pub fn gated_residual(xs: &Tensor, ys: &Tensor, gate: &Tensor) -> Result<Tensor> {
        xs + ys.broadcast_mul(&gate.unsqueeze(1)?)?
    }

    /// Transpose to `[B, H, S, D]`, RMS norm, RoPE with the tables in the dtype, and back to
    /// `[B, S, H * D]`.
    pub fn qk_norm_rope(
        xs: &Tensor,
        weight: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let (b, s, hd) = xs.dims3()?;
        let dtype = xs.dtype();
        let x = xs
            .reshape((b, s, heads, hd / heads))?
            .transpose(1, 2)?
            .contiguous()?;
        let x = candle_nn::ops::rms_norm(&x, &weight.to_dtype(dtype)?, RMS_NORM_EPS)?;
        let x = candle_nn::rotary_emb::rope_i(&x, &cos.to_dtype(dtype)?, &sin.to_dtype(dtype)?)?;
        x.transpose(1, 2)?.reshape((b, s, hd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::models::kernel_check::max_abs_diff(a, b).unwrap()
    }

    /// Seeded normal draws, so a failure reproduces.
    fn randn(shape: &[usize], std: f64, dtype: DType) -> Tensor {
        thread_local!(static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        // A per-thread call counter: libtest runs each test on a thread of its own, so a
        // test's draws do not depend on what runs beside it.
        let seed = CALLS.with(|c| c.replace(c.get() + 1));
        (crate::models::noise::seeded_noise(seed, shape, &Device::Cpu).unwrap() * std)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn the_modulated_layer_norm_reference_equals_the_unfused_ops() {
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::BF16, 0.07)] {
            let xs = (randn(&[2, 5, 96], 3.0, dtype) + 1.5).unwrap();
            let (shift, scale) = (randn(&[2, 96], 1.0, dtype), randn(&[2, 96], 0.5, dtype));
            let fused = modulated_layer_norm(&xs, &shift, &scale).unwrap();
            let plain = unfused::modulated_layer_norm(&xs, &shift, &scale).unwrap();
            assert_eq!(fused.dims(), plain.dims());
            let diff = max_diff(&fused, &plain);
            assert!(diff < tol, "{dtype:?}: {diff}");
        }
    }

    #[test]
    fn the_gated_residual_reference_equals_the_unfused_ops() {
        // The fused op rounds `x + g * y` once; the unfused ops round `g * y`, then the sum:
        // each rounding is at most half a unit in the last place, 2^-(p+1) of the value (p:
        // the dtype's mantissa bits), so elementwise |fused - plain| <= 2^-p (|x + g y| +
        // |g y|). Random inputs: an absolute bound would fail on a large draw.
        for (dtype, mantissa_bits) in [(DType::F32, 23), (DType::F16, 10), (DType::BF16, 7)] {
            let (xs, ys) = (
                randn(&[3, 4, 40], 1.0, dtype),
                randn(&[3, 4, 40], 1.0, dtype),
            );
            let gate = randn(&[3, 40], 1.0, dtype);
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let fused = f32s(&gated_residual(&xs, &ys, &gate).unwrap());
            let plain = f32s(&unfused::gated_residual(&xs, &ys, &gate).unwrap());
            let product = f32s(&ys)
                .broadcast_mul(&f32s(&gate).unsqueeze(1).unwrap())
                .unwrap();
            let bound = ((fused.abs().unwrap() + product.abs().unwrap()).unwrap()
                * 2f64.powi(-mantissa_bits))
            .unwrap();
            let excess = ((fused - plain).unwrap().abs().unwrap() - bound)
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                excess <= 1e-7,
                "{dtype:?}: {excess} over the rounding bound"
            );
        }
    }

    #[test]
    fn the_qk_norm_rope_reference_equals_the_unfused_ops() {
        let (b, s, heads, d) = (2, 7, 3, 16);
        let angles = Tensor::arange(0f32, (s * d / 2) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, 0.1)
            .unwrap()
            .reshape((s, d / 2))
            .unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.04)] {
            let xs = randn(&[b, s, heads * d], 2.0, dtype);
            let weight = (randn(&[d], 0.3, dtype) + 1.0).unwrap();
            let fused = qk_norm_rope(&xs, &weight, &cos, &sin, heads).unwrap();
            let plain = unfused::qk_norm_rope(&xs, &weight, &cos, &sin, heads).unwrap();
            assert_eq!(fused.dims(), &[b, s, heads * d]);
            let diff = max_diff(&fused, &plain);
            assert!(diff < tol, "{dtype:?}: {diff}");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_by_name() {
        let xs = randn(&[2, 5, 8], 1.0, DType::F32);
        let err = modulated_layer_norm(&xs, &randn(&[2, 7], 1.0, DType::F32), &xs.i0())
            .unwrap_err()
            .to_string();
        assert!(err.contains("shift"), "{err}");
    }

    trait FirstRows {
        fn i0(&self) -> Tensor;
    }
    impl FirstRows for Tensor {
        fn i0(&self) -> Tensor {
            self.narrow(1, 0, 1).unwrap().squeeze(1).unwrap()
        }
    }
}
