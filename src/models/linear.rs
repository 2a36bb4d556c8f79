//! A biased linear layer's forward pass, each device taking its fastest route: on the CPU in
//! f32 the bias is folded into the matrix product ([`super::cpu::linear`]), on CUDA it goes
//! on in one fused pass after cuBLAS's product ([`super::cuda::add_row_bias`]), anywhere
//! else (and for layers without a bias) candle's `Linear`.

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;

/// `xs @ weight^T + bias` over the last dimension of `xs` (any leading dims).
pub fn forward(linear: &Linear, xs: &Tensor) -> Result<Tensor> {
    let Some(bias) = linear.bias() else {
        return linear.forward(xs);
    };
    if xs.device().is_cuda() {
        // candle's broadcast add is a general strided kernel; the row-bias kernel is a copy.
        let product = Linear::new(linear.weight().clone(), None).forward(xs)?;
        return super::cuda::add_row_bias(&product, bias);
    }
    super::cpu::linear::forward(linear, xs)
}
