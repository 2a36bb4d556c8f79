//! The transformer's linear layers, whatever form their weights are held in: dense in the
//! model dtype, ggml-quantized (from a GGUF file, or quantized as safetensors are read), or
//! fp8 (e4m3). An ICEdit LoRA is merged where the weight is dense (and before quantizing on
//! load), runs as a low-rank side branch over weights it cannot be merged into (a GGUF base,
//! fp8), and its MoE layers run their experts at inference.
//!
//! On CUDA a dense layer is one cuBLASLt GEMM with the bias (and, for the MLPs, the GELU)
//! fused, and an fp8 layer an fp8 GEMM on sm89+ ([`crate::models::cuda::gemm`], switches
//! `gemm_epilogue` / `fp8_gemm`); elsewhere, and with the switches off, dense layers run
//! candle's matmul + bias add and fp8 weights are up-cast per forward. On sm90+ (switch
//! `fp8_rows`) an fp8 layer reads its input as fp8 rows ([`LinearInput`]), quantized once
//! for every layer that reads the same input, by the modulate kernel where it writes it.

use std::cell::OnceCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::held_weight::{QuantizedMatmul, Weight};
use super::lora::{Experts, LoraSet, LowRank};
use super::weights::WeightSource;
use crate::models::cuda::fp8_rows::Fp8Rows;
use crate::models::cuda::gemm;
use crate::models::cuda::switch::{use_kernel, Kernel};

/// A linear layer's input: the activations in the model dtype and, once an fp8 layer has
/// asked for them, the same activations as fp8 rows ([`Fp8Rows`]), made once and shared by
/// every fp8 layer that reads this input (q, k and v read one). The fused modulate kernel
/// writes them beside the activations ([`LinearInput::with_fp8_rows`]).
#[derive(Debug)]
pub struct LinearInput {
    dense: Tensor,
    fp8_rows: OnceCell<Fp8Rows>,
}

impl LinearInput {
    /// `dense` `[.., in]`; its fp8 rows are made when a layer first needs them.
    pub fn new(dense: Tensor) -> Self {
        Self {
            dense,
            fp8_rows: OnceCell::new(),
        }
    }

    /// `dense` with its fp8 rows already made (they must be `Fp8Rows::quantize(&dense)`).
    pub fn with_fp8_rows(dense: Tensor, rows: Fp8Rows) -> Self {
        Self {
            dense,
            fp8_rows: OnceCell::from(rows),
        }
    }

    /// The activations in the model dtype.
    pub fn dense(&self) -> &Tensor {
        &self.dense
    }

    /// The activations as fp8 rows, quantized on first use.
    pub fn fp8_rows(&self) -> Result<&Fp8Rows> {
        if let Some(rows) = self.fp8_rows.get() {
            return Ok(rows);
        }
        let rows = Fp8Rows::quantize(&self.dense)?;
        Ok(self.fp8_rows.get_or_init(|| rows))
    }
}

/// A linear layer with a bias, its weight held as [`Weight`] says.
#[derive(Debug, Clone)]
pub struct BaseLinear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl BaseLinear {
    /// A layer over `weight` and `bias`.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            Weight::Dense(w) | Weight::Fp8 { weight: w, .. } => w.dims2(),
            Weight::Quantized(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims2(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2(),
            },
        }
    }
}

impl BaseLinear {
    /// `gelu(layer(xs))` (tanh GELU, FLUX's MLPs): on CUDA the GELU rides on the GEMM's
    /// epilogue.
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_input(&LinearInput::new(xs.clone()), true)
    }

    /// The layer on `input`, then GELU if `gelu`: one fused GEMM where
    /// [`Self::fused_gemm`] says so, over the input's fp8 rows where
    /// [`Self::takes_fp8_rows`] does.
    pub fn forward_input(&self, input: &LinearInput, gelu: bool) -> Result<Tensor> {
        let xs = input.dense();
        let kernel = self.fused_gemm(xs);
        if let (Weight::Fp8 { weight, scale }, Some(Kernel::Fp8Gemm)) = (&self.weight, kernel) {
            if fp8_rows_on(xs) {
                let out = input.fp8_rows().and_then(|rows| {
                    gemm::fp8_rows_linear(
                        rows,
                        weight,
                        *scale,
                        self.bias.as_ref(),
                        gelu,
                        xs.dtype(),
                    )
                });
                match out {
                    Ok(out) => return Ok(out),
                    // cuBLASLt refused per-row scales for this shape (it remembers, so the
                    // next call falls back at once): the per-tensor fp8 GEMM below.
                    Err(e) => warn_once(Kernel::Fp8Rows, xs, &e),
                }
            }
        }
        let fused = match (&self.weight, kernel) {
            (Weight::Dense(w), Some(k @ Kernel::GemmEpilogue)) => {
                Some((k, gemm::linear(xs, w, self.bias.as_ref(), gelu)))
            }
            (Weight::Fp8 { weight, scale }, Some(k @ Kernel::Fp8Gemm)) => Some((
                k,
                gemm::fp8_linear(xs, weight, *scale, self.bias.as_ref(), gelu),
            )),
            // GGUF on many rows: the layer dequantized into the model dtype, then the same
            // epilogue GEMM as a dense layer.
            (Weight::Quantized(q, _), Some(k @ Kernel::GemmEpilogue)) => Some((
                k,
                dequantized(q, xs.dtype())
                    .and_then(|w| gemm::linear(xs, &w, self.bias.as_ref(), gelu)),
            )),
            _ => None,
        };
        match fused {
            Some((_, Ok(out))) => return Ok(out),
            // A shape cuBLASLt has no algorithm for (the device check covers the FLUX
            // shapes, not every one): candle's path instead, said once per kernel.
            Some((kernel, Err(e))) => warn_once(kernel, xs, &e),
            None => {}
        }
        let out = self.unfused(xs)?;
        if gelu {
            out.gelu()
        } else {
            Ok(out)
        }
    }

    /// Whether this layer multiplies `xs`-like inputs as fp8 rows: an fp8 weight on the fp8
    /// GEMM with `fp8_rows` on (on CUDA, sm90+; off CUDA, inside a forced switch, the
    /// emulation).
    pub fn takes_fp8_rows(&self, xs: &Tensor) -> bool {
        self.fused_gemm(xs) == Some(Kernel::Fp8Gemm) && fp8_rows_on(xs)
    }

    /// Which fused GEMM runs this layer for `xs`, if any: dense weights through
    /// `gemm_epilogue`, fp8 ones through `fp8_gemm` (on CUDA only where the device has fp8
    /// tensor cores and the sizes suit them; off CUDA the switch forces its emulation).
    fn fused_gemm(&self, xs: &Tensor) -> Option<Kernel> {
        if self.bias.as_ref().is_some_and(|b| b.dtype() != xs.dtype()) {
            return None;
        }
        match &self.weight {
            Weight::Dense(w) if w.dtype() == xs.dtype() => {
                use_kernel(Kernel::GemmEpilogue, xs).then_some(Kernel::GemmEpilogue)
            }
            Weight::Quantized(..) => {
                let rows = xs.elem_count() / xs.dim(D::Minus1).unwrap_or(1).max(1);
                (QuantizedMatmul::from_env().dequantizes(xs.device(), rows)
                    && use_kernel(Kernel::GemmEpilogue, xs))
                .then_some(Kernel::GemmEpilogue)
            }
            Weight::Fp8 { weight, .. } if use_kernel(Kernel::Fp8Gemm, xs) => {
                let on_device = || {
                    let (out, k) = weight.dims2().unwrap_or((1, 1));
                    // cuBLASLt's fp8 kernels want 16-byte rows and 16-element tiles.
                    matches!(xs.dtype(), DType::BF16 | DType::F16)
                        && k.is_multiple_of(16)
                        && out.is_multiple_of(16)
                        && gemm::fp8_supported(xs.device())
                };
                (!xs.device().is_cuda() || on_device()).then_some(Kernel::Fp8Gemm)
            }
            _ => None,
        }
    }

    /// candle's path: matmul (fp8 weights up-cast first), then the bias in one pass.
    fn unfused(&self, xs: &Tensor) -> Result<Tensor> {
        let out = match &self.weight {
            Weight::Dense(w) => xs.broadcast_matmul(&w.t()?)?,
            Weight::Quantized(q, _) => quantized_forward(q, xs, QuantizedMatmul::from_env())?,
            Weight::Fp8 { weight, scale } => {
                let w = (weight.to_dtype(xs.dtype())? * *scale)?;
                xs.broadcast_matmul(&w.t()?)?
            }
        };
        match &self.bias {
            Some(b) => crate::models::cuda::add_row_bias(&out, b),
            None => Ok(out),
        }
    }
}

impl Module for BaseLinear {
    /// `xs` is `[.., in]` in the model dtype; the result is `[.., out]` in the same dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_input(&LinearInput::new(xs.clone()), false)
    }
}

/// Whether an fp8 GEMM over `xs` takes its input as fp8 rows: `fp8_rows` on, and on CUDA a
/// device with per-row scales (sm90+).
fn fp8_rows_on(xs: &Tensor) -> bool {
    use_kernel(Kernel::Fp8Rows, xs)
        && (!xs.device().is_cuda() || gemm::fp8_rows_supported(xs.device()))
}

/// Logs, once per kernel, that a fused GEMM failed and a slower path ran instead (the
/// per-tensor fp8 GEMM after `fp8_rows`, candle's matmul after the others).
fn warn_once(kernel: Kernel, xs: &Tensor, error: &candle_core::Error) {
    static WARNED: std::sync::Mutex<Vec<Kernel>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if !warned.contains(&kernel) {
        warned.push(kernel);
        tracing::warn!(
            kernel = kernel.name(),
            input = ?xs.dims(),
            %error,
            "fused GEMM failed; the layer falls back to a slower path (said once per kernel)"
        );
    }
}

/// `xs [.., in]` times a ggml-quantized `[out, in]` weight, as `how` says: candle's
/// quantized kernels (f32 in and out) or the weight dequantized into `xs`'s dtype for one
/// ordinary matmul.
pub fn quantized_forward(q: &QMatMul, xs: &Tensor, how: QuantizedMatmul) -> Result<Tensor> {
    let rows = xs.elem_count() / xs.dim(D::Minus1)?.max(1);
    if how.dequantizes(xs.device(), rows) {
        return xs.broadcast_matmul(&dequantized(q, xs.dtype())?.t()?);
    }
    // candle's quantized kernels take and give f32.
    q.forward(&xs.to_dtype(DType::F32)?.contiguous()?)?
        .to_dtype(xs.dtype())
}

/// A quantized `[out, in]` weight as a dense tensor of `dtype` (on CUDA in one kernel pass
/// for Q8_0 / Q4_0 / Q4_K: [`crate::models::cuda::dequant`]).
fn dequantized(q: &QMatMul, dtype: DType) -> Result<Tensor> {
    match q {
        QMatMul::QTensor(t) => crate::models::cuda::dequant::dequantize(t, dtype),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(dtype),
    }
}

/// A linear layer as the model runs it.
#[derive(Debug, Clone)]
pub enum AdaptedLinear {
    /// The base layer (a plain LoRA, if any, merged into a dense weight).
    Base(BaseLinear),
    /// A base the plain LoRA could not be merged into, plus the adapter as a side branch:
    /// `y = W x + s * B (A x)`.
    LowRank {
        /// The base layer.
        base: BaseLinear,
        /// `lora_A` `[r, in]`, model dtype.
        down: Tensor,
        /// `lora_B` `[out, r]`, model dtype.
        up: Tensor,
        /// `alpha / r` times the user's scale.
        scale: f64,
    },
    /// Base layer plus per-token top-1 expert adapters.
    Moe(MoeLinear),
}

impl AdaptedLinear {
    /// The base layer.
    pub fn base(&self) -> &BaseLinear {
        match self {
            Self::Base(b) | Self::LowRank { base: b, .. } => b,
            Self::Moe(m) => &m.base,
        }
    }

    /// `gelu(layer(xs))` (tanh GELU): fused into the GEMM for a plain base layer; after the
    /// side branches otherwise (the GELU applies to their sum).
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_gelu_input(&LinearInput::new(xs.clone()))
    }

    /// [`Self::forward_gelu`] on a [`LinearInput`] (its fp8 rows shared with other layers).
    pub fn forward_gelu_input(&self, input: &LinearInput) -> Result<Tensor> {
        match self {
            Self::Base(l) => l.forward_input(input, true),
            _ => self.forward_input(input)?.gelu(),
        }
    }

    /// The layer on a [`LinearInput`]: the base layer reads its fp8 rows where it takes
    /// them, the side branches the activations.
    pub fn forward_input(&self, input: &LinearInput) -> Result<Tensor> {
        let xs = input.dense();
        match self {
            Self::Base(l) => l.forward_input(input, false),
            Self::LowRank {
                base,
                down,
                up,
                scale,
            } => {
                let side = xs
                    .broadcast_matmul(&down.t()?)?
                    .broadcast_matmul(&up.t()?)?;
                base.forward_input(input, false)? + (side * *scale)?
            }
            Self::Moe(m) => m.forward_input(input),
        }
    }

    /// Whether the base layer multiplies `xs`-like inputs as fp8 rows
    /// ([`BaseLinear::takes_fp8_rows`]).
    pub fn takes_fp8_rows(&self, xs: &Tensor) -> bool {
        self.base().takes_fp8_rows(xs)
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_input(&LinearInput::new(xs.clone()))
    }
}

/// A base linear layer plus top-1 routed low-rank experts.
///
/// The experts run as two products for all of them at once rather than two per expert:
/// every token's input times the experts' stacked down projections (`[B, S, E * r]`, the
/// input read once), the columns of the experts a token did not pick zeroed, then times the
/// stacked up projections with each expert's scale folded in. Per token that is its expert's
/// `scale * up (down x)` (the other experts' terms are zero), with one add to the base
/// output instead of three passes over it per expert.
#[derive(Debug, Clone)]
pub struct MoeLinear {
    base: BaseLinear,
    /// Router `[experts, in]` in the model dtype.
    route: Tensor,
    /// The experts' down projections stacked: `[E * r, in]`, model dtype.
    down: Tensor,
    /// The experts' up projections side by side, each times its scale (in f32, then
    /// rounded once): `[out, E * r]`, model dtype.
    up: Tensor,
    /// The expert each stacked column belongs to: `[E * r]` u32.
    expert_of_column: Tensor,
}

impl MoeLinear {
    /// Moves the experts to `dtype` and `base`'s device.
    pub fn new(
        base: BaseLinear,
        experts: &Experts,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let (out_dim, in_dim) = base.dims()?;
        let (mut downs, mut ups, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for (e, x) in experts.experts.iter().enumerate() {
            if x.down.dims().len() != 2
                || x.down.dim(1)? != in_dim
                || x.up.dims() != [out_dim, x.down.dim(0)?]
            {
                candle_core::bail!(
                    "expert {e}: shapes {:?}/{:?} do not fit a {in_dim} -> {out_dim} layer",
                    x.down.dims(),
                    x.up.dims()
                );
            }
            owners.extend(std::iter::repeat_n(e as u32, x.down.dim(0)?));
            downs.push(x.down.to_dtype(DType::F32)?);
            ups.push((x.up.to_dtype(DType::F32)? * x.scale)?);
        }
        let route = experts.route.to_dtype(dtype)?.to_device(dev)?;
        if route.dims() != [downs.len(), in_dim] {
            candle_core::bail!(
                "router shape {:?} does not fit {} experts over {in_dim} inputs",
                route.dims(),
                downs.len()
            );
        }
        let stack = |parts: &[Tensor], dim: usize| -> Result<Tensor> {
            Tensor::cat(parts, dim)?.to_dtype(dtype)?.to_device(dev)
        };
        Ok(Self {
            base,
            route,
            down: stack(&downs, 0)?,
            up: stack(&ups, 1)?,
            expert_of_column: Tensor::new(owners, dev)?,
        })
    }

    /// `input` is `[B, S, in]`; every token adds the update of its top-1 expert.
    pub fn forward_input(&self, input: &LinearInput) -> Result<Tensor> {
        let xs = input.dense();
        let out = self.base.forward_input(input, false)?;
        let choice = xs
            .broadcast_matmul(&self.route.t()?)?
            .argmax_keepdim(D::Minus1)?; // [B, S, 1]
        let picked = choice
            .broadcast_eq(&self.expert_of_column)?
            .to_dtype(xs.dtype())?; // [B, S, E * r]: 1 on the token's expert's columns
        let hidden = (xs.broadcast_matmul(&self.down.t()?)? * picked)?;
        out + hidden.broadcast_matmul(&self.up.t()?)?
    }
}

impl Module for MoeLinear {
    /// `xs` is `[B, S, in]`; every token adds the update of its top-1 expert.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_input(&LinearInput::new(xs.clone()))
    }
}

/// How the transformer's linear layers are built: the LoRA that adapts them, the file
/// that may hold them quantized, and a ggml type to quantize dense weights to as they are
/// read.
#[derive(Clone, Copy, Default)]
pub struct Linears<'a> {
    /// The ICEdit LoRA, plain and MoE.
    pub lora: Option<&'a LoraSet>,
    /// The weights' file, asked for quantized (GGUF) or fp8 tensors before reading dense.
    pub source: Option<&'a WeightSource>,
    /// Quantize every dense weight whose rows fit the type's blocks.
    pub quantize: Option<GgmlDType>,
    /// Hold every dense weight as fp8 e4m3 with a per-tensor scale (`--quantize fp8`),
    /// after any plain LoRA is merged.
    pub fp8: bool,
    /// Benchmarks only: quantize (or round to fp8) just the first rows of each weight and
    /// repeat them for the rest. Quantized kernels take the same time whatever the values,
    /// and quantizing 12B random parameters on the CPU would take minutes.
    pub sample_rows: Option<usize>,
}

/// A layer's dense weight read from the checkpoint (f32, on the CPU) to be quantized,
/// checked against the layer's shape as a dense load checks it: the row repeat below is for
/// the benchmark's sampled rows only, never for a file's tensor that is short of rows.
fn read_checked(source: &WeightSource, key: &str, output: usize, input: usize) -> Result<Tensor> {
    source.get(
        (output, input).into(),
        key,
        candle_nn::Init::Const(0.0),
        DType::F32,
        &Device::Cpu,
    )
}

impl<'a> Linears<'a> {
    /// Dense weights with `lora` merged in (or its experts attached).
    pub fn dense(lora: Option<&'a LoraSet>) -> Self {
        Self {
            lora,
            ..Self::default()
        }
    }

    /// The layer `vb`'s prefix names (a diffusers module path), `input -> output` wide.
    pub fn build(&self, vb: VarBuilder, input: usize, output: usize) -> Result<AdaptedLinear> {
        let module = vb.prefix();
        let (dtype, dev) = (vb.dtype(), vb.device().clone());
        let weight_name = format!("{module}.weight");
        let stored = match self.source {
            Some(source) => source.held_weight(&weight_name, &dev)?,
            None => None,
        };
        let bias = Some(vb.get(output, "bias")?);
        let (base, mergeable) = match stored {
            // Held as the file holds it: a plain LoRA cannot be merged into it.
            Some(weight) => (BaseLinear::new(weight, bias), false),
            // Dense, with any plain LoRA merged by the source as it is read; quantized from
            // an f32 copy on the CPU (never materialised in full on the device first).
            None if self.fp8 => {
                let rows = self.sample_rows.map_or(output, |r| r.clamp(1, output));
                let w = match self.source {
                    Some(source) => read_checked(source, &weight_name, output, input)?,
                    None => vb
                        .get((output, input), "weight")?
                        .narrow(0, 0, rows)?
                        .to_device(&Device::Cpu)?,
                };
                let weight = match to_fp8(&w, &dev)? {
                    Weight::Fp8 { weight, scale } if w.dim(0)? < output => Weight::Fp8 {
                        weight: repeat_fp8_rows(&weight, output)?,
                        scale,
                    },
                    held => held,
                };
                (BaseLinear::new(weight, bias), true)
            }
            None => match self.quantize {
                Some(t) if input.is_multiple_of(t.block_size()) => {
                    let rows = self.sample_rows.map_or(output, |r| r.clamp(1, output));
                    let w = match self.source {
                        Some(source) => read_checked(source, &weight_name, output, input)?,
                        None => vb.get((output, input), "weight")?.narrow(0, 0, rows)?,
                    };
                    // A fresh buffer: candle's quantizer reads the raw storage, so a view
                    // (rows cut out of a fused matrix) must not be passed as it is.
                    let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let w = Tensor::from_vec(values, (w.dim(0)?, input), &Device::Cpu)?;
                    let q = QTensor::quantize(&w, t)?;
                    let q = if w.dim(0)? < output {
                        repeat_rows(&q, output, &dev)?
                    } else {
                        QTensor::new(QStorage::from_data(q.data()?, &dev, t)?, (output, input))?
                    };
                    let weight = Weight::Quantized(Arc::new(QMatMul::from_qtensor(q)?), t);
                    (BaseLinear::new(weight, bias), true)
                }
                _ => (
                    BaseLinear::new(Weight::Dense(vb.get((output, input), "weight")?), bias),
                    true,
                ),
            },
        };
        let (out_dim, in_dim) = base.dims()?;
        if (out_dim, in_dim) != (output, input) {
            candle_core::bail!(
                "`{weight_name}` is {out_dim}x{in_dim}, the model needs {output}x{input}"
            );
        }
        // A LoRA that does not fit the layer is named by file and module: the base weights
        // are fine, the adapter is for another model.
        let misfit = |lora: &LoraSet, e: candle_core::Error| {
            candle_core::Error::Msg(format!(
                "{}: the LoRA's adapter for `{module}` does not fit the transformer's layer: {e}",
                lora.path.display()
            ))
        };
        if let Some(lora) = self.lora {
            if let Some(experts) = lora.take_experts(&module) {
                return MoeLinear::new(base, experts, dtype, &dev)
                    .map(AdaptedLinear::Moe)
                    .map_err(|e| misfit(lora, e));
            }
            if !mergeable {
                if let Some(adapter) = lora.take_plain_unmerged(&module) {
                    return side_branch(base, adapter, dtype, &dev).map_err(|e| misfit(lora, e));
                }
            }
        }
        Ok(AdaptedLinear::Base(base))
    }
}

/// The largest magnitude fp8 e4m3 holds.
const FP8_E4M3_MAX: f32 = 448.0;

/// `w` as fp8 e4m3 on `dev` with one scale for the tensor: `amax(|w|) / 448`, so the
/// largest weight lands on e4m3's largest value (the per-tensor scheme of the community's
/// "scaled fp8" FLUX files, read by the same [`Weight::Fp8`] path). Rounded to nearest on
/// the CPU.
pub fn to_fp8(w: &Tensor, dev: &Device) -> Result<Weight> {
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let amax = w.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = if amax > 0.0 && amax.is_finite() {
        amax / FP8_E4M3_MAX
    } else {
        1.0
    };
    let held = (w / scale as f64)?.to_dtype(DType::F8E4M3)?;
    Ok(Weight::Fp8 {
        weight: held.to_device(dev)?,
        scale: scale as f64,
    })
}

/// An fp8 `[rows, in]` matrix repeated to `[output, in]` on its device (benchmarks: see
/// [`Linears::sample_rows`]).
fn repeat_fp8_rows(w: &Tensor, output: usize) -> Result<Tensor> {
    let rows = w.dim(0)?;
    w.repeat((output.div_ceil(rows), 1))?
        .narrow(0, 0, output)?
        .contiguous()
}

/// A quantized `[rows, in]` matrix repeated to `[output, in]` on `dev`.
fn repeat_rows(q: &QTensor, output: usize, dev: &Device) -> Result<QTensor> {
    let (rows, input) = q.shape().dims2()?;
    let sample = q.data()?;
    let row_bytes = sample.len() / rows;
    let mut bytes = Vec::with_capacity(row_bytes * output);
    while bytes.len() < row_bytes * output {
        let take = (row_bytes * output - bytes.len()).min(sample.len());
        bytes.extend_from_slice(&sample[..take]);
    }
    QTensor::new(
        QStorage::from_data(std::borrow::Cow::Owned(bytes), dev, q.dtype())?,
        (output, input),
    )
}

fn side_branch(
    base: BaseLinear,
    adapter: &LowRank,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<AdaptedLinear> {
    let (out_dim, in_dim) = base.dims()?;
    let (down, up) = (
        adapter.down.to_dtype(dtype)?.to_device(dev)?,
        adapter.up.to_dtype(dtype)?.to_device(dev)?,
    );
    if down.dim(1)? != in_dim || up.dim(0)? != out_dim {
        candle_core::bail!(
            "LoRA shapes {:?}/{:?} do not fit a {in_dim} -> {out_dim} layer",
            down.dims(),
            up.dims()
        );
    }
    Ok(AdaptedLinear::LowRank {
        base,
        down,
        up,
        scale: adapter.scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The max absolute difference over the mean absolute value of `reference`.
    fn relative_error(a: &Tensor, reference: &Tensor) -> f32 {
        let diff = (a - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = reference
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / scale
    }

    /// Both ways of multiplying by a quantized weight give the product with the weight
    /// the file holds: the dequantized one exactly (it is that product), candle's kernels
    /// within their rounding of the activations. The bound for those: the kernels quantize
    /// each block of activations (32 values for Q8_0 / Q4_0, whose dot type is Q8_0; 256 for
    /// Q4_K's Q8_K) to 8 bits with a scale of about amax / 127 (Q8_0: amax / 127 stored as
    /// f16; Q8_K: amax / 128, the negative end clamped to 127 steps), so each activation
    /// moves by at most amax_block / 127; the weights are the held values exactly and the
    /// integer dot products are exact, so output (r, c) is off by at most
    /// sum_i |w[c, i]| amax_block(x[r], i) / 127, plus f32 rounding of the block sums.
    #[test]
    fn a_dequantized_product_equals_the_kernels_product() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.5, (96, 256), &dev).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (2, 40, 256), &dev).unwrap();
        let x = xs.reshape((80, 256)).unwrap().to_vec2::<f32>().unwrap();
        for (t, dot_block) in [
            (GgmlDType::Q8_0, 32),
            (GgmlDType::Q4_0, 32),
            (GgmlDType::Q4K, 256),
        ] {
            let q = QTensor::quantize(&weight, t).unwrap();
            let held = q.dequantize(&dev).unwrap();
            let exact = xs.broadcast_matmul(&held.t().unwrap()).unwrap();
            let q = QMatMul::from_qtensor(q).unwrap();
            let dequantized = quantized_forward(&q, &xs, QuantizedMatmul::Dequantize).unwrap();
            let kernels = quantized_forward(&q, &xs, QuantizedMatmul::Kernels).unwrap();
            assert_eq!(dequantized.dims(), &[2, 40, 96]);
            assert!(relative_error(&dequantized, &exact) < 1e-5, "{t:?}");
            let w = held.to_vec2::<f32>().unwrap();
            let got = kernels.reshape((80, 96)).unwrap().to_vec2::<f32>().unwrap();
            let want = exact.reshape((80, 96)).unwrap().to_vec2::<f32>().unwrap();
            let mut worst = 0f32;
            for (r, xr) in x.iter().enumerate() {
                let amax: Vec<f32> = xr
                    .chunks(dot_block)
                    .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
                    .collect();
                for (c, wc) in w.iter().enumerate() {
                    let moved: f32 = (0..256).map(|i| wc[i].abs() * amax[i / dot_block]).sum();
                    let size: f32 = (0..256).map(|i| (wc[i] * xr[i]).abs()).sum();
                    let bound = moved / 127.0 + 1e-5 * size + 1e-6;
                    let err = (got[r][c] - want[r][c]).abs();
                    assert!(err <= bound, "{t:?} [{r}, {c}]: {err} > {bound}");
                    worst = worst.max(err / bound);
                }
            }
            // Random rounding errors cancel: inside the worst case, but not zero.
            assert!(worst > 0.0, "{t:?}");
            // `Auto` on the CPU keeps the kernels, whatever the rows.
            let auto = quantized_forward(&q, &xs, QuantizedMatmul::Auto).unwrap();
            assert_eq!(relative_error(&auto, &kernels), 0.0);
        }
    }

    /// fp8 with a per-tensor scale: the largest weight is held exactly at 448 x scale, and
    /// every weight within e4m3's rounding (3 mantissa bits: half of 2^-3 relative, or the
    /// smallest subnormal step times the scale near zero).
    #[test]
    fn fp8_holds_each_weight_within_its_rounding() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (64, 48), &dev).unwrap();
        let Weight::Fp8 { weight, scale } = to_fp8(&w, &dev).unwrap() else {
            panic!("not fp8")
        };
        assert_eq!(weight.dtype(), DType::F8E4M3);
        let back = (weight.to_dtype(DType::F32).unwrap() * scale).unwrap();
        let (w, back) = (
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((scale as f32 - amax / 448.0).abs() < 1e-9);
        for (a, b) in w.iter().zip(&back) {
            let bound = (a.abs() / 16.0).max(scale as f32 * 2f32.powi(-9));
            assert!((a - b).abs() <= bound * 1.0001, "{a} held as {b}");
        }
        assert!(back.iter().any(|b| (b.abs() - amax).abs() < 1e-6));
        // All zeros: scale 1, zeros held.
        let zeros = Tensor::zeros((4, 4), DType::F32, &dev).unwrap();
        let Weight::Fp8 { scale, .. } = to_fp8(&zeros, &dev).unwrap() else {
            panic!("not fp8")
        };
        assert_eq!(scale, 1.0);
    }

    /// A LoRA side branch over an fp8 base on the row path (the emulation, forced): the
    /// base reads the input's fp8 rows, the branch the 16-bit input, and one input's rows
    /// are made once for every layer that reads it.
    #[test]
    fn a_side_branch_over_an_fp8_base_reads_the_rows_and_the_input() {
        use crate::models::cuda::switch::{forced, Kernels};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (32, 48), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 32, &dev).unwrap();
        let base = BaseLinear::new(to_fp8(&w, &dev).unwrap(), Some(bias.clone()));
        let down = Tensor::randn(0f32, 0.2, (4, 48), &dev).unwrap();
        let up = Tensor::randn(0f32, 0.2, (32, 4), &dev).unwrap();
        let layer = AdaptedLinear::LowRank {
            base: base.clone(),
            down: down.clone(),
            up: up.clone(),
            scale: 0.5,
        };
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 48), &dev).unwrap();
        let rows_on = Kernels::parse("fp8_gemm,fp8_rows").unwrap();
        let input = LinearInput::new(xs.clone());
        let got = forced(rows_on, || {
            assert!(layer.takes_fp8_rows(&xs));
            layer.forward_input(&input).unwrap()
        });
        let Weight::Fp8 { weight, scale } = base.weight() else {
            panic!("not fp8")
        };
        let rows = Fp8Rows::quantize(&xs).unwrap();
        let want_base =
            gemm::fp8_rows_emulated(&rows, weight, *scale, Some(&bias), false, DType::F32).unwrap();
        let side = xs
            .broadcast_matmul(&down.t().unwrap())
            .unwrap()
            .broadcast_matmul(&up.t().unwrap())
            .unwrap();
        let want = (want_base + (side * 0.5).unwrap()).unwrap();
        assert_eq!(relative_error(&got, &want), 0.0);
        // The rows were made once, on the first layer's call, and are reused as they are.
        let first = input.fp8_rows().unwrap().scales.clone();
        let again = forced(rows_on, || base.forward_input(&input, false).unwrap());
        assert_eq!(input.fp8_rows().unwrap().scales.id(), first.id());
        assert_eq!(again.dims(), &[2, 5, 32]);
        // Without `fp8_rows` the same layer takes the per-tensor emulation instead.
        let per_tensor = forced(Kernels::parse("fp8_gemm").unwrap(), || {
            assert!(!layer.takes_fp8_rows(&xs));
            layer.forward(&xs).unwrap()
        });
        assert!(relative_error(&per_tensor, &got) > 0.0);
    }

    #[test]
    fn auto_dequantizes_only_many_rows_on_cuda() {
        let cpu = Device::Cpu;
        assert!(!QuantizedMatmul::Auto.dequantizes(&cpu, 4096));
        assert!(QuantizedMatmul::Dequantize.dequantizes(&cpu, 1));
        assert!(!QuantizedMatmul::Kernels.dequantizes(&cpu, 4096));
    }
}
