//! Activations quantized to fp8 e4m3 one row (token) at a time: the input of the fp8 GEMM
//! where cuBLASLt applies one scale per row of activations ("outer vector" scaling, sm90+;
//! issue 32).
//!
//! Per-row scales cost no extra pass where a kernel of ours writes the activations: the
//! fused modulate kernel holds each row as it writes it and writes its e4m3 copy beside it
//! ([`super::glue::modulated_layer_norm_fp8`]), and one quantization serves every fp8 layer
//! that reads the same input (q, k and v; the single block's MLP too). Other inputs (the
//! attention output, the MLP's hidden layer) take one pass of `quantize_rows_e4m3` (fp8.cu)
//! instead of the per-tensor scheme's two. Per-row scales also keep a batch's candidates
//! independent: no candidate's largest activation sets another's rounding.
//!
//! The scheme is [`crate::models::fp8::quantize_rows`]; off CUDA it is what runs.

use candle_core::{DType, Result, Tensor, D};

/// `[.., cols]` activations as e4m3 rows, each with its own scale: row `r` stands for
/// `values[r] * scales[r]`.
#[derive(Debug, Clone)]
pub struct Fp8Rows {
    /// `[.., cols]` e4m3, the activations' shape.
    pub values: Tensor,
    /// `[rows]` f32, `rows` the product of the leading dims.
    pub scales: Tensor,
}

impl Fp8Rows {
    /// `xs` `[.., cols]` quantized one row at a time: one kernel pass on CUDA (bf16 / f16),
    /// [`crate::models::fp8::quantize_rows`] elsewhere.
    pub fn quantize(xs: &Tensor) -> Result<Self> {
        let cols = xs.dim(D::Minus1)?;
        let rows = xs.elem_count() / cols.max(1);
        #[cfg(feature = "cuda")]
        if xs.device().is_cuda() {
            let xs = xs.contiguous()?;
            let (q, scales) = {
                let (storage, layout) = xs.storage_and_layout();
                let candle_core::Storage::Cuda(cuda) = &*storage else {
                    candle_core::bail!("fp8 rows: a CUDA tensor without CUDA storage")
                };
                super::fused_launch::quantize_rows((cuda, layout), rows, cols)?
            };
            return Ok(Self::from_cuda(q, scales, xs.shape().clone(), rows));
        }
        let values = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (q, scales) = crate::models::fp8::quantize_rows(&values, cols.max(1));
        Ok(Self {
            // Every q is an e4m3 value, so the conversion is exact.
            values: Tensor::from_vec(q, xs.shape(), xs.device())?.to_dtype(DType::F8E4M3)?,
            scales: Tensor::from_vec(scales, rows, xs.device())?,
        })
    }

    /// Rows made on the device (the quantize and fused modulate kernels' outputs).
    #[cfg(feature = "cuda")]
    pub(crate) fn from_cuda(
        values: candle_core::CudaStorage,
        scales: candle_core::CudaStorage,
        shape: candle_core::Shape,
        rows: usize,
    ) -> Self {
        use candle_core::op::BackpropOp;
        use candle_core::Storage;
        Self {
            values: Tensor::from_storage(Storage::Cuda(values), shape, BackpropOp::none(), false),
            scales: Tensor::from_storage(Storage::Cuda(scales), rows, BackpropOp::none(), false),
        }
    }

    /// The number of rows.
    pub fn rows(&self) -> Result<usize> {
        self.scales.dim(0)
    }

    /// The values the rows stand for, `values * scales`, in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let cols = self.values.dim(D::Minus1)?;
        let rows = self.rows()?;
        self.values
            .to_dtype(DType::F32)?
            .reshape((rows, cols))?
            .broadcast_mul(&self.scales.unsqueeze(1)?)?
            .reshape(self.values.shape())?
            .to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantized_rows_match_the_reference_and_stand_for_their_values() -> Result<()> {
        let dev = Device::Cpu;
        let xs = (Tensor::randn(0f32, 1.0, (2, 3, 32), &dev)?
            * Tensor::new(&[[[1f32]], [[1000.0]]], &dev)?.broadcast_as((2, 3, 32))?)?
        .to_dtype(DType::BF16)?;
        let rows = Fp8Rows::quantize(&xs)?;
        assert_eq!(rows.values.dims(), [2, 3, 32]);
        assert_eq!(rows.values.dtype(), DType::F8E4M3);
        assert_eq!(rows.scales.dims(), [6]);
        let values = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (q, scales) = crate::models::fp8::quantize_rows(&values, 32);
        assert_eq!(rows.scales.to_vec1::<f32>()?, scales);
        let held = rows
            .values
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(
            held, q,
            "the e4m3 tensor holds the reference's values exactly"
        );
        // Each value within e4m3's half step (2^-4 relative) of its own row's scale.
        let back = rows
            .dequantize(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (r, (v, b)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let step = scales[r] * 2f32.powi(-9); // e4m3's smallest step at this scale
            for (v, b) in v.iter().zip(b) {
                assert!(
                    (v - b).abs() <= v.abs() / 16.0 + step,
                    "row {r}: {v} -> {b}"
                );
            }
        }
        Ok(())
    }
}
