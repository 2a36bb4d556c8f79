//! Which fused kernels the FLUX forward and the Qwen-VL judge use, for A/B runs and for the
//! device check.
//!
//! On CUDA every fused kernel is on unless the environment variable `ICEDIT_CUDA_FUSED`
//! says otherwise: `all` (the default), `none`, or a comma-separated list of the kernels to
//! use (`attention,modulate,gated_residual,qk_norm_rope,judge_attention,gemm_epilogue,
//! fp8_gemm,fp8_rows`; judge_attention is the Qwen-VL judge's attention). `bench flux` turns a kernel off
//! for the rest of its run when it fails its device check ([`disable`]).
//!
//! Off CUDA the fused kernels are never used, except inside [`forced`], which the device
//! check and tests use to run the fused ops (their CPU references off CUDA) on purpose.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};

/// The environment variable read once for the global choice.
pub const ENV: &str = "ICEDIT_CUDA_FUSED";

/// One fused kernel the FLUX forward can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Flash attention over the joint sequence (`attention.rs`, `flash.cu`).
    Attention,
    /// Layer norm + AdaLN shift/scale in one pass.
    Modulate,
    /// `x + gate * y`.
    GatedResidual,
    /// Per-head q/k RMS norm + RoPE in the attention layout.
    QkNormRope,
    /// The Qwen-VL judge's flash attention: the vision tower's segments and the decoder's
    /// causal prefill (`attention::judge_attention`).
    JudgeAttention,
    /// Dense linears as one cuBLASLt GEMM with the bias (and the MLP's GELU) fused
    /// (`gemm.rs`).
    GemmEpilogue,
    /// fp8 weights multiplied by cuBLASLt's fp8 GEMM (activations quantized per tensor) on
    /// sm89+, instead of up-cast per forward (`gemm.rs`, `fp8.cu`).
    Fp8Gemm,
    /// With `fp8_gemm` on sm90+: the activations quantized one row at a time, inside the
    /// modulate kernel where it writes them, and scaled per row by cuBLASLt
    /// (`fp8_rows.rs`); without it, the per-tensor scheme.
    Fp8Rows,
}

impl Kernel {
    /// Every kernel, in the order the check reports them.
    pub const ALL: [Kernel; 8] = [
        Kernel::Attention,
        Kernel::Modulate,
        Kernel::GatedResidual,
        Kernel::QkNormRope,
        Kernel::JudgeAttention,
        Kernel::GemmEpilogue,
        Kernel::Fp8Gemm,
        Kernel::Fp8Rows,
    ];

    /// The name `ICEDIT_CUDA_FUSED` and the check's report use.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::Modulate => "modulate",
            Kernel::GatedResidual => "gated_residual",
            Kernel::QkNormRope => "qk_norm_rope",
            Kernel::JudgeAttention => "judge_attention",
            Kernel::GemmEpilogue => "gemm_epilogue",
            Kernel::Fp8Gemm => "fp8_gemm",
            Kernel::Fp8Rows => "fp8_rows",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels(u8);

impl Kernels {
    /// Every kernel.
    pub const ALL: Kernels = Kernels(0b1111_1111);
    /// No kernel.
    pub const NONE: Kernels = Kernels(0);

    /// Whether `kernel` is in the set.
    pub fn contains(self, kernel: Kernel) -> bool {
        self.0 & kernel.bit() != 0
    }

    /// Parses `all`, `none` or a comma-separated list of kernel names.
    pub fn parse(text: &str) -> Result<Kernels, String> {
        match text.trim() {
            "" | "all" => return Ok(Kernels::ALL),
            "none" => return Ok(Kernels::NONE),
            _ => {}
        }
        let mut set = 0;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let kernel = Kernel::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    format!(
                        "{ENV}={text}: unknown kernel `{name}` (expected all, none or a list of {})",
                        Kernel::ALL.map(Kernel::name).join(", ")
                    )
                })?;
            set |= kernel.bit();
        }
        Ok(Kernels(set))
    }
}

/// `ICEDIT_CUDA_FUSED` as set, or the error naming it and its value.
pub fn from_env() -> Result<Kernels, String> {
    match std::env::var(ENV) {
        Ok(text) => Kernels::parse(&text),
        Err(std::env::VarError::NotPresent) => Ok(Kernels::ALL),
        Err(e) => Err(format!("{ENV}: {e}")),
    }
}

/// Bits of the kernels turned off after start ([`disable`]).
static DISABLED: AtomicU8 = AtomicU8::new(0);

fn global() -> Kernels {
    static FROM_ENV: OnceLock<Kernels> = OnceLock::new();
    let set = *FROM_ENV.get_or_init(|| {
        from_env().unwrap_or_else(|e| {
            tracing::error!("{e}; no fused FLUX kernel is used");
            Kernels::NONE
        })
    });
    Kernels(set.0 & !DISABLED.load(Ordering::Relaxed))
}

/// Turns `kernel` off for the rest of the process (a kernel that failed its device check).
pub fn disable(kernel: Kernel) {
    DISABLED.fetch_or(kernel.bit(), Ordering::Relaxed);
}

/// The kernels the FLUX forward uses on CUDA now.
pub fn enabled() -> Kernels {
    global()
}

thread_local! {
    static FORCED: Cell<Option<Kernels>> = const { Cell::new(None) };
}

/// Runs `f` with exactly `kernels` used on this thread, on any device (off CUDA a fused op
/// runs its CPU reference).
pub fn forced<T>(kernels: Kernels, f: impl FnOnce() -> T) -> T {
    let before = FORCED.with(|c| c.replace(Some(kernels)));
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Whether the FLUX forward should use `kernel` for `xs`: inside [`forced`] as it says
/// (any device), else on CUDA when enabled; always only for f16 / bf16 (and f32 for the
/// glue kernels and the fp8 GEMM's CPU emulation, never for attention and the 16-bit GEMM,
/// whose tensor cores take 16-bit inputs).
pub fn use_kernel(kernel: Kernel, xs: &Tensor) -> bool {
    let dtype_ok = match xs.dtype() {
        DType::BF16 | DType::F16 => true,
        DType::F32 => !matches!(
            kernel,
            Kernel::Attention | Kernel::JudgeAttention | Kernel::GemmEpilogue
        ),
        _ => false,
    };
    if !dtype_ok {
        return false;
    }
    match FORCED.with(Cell::get) {
        Some(set) => set.contains(kernel),
        None => xs.device().is_cuda() && global().contains(kernel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_switch_parses_all_none_and_lists_and_names_a_bad_kernel() {
        assert_eq!(Kernels::parse("all"), Ok(Kernels::ALL));
        assert_eq!(Kernels::parse("none"), Ok(Kernels::NONE));
        let set = Kernels::parse("attention, modulate").unwrap();
        assert!(set.contains(Kernel::Attention) && set.contains(Kernel::Modulate));
        assert!(!set.contains(Kernel::GatedResidual) && !set.contains(Kernel::QkNormRope));
        let err = Kernels::parse("attention,flash").unwrap_err();
        assert!(
            err.contains("ICEDIT_CUDA_FUSED") && err.contains("`flash`"),
            "{err}"
        );
    }

    #[test]
    fn off_cuda_no_kernel_is_used_unless_forced() {
        let xs = Tensor::zeros((2, 3), DType::BF16, &Device::Cpu).unwrap();
        assert!(!use_kernel(Kernel::Modulate, &xs));
        assert!(forced(Kernels::ALL, || use_kernel(Kernel::Modulate, &xs)));
        assert!(!forced(Kernels::NONE, || use_kernel(Kernel::Modulate, &xs)));
        let f32s = xs.to_dtype(DType::F32).unwrap();
        assert!(!forced(Kernels::ALL, || use_kernel(
            Kernel::Attention,
            &f32s
        )));
        assert!(!use_kernel(Kernel::Modulate, &xs), "restored after forced");
    }
}
