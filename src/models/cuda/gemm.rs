//! Linear layers as one cuBLASLt GEMM with a fused epilogue (issue 31 item 2) and as an fp8
//! GEMM (issue 32), for FLUX's token-wise linears on a GPU.
//!
//! - [`linear`]: `y = x @ W^T + b`, or `gelu_tanh(x @ W^T + b)` for the MLPs' first linear,
//!   bf16 / f16 in and out, f32 accumulation: the bias add (a second pass over the output
//!   in candle, ~75 ms of a 0.22 s step on the H200, docs/results/gpu-2026-12-04.md) and
//!   the GELU (a third) are done by the GEMM as it writes its output.
//! - [`fp8_linear`]: the same with an fp8 (e4m3) weight and its per-tensor scale. The
//!   activations are quantized to e4m3 on the fly with one dynamic scale (`amax / 448`, two
//!   passes of `fp8.cu`: the largest magnitude, then the scaled, rounded values) and the
//!   product runs on the fp8 tensor cores (sm89+), scales applied by cuBLASLt, bf16 / f16
//!   out with the same epilogues. The fallback of:
//! - [`fp8_rows_linear`]: the fp8 GEMM over activations already quantized one row at a time
//!   ([`Fp8Rows`]: by the fused modulate kernel, or one pass of ours), cuBLASLt applying a
//!   scale per activation row and per weight row ("outer vector" scaling, sm90+): no
//!   quantization pass of its own, and one quantization shared by the layers that read one
//!   input.
//!
//! Off CUDA each has a CPU reference with the same arithmetic ([`reference`]: the product
//! in f32, bias, GELU, one rounding; [`fp8_emulated`]: the activations quantized as the
//! kernel does ([`crate::models::fp8`]), the e4m3 product in f32, scales, bias, GELU). The
//! FLUX blocks use the CUDA ops unless `ICEDIT_CUDA_FUSED` leaves out `gemm_epilogue` /
//! `fp8_gemm` ([`super::switch`]); `bench flux` checks both against candle's path first.
//!
//! GELU: FLUX's MLPs use the tanh approximation (diffusers `GELU(approximate="tanh")`,
//! candle's `Tensor::gelu`). The cuBLAS documentation of `cublasLtEpilogue_t`
//! (<https://docs.nvidia.com/cuda/cublas/#cublasltepilogue-t>) says only "apply GELU
//! point-wise"; that it is the tanh form is what PyTorch relies on (its CPU decomposition
//! of `_addmm_activation(use_gelu=True)`, which runs the `GELU_BIAS` epilogue on CUDA,
//! computes `gelu(approximate="tanh")` for CUDA tensors: torch/_decomp/decompositions.py)
//! and what XLA fuses into it (the tanh-approximate GELU pattern, openxla/xla#7751). The
//! device check (`bench flux`) holds the fused GELU to candle's tanh GELU at full size
//! before it is used.

use candle_core::{DType, Device, Result, Tensor, D};

use super::fp8_rows::Fp8Rows;

/// `gelu(x @ weight^T + bias)` (or without the GELU / bias) for `xs` `[.., in]`, `weight`
/// `[out, in]`, `bias` `[out]`, all in `xs`'s dtype; `[.., out]` in that dtype. On CUDA one
/// cuBLASLt GEMM (bf16 / f16); elsewhere [`reference`].
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    check_shapes("gemm", xs, weight, bias, xs.dtype(), xs.dtype())?;
    if !xs.device().is_cuda() {
        return reference(xs, weight, bias, gelu);
    }
    if !matches!(xs.dtype(), DType::BF16 | DType::F16) {
        candle_core::bail!("gemm: bf16 or f16 on CUDA, not {:?}", xs.dtype());
    }
    let op = Gemm {
        gelu,
        fp8_weight_scale: None,
        row_scales: None,
        out_dtype: xs.dtype(),
    };
    apply(xs, weight, bias, &op)
}

/// [`linear`] with an fp8 e4m3 `weight` `[out, in]` that stands for `weight * weight_scale`:
/// on CUDA the fp8 GEMM (the caller checks [`fp8_supported`]), elsewhere [`fp8_emulated`].
pub fn fp8_linear(
    xs: &Tensor,
    weight: &Tensor,
    weight_scale: f64,
    bias: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    check_shapes("fp8 gemm", xs, weight, bias, DType::F8E4M3, xs.dtype())?;
    if !xs.device().is_cuda() {
        return fp8_emulated(xs, weight, weight_scale, bias, gelu);
    }
    if !matches!(xs.dtype(), DType::BF16 | DType::F16) {
        candle_core::bail!("fp8 gemm: bf16 or f16 activations, not {:?}", xs.dtype());
    }
    let op = Gemm {
        gelu,
        fp8_weight_scale: Some(weight_scale as f32),
        row_scales: None,
        out_dtype: xs.dtype(),
    };
    apply(xs, weight, bias, &op)
}

/// [`fp8_linear`] over activations already quantized one row at a time: `gelu(rows @
/// (weight * weight_scale)^T + bias)` in `dtype` (bf16 / f16 on CUDA, the bias's dtype),
/// `[.., out]` for rows `[.., in]`. On CUDA one fp8 GEMM with per-row scales (the caller
/// checks [`fp8_rows_supported`]); elsewhere [`fp8_rows_emulated`].
pub fn fp8_rows_linear(
    rows: &Fp8Rows,
    weight: &Tensor,
    weight_scale: f64,
    bias: Option<&Tensor>,
    gelu: bool,
    dtype: DType,
) -> Result<Tensor> {
    let xs = &rows.values;
    check_shapes("fp8 row gemm", xs, weight, bias, DType::F8E4M3, dtype)?;
    if rows.rows()? * xs.dim(D::Minus1)? != xs.elem_count() {
        candle_core::bail!(
            "fp8 row gemm: {} row scales for values {:?}",
            rows.rows()?,
            xs.dims()
        );
    }
    if !xs.device().is_cuda() {
        return fp8_rows_emulated(rows, weight, weight_scale, bias, gelu, dtype);
    }
    if !matches!(dtype, DType::BF16 | DType::F16) {
        candle_core::bail!("fp8 row gemm: bf16 or f16 output, not {dtype:?}");
    }
    let op = Gemm {
        gelu,
        fp8_weight_scale: Some(weight_scale as f32),
        row_scales: Some(rows.scales.contiguous()?),
        out_dtype: dtype,
    };
    apply(xs, weight, bias, &op)
}

/// Whether `device` runs [`fp8_rows_linear`]: CUDA with compute capability 9.0 (Hopper) or
/// newer, where cuBLASLt documents outer-vector fp8 scaling. (Ada's fp8 GEMM takes the
/// per-tensor [`fp8_linear`].)
pub fn fp8_rows_supported(device: &Device) -> bool {
    compute_capability_at_least(device, (9, 0))
}

/// The CPU emulation of [`fp8_rows_linear`]: the product of the e4m3 values in f32, each
/// output row times its activation row's scale and the weight's, then bias and GELU in
/// f32, rounded once to `dtype`.
pub fn fp8_rows_emulated(
    rows: &Fp8Rows,
    weight: &Tensor,
    weight_scale: f64,
    bias: Option<&Tensor>,
    gelu: bool,
    dtype: DType,
) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    let count = rows.rows()?;
    let q = rows.values.to_dtype(DType::F32)?.reshape((count, k))?;
    let y = q
        .matmul(&weight.to_dtype(DType::F32)?.t()?)?
        .broadcast_mul(&rows.scales.unsqueeze(1)?)?;
    let y = finish((y * weight_scale)?, bias, gelu, dtype)?;
    let mut dims = rows.values.dims().to_vec();
    *dims.last_mut().expect("checked") = n;
    y.reshape(dims)
}

/// Whether `device` runs [`fp8_linear`] on fp8 tensor cores: CUDA with compute capability
/// 8.9 (Ada) or newer. Elsewhere fp8 weights are up-cast per forward.
pub fn fp8_supported(device: &Device) -> bool {
    compute_capability_at_least(device, (8, 9))
}

/// Whether `device` is a CUDA device of compute capability `cc` or newer.
fn compute_capability_at_least(device: &Device, cc: (i32, i32)) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return lt::compute_capability(dev).is_ok_and(|have| have >= cc);
    }
    let _ = (device, cc);
    false
}

/// The CPU reference of [`linear`]: the product, bias and GELU (tanh) in f32, rounded once
/// to `xs`'s dtype.
pub fn reference(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?;
    let y = xs.to_dtype(DType::F32)?.broadcast_matmul(&w.t()?)?;
    finish(y, bias, gelu, xs.dtype())
}

/// The CPU emulation of [`fp8_linear`]: `xs` quantized to e4m3 with one scale as the CUDA
/// kernel does ([`crate::models::fp8::quantize`]), the product of the e4m3 values in f32,
/// times both scales, then bias and GELU in f32, rounded once to `xs`'s dtype.
pub fn fp8_emulated(
    xs: &Tensor,
    weight: &Tensor,
    weight_scale: f64,
    bias: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    let values = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (q, x_scale) = crate::models::fp8::quantize(&values);
    let q = Tensor::from_vec(q, xs.shape(), xs.device())?;
    let w = weight.to_dtype(DType::F32)?;
    let y = (q.broadcast_matmul(&w.t()?)? * (x_scale as f64 * weight_scale))?;
    finish(y, bias, gelu, xs.dtype())
}

/// `y + bias`, GELU (tanh), in f32, then `dtype`.
fn finish(y: Tensor, bias: Option<&Tensor>, gelu: bool, dtype: DType) -> Result<Tensor> {
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    let y = if gelu { y.gelu()? } else { y };
    y.to_dtype(dtype)
}

/// Shapes and dtypes [`linear`] / [`fp8_linear`] / [`fp8_rows_linear`] accept (the bias in
/// the output's dtype); anything else names itself.
fn check_shapes(
    what: &str,
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    weight_dtype: DType,
    out_dtype: DType,
) -> Result<()> {
    let k = xs.dim(D::Minus1)?;
    let (n, wk) = weight.dims2()?;
    if wk != k || weight.dtype() != weight_dtype {
        candle_core::bail!(
            "{what}: weight {:?} {:?} does not fit input {:?} {:?} (want [out, {k}] {weight_dtype:?})",
            weight.dims(),
            weight.dtype(),
            xs.dims(),
            xs.dtype()
        );
    }
    if let Some(b) = bias {
        if b.dims() != [n] || b.dtype() != out_dtype {
            candle_core::bail!(
                "{what}: bias {:?} {:?}, expected [{n}] {out_dtype:?}",
                b.dims(),
                b.dtype()
            );
        }
    }
    Ok(())
}

/// Runs `op` on CUDA tensors (bias optional).
fn apply(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, op: &Gemm) -> Result<Tensor> {
    let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => xs.apply_op3_no_bwd(&weight, &b.contiguous()?, op),
        None => xs.apply_op2_no_bwd(&weight, op),
    }
}

/// The GEMM as a candle custom op (CUDA only: the CPU takes [`reference`] /
/// [`fp8_emulated`] / [`fp8_rows_emulated`] before reaching it).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Gemm {
    gelu: bool,
    /// `Some(scale)`: the weight is e4m3 and stands for `weight * scale`.
    fp8_weight_scale: Option<f32>,
    /// `Some([rows] f32)`: the input is e4m3 rows with these scales ([`Fp8Rows`]).
    row_scales: Option<Tensor>,
    /// The output's dtype (the input's, unless the input is e4m3 rows).
    out_dtype: DType,
}

impl candle_core::CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "icedit-gemm"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("icedit-gemm runs on CUDA only; the CPU takes the reference")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        lt::gemm((x, xl), (w, wl), None, self)
    }
}

impl candle_core::CustomOp3 for Gemm {
    fn name(&self) -> &'static str {
        "icedit-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("icedit-gemm runs on CUDA only; the CPU takes the reference")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        lt::gemm((x, xl), (w, wl), Some((b, bl)), self)
    }
}

/// cuBLASLt: one handle and workspace per device and thread (candle's CUDA devices run on
/// the calling thread's stream, and a workspace must not be shared by two streams at once),
/// and per GEMM shape a cached plan: the matmul descriptor, the three matrix layouts and
/// the heuristic's algorithm.
#[cfg(feature = "cuda")]
mod lt {
    use std::collections::{HashMap, HashSet};
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::thread::ThreadId;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};

    use super::super::fused_launch::view;
    use super::super::ptx::{FP8 as FP8_PTX, FP8_MODULE};

    /// NVIDIA's recommended cuBLASLt workspace: 32 MiB on Hopper, 4 MiB before.
    fn workspace_bytes(major: i32) -> usize {
        if major >= 9 {
            32 << 20
        } else {
            4 << 20
        }
    }

    fn lt_err(what: &str, e: result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    /// One GEMM shape as cuBLASLt sees it (column-major): `D [m, n] = op(A) [m, k] B [k, n]`
    /// with A the weight (`[out, in]` row-major, transposed), B the activations and D the
    /// output (`[rows, out]` row-major), and the byte alignment of each pointer (the
    /// heuristic picks kernels that may rely on it).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct PlanKey {
        m: u64,
        n: u64,
        k: u64,
        dtype: DType,
        fp8: bool,
        /// fp8 with one scale per weight row and per activation row (outer vectors).
        row_scales: bool,
        bias: bool,
        gelu: bool,
        align: [u32; 3],
    }

    /// A cached plan; the raw handles are owned and destroyed on drop.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        d: sys::cublasLtMatrixLayout_t,
        algo: Option<sys::cublasLtMatmulAlgo_t>,
    }

    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: each handle was created for this plan and is destroyed once; a null
            // one was never created.
            unsafe {
                for layout in [self.a, self.b, self.d] {
                    if !layout.is_null() {
                        let _ = result::destroy_matrix_layout(layout);
                    }
                }
                if !self.desc.is_null() {
                    let _ = result::destroy_matmul_desc(self.desc);
                }
            }
        }
    }

    /// One device's (and thread's) cuBLASLt state.
    struct DeviceLt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        plans: HashMap<PlanKey, Plan>,
        /// Vectors of ones by length: the weight-row scales of a per-tensor-scaled fp8
        /// weight under outer-vector scaling (its one scale rides on alpha).
        ones: HashMap<usize, CudaSlice<f32>>,
        /// GEMMs cuBLASLt found no algorithm for (or refused an attribute of).
        refused: HashSet<PlanKey>,
    }

    // SAFETY: the raw handles are only used with the state's mutex held.
    unsafe impl Send for DeviceLt {}

    impl Drop for DeviceLt {
        fn drop(&mut self) {
            self.plans.clear();
            // SAFETY: created in `device_lt`, destroyed once.
            unsafe {
                let _ = result::destroy_handle(self.handle);
            }
        }
    }

    type States = HashMap<(DeviceId, ThreadId), Arc<Mutex<DeviceLt>>>;

    fn device_lt(dev: &CudaDevice) -> Result<Arc<Mutex<DeviceLt>>> {
        static STATES: OnceLock<Mutex<States>> = OnceLock::new();
        let key = (dev.id(), std::thread::current().id());
        let mut states = STATES
            .get_or_init(Default::default)
            .lock()
            .expect("lt states");
        if let Some(state) = states.get(&key) {
            return Ok(state.clone());
        }
        let (major, _) = compute_capability(dev)?;
        let handle = result::create_handle().map_err(|e| lt_err("create", e))?;
        let workspace = dev.alloc_zeros::<u8>(workspace_bytes(major))?;
        let state = Arc::new(Mutex::new(DeviceLt {
            handle,
            workspace,
            plans: HashMap::new(),
            ones: HashMap::new(),
            refused: HashSet::new(),
        }));
        states.insert(key, state.clone());
        Ok(state)
    }

    /// The device's compute capability (major, minor), read once per device.
    pub fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
        static CAPS: OnceLock<Mutex<HashMap<DeviceId, (i32, i32)>>> = OnceLock::new();
        let mut caps = CAPS.get_or_init(Default::default).lock().expect("caps");
        if let Some(cc) = caps.get(&dev.id()) {
            return Ok(*cc);
        }
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let major = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .w()?;
        let minor = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .w()?;
        caps.insert(dev.id(), (major, minor));
        Ok((major, minor))
    }

    fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
        Ok(match dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            other => candle_core::bail!("cuBLASLt GEMM: bf16 or f16 output, not {other:?}"),
        })
    }

    /// Sets a matmul descriptor attribute to `value`.
    ///
    /// # Safety
    /// `desc` is live and `T` is the attribute's C type.
    unsafe fn set_desc<T>(
        desc: sys::cublasLtMatmulDesc_t,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: &T,
    ) -> Result<()> {
        result::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
        .map_err(|e| lt_err("descriptor attribute", e))
    }

    /// Builds the plan for `key` and asks the heuristic for its algorithm.
    fn plan(handle: sys::cublasLtHandle_t, key: &PlanKey, workspace: usize) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let out_type = data_type(key.dtype)?;
        let in_type = if key.fp8 {
            sys::cudaDataType_t::CUDA_R_8F_E4M3
        } else {
            out_type
        };
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: None,
        };
        plan.desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| lt_err("matmul descriptor", e))?;
        let epilogue = match (key.bias, key.gelu) {
            (false, false) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            (true, false) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            (false, true) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
            (true, true) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        };
        // SAFETY: the descriptor is live; each value has its attribute's C type
        // (cublasOperation_t and cudaDataType_t are 32-bit enums, epilogue uint32,
        // fast accumulation int8).
        unsafe {
            set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?; // CUBLAS_OP_T
            set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?; // CUBLAS_OP_N
            set_desc(
                plan.desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &(epilogue as u32),
            )?;
            if key.bias {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_type)?;
            }
            if key.fp8 {
                // fp8 products accumulated without periodic promotion: the fast setting
                // every public fp8 FLUX inference uses (the device check measures its error).
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
            if key.row_scales {
                // D[i, j] = alpha * scale_A[i] * scale_B[j] * sum_l A[i, l] B[l, j]: a scale
                // per weight row (output channel) and per activation row (token); both
                // modes must be set (cuBLAS docs, "Outer Vector Scaling for FP8 Data Types").
                let mode =
                    sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
            }
        }
        let layout = |t, rows: u64, cols: u64, ld: u64| {
            result::create_matrix_layout(t, rows, cols, ld as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        // Column-major views of the row-major tensors: the weight [out, in] is k x m, the
        // activations [rows, in] k x n, the output [rows, out] m x n.
        plan.a = layout(in_type, key.k, key.m, key.k)?;
        plan.b = layout(in_type, key.k, key.n, key.k)?;
        plan.d = layout(out_type, key.m, key.n, key.m)?;
        let pref = result::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let heuristic = (|| {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let set = |attr, value: *const c_void, size| {
                // SAFETY: `pref` is live; value points at `size` bytes of the attribute's type.
                unsafe { result::set_matmul_pref_attribute(pref, attr, value, size) }
                    .map_err(|e| lt_err("preference attribute", e))
            };
            let bytes = workspace as u64;
            set(
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                8,
            )?;
            for (attr, align) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
            ] {
                set(attr, &align as *const u32 as *const c_void, 4)?;
            }
            // SAFETY: every handle is live; C and D share the output layout.
            unsafe {
                result::get_matmul_algo_heuristic(
                    handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref,
                )
            }
            .map_err(|e| {
                lt_err(
                    &format!(
                        "no algorithm for {} x {} x {} ({:?}{}{}{})",
                        key.n,
                        key.k,
                        key.m,
                        key.dtype,
                        match (key.fp8, key.row_scales) {
                            (true, true) => ", fp8 inputs, row scales",
                            (true, false) => ", fp8 inputs",
                            _ => "",
                        },
                        if key.bias { ", bias" } else { "" },
                        if key.gelu { ", gelu" } else { "" }
                    ),
                    e,
                )
            })
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = result::destroy_matmul_pref(pref);
        }
        plan.algo = Some(heuristic?.algo);
        Ok(plan)
    }

    /// Largest power-of-two alignment of a device address, up to 256 bytes.
    fn alignment(ptr: u64) -> u32 {
        1 << ptr.trailing_zeros().min(8)
    }

    /// The GEMM of [`super::linear`] / [`super::fp8_linear`] / [`super::fp8_rows_linear`]
    /// on CUDA storage, as `op` says.
    pub fn gemm(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        op: &super::Gemm,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = x.1.dims();
        let k = *dims.last().unwrap_or(&0);
        let (out, wk) = w.1.shape().dims2()?;
        if wk != k || k == 0 {
            candle_core::bail!(
                "cuBLASLt GEMM: weight {:?} for input {:?}",
                w.1.dims(),
                dims
            );
        }
        let rows = x.1.shape().elem_count() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = out;
        let shape = Shape::from(out_dims);
        let storage = match op.out_dtype {
            DType::BF16 => run::<half::bf16>(x, w, bias, op, (rows, out, k))?,
            DType::F16 => run::<half::f16>(x, w, bias, op, (rows, out, k))?,
            other => candle_core::bail!("cuBLASLt GEMM: bf16 or f16, not {other:?}"),
        };
        Ok((storage, shape))
    }

    /// The activations as the GEMM reads them.
    enum Input<'a, T> {
        /// 16-bit, for a 16-bit weight.
        Dense(CudaView<'a, T>),
        /// Quantized here with one scale for the tensor (`fp8.cu`), kept alive until the
        /// GEMM is enqueued (stream order keeps them valid until it has run).
        PerTensor(CudaSlice<float8::F8E4M3>, CudaSlice<f32>),
        /// Quantized before, one scale per row.
        Rows(CudaView<'a, float8::F8E4M3>, CudaView<'a, f32>),
    }

    fn run<T: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        op: &super::Gemm,
        (rows, out, k): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev: &CudaDevice = x.0.device();
        let stream = dev.cuda_stream();
        let bv = bias.map(|(s, l)| view::<T>(s, l)).transpose()?;
        // SAFETY: every element is written by the GEMM below.
        let mut dst = unsafe { dev.alloc::<T>(rows * out)? };
        if rows == 0 || out == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()));
        }
        let scales_held = op.row_scales.as_ref().map(|t| t.storage_and_layout());
        let input = match (&scales_held, op.fp8_weight_scale) {
            (Some((storage, layout)), Some(_)) => {
                let candle_core::Storage::Cuda(scales) = &**storage else {
                    candle_core::bail!("fp8 row gemm: the row scales are not on the device")
                };
                Input::Rows(
                    view::<float8::F8E4M3>(x.0, x.1)?,
                    view::<f32>(scales, layout)?,
                )
            }
            (None, Some(_)) => {
                let (q, scale) = quantize_e4m3(dev, &view::<T>(x.0, x.1)?, x.0.dtype(), rows * k)?;
                Input::PerTensor(q, scale)
            }
            (None, None) => Input::Dense(view::<T>(x.0, x.1)?),
            (Some(_), None) => candle_core::bail!("cuBLASLt GEMM: row scales need an fp8 weight"),
        };
        let row_scales = matches!(input, Input::Rows(..));
        let (w_fp8, w_dense) = match op.fp8_weight_scale {
            Some(_) => (Some(view::<float8::F8E4M3>(w.0, w.1)?), None),
            None => (None, Some(view::<T>(w.0, w.1)?)),
        };
        let state = device_lt(dev)?;
        let mut guard = state.lock().expect("cuBLASLt state");
        // Disjoint borrows of the fields (the ones vector is read while a plan is added).
        let state = &mut *guard;
        if row_scales && !state.ones.contains_key(&out) {
            let ones = stream.clone_htod(&vec![1f32; out]).w()?;
            state.ones.insert(out, ones);
        }
        let workspace_len = state.workspace.len();
        let (w_ptr, _w_guard) = match (&w_fp8, &w_dense) {
            (Some(v), _) => v.device_ptr(&stream),
            (_, Some(v)) => v.device_ptr(&stream),
            (None, None) => unreachable!("one weight view"),
        };
        let ((x_ptr, _x_guard), b_scale_ptr) = match &input {
            Input::Dense(v) => (v.device_ptr(&stream), None),
            Input::PerTensor(q, scale) => (q.device_ptr(&stream), Some(scale.device_ptr(&stream))),
            Input::Rows(q, scales) => (q.device_ptr(&stream), Some(scales.device_ptr(&stream))),
        };
        let a_scale_ptr = if row_scales {
            Some(state.ones[&out].device_ptr(&stream))
        } else {
            None
        };
        let bias_ptr = bv.as_ref().map(|b| b.device_ptr(&stream));
        let (d_ptr, d_guard) = dst.device_ptr_mut(&stream);
        let key = PlanKey {
            m: out as u64,
            n: rows as u64,
            k: k as u64,
            dtype: op.out_dtype,
            fp8: op.fp8_weight_scale.is_some(),
            row_scales,
            bias: bias.is_some(),
            gelu: op.gelu,
            align: [alignment(w_ptr), alignment(x_ptr), alignment(d_ptr)],
        };
        let handle = state.handle;
        if state.refused.contains(&key) {
            // Asked before and refused: the caller's fallback runs without a new heuristic
            // query (a layer of an unsupported shape is met every step).
            candle_core::bail!("cuBLASLt has no algorithm for this GEMM (refused before)");
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = state.plans.entry(key) {
            match plan(handle, &key, workspace_len) {
                Ok(plan) => {
                    slot.insert(plan);
                }
                Err(e) => {
                    state.refused.insert(key);
                    return Err(e);
                }
            }
        }
        let (ws_ptr, _ws_guard) = state.workspace.device_ptr(&stream);
        let plan = &state.plans[&key];
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: the descriptor is live (the state's mutex is held until the GEMM is
        // enqueued); pointer attributes are device addresses of live buffers.
        unsafe {
            if let Some((b, _)) = &bias_ptr {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, b)?;
            }
            if let Some((s, _)) = &a_scale_ptr {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, s)?;
            }
            if let Some((s, _)) = &b_scale_ptr {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, s)?;
            }
        }
        // D = alpha * scale_A * scale_B * op(A) B (+ bias): the weight's one scale rides on
        // alpha (a host scalar; under outer-vector scaling the A vector is ones), the
        // activations' on the B scale pointer (device).
        let alpha: f32 = op.fp8_weight_scale.unwrap_or(1.0);
        let beta: f32 = 0.0;
        let algo = plan.algo.as_ref().expect("planned");
        // SAFETY: the plan's layouts describe these buffers (shapes checked above, dtypes
        // matched by `view`), the workspace is this state's, and the stream is the device's.
        unsafe {
            result::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w_ptr as *const c_void,
                plan.a,
                x_ptr as *const c_void,
                plan.b,
                d_ptr as *const c_void,
                plan.d,
                d_ptr as *mut c_void,
                plan.d,
                algo,
                ws_ptr as *mut c_void,
                workspace_len,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err("matmul", e))?;
        drop((bias_ptr, a_scale_ptr, b_scale_ptr, d_guard));
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    /// `x` (`n` values) as e4m3 with one scale, `amax / 448`: `(q, scale)` on the device
    /// (fp8.cu: a pass for the largest magnitude, then one that scales, rounds to nearest
    /// even and saturates at +-448, as [`crate::models::fp8::quantize`]).
    fn quantize_e4m3<T: DeviceRepr>(
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        dtype: DType,
        n: usize,
    ) -> Result<(CudaSlice<float8::F8E4M3>, CudaSlice<f32>)> {
        let suffix = match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("fp8 quantize: bf16 or f16, not {other:?}"),
        };
        const THREADS: usize = 256;
        // Grid-stride loops: a few blocks per SM is enough to saturate memory.
        let blocks = n.div_ceil(THREADS * 4).clamp(1, 2048) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = n as i64;
        let amax = dev.alloc_zeros::<u32>(1)?;
        let func = dev.get_or_load_custom_func(&format!("absmax_{suffix}"), FP8_MODULE, FP8_PTX)?;
        let mut b = func.builder();
        b.arg(x).arg(&amax).arg(&count);
        // SAFETY: argument types and count match the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        // SAFETY: every element is written by the kernel below.
        let q = unsafe { dev.alloc::<float8::F8E4M3>(n)? };
        // SAFETY: written by the kernel below.
        let scale = unsafe { dev.alloc::<f32>(1)? };
        let func =
            dev.get_or_load_custom_func(&format!("quantize_e4m3_{suffix}"), FP8_MODULE, FP8_PTX)?;
        let mut b = func.builder();
        b.arg(x).arg(&amax).arg(&q).arg(&scale).arg(&count);
        // SAFETY: argument types and count match the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok((q, scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::models::kernel_check::max_abs_diff(a, b).unwrap()
    }

    fn randn(shape: &[usize], std: f32, dtype: DType) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The reference is candle's path (matmul, broadcast bias add, tanh GELU) up to its
    /// roundings: exact in f32, within a few bf16 steps in bf16 (candle rounds the product
    /// before the bias and the sum before the GELU; the reference rounds once).
    #[test]
    fn the_reference_is_matmul_bias_and_tanh_gelu() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.1)] {
            let xs = randn(&[2, 7, 48], 1.0, dtype);
            let w = randn(&[40, 48], 0.2, dtype);
            let b = randn(&[40], 1.0, dtype);
            let plain = xs
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            for gelu in [false, true] {
                let want = if gelu {
                    plain.gelu().unwrap()
                } else {
                    plain.clone()
                };
                let got = linear(&xs, &w, Some(&b), gelu).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[2, 7, 40][..], dtype));
                let diff = max_abs_diff(&got, &want);
                assert!(diff < tol, "{dtype:?} gelu {gelu}: {diff}");
            }
            let got = linear(&xs, &w, None, false).unwrap();
            let want = xs.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert!(max_abs_diff(&got, &want) < tol);
        }
    }

    /// GELU of the reference is the tanh form: at x = 1, 0.841192 (erf form: 0.841345).
    #[test]
    fn the_reference_gelu_is_the_tanh_approximation() {
        let xs = Tensor::new(&[[1f32]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[1f32]], &Device::Cpu).unwrap();
        let y = reference(&xs, &w, None, true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[0][0];
        let tanh_form = 0.5 * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * 1.044715).tanh());
        assert!((y - tanh_form).abs() < 1e-6, "{y}");
        assert!((y - 0.841345).abs() > 1e-4);
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_by_name() {
        let xs = randn(&[3, 8], 1.0, DType::F32);
        let err = linear(&xs, &randn(&[4, 9], 1.0, DType::F32), None, false).unwrap_err();
        assert!(err.to_string().contains("weight [4, 9]"), "{err}");
        let err = linear(
            &xs,
            &randn(&[4, 8], 1.0, DType::F32),
            Some(&randn(&[5], 1.0, DType::F32)),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bias [5]"), "{err}");
        let err = fp8_linear(&xs, &randn(&[4, 8], 1.0, DType::F32), 1.0, None, false).unwrap_err();
        assert!(err.to_string().contains("F8E4M3"), "{err}");
        assert!(!fp8_supported(&Device::Cpu));
    }

    /// The fp8 emulation against the f32 product of the unquantized operands, element by
    /// element within the rounding bound of e4m3.
    ///
    /// Each operand is held within a relative `u = 2^-4` (half a step of 3 mantissa bits) or,
    /// below e4m3's smallest normal, within half a subnormal step (`2^-10` times its scale).
    /// So `|x' w' - x w| <= (2u + u^2) |x| |w| + (subnormal terms)`, and the product's error
    /// is at most `(2u + u^2) sum_k |x_k| |w_k|` plus `sum_k (e_x |w_k| + e_w |x_k|)` with
    /// `e = 2^-10 scale`; the f32 accumulation adds ~`k 2^-24` of the same sum, negligible.
    #[test]
    fn the_fp8_emulation_stays_within_the_e4m3_rounding_bound() {
        let (rows, k, n) = (9, 64, 24);
        let xs = randn(&[rows, k], 1.5, DType::F32);
        let (w, weight, scale) = fp8_weight(n, k);
        let bias = randn(&[n], 1.0, DType::F32);
        let got = fp8_linear(&xs, &weight, scale, Some(&bias), false).unwrap();
        let x = xs.to_vec2::<f32>().unwrap();
        let x_scale = crate::models::fp8::scale_for(crate::models::fp8::amax(&x.concat()));
        let worst = worst_against_e4m3_bound(&got, &xs, &w, scale as f32, &bias, |_| x_scale);
        // Rounding errors of random signs cancel: far inside the worst case, but not zero.
        assert!(worst > 0.0 && worst < 0.5, "{worst}");
    }

    /// The same bound per row with per-row activation scales, on rows whose magnitudes
    /// span 10^4 (one scale for all would push the small rows into e4m3's subnormals).
    #[test]
    fn the_fp8_row_emulation_stays_within_each_rows_bound() {
        let (rows, k, n) = (6, 48, 16);
        let magnitudes = Tensor::new(&[1e-2f32, 1.0, 100.0, 0.5, 3.0, 1e-1], &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let xs = randn(&[rows, k], 1.0, DType::F32)
            .broadcast_mul(&magnitudes)
            .unwrap();
        let (w, weight, scale) = fp8_weight(n, k);
        let bias = randn(&[n], 1.0, DType::F32);
        let quantized = Fp8Rows::quantize(&xs).unwrap();
        let got =
            fp8_rows_linear(&quantized, &weight, scale, Some(&bias), false, DType::F32).unwrap();
        let row_scales = quantized.scales.to_vec1::<f32>().unwrap();
        let worst = worst_against_e4m3_bound(&got, &xs, &w, scale as f32, &bias, |r| row_scales[r]);
        assert!(worst > 0.0 && worst < 0.5, "{worst}");
        // [.., in] leading dims are kept; a bias of the wrong dtype names itself.
        let batched = Fp8Rows::quantize(&xs.reshape((2, 3, k)).unwrap()).unwrap();
        let out = fp8_rows_linear(&batched, &weight, scale, None, true, DType::BF16).unwrap();
        assert_eq!((out.dims(), out.dtype()), (&[2, 3, n][..], DType::BF16));
        let err = fp8_rows_linear(&batched, &weight, scale, Some(&bias), false, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias") && err.contains("BF16"), "{err}");
    }

    /// A random `[n, k]` weight `w` and its e4m3 form with one scale, as `--quantize fp8`
    /// holds it: `(w, e4m3 weight, scale)`.
    fn fp8_weight(n: usize, k: usize) -> (Tensor, Tensor, f64) {
        let w = randn(&[n, k], 0.3, DType::F32);
        let w_amax = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = crate::models::fp8::scale_for(w_amax) as f64;
        let weight = (&w / scale).unwrap().to_dtype(DType::F8E4M3).unwrap();
        (w, weight, scale)
    }

    /// Holds an fp8 GEMM's output `got` to the f32 product `xs @ w^T + bias` element by
    /// element: both operands rounded to e4m3 (relative error u = 2^-4 each, so (2u + u^2)
    /// of the absolute products) plus the subnormal steps (2^-10 of each scale times the
    /// other operand), with `x_scale(r)` row r's activation scale. Returns the largest error
    /// as a fraction of its bound.
    fn worst_against_e4m3_bound(
        got: &Tensor,
        xs: &Tensor,
        w: &Tensor,
        w_scale: f32,
        bias: &Tensor,
        x_scale: impl Fn(usize) -> f32,
    ) -> f32 {
        let exact = reference(xs, w, Some(bias), false).unwrap();
        let (x, wv) = (xs.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let u = 1.0 / 16.0;
        let (got, exact) = (
            got.to_vec2::<f32>().unwrap(),
            exact.to_vec2::<f32>().unwrap(),
        );
        let mut worst = 0f32;
        for (r, (got_row, exact_row)) in got.iter().zip(&exact).enumerate() {
            for (c, (g, e)) in got_row.iter().zip(exact_row).enumerate() {
                let k = x[r].len();
                let abs_sum: f32 = (0..k).map(|i| (x[r][i] * wv[c][i]).abs()).sum();
                let sub: f32 = (0..k)
                    .map(|i| {
                        2f32.powi(-10) * (x_scale(r) * wv[c][i].abs() + w_scale * x[r][i].abs())
                    })
                    .sum();
                let bound = (2.0 * u + u * u) * abs_sum + sub + 1e-5 * (1.0 + e.abs());
                let err = (g - e).abs();
                assert!(err <= bound, "[{r}, {c}]: {err} > {bound}");
                worst = worst.max(err / bound);
            }
        }
        worst
    }
}
