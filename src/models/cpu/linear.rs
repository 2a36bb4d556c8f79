//! A linear layer's forward pass with its bias folded into the matrix product.
//!
//! candle's `Linear` zero-fills its output, multiplies into it, then adds the bias in a
//! second pass that reads and writes the whole output again (for the Qwen2-VL vision MLP,
//! 42 MiB per block). Here the output starts as the bias repeated on every row and `gemm`
//! accumulates onto it, so the output is written once and read once, inside the kernel's
//! cache-sized tiles (what torch's `addmm` does).

use candle_core::{Module, Result, Storage, Tensor};
use candle_nn::Linear;
use gemm::Parallelism;

/// `xs @ weight^T + bias` over the last dimension of `xs` (any leading dims). Dense f32 CPU
/// inputs with a bias take the folded path; anything else is candle's `Linear::forward`.
pub fn forward(linear: &Linear, xs: &Tensor) -> Result<Tensor> {
    let weight = linear.weight();
    let Some(bias) = linear.bias() else {
        return linear.forward(xs);
    };
    if ![xs, weight, bias]
        .iter()
        .all(|t| super::is_dense_cpu_f32(t))
        || weight.rank() != 2
    {
        return linear.forward(xs);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let dims = xs.dims();
    let Some((&last, leading)) = dims.split_last() else {
        return linear.forward(xs);
    };
    if last != in_dim || bias.dims() != [out_dim] {
        // Let candle name the mismatch.
        return linear.forward(xs);
    }
    let rows: usize = leading.iter().product();
    let (xs_store, xs_layout) = xs.storage_and_layout();
    let (w_store, w_layout) = weight.storage_and_layout();
    let (b_store, b_layout) = bias.storage_and_layout();
    let (x, w, b) = match (&*xs_store, &*w_store, &*b_store) {
        (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(b)) => (
            &x.as_slice::<f32>()?[xs_layout.start_offset()..][..rows * in_dim],
            &w.as_slice::<f32>()?[w_layout.start_offset()..][..out_dim * in_dim],
            &b.as_slice::<f32>()?[b_layout.start_offset()..][..out_dim],
        ),
        _ => candle_core::bail!("folded linear needs CPU tensors"),
    };
    let mut out = Vec::with_capacity(rows * out_dim);
    for _ in 0..rows {
        out.extend_from_slice(b);
    }
    if rows > 0 && out_dim > 0 {
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: `out` is [rows, out_dim] (row stride out_dim), `x` [rows, in_dim] (row
        // stride in_dim), and the weight [out_dim, in_dim] read as its transpose
        // [in_dim, out_dim] (row stride 1, column stride in_dim); all within their slices.
        // With read_dst, gemm computes out = 1 * out + 1 * x w^T.
        unsafe {
            gemm::gemm(
                rows,
                out_dim,
                in_dim,
                out.as_mut_ptr(),
                1,
                out_dim as isize,
                true,
                x.as_ptr(),
                1,
                in_dim as isize,
                w.as_ptr(),
                in_dim as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    drop((xs_store, w_store, b_store));
    let mut shape = leading.to_vec();
    shape.push(out_dim);
    Tensor::from_vec(out, shape, xs.device())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::models::cpu::max_abs_diff;

    #[test]
    fn matches_candles_linear() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (37, 29), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let linear = Linear::new(w.clone(), Some(b));
        for shape in [vec![5, 29], vec![2, 3, 29], vec![1, 1, 29], vec![0, 29]] {
            let xs = Tensor::randn(0f32, 1.0, shape.clone(), &dev).unwrap();
            let ours = forward(&linear, &xs).unwrap();
            let want = linear.forward(&xs).unwrap();
            assert_eq!(ours.dims(), want.dims(), "{shape:?}");
            if ours.elem_count() > 0 {
                assert!(max_abs_diff(&ours, &want) < 1e-5, "{shape:?}");
            }
        }
        // Without a bias, strided or not f32: candle's own path, same answers.
        let plain = Linear::new(w, None);
        let xs = Tensor::randn(0f32, 1.0, (4, 29), &dev).unwrap();
        let diff = max_abs_diff(&forward(&plain, &xs).unwrap(), &plain.forward(&xs).unwrap());
        assert_eq!(diff, 0.0);
        let strided = Tensor::randn(0f32, 1.0, (29, 4), &dev)
            .unwrap()
            .t()
            .unwrap();
        let diff = max_abs_diff(
            &forward(&linear, &strided).unwrap(),
            &linear.forward(&strided).unwrap(),
        );
        assert_eq!(diff, 0.0);
        let half = xs.to_dtype(DType::F16).unwrap();
        assert!(forward(&linear, &half).is_err() == linear.forward(&half).is_err());
        // A wrong width is candle's error, not a panic here.
        let wide = Tensor::zeros((4, 30), DType::F32, &dev).unwrap();
        assert!(forward(&linear, &wide).is_err());
    }
}
