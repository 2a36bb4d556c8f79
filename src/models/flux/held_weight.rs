//! How one linear layer's weight matrix is held in memory: dense in the model dtype,
//! ggml-quantized, or fp8 with its scale. [`super::weights`] produces these as it reads a
//! file; [`super::linear`] multiplies with them.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::Tensor;

/// The format a model's linear weights are held in: what a file stores, what `--quantize` /
/// `--dequantize` ask for, what `bench flux` times and what the memory plan counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightFormat {
    /// Dense in the compute dtype.
    Dense,
    /// ggml-quantized (a GGUF file, or `--quantize`); rows whose width is not a multiple of
    /// the type's block stay dense, as the loader keeps them.
    Quantized(GgmlDType),
    /// fp8 e4m3, one byte per weight, up-cast one layer at a time.
    Fp8,
}

impl WeightFormat {
    /// How users write it (`dense`, `q8_0`, `fp8`).
    pub fn name(&self) -> String {
        match self {
            Self::Dense => "dense".into(),
            Self::Quantized(t) => crate::device::ggml_dtype_name(*t),
            Self::Fp8 => "fp8".into(),
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    /// `dense`, `fp8` or a ggml type name (`q8_0`, `q4_k`, ...).
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "dense" => Ok(Self::Dense),
            "fp8" => Ok(Self::Fp8),
            other => crate::device::parse_ggml_dtype(other)
                .map(Self::Quantized)
                .map_err(|e| format!("{e} (or dense, fp8)")),
        }
    }
}

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

    /// The format it is held in.
    pub fn format(&self) -> WeightFormat {
        match self {
            Self::Dense(_) => WeightFormat::Dense,
            Self::Quantized(_, t) => WeightFormat::Quantized(*t),
            Self::Fp8 { .. } => WeightFormat::Fp8,
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

/// How a ggml-quantized layer multiplies activations of many rows.
///
/// candle's quantized kernels are built for one-token decoding: f32 activations and dot
/// products per row, which loses to a dense GEMM when a FLUX forward multiplies thousands of
/// tokens (on the GPU, the q8_0 step measured 1.8x bf16's; docs/results/gpu-2026-12-04.md).
/// Dequantizing the layer's weight into the model dtype and running the ordinary matmul
/// (cuBLAS) instead is what diffusers' GGUF path does; the dequantized copy lives for that
/// one product, so memory stays at the quantized size plus one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizedMatmul {
    /// Dequantize on CUDA for products of at least [`DEQUANTIZE_FROM_ROWS`] rows; candle's
    /// kernels otherwise (few rows: the modulation linears; and on the CPU, where the
    /// quantized kernels measured faster than f32 GEMMs at every size).
    Auto,
    /// Always dequantize, any device and row count.
    Dequantize,
    /// Always candle's quantized kernels (the path before this choice existed).
    Kernels,
}

/// Rows from which [`QuantizedMatmul::Auto`] dequantizes on CUDA: the modulation linears
/// (one row per candidate) stay on the kernels, token-wise linears (512+ rows) go to GEMMs.
pub const DEQUANTIZE_FROM_ROWS: usize = 32;

impl QuantizedMatmul {
    /// The process-wide choice: `ICEDIT_QUANTIZED_MATMUL` = `auto` (default), `dequantize`
    /// or `kernels`, read once (for A/B timings such as `bench flux`; an unknown value is
    /// reported once and `auto` used).
    pub fn from_env() -> Self {
        static CHOICE: std::sync::OnceLock<QuantizedMatmul> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(
            || match std::env::var("ICEDIT_QUANTIZED_MATMUL").as_deref() {
                Err(_) | Ok("") | Ok("auto") => Self::Auto,
                Ok("dequantize") => Self::Dequantize,
                Ok("kernels") => Self::Kernels,
                Ok(other) => {
                    tracing::warn!(
                        value = other,
                        "ICEDIT_QUANTIZED_MATMUL must be auto, dequantize or kernels; using auto"
                    );
                    Self::Auto
                }
            },
        )
    }

    /// Whether a product of `rows` activation rows on `device` runs on the dequantized
    /// weight.
    pub fn dequantizes(self, device: &candle_core::Device, rows: usize) -> bool {
        match self {
            Self::Auto => device.is_cuda() && rows >= DEQUANTIZE_FROM_ROWS,
            Self::Dequantize => true,
            Self::Kernels => false,
        }
    }
}
