//! cuDNN's fused scaled-dot-product attention for FLUX's joint attention: the second route of
//! issue 31, item 1, measured beside our own flash kernel ([`super::attention`]) before one
//! is chosen. It is the engine torch's SDPA runs on Hopper (diffusers' 7.8 ms of attention
//! per step), reached through a small C++ shim over NVIDIA's cudnn-frontend graph API
//! (`cudnn_sdpa.cpp`, compiled by build.rs with the `cudnn` feature only).
//!
//! It reads and writes the same `[B, L, heads * D]` layout as the flash kernel, so the two
//! are interchangeable: `bench flux` checks it against candle's unfused attention on the
//! device and times it beside the flash kernel (fused-check row "attention (cuDNN)"), and
//! `ICEDIT_CUDA_ATTENTION=cudnn` ([`ENV`]) makes FLUX's blocks run it. Builds without the
//! `cudnn` feature refuse it by name.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The environment variable that picks FLUX's attention route on CUDA: `own` (the
/// default, [`super::attention::flash_attention`]) or `cudnn`.
pub const ENV: &str = "ICEDIT_CUDA_ATTENTION";

/// Which attention FLUX's blocks run where the fused path applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionRoute {
    /// Our flash kernel (`flash.cu`).
    Own,
    /// cuDNN's fused SDPA (`--features cudnn`).
    Cudnn,
}

/// Whether this build has the cuDNN route.
pub fn built() -> bool {
    cfg!(feature = "cudnn")
}

/// The route [`ENV`] asks for, or the error naming it and its value.
pub fn route_from_env() -> std::result::Result<AttentionRoute, String> {
    match std::env::var(ENV) {
        Ok(text) => parse_route(&text, built()),
        Err(std::env::VarError::NotPresent) => Ok(AttentionRoute::Own),
        Err(e) => Err(format!("{ENV}: {e}")),
    }
}

fn parse_route(text: &str, built: bool) -> std::result::Result<AttentionRoute, String> {
    match text.trim() {
        "" | "own" => Ok(AttentionRoute::Own),
        "cudnn" if built => Ok(AttentionRoute::Cudnn),
        "cudnn" => Err(format!(
            "{ENV}=cudnn: this binary was built without the `cudnn` feature"
        )),
        other => Err(format!("{ENV}={other}: expected own or cudnn")),
    }
}

/// The route for this process ([`route_from_env`], read once; a bad value is logged and the
/// flash kernel runs).
pub fn route() -> AttentionRoute {
    static ROUTE: OnceLock<AttentionRoute> = OnceLock::new();
    *ROUTE.get_or_init(|| {
        route_from_env().unwrap_or_else(|e| {
            tracing::error!("{e}; FLUX's attention runs the flash kernel");
            AttentionRoute::Own
        })
    })
}

/// Attention of q, k, v `[B, L, heads * D]` scaled by `1 / sqrt(D)`, by cuDNN's fused SDPA;
/// returns `[B, L, heads * D]`. CUDA, bf16 / f16 and a `cudnn` build only.
pub fn cudnn_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, _, hd) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "cuDNN attention: q {:?}, k {:?} and v {:?} must have one shape",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || !hd.is_multiple_of(heads) {
        candle_core::bail!("cuDNN attention: {hd} columns do not split into {heads} heads");
    }
    if !matches!(q.dtype(), DType::BF16 | DType::F16) {
        candle_core::bail!("cuDNN attention takes bf16 or f16, not {:?}", q.dtype());
    }
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &CudnnAttention { heads },
    )
}

/// Whether cuDNN accepts its attention graph for q, k, v `[batch, tokens, heads * head_dim]`
/// in `dtype` on GPUs of compute capability `sm` (90 for Hopper), checked on the host by
/// cuDNN's own rules (cudnn-frontend's validation): no device is needed, so a shape the
/// route cannot take is known before a GPU run. Whether an engine of the device's libcudnn
/// runs it is only known there, when the graph is built.
#[cfg(feature = "cudnn")]
pub fn validate(
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    dtype: DType,
    sm: u32,
) -> Result<()> {
    imp::validate([batch, heads, tokens, head_dim], dtype, sm)
}

struct CudnnAttention {
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    heads: usize,
}

impl CustomOp3 for CudnnAttention {
    fn name(&self) -> &'static str {
        "icedit-cudnn-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cuDNN attention runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        return imp::run((q, ql), (k, kl), (v, vl), self.heads);
        #[cfg(not(feature = "cudnn"))]
        {
            let _ = (q, ql, k, kl, v, vl);
            candle_core::bail!("cuDNN attention needs a build with `--features cudnn`")
        }
    }
}

#[cfg(feature = "cudnn")]
mod imp {
    use std::ffi::{c_char, c_int, c_void, CStr};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use crate::models::cuda::fused_launch::view;

    extern "C" {
        fn icedit_cudnn_sdpa_error() -> *const c_char;
        fn icedit_cudnn_sdpa_prepare(
            b: i64,
            h: i64,
            s: i64,
            d: i64,
            dtype: c_int,
            workspace: *mut i64,
        ) -> c_int;
        fn icedit_cudnn_sdpa_validate(
            b: i64,
            h: i64,
            s: i64,
            d: i64,
            dtype: c_int,
            sm: c_int,
        ) -> c_int;
        #[allow(clippy::too_many_arguments)]
        fn icedit_cudnn_sdpa_run(
            b: i64,
            h: i64,
            s: i64,
            d: i64,
            dtype: c_int,
            stream: *mut c_void,
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            out: *mut c_void,
            workspace: *mut c_void,
        ) -> c_int;
    }

    /// The shim's message for its last failure on this thread.
    fn shim_error(what: &str) -> candle_core::Error {
        // SAFETY: the shim returns a NUL-terminated string it owns (thread-local).
        let message = unsafe { CStr::from_ptr(icedit_cudnn_sdpa_error()) };
        candle_core::Error::msg(format!("{what}: {}", message.to_string_lossy()))
    }

    /// The shim's code for `dtype`.
    fn dtype_code(dtype: DType) -> Result<c_int> {
        match dtype {
            DType::BF16 => Ok(0),
            DType::F16 => Ok(1),
            other => candle_core::bail!("cuDNN attention takes bf16 or f16, not {other:?}"),
        }
    }

    /// [`super::validate`] for dims `[batch, heads, tokens, head_dim]`.
    pub fn validate(dims: [usize; 4], dtype: DType, sm: u32) -> Result<()> {
        let [b, h, s, d] = dims.map(|x| x as i64);
        // SAFETY: plain values in; the shim builds and drops its own graph.
        let rc = unsafe { icedit_cudnn_sdpa_validate(b, h, s, d, dtype_code(dtype)?, sm as c_int) };
        if rc != 0 {
            return Err(shim_error("cuDNN attention"));
        }
        Ok(())
    }

    pub fn run(
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        heads: usize,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, l, hd) = q.1.shape().dims3()?;
        let d = hd / heads;
        let dtype = q.0.dtype();
        let code = dtype_code(dtype)?;
        let dims = [b as i64, heads as i64, l as i64, d as i64];
        let mut workspace_bytes = 0i64;
        // SAFETY: plain values in, one i64 written.
        let rc = unsafe {
            icedit_cudnn_sdpa_prepare(
                dims[0],
                dims[1],
                dims[2],
                dims[3],
                code,
                &mut workspace_bytes,
            )
        };
        if rc != 0 {
            return Err(shim_error("cuDNN attention"));
        }
        let dev = q.0.device().clone();
        let stream = dev.cuda_stream();
        macro_rules! launch {
            ($T:ty) => {{
                let (qv, kv, vv) = (
                    view::<$T>(q.0, q.1)?,
                    view::<$T>(k.0, k.1)?,
                    view::<$T>(v.0, v.1)?,
                );
                // SAFETY: cuDNN writes every element of the output.
                let mut out = unsafe { dev.alloc::<$T>(b * l * hd)? };
                let mut workspace = unsafe { dev.alloc::<u8>(workspace_bytes.max(1) as usize)? };
                {
                    let (qp, _q) = qv.device_ptr(&stream);
                    let (kp, _k) = kv.device_ptr(&stream);
                    let (vp, _v) = vv.device_ptr(&stream);
                    let (op, _o) = out.device_ptr_mut(&stream);
                    let (wp, _w) = workspace.device_ptr_mut(&stream);
                    // SAFETY: the pointers are live device buffers of the sizes the graph
                    // was built for, on candle's stream, which the call runs on.
                    let rc = unsafe {
                        icedit_cudnn_sdpa_run(
                            dims[0],
                            dims[1],
                            dims[2],
                            dims[3],
                            code,
                            stream.cu_stream() as *mut c_void,
                            qp as *const c_void,
                            kp as *const c_void,
                            vp as *const c_void,
                            op as *mut c_void,
                            wp as *mut c_void,
                        )
                    };
                    if rc != 0 {
                        return Err(shim_error("cuDNN attention"));
                    }
                }
                drop(workspace);
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match dtype {
            DType::BF16 => launch!(half::bf16),
            _ => launch!(half::f16),
        };
        Ok((out, q.1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_route_is_own_unless_cudnn_is_asked_and_built() {
        assert_eq!(parse_route("", false), Ok(AttentionRoute::Own));
        assert_eq!(parse_route("own", true), Ok(AttentionRoute::Own));
        assert_eq!(parse_route(" cudnn ", true), Ok(AttentionRoute::Cudnn));
        let unbuilt = parse_route("cudnn", false).unwrap_err();
        assert!(unbuilt.contains("without the `cudnn` feature"), "{unbuilt}");
        let bad = parse_route("cutlass", true).unwrap_err();
        assert!(bad.contains("ICEDIT_CUDA_ATTENTION=cutlass"), "{bad}");
    }

    #[test]
    fn off_cuda_and_on_bad_shapes_it_says_why() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 8), DType::BF16, &dev).unwrap();
        let err = cudnn_attention(&x, &x, &x, 2).unwrap_err().to_string();
        assert!(err.contains("runs on CUDA only"), "{err}");
        let err = cudnn_attention(&x, &x, &x, 3).unwrap_err().to_string();
        assert!(err.contains("do not split into 3 heads"), "{err}");
        let y = Tensor::zeros((1, 5, 8), DType::BF16, &dev).unwrap();
        let err = cudnn_attention(&x, &y, &x, 2).unwrap_err().to_string();
        assert!(err.contains("must have one shape"), "{err}");
        let f = x.to_dtype(DType::F32).unwrap();
        let err = cudnn_attention(&f, &f, &f, 2).unwrap_err().to_string();
        assert!(err.contains("bf16 or f16"), "{err}");
    }

    /// cuDNN's host-side rules accept the graphs FLUX's blocks build on Hopper (512 T5
    /// tokens + the 1024x512 diptych's 2048 image tokens, 24 heads of 128; batch 1 and 4;
    /// and the 1024 refine's 8192 image tokens), and refuse a head size they cannot take:
    /// the shim describes the graph as it will on the device. Runs in `--features cudnn`
    /// builds (libcudnn.so.9 on the library path); no GPU needed.
    #[cfg(feature = "cudnn")]
    #[test]
    fn cudnn_accepts_fluxs_attention_graphs_for_hopper_on_the_host() {
        for (batch, tokens) in [(1, 512 + 2048), (4, 512 + 2048), (1, 512 + 8192)] {
            for dtype in [DType::BF16, DType::F16] {
                validate(batch, tokens, 24, 128, dtype, 90)
                    .unwrap_or_else(|e| panic!("batch {batch}, {tokens} tokens, {dtype:?}: {e}"));
            }
        }
        let err = validate(1, 64, 2, 300, DType::BF16, 90)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[1, 2, 64, 300]") && err.contains("sm_90"),
            "{err}"
        );
        let err = validate(1, 64, 2, 128, DType::F32, 90)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bf16 or f16"), "{err}");
    }
}
