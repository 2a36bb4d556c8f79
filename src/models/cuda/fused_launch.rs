//! Launches of the fused FLUX kernels (`kernels.cu` glue kernels, `flash.cu` attention): the
//! PTX build.rs compiled, loaded once per device, and one function per kernel that checks
//! its inputs' storage and launches it. Only built with the `cuda` feature.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

use super::ptx::{
    FLASH as FLASH_PTX, FLASH_MODULE, FP8 as FP8_PTX, FP8_MODULE, KERNELS as KERNELS_PTX,
    KERNELS_MODULE,
};

/// The contiguous elements `layout` covers in `storage`, as `T` (every launch of ours, the
/// cuBLASLt GEMMs' and cuDNN's attention's included, takes its inputs this way).
pub(super) fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    let slice: &CudaSlice<T> = storage.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("icedit CUDA kernels need contiguous inputs"),
    }
}

/// The kernel-name suffix of a dtype.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("icedit CUDA kernels take f32, f16 or bf16, not {other:?}"),
    })
}

/// Runs `$body` with `$T` bound to the element type of `$dtype` (f32, f16, bf16).
macro_rules! with_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => candle_core::bail!("icedit CUDA kernels take f32, f16 or bf16, not {other:?}"),
        }
    };
}

/// `norm(x) * (1 + scale[b]) + shift[b]` (see `modulated_layer_norm` in kernels.cu): x
/// `[rows, c]` with `s` rows per batch entry, shift and scale `[rows / s, c]`, `shape` =
/// `(rows, s, c, eps)`. With `fp8` the kernel also writes the output as fp8 e4m3 rows with
/// one scale per row (`modulated_layer_norm_fp8`): `Some((e4m3 [rows, c], scales [rows]
/// f32))`.
pub fn modulated_layer_norm(
    x: (&CudaStorage, &Layout),
    shift: (&CudaStorage, &Layout),
    scale: (&CudaStorage, &Layout),
    shape: (usize, usize, usize, f32),
    fp8: bool,
) -> Result<(CudaStorage, Option<(CudaStorage, CudaStorage)>)> {
    let c = shape.2;
    // The row lives in shared memory: 48 KiB without opting in to more.
    if c * 4 > 48 * 1024 {
        candle_core::bail!("modulated layer norm: rows of {c} exceed the kernel's 12288 columns");
    }
    type Out = (CudaStorage, Option<(CudaStorage, CudaStorage)>);
    fn run<T: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        shift: (&CudaStorage, &Layout),
        scale: (&CudaStorage, &Layout),
        (rows, s, c, eps): (usize, usize, usize, f32),
        fp8: bool,
    ) -> Result<Out> {
        let dev: &CudaDevice = x.0.device();
        let kernel = if fp8 {
            "modulated_layer_norm_fp8"
        } else {
            "modulated_layer_norm"
        };
        let name = format!("{kernel}_{}", suffix(x.0.dtype())?);
        let func = dev.get_or_load_custom_func(&name, KERNELS_MODULE, KERNELS_PTX)?;
        let (xv, sh, sc) = (
            view::<T>(x.0, x.1)?,
            view::<T>(shift.0, shift.1)?,
            view::<T>(scale.0, scale.1)?,
        );
        // SAFETY: every element is written by the kernel below (each row's scale by its
        // block's first thread).
        let dst = unsafe { dev.alloc::<T>(rows * c)? };
        let quantized = if fp8 {
            // SAFETY: as `dst`.
            unsafe {
                Some((
                    dev.alloc::<float8::F8E4M3>(rows * c)?,
                    dev.alloc::<f32>(rows)?,
                ))
            }
        } else {
            None
        };
        if rows > 0 {
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: (c * 4) as u32,
            };
            let (s, c) = (s as i32, c as i32);
            let mut b = func.builder();
            b.arg(&xv).arg(&sh).arg(&sc).arg(&dst);
            if let Some((q, scales)) = &quantized {
                b.arg(q).arg(scales);
            }
            b.arg(&s).arg(&c).arg(&eps);
            // SAFETY: argument types and count match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        let wrap = |slice| CudaStorage::wrap_cuda_slice(slice, dev.clone());
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            quantized
                .map(|(q, scales)| (wrap(q), CudaStorage::wrap_cuda_slice(scales, dev.clone()))),
        ))
    }
    with_dtype!(x.0.dtype(), |T| run::<T>(x, shift, scale, shape, fp8))
}

/// x `[rows, cols]` as fp8 e4m3 rows, each with its own scale (`quantize_rows_e4m3` in
/// fp8.cu): `(e4m3 [rows, cols], scales [rows] f32)`.
pub fn quantize_rows(
    x: (&CudaStorage, &Layout),
    rows: usize,
    cols: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    fn run<T: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        rows: usize,
        cols: usize,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let dev: &CudaDevice = x.0.device();
        let name = format!("quantize_rows_e4m3_{}", suffix(x.0.dtype())?);
        let func = dev.get_or_load_custom_func(&name, FP8_MODULE, FP8_PTX)?;
        let xv = view::<T>(x.0, x.1)?;
        // SAFETY: every element is written by the kernel below.
        let (q, scales) = unsafe {
            (
                dev.alloc::<float8::F8E4M3>(rows * cols)?,
                dev.alloc::<f32>(rows)?,
            )
        };
        if rows > 0 && cols > 0 {
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let cols = cols as i32;
            let mut b = func.builder();
            b.arg(&xv).arg(&q).arg(&scales).arg(&cols);
            // SAFETY: argument types and count match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(q, dev.clone()),
            CudaStorage::wrap_cuda_slice(scales, dev.clone()),
        ))
    }
    match x.0.dtype() {
        DType::BF16 => run::<half::bf16>(x, rows, cols),
        DType::F16 => run::<half::f16>(x, rows, cols),
        other => candle_core::bail!("fp8 row quantization: bf16 or f16, not {other:?}"),
    }
}

/// `x + gate[b] * y` (see `gated_residual` in kernels.cu): x, y `[rows, c]`, `s` rows per
/// batch entry, gate `[rows / s, c]`.
pub fn gated_residual(
    x: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    gate: (&CudaStorage, &Layout),
    rows: usize,
    s: usize,
    c: usize,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        y: (&CudaStorage, &Layout),
        gate: (&CudaStorage, &Layout),
        (rows, s, c): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev: &CudaDevice = x.0.device();
        let name = format!("gated_residual_{}", suffix(x.0.dtype())?);
        let func = dev.get_or_load_custom_func(&name, KERNELS_MODULE, KERNELS_PTX)?;
        let (xv, yv, gv) = (
            view::<T>(x.0, x.1)?,
            view::<T>(y.0, y.1)?,
            view::<T>(gate.0, gate.1)?,
        );
        // SAFETY: every element is written by the kernel below.
        let dst = unsafe { dev.alloc::<T>(rows * c)? };
        if rows * c > 0 {
            const THREADS: usize = 256;
            let cfg = LaunchConfig {
                grid_dim: (c.div_ceil(THREADS) as u32, rows.min(65_535) as u32, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows, s, c) = (rows as i32, s as i32, c as i32);
            let mut b = func.builder();
            b.arg(&xv)
                .arg(&yv)
                .arg(&gv)
                .arg(&dst)
                .arg(&rows)
                .arg(&s)
                .arg(&c);
            // SAFETY: argument types and count match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    with_dtype!(x.0.dtype(), |T| run::<T>(x, y, gate, (rows, s, c)))
}

/// Per-head RMS norm (weight `[d]`) + interleaved RoPE (f32 cos, sin `[s, d / 2]`) of x
/// `[b, s, heads, d]` (see `qk_norm_rope` in kernels.cu).
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    x: (&CudaStorage, &Layout),
    weight: &Tensor,
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
    rows: usize,
    s: usize,
    heads: usize,
    d: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let (w_storage, w_layout) = weight.storage_and_layout();
    let Storage::Cuda(w) = &*w_storage else {
        candle_core::bail!("qk norm + rope: the norm weight is not on the GPU")
    };
    let (cos_v, sin_v) = (view::<f32>(cos.0, cos.1)?, view::<f32>(sin.0, sin.1)?);
    let dev: &CudaDevice = x.0.device();
    let name = format!("qk_norm_rope_{}", suffix(x.0.dtype())?);
    let func = dev.get_or_load_custom_func(&name, KERNELS_MODULE, KERNELS_PTX)?;
    const ROWS_PER_BLOCK: usize = 8;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
        block_dim: (32, ROWS_PER_BLOCK as u32, 1),
        shared_mem_bytes: 0,
    };
    let (n, s, heads, d) = (rows as i32, s as i32, heads as i32, d as i32);
    with_dtype!(x.0.dtype(), |T| {
        let xv = view::<T>(x.0, x.1)?;
        let wv = view::<T>(w, w_layout)?;
        // SAFETY: every element is written by the kernel below.
        let dst = unsafe { dev.alloc::<T>(rows * d as usize)? };
        if rows > 0 {
            let mut b = func.builder();
            b.arg(&xv).arg(&wv).arg(&cos_v).arg(&sin_v).arg(&dst);
            b.arg(&n).arg(&s).arg(&heads).arg(&d).arg(&eps);
            // SAFETY: argument types and count match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    })
}

/// Flash attention over q, k, v `[b, l, heads, d]` (see flash.cu), out in the same layout;
/// `warps` (4 or 8) picks the kernel variant (16 query rows per warp).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    b: usize,
    l: usize,
    heads: usize,
    d: usize,
    warps: usize,
) -> Result<CudaStorage> {
    let dtype = q.0.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        candle_core::bail!("flash attention takes bf16 or f16, not {dtype:?}");
    }
    if !matches!(d, 64 | 128) || !matches!(warps, 4 | 8) {
        candle_core::bail!("flash attention is built for head dims 64 and 128 with 4 or 8 warps, not {d} / {warps}");
    }
    let dev: &CudaDevice = q.0.device();
    let name = format!("flash_attention_d{d}_w{warps}_{}", suffix(dtype)?);
    let func = dev.get_or_load_custom_func(&name, FLASH_MODULE, FLASH_PTX)?;
    let rows_per_block = 16 * warps;
    let cfg = LaunchConfig {
        grid_dim: (l.div_ceil(rows_per_block) as u32, heads as u32, b as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let (l_arg, h_arg) = (l as i32, heads as i32);
    with_dtype!(dtype, |T| {
        let (qv, kv, vv) = (
            view::<T>(q.0, q.1)?,
            view::<T>(k.0, k.1)?,
            view::<T>(v.0, v.1)?,
        );
        for (name, layout) in [("q", q.1), ("k", k.1), ("v", v.1)] {
            // cp.async moves 16 bytes: rows must start 16-byte aligned.
            if layout.start_offset() % 8 != 0 {
                candle_core::bail!("flash attention: {name} starts at an unaligned offset");
            }
        }
        // SAFETY: every element is written by the kernel below.
        let dst = unsafe { dev.alloc::<T>(b * l * heads * d)? };
        if b * l * heads > 0 {
            let mut builder = func.builder();
            builder.arg(&qv).arg(&kv).arg(&vv).arg(&dst);
            builder.arg(&l_arg).arg(&h_arg).arg(&scale_log2);
            // SAFETY: argument types and count match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    })
}
