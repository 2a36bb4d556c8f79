//! `x * sigmoid(alpha * x)` (SiLU at alpha 1, quick-GELU at 1.702) in one vectorized pass,
//! alone or times a second tensor (a gated MLP's `act(gate) * up`).
//!
//! candle computes quick-GELU as three tensor operations (scale, sigmoid, product), each
//! streaming the whole hidden activation through memory with a scalar `exp`; this reads
//! it once and writes it once, on all threads.

use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

use super::exp::exp;

/// Elements per parallel task: enough to amortise scheduling, few enough to spread.
const TASK: usize = 1 << 14;

/// `x * sigmoid(alpha * x)` of a dense f32 CPU tensor (an error otherwise; callers check
/// [`super::is_dense_cpu_f32`]).
pub fn sigmoid_gated(xs: &Tensor, alpha: f32) -> Result<Tensor> {
    gated(xs, None, alpha)
}

/// `x * sigmoid(alpha * x) * y` (a gated MLP's `act(gate) * up`) in one pass over both, for
/// dense f32 CPU tensors of one shape: candle would write the activation and then read it
/// back for the product, on one thread.
pub fn sigmoid_gated_product(xs: &Tensor, ys: &Tensor, alpha: f32) -> Result<Tensor> {
    if xs.dims() != ys.dims() {
        candle_core::bail!(
            "gated product of shapes {:?} and {:?}",
            xs.dims(),
            ys.dims()
        );
    }
    gated(xs, Some(ys), alpha)
}

fn gated(xs: &Tensor, ys: Option<&Tensor>, alpha: f32) -> Result<Tensor> {
    if !super::is_dense_cpu_f32(xs) || !ys.is_none_or(super::is_dense_cpu_f32) {
        candle_core::bail!("fused activation needs contiguous f32 CPU tensors");
    }
    let count = xs.elem_count();
    let (x_store, x_layout) = xs.storage_and_layout();
    let y_guard = ys.map(|y| y.storage_and_layout());
    let input = cpu_slice(&x_store, x_layout.start_offset(), count)?;
    let other = match &y_guard {
        Some((store, layout)) => Some(cpu_slice(store, layout.start_offset(), count)?),
        None => None,
    };
    let mut out = vec![0f32; count];
    match other {
        None => out
            .par_chunks_mut(TASK)
            .zip(input.par_chunks(TASK))
            .for_each(|(out, input)| gate(input, out, alpha)),
        Some(other) => out
            .par_chunks_mut(TASK)
            .zip(input.par_chunks(TASK).zip(other.par_chunks(TASK)))
            .for_each(|(out, (input, other))| gate_product(input, other, out, alpha)),
    }
    drop((x_store, y_guard));
    Tensor::from_vec(out, xs.dims(), xs.device())
}

/// `count` values of a CPU f32 storage from `start`.
fn cpu_slice(store: &Storage, start: usize, count: usize) -> Result<&[f32]> {
    match store {
        Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[start..][..count]),
        _ => candle_core::bail!("fused activation needs a CPU tensor"),
    }
}

super::simd_dispatch! {
    fn gate(input: &[f32], out: &mut [f32], alpha: f32) => gate_body
}

super::simd_dispatch! {
    fn gate_product(input: &[f32], other: &[f32], out: &mut [f32], alpha: f32) => gate_product_body
}

#[inline(always)]
fn gate_body(input: &[f32], out: &mut [f32], alpha: f32) {
    for (o, &x) in out.iter_mut().zip(input) {
        *o = x / (1.0 + exp(-alpha * x));
    }
}

#[inline(always)]
fn gate_product_body(input: &[f32], other: &[f32], out: &mut [f32], alpha: f32) {
    for ((o, &x), &y) in out.iter_mut().zip(input).zip(other) {
        *o = x / (1.0 + exp(-alpha * x)) * y;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::models::cpu::max_abs_diff;

    #[test]
    fn matches_the_tensor_formula() {
        let dev = Device::Cpu;
        // Past one task, with a ragged tail, and values far into both tails.
        let xs = (Tensor::randn(0f32, 1.0, (3, TASK + 7), &dev).unwrap() * 30.0).unwrap();
        for alpha in [1.0f32, 1.702] {
            let ours = sigmoid_gated(&xs, alpha).unwrap();
            let scaled = (&xs * alpha as f64).unwrap();
            let want = (&xs * candle_nn::ops::sigmoid(&scaled).unwrap()).unwrap();
            let diff = max_abs_diff(&ours, &want);
            assert!(diff < 1e-5, "alpha {alpha}: {diff}");
        }
        let strided = xs.t().unwrap();
        assert!(sigmoid_gated(&strided, 1.0).is_err());
    }

    #[test]
    fn the_gated_product_matches_the_tensor_formula() {
        let dev = Device::Cpu;
        let xs = (Tensor::randn(0f32, 1.0, (3, TASK + 7), &dev).unwrap() * 30.0).unwrap();
        let ys = Tensor::randn(0f32, 2.0, (3, TASK + 7), &dev).unwrap();
        for alpha in [1.0f32, 1.702] {
            let ours = sigmoid_gated_product(&xs, &ys, alpha).unwrap();
            let want = (sigmoid_gated(&xs, alpha).unwrap() * &ys).unwrap();
            let diff = max_abs_diff(&ours, &want);
            assert!(diff < 1e-5, "alpha {alpha}: {diff}");
        }
        let other_shape = Tensor::zeros((3, TASK), candle_core::DType::F32, &dev).unwrap();
        assert!(sigmoid_gated_product(&xs, &other_shape, 1.0).is_err());
        assert!(sigmoid_gated_product(&xs, &ys.t().unwrap().t().unwrap(), 1.0).is_ok());
        let strided = Tensor::randn(0f32, 1.0, (TASK + 7, 3), &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(sigmoid_gated_product(&xs, &strided, 1.0).is_err());
    }
}
