//! Flash attention for FLUX's joint attention: `softmax(q k^T / sqrt(D)) v` per (batch,
//! head) without the `[L, L]` scores ever reaching memory (`flash.cu`: tiles of queries held
//! on chip, an online softmax, tensor cores through `mma.sync`; bf16 / f16 in and out, f32
//! inside). Not causal; any length; head dims 64 and 128.
//!
//! q, k, v and the output are `[B, L, H * D]`, the layout the q/k/v linears write and the
//! output projection reads, so nothing is transposed. A candle custom op: on CUDA it
//! launches the kernel, on the CPU it runs a plain f32 reference ([`reference`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::glue::cpu;

/// Head dims the kernel is built for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Warps per block of the kernel the model uses (4 or 8; 16 query rows each).
static WARPS: AtomicUsize = AtomicUsize::new(8);

/// The kernel variant the model uses: 4 or 8 warps per block (`bench flux`'s device check
/// times both and keeps the faster).
pub fn warps() -> usize {
    WARPS.load(Ordering::Relaxed)
}

/// Sets [`warps`] (4 or 8; other values are ignored).
pub fn set_warps(warps: usize) {
    if matches!(warps, 4 | 8) {
        WARPS.store(warps, Ordering::Relaxed);
    }
}

/// Whether [`flash_attention`] takes `heads` heads of `[B, L, hd]` `dtype` inputs.
pub fn supports(hd: usize, heads: usize, dtype: DType) -> bool {
    heads > 0
        && hd.is_multiple_of(heads)
        && HEAD_DIMS.contains(&(hd / heads))
        && matches!(dtype, DType::BF16 | DType::F16)
}

/// Attention of q, k, v `[B, L, heads * D]` (head `h` in columns `h * D..(h + 1) * D`),
/// scaled by `1 / sqrt(D)`; returns `[B, L, heads * D]`.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    flash_attention_with(q, k, v, heads, warps())
}

/// [`flash_attention`] with the kernel variant of `warps` warps per block (4 or 8).
pub fn flash_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    warps: usize,
) -> Result<Tensor> {
    let (_, _, hd) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?} differ",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || !hd.is_multiple_of(heads) || !HEAD_DIMS.contains(&(hd / heads)) {
        candle_core::bail!(
            "flash attention: {hd} columns as {heads} heads; head dims {HEAD_DIMS:?} are built"
        );
    }
    let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
    q.apply_op3_no_bwd(&k, &v, &FlashAttention { heads, warps })
}

/// `xs` contiguous and starting at a multiple of 8 elements (16 bytes in bf16), as the
/// kernel's 16-byte copies need.
fn aligned(xs: &Tensor) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    if xs.layout().start_offset().is_multiple_of(8) {
        Ok(xs)
    } else {
        xs.copy()
    }
}

/// The plain f32 attention of `[B, L, H, D]` values (what the CPU runs): per row, scores
/// `q . k / sqrt(D)`, a max-subtracted softmax, the weighted sum of v.
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    l: usize,
    heads: usize,
    d: usize,
) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let row = heads * d;
    let mut out = vec![0f32; b * l * row];
    // Each chunk is one (batch, query row): all heads of it.
    out.par_chunks_mut(row).enumerate().for_each(|(bi, dst)| {
        let (batch, _) = (bi / l, bi % l);
        let mut scores = vec![0f32; l];
        for h in 0..heads {
            let qi = &q[bi * row + h * d..][..d];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &k[(batch * l + j) * row + h * d..][..d];
                *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            let o = &mut dst[h * d..(h + 1) * d];
            o.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let vj = &v[(batch * l + j) * row + h * d..][..d];
                for (o, v) in o.iter_mut().zip(vj) {
                    *o += p * v;
                }
            }
            o.iter_mut().for_each(|o| *o /= total);
        }
    });
    out
}

/// Candle's unfused attention on the same layout, as FLUX ran it before: transposes to
/// `[B, H, L, D]`, scores, f32 softmax, values, and back.
pub fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = q.dims3()?;
    let d = hd / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = q.matmul(&k.t()?)?;
    let weights = super::scaled_softmax_last_dim(scores, 1.0 / (d as f64).sqrt())?;
    weights.matmul(&v)?.transpose(1, 2)?.reshape((b, l, hd))
}

struct FlashAttention {
    heads: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    warps: usize,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "icedit-flash-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, l, hd) = ql.shape().dims3()?;
        let out = reference(
            &cpu::to_f32(q, ql)?,
            &cpu::to_f32(k, kl)?,
            &cpu::to_f32(v, vl)?,
            b,
            l,
            self.heads,
            hd / self.heads,
        );
        Ok((cpu::from_f32(out, q.dtype())?, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, l, hd) = ql.shape().dims3()?;
        let out = super::fused_launch::flash_attention(
            (q, ql),
            (k, kl),
            (v, vl),
            b,
            l,
            self.heads,
            hd / self.heads,
            self.warps,
        )?;
        Ok((out, ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn the_reference_equals_candles_unfused_attention_at_any_length() {
        // 70 rows: one full 64-key tile and a masked tail on the GPU.
        for (d, l, dtype, tol) in [
            (64, 70, DType::F32, 1e-5),
            (128, 33, DType::F32, 1e-5),
            // candle rounds the scores to bf16 before its softmax; the reference does not.
            (128, 70, DType::BF16, 4e-2),
            (64, 9, DType::F16, 2e-3),
        ] {
            let heads = 3;
            let r = |std: f32| {
                Tensor::randn(0f32, std, (2, l, heads * d), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (q, k, v) = (r(1.0), r(1.0), r(1.0));
            let fused = flash_attention(&q, &k, &v, heads).unwrap();
            let plain = unfused(&q, &k, &v, heads).unwrap();
            assert_eq!(fused.dims(), &[2, l, heads * d]);
            let diff = max_diff(&fused, &plain);
            assert!(diff < tol, "d {d}, l {l}, {dtype:?}: {diff}");
        }
    }

    #[test]
    fn heads_of_an_unbuilt_size_are_refused() {
        let q = Tensor::zeros((1, 4, 96), DType::BF16, &Device::Cpu).unwrap();
        let err = flash_attention(&q, &q, &q, 1).unwrap_err().to_string();
        assert!(err.contains("head dims"), "{err}");
        assert!(!supports(96, 1, DType::BF16) && supports(256, 2, DType::BF16));
        assert!(!supports(256, 2, DType::F32));
    }
}
