//! `x * sigmoid(alpha * x)` (SiLU at alpha 1, quick-GELU at 1.702) in one vectorized pass.
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
    if !super::is_dense_cpu_f32(xs) {
        candle_core::bail!("fused activation needs a contiguous f32 CPU tensor");
    }
    let count = xs.elem_count();
    let (store, layout) = xs.storage_and_layout();
    let input = match &*store {
        Storage::Cpu(cpu) => &cpu.as_slice::<f32>()?[layout.start_offset()..][..count],
        _ => candle_core::bail!("fused activation needs a CPU tensor"),
    };
    let mut out = vec![0f32; count];
    out.par_chunks_mut(TASK)
        .zip(input.par_chunks(TASK))
        .for_each(|(out, input)| gate(input, out, alpha));
    drop(store);
    Tensor::from_vec(out, xs.dims(), xs.device())
}

super::simd_dispatch! {
    fn gate(input: &[f32], out: &mut [f32], alpha: f32) => gate_body
}

#[inline(always)]
fn gate_body(input: &[f32], out: &mut [f32], alpha: f32) {
    for (o, &x) in out.iter_mut().zip(input) {
        *o = x / (1.0 + exp(-alpha * x));
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
}
