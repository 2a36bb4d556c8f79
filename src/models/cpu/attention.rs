//! Softmax attention within segments, fused on the CPU.
//!
//! For each head and each block of query rows, the block's scores against its segment's
//! keys (a few hundred KiB) are computed with `gemm`, turned into unnormalised softmax
//! weights in place, multiplied into the values with `gemm`, and the output rows divided
//! by their sums. The full `[heads, len, len]` score tensor never exists, so nothing
//! leaves the cache between the three steps. Heads run in parallel on rayon's pool.

use candle_core::{bail, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::exp::exp;

/// Scores per block (floats): 256 KiB, inside a core's L2 with room for the keys.
const BLOCK_SCORES: usize = 64 * 1024;

/// Attention of `q` (softmax scale already applied), `k`, `v`, each `[heads, n, hd]`
/// contiguous f32 on the CPU, where row `i` attends only to rows of its own segment
/// `[segments[j], segments[j + 1])`. Returns `[heads, n, hd]`.
///
/// Errors if the tensors are not dense CPU f32 of one shape or the segments do not tile
/// `0..n`; callers check [`super::is_dense_cpu_f32`] first and use the tensor path
/// otherwise.
pub fn segmented_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[usize],
) -> Result<Tensor> {
    let (heads, n, hd) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        bail!(
            "fused attention: q {:?}, k {:?}, v {:?} differ",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if segments.first() != Some(&0)
        || segments.last() != Some(&n)
        || segments.windows(2).any(|w| w[0] > w[1])
    {
        bail!("fused attention: segments {segments:?} do not tile 0..{n}");
    }
    for t in [q, k, v] {
        if !super::is_dense_cpu_f32(t) {
            bail!("fused attention needs contiguous f32 CPU tensors");
        }
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qd, kd, vd) = match (&*qs, &*ks, &*vs) {
        (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) => (
            &q.as_slice::<f32>()?[ql.start_offset()..][..heads * n * hd],
            &k.as_slice::<f32>()?[kl.start_offset()..][..heads * n * hd],
            &v.as_slice::<f32>()?[vl.start_offset()..][..heads * n * hd],
        ),
        _ => bail!("fused attention needs CPU tensors"),
    };

    let mut out = vec![0f32; heads * n * hd];
    if hd > 0 {
        out.par_chunks_mut(n * hd).enumerate().for_each_init(
            Scratch::default,
            |scratch, (h, out)| {
                let head = h * n * hd..(h + 1) * n * hd;
                let (q, k, v) = (&qd[head.clone()], &kd[head.clone()], &vd[head]);
                for w in segments.windows(2) {
                    let (start, len) = (w[0], w[1] - w[0]);
                    let seg = start * hd..(start + len) * hd;
                    head_segment(
                        &q[seg.clone()],
                        &k[seg.clone()],
                        &v[seg.clone()],
                        &mut out[seg],
                        hd,
                        scratch,
                    );
                }
            },
        );
    }
    drop((qs, ks, vs));
    Tensor::from_vec(out, (heads, n, hd), q.device())
}

/// One worker's buffers, reused across the heads and segments it runs.
#[derive(Default)]
struct Scratch {
    /// A block of scores, `[rows, len]`.
    scores: Vec<f32>,
    /// Each score row's softmax denominator.
    sums: Vec<f32>,
}

/// One head over one segment: `q`, `k`, `v`, `out` are `[len, hd]` row-major.
fn head_segment(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    hd: usize,
    scratch: &mut Scratch,
) {
    let len = q.len() / hd;
    if len == 0 {
        return;
    }
    let rows = (BLOCK_SCORES / len).clamp(1, len);
    let Scratch { scores, sums } = scratch;
    scores.resize(rows * len, 0.0);
    sums.resize(rows, 0.0);

    for r0 in (0..len).step_by(rows) {
        let m = rows.min(len - r0);
        let block = &mut scores[..m * len];
        let q_rows = &q[r0 * hd..(r0 + m) * hd];
        // SAFETY: every pointer spans the matrix its strides describe: `block` is
        // [m, len] (row stride len), `q_rows` [m, hd] (row stride hd), and k read as its
        // transpose [hd, len] (row stride 1, column stride hd) lies in `k` ([len, hd]).
        unsafe {
            gemm::gemm(
                m,
                len,
                hd,
                block.as_mut_ptr(),
                1,
                len as isize,
                false,
                q_rows.as_ptr(),
                1,
                hd as isize,
                k.as_ptr(),
                hd as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        softmax_rows(block, len, &mut sums[..m]);
        let out_rows = &mut out[r0 * hd..(r0 + m) * hd];
        // SAFETY: `out_rows` is [m, hd] (row stride hd), `block` [m, len] (row stride
        // len), `v` [len, hd] (row stride hd); all within their slices.
        unsafe {
            gemm::gemm(
                m,
                hd,
                len,
                out_rows.as_mut_ptr(),
                1,
                hd as isize,
                false,
                block.as_ptr(),
                1,
                len as isize,
                v.as_ptr(),
                1,
                hd as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for (row, sum) in out_rows.chunks_exact_mut(hd).zip(sums.iter()) {
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

super::simd_dispatch! {
    /// Each `len`-wide row of `block` becomes `exp(x - max)`; its sum goes to `sums`.
    fn softmax_rows(block: &mut [f32], len: usize, sums: &mut [f32]) => softmax_rows_body
}

/// Two passes over each row (the max; then exp and the sum), loops the compiler vectorizes:
/// the max and the sum keep eight independent lanes, as floats may not be reassociated.
#[inline(always)]
fn softmax_rows_body(block: &mut [f32], len: usize, sums: &mut [f32]) {
    const LANES: usize = 8;
    for (row, sum) in block.chunks_exact_mut(len).zip(sums.iter_mut()) {
        let whole = len - len % LANES;
        let mut top = [f32::NEG_INFINITY; LANES];
        for chunk in row[..whole].chunks_exact(LANES) {
            for j in 0..LANES {
                top[j] = top[j].max(chunk[j]);
            }
        }
        let max = row[whole..]
            .iter()
            .chain(top.iter())
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut acc = [0f32; LANES];
        for chunk in row[..whole].chunks_exact_mut(LANES) {
            for j in 0..LANES {
                chunk[j] = exp(chunk[j] - max);
                acc[j] += chunk[j];
            }
        }
        for x in row[whole..].iter_mut() {
            *x = exp(*x - max);
        }
        *sum = row[whole..].iter().sum::<f32>() + acc.iter().sum::<f32>();
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;
    use crate::models::cpu::max_abs_diff;

    /// The unfused reference: scores, softmax, weighted sum, one segment at a time.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[usize]) -> Tensor {
        let parts: Vec<Tensor> = segments
            .windows(2)
            .filter(|w| w[1] > w[0])
            .map(|w| {
                let (s, l) = (w[0], w[1] - w[0]);
                let (q, k, v) = (
                    q.narrow(1, s, l).unwrap(),
                    k.narrow(1, s, l).unwrap(),
                    v.narrow(1, s, l).unwrap(),
                );
                let scores = q.matmul(&k.t().unwrap()).unwrap();
                candle_nn::ops::softmax(&scores, D::Minus1)
                    .unwrap()
                    .matmul(&v)
                    .unwrap()
            })
            .collect();
        Tensor::cat(&parts, 1).unwrap()
    }

    #[test]
    fn matches_unfused_attention_across_segments_and_blocks() {
        let dev = Device::Cpu;
        // 700 rows make blocks of 93 rows with a short last one; 13 is off the lane width.
        for (heads, segments, hd) in [
            (3, vec![0, 5, 705, 1000], 13),
            (2, vec![0, 64, 64, 128], 16),
            (1, vec![0, 1], 8),
        ] {
            let n = *segments.last().unwrap();
            let rand = |s: f32| Tensor::randn(0f32, s, (heads, n, hd), &dev).unwrap();
            // Large scores exercise the max subtraction.
            let (q, k, v) = (rand(3.0), rand(3.0), rand(1.0));
            let ours = segmented_attention(&q, &k, &v, &segments).unwrap();
            let want = reference(&q, &k, &v, &segments);
            let diff = max_abs_diff(&ours, &want);
            assert!(diff < 2e-5, "segments {segments:?}: max abs diff {diff}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let dev = Device::Cpu;
        let t = Tensor::zeros((2, 8, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(segmented_attention(&t, &t, &t, &[0, 7]).is_err());
        let wide = Tensor::zeros((2, 8, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(segmented_attention(&t, &wide, &t, &[0, 8]).is_err());
        let half = t.to_dtype(candle_core::DType::F16).unwrap();
        assert!(segmented_attention(&half, &half, &half, &[0, 8]).is_err());
        let strided = t.transpose(1, 2).unwrap();
        assert!(segmented_attention(&strided, &strided, &strided, &[0, 4]).is_err());
    }
}
