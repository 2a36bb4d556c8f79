//! Flash attention of our own (`flash.cu`): `softmax(q k^T / sqrt(D)) v` per (batch, head)
//! without the `[L, L]` scores ever reaching memory (tiles of queries held on chip, an
//! online softmax, tensor cores through `mma.sync`; bf16 / f16 in and out, f32 inside).
//!
//! Two entry points, each a candle custom op (on CUDA it launches the kernel, on the CPU it
//! runs a plain f32 reference):
//! - [`flash_attention`], FLUX's joint attention: not causal, one sequence, head dims 64 and
//!   128; q, k, v and the output are `[B, L, H * D]`, the layout the q/k/v linears write and
//!   the output projection reads, so nothing is transposed.
//! - [`judge_attention`], the Qwen-VL judge's: head dims 64, 72 (run as 80), 80 and 128,
//!   variable-length segments (the vision tower's frames and windows, one launch for all of
//!   them), causal masking after a cached prefix (the decoder's prefill), grouped key/value heads, and q,
//!   k, v read through their strides (`[B, H, L, D]` views, the head dim contiguous), so the
//!   vision tower's v is read inside the qkv projection's output and the decoder's cache as
//!   it is. The output is `[B, L, H * D]`, what both output projections read.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::glue::cpu;

/// Head dims FLUX's kernel ([`flash_attention`]) is built for.
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
            let at = |j: usize| (batch * l + j) * row + h * d;
            attend_row(
                &q[bi * row + h * d..][..d],
                scale,
                &mut scores,
                |j| &k[at(j)..][..d],
                |j| &v[at(j)..][..d],
                &mut dst[h * d..(h + 1) * d],
            );
        }
    });
    out
}

/// One query row of softmax attention in f32: `scores[j] = q . key(j) * scale` for every
/// `j < scores.len()`, a max-subtracted softmax, and `out` the weighted sum of `value(j)`.
/// The CPU references of both kernels run it.
fn attend_row<'a>(
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    out: &mut [f32],
) {
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = q.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f32>() * scale;
        max = max.max(*s);
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    out.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(value(j)) {
            *o += p * v;
        }
    }
    out.iter_mut().for_each(|o| *o /= total);
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

/// Head dims the judge's kernel ([`judge_attention`]) is built for: 80 is the vision tower
/// of Qwen2-VL and Qwen2.5-VL (1280 wide, 16 heads), 72 Qwen3-VL's (1152 wide, 16 heads;
/// run as 80 with zero-filled columns), 128 their decoders'.
pub const JUDGE_HEAD_DIMS: [usize; 4] = [64, 72, 80, 128];

/// Which keys a query sees in [`judge_attention`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Visibility<'a> {
    /// Segment boundaries (cu_seqlens: `0 = s[0] < s[1] < .. = L`): rows of `[s[i], s[i +
    /// 1])` attend only among themselves. Queries and keys share them (self-attention).
    pub segments: Option<&'a [usize]>,
    /// Query `i` sees keys `j <= i + (Lk - Lq)`: the keys of a cached prefix and its own.
    pub causal: bool,
}

/// Whether [`judge_attention`] takes heads of `head_dim` in `dtype`.
pub fn judge_supports(head_dim: usize, dtype: DType) -> bool {
    JUDGE_HEAD_DIMS.contains(&head_dim) && matches!(dtype, DType::BF16 | DType::F16)
}

/// Attention of q `[B, H, Lq, D]` over k, v `[B, KVH, Lk, D]` (`H` a multiple of `KVH`:
/// query head `h` reads key/value head `h / (H / KVH)`), scaled by `1 / sqrt(D)`, keys
/// limited by `visibility`; returns `[B, Lq, H * D]`. Any strides: on CUDA the kernel reads
/// views in place when their rows start 16-byte aligned (else they are copied first).
pub fn judge_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visibility: Visibility,
) -> Result<Tensor> {
    let (_, _, lq, _) = q.dims4()?;
    let longest = match visibility.segments {
        Some(s) => s.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0),
        None => lq,
    };
    // A block of 4 warps takes 64 query rows: enough for the tower's 64-patch windows.
    let warps = if longest <= 64 { 4 } else { 8 };
    judge_attention_with(q, k, v, visibility, warps)
}

/// [`judge_attention`] with the kernel variant of `warps` warps per block (4 or 8).
pub fn judge_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visibility: Visibility,
    warps: usize,
) -> Result<Tensor> {
    let op = JudgeAttention::new(q, k, v, visibility, warps)?;
    if q.device().is_cuda() {
        let (q, k, v) = (
            strided_aligned(q)?,
            strided_aligned(k)?,
            strided_aligned(v)?,
        );
        q.apply_op3_no_bwd(&k, &v, &op)
    } else {
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
    }
}

/// `xs` as it is when the kernel can read it (head dim contiguous, rows and the start on
/// 8-element boundaries), else a contiguous copy that starts aligned.
fn strided_aligned(xs: &Tensor) -> Result<Tensor> {
    let layout = xs.layout();
    let (stride, dims) = (layout.stride(), xs.dims());
    let readable = (dims[3] == 1 || stride[3] == 1)
        && stride[..3].iter().all(|s| s.is_multiple_of(8))
        && layout.start_offset().is_multiple_of(8);
    if readable {
        Ok(xs.clone())
    } else {
        aligned(&xs.contiguous()?)
    }
}

/// The plain f32 form of [`judge_attention`] (what the CPU runs): q `[B, H, Lq, D]`, k and v
/// `[B, KVH, Lk, D]`, contiguous; per query row, the scores of the keys it sees, a
/// max-subtracted softmax and the weighted sum of v. Returns `[B, Lq, H, D]`.
#[allow(clippy::too_many_arguments)]
pub fn judge_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, heads, lq, d): (usize, usize, usize, usize),
    (kv_heads, lk): (usize, usize),
    segments: Option<&[usize]>,
    causal: bool,
) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let group = heads / kv_heads;
    let row = heads * d;
    let mut out = vec![0f32; b * lq * row];
    // Each chunk is one (batch, query row): all heads of it.
    out.par_chunks_mut(row).enumerate().for_each(|(bi, dst)| {
        let (batch, i) = (bi / lq, bi % lq);
        // The keys row i sees: [k0, k_end).
        let (k0, seg_q0, seg_lq, seg_lk) = match segments {
            Some(s) => {
                let seg = s.partition_point(|&b| b <= i) - 1;
                let len = s[seg + 1] - s[seg];
                (s[seg], s[seg], len, len)
            }
            None => (0, 0, lq, lk),
        };
        let visible = if causal {
            (i - seg_q0 + seg_lk - seg_lq + 1).min(seg_lk)
        } else {
            seg_lk
        };
        let mut scores = vec![0f32; visible];
        for h in 0..heads {
            let kvh = h / group;
            let at = |j: usize| ((batch * kv_heads + kvh) * lk + k0 + j) * d;
            attend_row(
                &q[((batch * heads + h) * lq + i) * d..][..d],
                scale,
                &mut scores,
                |j| &k[at(j)..][..d],
                |j| &v[at(j)..][..d],
                &mut dst[h * d..(h + 1) * d],
            );
        }
    });
    out
}

/// Candle's unfused form of [`judge_attention`] (the device check's baseline, as the judge
/// ran before the kernel): per segment, grouped heads repeated, f32 scores with the causal
/// mask added, softmax, values; `[B, Lq, H * D]` in q's dtype.
pub fn judge_unfused(q: &Tensor, k: &Tensor, v: &Tensor, visibility: Visibility) -> Result<Tensor> {
    let (b, heads, lq, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        let (b, kv, s, d) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, kv, group, s, d))?
            .reshape((b, kv * group, s, d))?
            .to_dtype(DType::F32)
    };
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
        let (lq, lk) = (q.dim(2)?, k.dim(2)?);
        let scores = (q.to_dtype(DType::F32)?.matmul(&repeat(k)?.t()?)? / (d as f64).sqrt())?;
        let scores = if visibility.causal {
            let past = lk - lq;
            let mask: Vec<f32> = (0..lq)
                .flat_map(|i| {
                    (0..lk).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            scores.broadcast_add(&Tensor::from_vec(mask, (lq, lk), q.device())?)?
        } else {
            scores
        };
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&repeat(v)?)
    };
    let out = match visibility.segments {
        None => attend(q, k, v)?,
        Some(s) => {
            let parts = s
                .windows(2)
                .map(|w| {
                    let (start, len) = (w[0], w[1] - w[0]);
                    attend(
                        &q.narrow(2, start, len)?,
                        &k.narrow(2, start, len)?,
                        &v.narrow(2, start, len)?,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 2)?
        }
    };
    out.transpose(1, 2)?
        .reshape((b, lq, heads * d))?
        .to_dtype(q.dtype())
}

/// [`judge_attention`] as a custom op: the checked shapes and the masking.
struct JudgeAttention {
    /// (B, H, Lq, D) of q and (KVH, Lk) of k and v.
    q_dims: (usize, usize, usize, usize),
    kv_dims: (usize, usize),
    segments: Option<Vec<usize>>,
    causal: bool,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    warps: usize,
}

impl JudgeAttention {
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        visibility: Visibility,
        warps: usize,
    ) -> Result<Self> {
        let (b, heads, lq, d) = q.dims4()?;
        let (kb, kv_heads, lk, kd) = k.dims4()?;
        if (kb, kd) != (b, d) || v.dims() != k.dims() {
            candle_core::bail!(
                "judge attention: q {:?}, k {:?}, v {:?} do not fit [B, H, Lq, D] and [B, KVH, Lk, D]",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!(
                "judge attention: {heads} query heads over {kv_heads} key/value heads"
            );
        }
        if !JUDGE_HEAD_DIMS.contains(&d) || !matches!(warps, 4 | 8) {
            candle_core::bail!(
                "judge attention: head dim {d} with {warps} warps; head dims {JUDGE_HEAD_DIMS:?} with 4 or 8 warps are built"
            );
        }
        if visibility.causal && lk < lq {
            candle_core::bail!("judge attention: causal with {lq} queries over only {lk} keys");
        }
        let segments = visibility.segments.map(<[usize]>::to_vec);
        if let Some(s) = &segments {
            let ordered = s.windows(2).all(|w| w[0] < w[1]);
            if lq != lk || s.first() != Some(&0) || s.last() != Some(&lq) || !ordered || s.len() < 2
            {
                candle_core::bail!(
                    "judge attention: segments {s:?} must rise from 0 to the {lq} queries (= the {lk} keys)"
                );
            }
        }
        Ok(Self {
            q_dims: (b, heads, lq, d),
            kv_dims: (kv_heads, lk),
            segments,
            causal: visibility.causal,
            warps,
        })
    }

    fn out_shape(&self) -> Shape {
        let (b, heads, lq, d) = self.q_dims;
        Shape::from((b, lq, heads * d))
    }
}

impl CustomOp3 for JudgeAttention {
    fn name(&self) -> &'static str {
        "icedit-judge-attention"
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
        let out = judge_reference(
            &cpu::to_f32(q, ql)?,
            &cpu::to_f32(k, kl)?,
            &cpu::to_f32(v, vl)?,
            self.q_dims,
            self.kv_dims,
            self.segments.as_deref(),
            self.causal,
        );
        Ok((cpu::from_f32(out, q.dtype())?, self.out_shape()))
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
        let out = launch::judge_attention(self, (q, ql), (k, kl), (v, vl))?;
        Ok((out, self.out_shape()))
    }
}

/// The judge kernel's launch (CUDA builds only).
#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

    use super::JudgeAttention;

    use super::super::ptx::{FLASH as FLASH_PTX, FLASH_MODULE};

    /// (batch, head, row) strides of a `[B, H, L, D]` layout, in elements, as the kernel
    /// takes them; refuses what it cannot read (the caller aligned them).
    fn strides(name: &str, layout: &Layout) -> Result<[i64; 3]> {
        let (stride, dims) = (layout.stride(), layout.dims());
        let ok = (dims[3] == 1 || stride[3] == 1)
            && stride[..3].iter().all(|s| s.is_multiple_of(8))
            && layout.start_offset().is_multiple_of(8);
        if !ok {
            candle_core::bail!("judge attention: {name} {dims:?} strides {stride:?} (offset {}) are not 16-byte rows", layout.start_offset());
        }
        Ok([stride[0] as i64, stride[1] as i64, stride[2] as i64])
    }

    /// The elements from `layout`'s start on.
    fn from<'a, T: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
    ) -> Result<CudaView<'a, T>> {
        Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
    }

    pub(super) fn judge_attention(
        op: &JudgeAttention,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        match q.0.dtype() {
            DType::BF16 => run::<half::bf16>(op, q, k, v, "bf16"),
            DType::F16 => run::<half::f16>(op, q, k, v, "f16"),
            other => candle_core::bail!("judge attention takes bf16 or f16, not {other:?}"),
        }
    }

    fn run<T: CudaDType + DeviceRepr>(
        op: &JudgeAttention,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let (b, heads, lq, d) = op.q_dims;
        let (kv_heads, lk) = op.kv_dims;
        let dev: &CudaDevice = q.0.device();
        let name = format!("judge_attention_d{d}_w{}_{suffix}", op.warps);
        let func = dev.get_or_load_custom_func(&name, FLASH_MODULE, FLASH_PTX)?;
        let (qs, ks, vs) = (strides("q", q.1)?, strides("k", k.1)?, strides("v", v.1)?);
        // Out is [B, Lq, H, D].
        let os = [(lq * heads * d) as i64, d as i64, (heads * d) as i64];
        let (nseg, longest) = match &op.segments {
            Some(s) => (
                s.len() - 1,
                s.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0),
            ),
            None => (0, lq),
        };
        if b * nseg.max(1) > 65_535 || heads > 65_535 {
            candle_core::bail!(
                "judge attention: {b} x {nseg} segments or {heads} heads exceed the grid"
            );
        }
        let rows_per_block = 16 * op.warps;
        let cfg = LaunchConfig {
            grid_dim: (
                longest.div_ceil(rows_per_block).max(1) as u32,
                heads as u32,
                (b * nseg.max(1)) as u32,
            ),
            block_dim: (32 * op.warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let cu: Option<CudaSlice<i32>> = op
            .segments
            .as_ref()
            .map(|s| dev.clone_htod(&s.iter().map(|&x| x as i32).collect::<Vec<i32>>()))
            .transpose()?;
        let ints = [
            nseg as i32,
            lq as i32,
            lk as i32,
            (heads / kv_heads) as i32,
            op.causal as i32,
        ];
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (qv, kv, vv) = (
            from::<T>(q.0, q.1)?,
            from::<T>(k.0, k.1)?,
            from::<T>(v.0, v.1)?,
        );
        let out_len = b * lq * heads * d;
        // SAFETY: the kernel writes every element of the [B, Lq, H, D] output.
        let dst = unsafe { dev.alloc::<T>(out_len)? };
        if out_len > 0 {
            let mut builder = func.builder();
            builder.arg(&qv).arg(&kv).arg(&vv).arg(&dst);
            // Without segments the kernel never reads cu_seqlens: any device pointer will do.
            match &cu {
                Some(cu) => builder.arg(cu),
                None => builder.arg(&dst),
            };
            for x in &ints {
                builder.arg(x);
            }
            for s in [&qs, &ks, &vs, &os].into_iter().flatten() {
                builder.arg(s);
            }
            builder.arg(&scale_log2);
            // SAFETY: argument types and count match the kernel's signature (flash.cu,
            // DEFINE_JUDGE); cu_seqlens outlives the launch on the stream (freed after it).
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::models::kernel_check::max_abs_diff(a, b).unwrap()
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

    /// `[B, H, L, D]` normal values in `dtype`.
    fn randn4(shape: (usize, usize, usize, usize), dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// (D, B, H, KVH, Lq, Lk, causal, segments, dtype, tolerance)
    type Case<'a> = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        Option<&'a [usize]>,
        DType,
        f32,
    );

    #[test]
    fn the_judge_reference_equals_candles_unfused_attention() {
        let seg = [0, 64, 100, 130, 150];
        let cases: [Case; 7] = [
            // The vision tower: windows of 64 and a ragged tail, head dim 80.
            (80, 1, 3, 3, 150, 150, false, Some(&seg), DType::F32, 1e-5),
            (80, 1, 2, 2, 150, 150, false, Some(&seg), DType::BF16, 4e-2),
            // Qwen3-VL's vision tower: head dim 72.
            (72, 1, 2, 2, 150, 150, false, Some(&seg), DType::BF16, 4e-2),
            // The decoder: causal prefill with grouped heads (4 over 2), two prompts.
            (128, 2, 4, 2, 70, 70, true, None, DType::F32, 1e-5),
            // A prefill after a 90-token cache: row i sees keys 0..=90 + i.
            (128, 1, 6, 2, 40, 130, true, None, DType::F16, 2e-3),
            (64, 1, 2, 1, 33, 33, false, None, DType::F32, 1e-5),
            // Causal inside each segment.
            (64, 1, 2, 2, 150, 150, true, Some(&seg), DType::F32, 1e-5),
        ];
        for (d, b, heads, kv_heads, lq, lk, causal, segments, dtype, tol) in cases {
            let q = randn4((b, heads, lq, d), dtype);
            let k = randn4((b, kv_heads, lk, d), dtype);
            let v = randn4((b, kv_heads, lk, d), dtype);
            let visibility = Visibility { segments, causal };
            let fused = judge_attention(&q, &k, &v, visibility).unwrap();
            let plain = judge_unfused(&q, &k, &v, visibility).unwrap();
            assert_eq!(fused.dims(), &[b, lq, heads * d]);
            assert_eq!(fused.dtype(), dtype);
            let diff = max_diff(&fused, &plain);
            assert!(
                diff < tol,
                "d {d}, {heads}/{kv_heads} heads, {lq}/{lk}, causal {causal}, {segments:?}, {dtype:?}: {diff}"
            );
        }
    }

    #[test]
    fn the_judge_reference_equals_the_cpu_models_own_kernels() {
        // The vision tower's segmented and the decoder's causal attention, as the f32 CPU
        // model runs them (q pre-scaled, [B, H, L, D] out).
        let d = 80;
        let seg = [0, 16, 80, 96];
        let (q, k, v) = (
            randn4((1, 2, 96, d), DType::F32),
            randn4((1, 2, 96, d), DType::F32),
            randn4((1, 2, 96, d), DType::F32),
        );
        let ours = judge_attention(
            &q,
            &k,
            &v,
            Visibility {
                segments: Some(&seg),
                causal: false,
            },
        )
        .unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let squeeze = |t: &Tensor| t.squeeze(0).unwrap().contiguous().unwrap();
        let model = crate::models::cpu::attention::segmented_attention(
            &squeeze(&(&q * scale).unwrap()),
            &squeeze(&k),
            &squeeze(&v),
            &seg,
        )
        .unwrap();
        let model = model
            .transpose(0, 1)
            .unwrap()
            .reshape((1, 96, 2 * d))
            .unwrap();
        assert!(max_diff(&ours, &model) < 1e-5);

        let d = 128;
        let (q, k, v) = (
            randn4((2, 4, 20, d), DType::F32),
            randn4((2, 2, 50, d), DType::F32),
            randn4((2, 2, 50, d), DType::F32),
        );
        let ours = judge_attention(
            &q,
            &k,
            &v,
            Visibility {
                segments: None,
                causal: true,
            },
        )
        .unwrap();
        let model = crate::models::cpu::attention::causal_attention(
            &(&q * (1.0 / (d as f64).sqrt())).unwrap(),
            &k,
            &v,
        )
        .unwrap();
        let model = model
            .transpose(1, 2)
            .unwrap()
            .reshape((2, 20, 4 * d))
            .unwrap();
        assert!(max_diff(&ours, &model) < 1e-5);
    }

    #[test]
    fn the_judge_kernel_reads_strided_views_as_the_vision_tower_passes_them() {
        // v read inside the qkv projection's [n, 3, heads, hd] output, as vision.rs does.
        let (n, heads, d) = (70, 2, 80);
        let qkv = Tensor::randn(0f32, 1.0, (n, 3, heads, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let part = |i: usize| {
            qkv.narrow(1, i, 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        assert!(!v.is_contiguous());
        let visibility = Visibility {
            segments: Some(&[0, 64, 70]),
            causal: false,
        };
        let strided = judge_attention(&q, &k, &v, visibility).unwrap();
        let packed = |t: &Tensor| t.contiguous().unwrap();
        let dense = judge_unfused(&packed(&q), &packed(&k), &packed(&v), visibility).unwrap();
        assert!(max_diff(&strided, &dense) < 4e-2);
    }

    #[test]
    fn judge_attention_refuses_what_it_cannot_run_and_names_why() {
        let t = |h: usize, l: usize, d: usize| {
            Tensor::zeros((1, h, l, d), DType::BF16, &Device::Cpu).unwrap()
        };
        let err = |q: &Tensor, k: &Tensor, vis: Visibility| {
            judge_attention(q, k, k, vis).unwrap_err().to_string()
        };
        let none = Visibility::default();
        assert!(err(&t(2, 8, 96), &t(2, 8, 96), none).contains("head dim 96"));
        assert!(err(&t(3, 8, 64), &t(2, 8, 64), none).contains("3 query heads over 2"));
        let causal = Visibility {
            segments: None,
            causal: true,
        };
        assert!(err(&t(2, 8, 64), &t(2, 4, 64), causal).contains("8 queries over only 4 keys"));
        for bad in [&[0, 5][..], &[0, 4, 4, 8], &[1, 8], &[0]] {
            let vis = Visibility {
                segments: Some(bad),
                causal: false,
            };
            assert!(
                err(&t(2, 8, 64), &t(2, 8, 64), vis).contains("segments"),
                "{bad:?}"
            );
        }
        assert!(judge_supports(80, DType::F16) && !judge_supports(80, DType::F32));
        assert!(judge_supports(72, DType::BF16) && !judge_supports(96, DType::BF16));
    }
}
