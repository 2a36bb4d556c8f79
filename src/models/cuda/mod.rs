//! Fused CUDA kernels for the GPU hot spots candle runs as several passes.
//!
//! The first GPU acceptance run (H200, bf16, 2026-12-04, `docs/results/gpu-2026-12-04.md`)
//! put our FLUX step at 4.7x diffusers'. Kernel times (Nsight Compute) showed why: each
//! attention chunk went scores (cuBLAS) -> scale -> cast to f32 -> softmax -> cast back, four
//! passes over `[heads, S, S]` that cost 20x the matrix products around them, and every
//! biased linear added its bias with candle's general broadcast kernel (index arithmetic
//! per element, ~15x a plain copy). The kernels here ([`kernels.cu`](kernels.cu), compiled
//! to PTX by `build.rs` with the `cuda` feature) do each in one pass:
//! - [`scaled_softmax_last_dim`]: `softmax(scale * x)` over the last dimension, read and
//!   written in the tensor's dtype, computed in f32 (so bf16 scores lose nothing more than
//!   their own rounding);
//! - [`add_row_bias`]: `x + bias` for a `[.., n]` tensor and an `[n]` bias.
//!
//! Both are candle custom ops: on CUDA they launch the kernels, elsewhere they compute the
//! same thing with candle's tensor operations (the CPU and tests take that path; the CPU's
//! own fused kernels live in [`super::cpu`]). `bench flux` checks the CUDA kernels against
//! the tensor operations on the device before timing ([`self_check`]).

//!
//! For FLUX's forward on a GPU there are also (issue 31): a flash attention of our own
//! ([`attention`], `flash.cu`) and the block's glue in single passes ([`glue`]: AdaLN
//! modulation, gated residual, q/k RMS norm + RoPE in the attention layout). The FLUX blocks
//! use them on CUDA in bf16 / f16 unless [`switch`] (`ICEDIT_CUDA_FUSED`) says otherwise;
//! `bench flux` checks each against candle's unfused operations on the device first. The
//! linears run as cuBLASLt GEMMs with the bias (and GELU) fused, and fp8 weights as fp8
//! GEMMs on sm89+ ([`gemm`], `fp8.cu`).

pub mod attention;
pub mod cudnn_attention;
pub mod dequant;
pub mod fp8_rows;
#[cfg(feature = "cuda")]
mod fused_launch;
pub mod gemm;
pub mod glue;
pub mod graph;
pub mod memory;
#[cfg(feature = "cuda")]
mod ptx;
pub mod switch;

use crate::models::kernel_check::max_abs_diff;
use candle_core::{DType, Result, Tensor, D};

/// `softmax(scale * xs)` over the last dimension, in `xs`'s dtype, computed in f32. Takes
/// `xs` by value so that off CUDA the unscaled scores are freed once scaled (attention
/// chunks are the largest buffers of a step; `tests/plan.rs` holds the peak to the plan).
pub fn scaled_softmax_last_dim(xs: Tensor, scale: f64) -> Result<Tensor> {
    if xs.device().is_cuda() {
        return xs.contiguous()?.apply_op1_no_bwd(&ScaledSoftmax {
            scale: scale as f32,
        });
    }
    reference_softmax(xs, scale)
}

/// `xs + bias` with `xs` `[.., n]` and `bias` `[n]`, in `xs`'s dtype.
pub fn add_row_bias(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = xs.dim(D::Minus1)?;
    if xs.device().is_cuda() && bias.dims() == [n] && bias.dtype() == xs.dtype() {
        return xs
            .contiguous()?
            .apply_op2_no_bwd(&bias.contiguous()?, &RowBias);
    }
    xs.broadcast_add(bias)
}

/// The tensor-operation form of [`scaled_softmax_last_dim`] (f32 arithmetic, one rounding).
fn reference_softmax(xs: Tensor, scale: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    // Each step consumes its input (a shadowed binding would keep it alive to the end), so
    // at most two score buffers exist at once, as before this op existed.
    let xs = if dtype == DType::F32 {
        xs
    } else {
        let scores = xs;
        scores.to_dtype(DType::F32)?
    };
    let xs = if scale == 1.0 { xs } else { (xs * scale)? };
    candle_nn::ops::softmax_last_dim(&xs)?.to_dtype(dtype)
}

/// Largest absolute differences between the CUDA kernels and their tensor-operation forms
/// on random inputs on `device` (softmax, bias), in `dtype`: `bench flux` reports them so a
/// GPU run shows the kernels are right where the tests (CPU only) cannot.
pub fn self_check(device: &candle_core::Device, dtype: DType) -> Result<(f32, f32)> {
    let scores = (Tensor::randn(0f32, 4.0, (3, 77, 2560), device)?).to_dtype(dtype)?;
    let fused = scaled_softmax_last_dim(scores.clone(), 0.125)?;
    let softmax_diff = max_abs_diff(&fused, &reference_softmax(scores, 0.125)?)?;
    let xs = Tensor::randn(0f32, 1.0, (2, 33, 3072), device)?.to_dtype(dtype)?;
    let bias = Tensor::randn(0f32, 1.0, 3072, device)?.to_dtype(dtype)?;
    let bias_diff = max_abs_diff(&add_row_bias(&xs, &bias)?, &xs.broadcast_add(&bias)?)?;
    Ok((softmax_diff, bias_diff))
}

/// [`scaled_softmax_last_dim`] as a custom op (CUDA only; other devices never reach it).
struct ScaledSoftmax {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    scale: f32,
}

impl candle_core::CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "icedit-scaled-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("icedit-scaled-softmax runs on CUDA only; the CPU takes the tensor path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        launch::scaled_softmax(storage, layout, self.scale)
    }
}

/// [`add_row_bias`] as a custom op (CUDA only; other devices never reach it).
struct RowBias;

impl candle_core::CustomOp2 for RowBias {
    fn name(&self) -> &'static str {
        "icedit-row-bias"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("icedit-row-bias runs on CUDA only; the CPU takes the tensor path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_layout: &candle_core::Layout,
        bias: &candle_core::CudaStorage,
        bias_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        launch::row_bias(xs, xs_layout, bias, bias_layout)
    }
}

/// Kernel launches (the PTX that build.rs compiled, loaded once per device).
#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};

    use super::ptx::{KERNELS as PTX, KERNELS_MODULE as MODULE};

    /// Evaluates `$body` with `$T` the element type of `$dtype` and `$name` the kernel
    /// `"{$base}_{f32|f16|bf16}"` (kernels.cu instantiates each kernel per dtype under
    /// those names); other dtypes are an error.
    macro_rules! per_dtype {
        ($dtype:expr, $base:literal, |$T:ident, $name:ident| $body:expr) => {
            match $dtype {
                DType::F32 => {
                    type $T = f32;
                    let $name = concat!($base, "_f32");
                    $body
                }
                DType::F16 => {
                    type $T = half::f16;
                    let $name = concat!($base, "_f16");
                    $body
                }
                DType::BF16 => {
                    type $T = half::bf16;
                    let $name = concat!($base, "_bf16");
                    $body
                }
                other => {
                    candle_core::bail!("icedit CUDA kernels take f32, f16 or bf16, not {other:?}")
                }
            }
        };
    }

    /// The contiguous elements `layout` covers in `slice`.
    fn contiguous<'a, T>(
        slice: &'a CudaSlice<T>,
        layout: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(slice.slice(start..end)),
            None => candle_core::bail!("icedit CUDA kernels need contiguous inputs"),
        }
    }

    pub fn scaled_softmax(
        storage: &CudaStorage,
        layout: &Layout,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            storage: &CudaStorage,
            layout: &Layout,
            name: &str,
            scale: f32,
        ) -> Result<CudaStorage> {
            let dev: &CudaDevice = storage.device();
            let src = contiguous(storage.as_cuda_slice::<T>()?, layout)?;
            let count = layout.shape().elem_count();
            let cols = layout.dims().last().copied().unwrap_or(1).max(1);
            let rows = count / cols;
            const ROWS_PER_BLOCK: usize = 4;
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            // SAFETY: every element is written by the kernel below.
            let dst = unsafe { dev.alloc::<T>(count)? };
            if count > 0 {
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
                    block_dim: (32, ROWS_PER_BLOCK as u32, 1),
                    shared_mem_bytes: 0,
                };
                let (rows, cols) = (rows as i32, cols as i32);
                let mut builder = func.builder();
                builder
                    .arg(&src)
                    .arg(&dst)
                    .arg(&rows)
                    .arg(&cols)
                    .arg(&scale);
                // SAFETY: argument types and count match the kernel's signature.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        let out = per_dtype!(storage.dtype(), "scaled_softmax", |T, name| {
            run::<T>(storage, layout, name, scale)?
        });
        Ok((out, layout.shape().clone()))
    }

    pub fn row_bias(
        xs: &CudaStorage,
        xs_layout: &Layout,
        bias: &CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            xs: &CudaStorage,
            xs_layout: &Layout,
            bias: &CudaStorage,
            bias_layout: &Layout,
            name: &str,
        ) -> Result<CudaStorage> {
            let dev: &CudaDevice = xs.device();
            let x = contiguous(xs.as_cuda_slice::<T>()?, xs_layout)?;
            let b = contiguous(bias.as_cuda_slice::<T>()?, bias_layout)?;
            let count = xs_layout.shape().elem_count();
            let cols = bias_layout.shape().elem_count().max(1);
            let rows = count / cols;
            const THREADS: usize = 256;
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            // SAFETY: every element is written by the kernel below.
            let dst = unsafe { dev.alloc::<T>(count)? };
            if count > 0 {
                let cfg = LaunchConfig {
                    grid_dim: (cols.div_ceil(THREADS) as u32, rows.min(65_535) as u32, 1),
                    block_dim: (THREADS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (rows, cols) = (rows as i32, cols as i32);
                let mut builder = func.builder();
                builder.arg(&x).arg(&b).arg(&dst).arg(&rows).arg(&cols);
                // SAFETY: argument types and count match the kernel's signature.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        if xs.dtype() != bias.dtype() {
            candle_core::bail!("row bias: {:?} input, {:?} bias", xs.dtype(), bias.dtype());
        }
        let out = per_dtype!(xs.dtype(), "add_row_bias", |T, name| {
            run::<T>(xs, xs_layout, bias, bias_layout, name)?
        });
        Ok((out, xs_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn off_cuda_the_softmax_is_the_scaled_f32_softmax() -> Result<()> {
        let xs = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, -1.0]], &Device::Cpu)?;
        let got = scaled_softmax_last_dim(xs, 0.5)?.to_vec2::<f32>()?;
        for (row, values) in got.iter().zip([[0.5f32, 1.0, 1.5], [0.0, 0.0, -0.5]]) {
            let total: f32 = values.iter().map(|v| v.exp()).sum();
            for (g, v) in row.iter().zip(values) {
                assert!(
                    (g - v.exp() / total).abs() < 1e-6,
                    "{g} vs {}",
                    v.exp() / total
                );
            }
        }
        Ok(())
    }

    #[test]
    fn off_cuda_the_row_bias_is_a_broadcast_add() -> Result<()> {
        let xs = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((1, 2, 3))?;
        let bias = Tensor::new(&[10f32, 20.0, 30.0], &Device::Cpu)?;
        assert_eq!(
            add_row_bias(&xs, &bias)?.to_vec3::<f32>()?,
            vec![vec![vec![10.0, 21.0, 32.0], vec![13.0, 24.0, 35.0]]]
        );
        Ok(())
    }

    #[test]
    fn the_self_check_passes_on_the_cpu_path() -> Result<()> {
        let (softmax, bias) = self_check(&Device::Cpu, DType::F32)?;
        assert_eq!((softmax, bias), (0.0, 0.0));
        Ok(())
    }
}
