//! How one linear layer's weight matrix is held in memory: dense in the model dtype,
//! ggml-quantized, or fp8 with its scale. [`super::weights`] produces these as it reads a
//! file; [`super::linear`] multiplies with them.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::Tensor;

/// How one layer's weight is held in memory.
#[derive(Debug, Clone)]
pub enum Weight {
    /// `[out, in]` in the model dtype.
    Dense(Tensor),
    /// A ggml-quantized `[out, in]` matrix (multiplied in f32 by candle's quantized kernels).
    Quantized(Arc<QMatMul>, GgmlDType),
    /// `[out, in]` in fp8 e4m3 and the per-tensor scale it is multiplied by when up-cast.
    Fp8 {
        /// The fp8 matrix.
        weight: Tensor,
        /// Dequantization scale (1 for unscaled checkpoints).
        scale: f64,
    },
}

impl Weight {
    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) | Self::Fp8 { weight: w, .. } => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
            Self::Quantized(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            },
        }
    }

    /// The ggml type of a quantized weight (`None` for dense and fp8).
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self {
            Self::Quantized(_, t) => Some(*t),
            _ => None,
        }
    }
}
