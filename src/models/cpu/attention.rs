//! Softmax attention within segments, fused on the CPU.
//!
//! For each head and each block of query rows, the block's scores against its segment's
//! keys (a few hundred KiB) are computed with `gemm`, turned into unnormalised softmax
//! weights in place, multiplied into the values with `gemm`, and the output rows divided
//! by their sums. The full `[heads, len, len]` score tensor never exists, so nothing
//! leaves the cache between the three steps. Heads run in parallel on rayon's pool.
//!
//! [`segmented_attention`] serves the Qwen-VL vision tower (rows attend within their
//! image or window); [`causal_attention`] the text decoder (row `i` attends to the cache
//! and rows up to `i`; masked keys are never scored, and grouped key/value heads are read
//! in place instead of repeated).

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
                    head_attention(
                        &q[seg.clone()],
                        &k[seg.clone()],
                        &v[seg.clone()],
                        &mut out[seg],
                        hd,
                        None,
                        scratch,
                    );
                }
            },
        );
    }
    drop((qs, ks, vs));
    Tensor::from_vec(out, (heads, n, hd), q.device())
}

/// Causal attention for a decoder: `q` `[b, heads, s, hd]` (softmax scale already
/// applied), `k` and `v` `[b, kv_heads, t, hd]` with the `t - s` cached positions first;
/// query row `i` attends to keys `0..=t - s + i`. Query head `h` reads key/value head
/// `h / (heads / kv_heads)` (grouped-query attention). Returns `[b, heads, s, hd]`.
///
/// Errors if the tensors are not dense CPU f32 or their shapes disagree; callers check
/// [`super::is_dense_cpu_f32`] first and use the tensor path otherwise.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, s, hd) = q.dims4()?;
    let (kb, kv_heads, t, khd) = k.dims4()?;
    if v.dims() != k.dims()
        || kb != b
        || khd != hd
        || t < s
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        bail!(
            "causal attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    for x in [q, k, v] {
        if !super::is_dense_cpu_f32(x) {
            bail!("causal attention needs contiguous f32 CPU tensors");
        }
    }
    let (groups, past) = (heads / kv_heads, t - s);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qd, kd, vd) = match (&*qs, &*ks, &*vs) {
        (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) => (
            &q.as_slice::<f32>()?[ql.start_offset()..][..b * heads * s * hd],
            &k.as_slice::<f32>()?[kl.start_offset()..][..b * kv_heads * t * hd],
            &v.as_slice::<f32>()?[vl.start_offset()..][..b * kv_heads * t * hd],
        ),
        _ => bail!("causal attention needs CPU tensors"),
    };
    let mut out = vec![0f32; b * heads * s * hd];
    if hd > 0 && s > 0 {
        out.par_chunks_mut(s * hd).enumerate().for_each_init(
            Scratch::default,
            |scratch, (i, out)| {
                let (batch, head) = (i / heads, i % heads);
                let kv = (batch * kv_heads + head / groups) * t * hd..;
                head_attention(
                    &qd[i * s * hd..(i + 1) * s * hd],
                    &kd[kv.clone()][..t * hd],
                    &vd[kv][..t * hd],
                    out,
                    hd,
                    Some(past),
                    scratch,
                );
            },
        );
    }
    drop((qs, ks, vs));
    Tensor::from_vec(out, (b, heads, s, hd), q.device())
}

/// One worker's buffers, reused across the heads and segments it runs.
#[derive(Default)]
struct Scratch {
    /// A block of scores, `[rows, len]`.
    scores: Vec<f32>,
    /// Each score row's softmax denominator.
    sums: Vec<f32>,
}

/// One head: `q` and `out` are `[len_q, hd]`, `k` and `v` `[len_k, hd]`, row-major. With
/// `causal = Some(past)`, query row `i` sees keys `0..=past + i` (`len_k = past + len_q`)
/// and each block scores only the keys its last row sees; otherwise every row sees all.
fn head_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    hd: usize,
    causal: Option<usize>,
    scratch: &mut Scratch,
) {
    let (len_q, len_k) = (q.len() / hd, k.len() / hd);
    if len_q == 0 || len_k == 0 {
        return;
    }
    let rows = (BLOCK_SCORES / len_k).clamp(1, len_q);
    let Scratch { scores, sums } = scratch;
    scores.resize(rows * len_k, 0.0);
    sums.resize(rows, 0.0);

    for r0 in (0..len_q).step_by(rows) {
        let m = rows.min(len_q - r0);
        // Keys this block scores: all, or those its last row may see.
        let width = causal.map_or(len_k, |past| (past + r0 + m).min(len_k));
        let block = &mut scores[..m * width];
        let q_rows = &q[r0 * hd..(r0 + m) * hd];
        // SAFETY: every pointer spans the matrix its strides describe: `block` is
        // [m, width] (row stride width), `q_rows` [m, hd] (row stride hd), and the first
        // `width` rows of k read as their transpose [hd, width] (row stride 1, column
        // stride hd) lie in `k` ([len_k, hd], width <= len_k).
        unsafe {
            gemm::gemm(
                m,
                width,
                hd,
                block.as_mut_ptr(),
                1,
                width as isize,
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
        match causal {
            None => softmax_rows(block, width, &mut sums[..m]),
            Some(past) => {
                for (i, row) in block.chunks_exact_mut(width).enumerate() {
                    // Row r0 + i sees keys 0..=past + r0 + i; later ones weigh nothing.
                    let seen = (past + r0 + i + 1).min(width);
                    softmax_rows(&mut row[..seen], seen, &mut sums[i..i + 1]);
                    row[seen..].fill(0.0);
                }
            }
        }
        let out_rows = &mut out[r0 * hd..(r0 + m) * hd];
        // SAFETY: `out_rows` is [m, hd] (row stride hd), `block` [m, width] (row stride
        // width), the first `width` rows of `v` [width, hd] (row stride hd); all within
        // their slices.
        unsafe {
            gemm::gemm(
                m,
                hd,
                width,
                out_rows.as_mut_ptr(),
                1,
                hd as isize,
                false,
                block.as_ptr(),
                1,
                width as isize,
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

    /// The unfused decoder path: key/value heads repeated, a -inf mask above the
    /// diagonal (offset by the cached positions), softmax, weighted sum.
    fn causal_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, heads, s, hd) = q.dims4().unwrap();
        let (_, kv_heads, t, _) = k.dims4().unwrap();
        let repeat = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, kv_heads, heads / kv_heads, t, hd))
                .unwrap()
                .reshape((b, heads, t, hd))
                .unwrap()
        };
        let past = t - s;
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| (0..t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (s, t), q.device()).unwrap();
        let scores = q
            .matmul(&repeat(k).t().unwrap())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&repeat(v))
            .unwrap()
    }

    #[test]
    fn causal_attention_matches_the_masked_tensor_path() {
        let dev = Device::Cpu;
        // (batch, heads, kv heads, new rows, cached rows, head width): a prefill long
        // enough for several blocks, grouped heads, a cache, one decode step, odd widths.
        for (b, heads, kv_heads, s, past, hd) in [
            (1, 2, 1, 700, 0, 16),
            (2, 6, 2, 9, 4, 13),
            (1, 4, 4, 1, 11, 8),
            (2, 3, 3, 300, 200, 5),
        ] {
            let q = Tensor::randn(0f32, 2.0, (b, heads, s, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 2.0, (b, kv_heads, past + s, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, kv_heads, past + s, hd), &dev).unwrap();
            let ours = causal_attention(&q, &k, &v).unwrap();
            let diff = max_abs_diff(&ours, &causal_reference(&q, &k, &v));
            assert!(
                diff < 2e-5,
                "b {b} heads {heads}/{kv_heads} s {s} past {past}: {diff}"
            );
        }
    }

    #[test]
    fn causal_attention_refuses_shapes_that_do_not_fit() {
        let dev = Device::Cpu;
        let z = |dims: (usize, usize, usize, usize)| {
            Tensor::zeros(dims, candle_core::DType::F32, &dev).unwrap()
        };
        // 3 query heads over 2 key/value heads; more new rows than keys; other widths.
        assert!(causal_attention(&z((1, 3, 4, 8)), &z((1, 2, 4, 8)), &z((1, 2, 4, 8))).is_err());
        assert!(causal_attention(&z((1, 2, 5, 8)), &z((1, 2, 4, 8)), &z((1, 2, 4, 8))).is_err());
        assert!(causal_attention(&z((1, 2, 4, 8)), &z((1, 2, 4, 7)), &z((1, 2, 4, 7))).is_err());
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
