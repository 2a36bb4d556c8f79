//! ggml-quantized weights dequantized into the model dtype for one ordinary GEMM: the GGUF
//! path of the FLUX linears on the GPU (issue 32; what diffusers' GGUF path does too).
//!
//! candle's CUDA dequantization writes f32 and a second pass casts it to bf16; for Q8_0,
//! Q4_0 and Q4_K (the GGUF types FLUX users run) `dequant.cu` writes bf16 / f16 in one pass,
//! a third of the memory traffic, and needs no f32 copy of the layer. Other types and the
//! CPU take candle's path. [`reference`] is the kernels' decoding on the CPU, held to
//! candle's `dequantize` by the tests.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};

/// Set when the kernels failed their device check (`bench flux`): candle's path from then on.
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the kernels off for the rest of the process.
pub fn disable() {
    DISABLED.store(true, Ordering::Relaxed);
}

/// Whether [`dequantize`] has a one-pass kernel for `dtype` weights.
pub fn has_kernel(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4K)
}

/// candle's dequantization of `q` into `dtype` (f16 directly, others through f32): what
/// runs where no kernel of ours does, and what the device check holds the kernels to.
pub fn dequantize_candle(q: &QTensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F16 {
        return q.dequantize_f16(&q.device());
    }
    q.dequantize(&q.device())?.to_dtype(dtype)
}

/// `q` as a dense tensor of `dtype` on `q`'s device (its shape): on CUDA in one kernel pass
/// for the types of [`has_kernel`] and bf16 / f16; else candle's dequantization (f16
/// directly, other dtypes through f32).
pub fn dequantize(q: &QTensor, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = q.device() {
        let ours = has_kernel(q.dtype()) && !DISABLED.load(Ordering::Relaxed);
        if ours && matches!(dtype, DType::BF16 | DType::F16) {
            return launch::dequantize(q, dtype, &dev);
        }
    }
    dequantize_candle(q, dtype)
}

/// The kernels' decoding on the CPU, value by value as each thread computes it.
pub mod reference {
    use candle_core::quantized::GgmlDType;

    fn half_at(bytes: &[u8], at: usize) -> f32 {
        half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
    }

    /// ggml's `get_scale_min_k4`: the 6-bit scale and min of pair `j` (0..7).
    fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
        if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        }
    }

    /// Value `i` of `n` held in the ggml blocks `q` of `dtype` (Q8_0, Q4_0 or Q4_K), in f32;
    /// `None` for other types.
    pub fn value(q: &[u8], dtype: GgmlDType, i: usize) -> Option<f32> {
        Some(match dtype {
            GgmlDType::Q8_0 => {
                let block = (i / 32) * 34;
                q[block + 2 + i % 32] as i8 as f32 * half_at(q, block)
            }
            GgmlDType::Q4_0 => {
                let block = (i / 32) * 18;
                let j = i % 32;
                let byte = q[block + 2 + j % 16];
                let nibble = if j < 16 { byte & 15 } else { byte >> 4 };
                (nibble as i32 - 8) as f32 * half_at(q, block)
            }
            GgmlDType::Q4K => {
                let block = (i / 256) * 144;
                let t = i % 256;
                let (chunk, within) = (t / 64, t % 64);
                let high = within >= 32;
                let (scale, min) =
                    scale_min_k4(2 * chunk + high as usize, &q[block + 4..block + 16]);
                let byte = q[block + 16 + 32 * chunk + within % 32];
                let nibble = if high { byte >> 4 } else { byte & 15 };
                let d = half_at(q, block) * scale as f32;
                let m = half_at(q, block + 2) * min as f32;
                d * nibble as f32 - m
            }
            _ => return None,
        })
    }

    /// All `n` values of `q`, or `None` for a type without a kernel.
    pub fn dequantize(q: &[u8], dtype: GgmlDType, n: usize) -> Option<Vec<f32>> {
        (0..n).map(|i| value(q, dtype, i)).collect()
    }
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::op::BackpropOp;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{CudaDevice, CudaStorage, DType, Result, Storage, Tensor};

    use super::super::ptx::{DEQUANT as DEQUANT_PTX, DEQUANT_MODULE};

    pub fn dequantize(q: &QTensor, dtype: DType, dev: &CudaDevice) -> Result<Tensor> {
        let n = q.shape().elem_count();
        let kind = match q.dtype() {
            GgmlDType::Q8_0 => "q8_0",
            GgmlDType::Q4_0 => "q4_0",
            GgmlDType::Q4K => "q4_k",
            other => candle_core::bail!("no dequantize kernel for {other:?}"),
        };
        let suffix = if dtype == DType::F16 { "f16" } else { "bf16" };
        let func = dev.get_or_load_custom_func(
            &format!("dequantize_{kind}_{suffix}"),
            DEQUANT_MODULE,
            DEQUANT_PTX,
        )?;
        let stream = dev.cuda_stream();
        let storage = {
            let (blocks, _guard) = q.device_ptr_with_guard(&stream)?;
            let blocks = blocks as u64;
            let count = n as i64;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            macro_rules! run {
                ($t:ty) => {{
                    // SAFETY: every element is written by the kernel below.
                    let dst = unsafe { dev.alloc::<$t>(n)? };
                    if n > 0 {
                        let mut b = func.builder();
                        b.arg(&blocks).arg(&dst).arg(&count);
                        // SAFETY: the kernel takes (const uint8_t *, T *, long long); the
                        // blocks pointer stays valid while `_guard` lives (past the launch,
                        // and stream order keeps the weight alive: the model holds it).
                        unsafe { b.launch(cfg) }.w()?;
                    }
                    CudaStorage::wrap_cuda_slice(dst, dev.clone())
                }};
            }
            if dtype == DType::F16 {
                run!(half::f16)
            } else {
                run!(half::bf16)
            }
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            q.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The kernels' decoding equals candle's `dequantize` value for value (both in f32, the
    /// same operations in the same order), for each type with a kernel.
    #[test]
    fn the_reference_decoding_equals_candles_dequantize() {
        let dev = Device::Cpu;
        // Rows of different magnitudes and signs, so every scale and min bit is exercised.
        let w = (Tensor::randn(0f32, 1.0, (8, 512), &dev).unwrap()
            * Tensor::new(&[0.01f32, 0.1, 1.0, 10.0, 0.3, 3.0, 30.0, 0.03], &dev)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .broadcast_as((8, 512))
                .unwrap())
        .unwrap();
        let w = (w + 0.05).unwrap(); // Q4_K's mins: not centred on 0
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            assert!(has_kernel(dtype));
            let q = QTensor::quantize(&w, dtype).unwrap();
            let candle: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let ours = reference::dequantize(&q.data().unwrap(), dtype, candle.len()).unwrap();
            let same = candle
                .iter()
                .zip(&ours)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}");
            // And `dequantize` into bf16 is that, rounded once.
            let bf16: Vec<f32> = dequantize(&q, DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let rounded: Vec<f32> = ours
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect();
            assert_eq!(bf16, rounded, "{dtype:?}");
        }
        assert!(!has_kernel(GgmlDType::Q5K));
        assert!(reference::dequantize(&[0; 176], GgmlDType::Q5K, 256).is_none());
    }
}
