//! Activation functions by the names checkpoints' configs give them (transformers'
//! `ACT2FN` keys), so a config's `hidden_act` is honoured, or refused by name when this
//! code does not have it, never silently replaced.

use candle_core::{Result, Tensor};

/// An activation a config can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: `x * sigmoid(x)`.
    Silu,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// The names this code computes, for error messages.
    pub const NAMES: &'static str =
        "silu, swish, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, relu";

    /// The activation a config names; an error names what is supported.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            other => {
                return Err(format!(
                    "activation {other:?} is not implemented here (supported: {})",
                    Self::NAMES
                ))
            }
        })
    }

    /// Applies it (SiLU and quick-GELU on dense f32 CPU tensors in one fused pass).
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        let fused = super::cpu::is_dense_cpu_f32(xs);
        match self {
            Self::Silu if fused => super::cpu::activation::sigmoid_gated(xs, 1.0),
            Self::QuickGelu if fused => super::cpu::activation::sigmoid_gated(xs, 1.702),
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
        }
    }

    /// `act(gate) * up`, a gated MLP's hidden activation (one fused pass for SiLU and
    /// quick-GELU on dense f32 CPU tensors of one shape).
    pub fn apply_gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let fused = super::cpu::is_dense_cpu_f32(gate)
            && super::cpu::is_dense_cpu_f32(up)
            && gate.dims() == up.dims();
        match self {
            Self::Silu if fused => super::cpu::activation::sigmoid_gated_product(gate, up, 1.0),
            Self::QuickGelu if fused => {
                super::cpu::activation::sigmoid_gated_product(gate, up, 1.702)
            }
            _ => self.apply(gate)? * up,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_and_unknown_ones_are_refused_by_name() {
        assert_eq!(Activation::from_name("swish").unwrap(), Activation::Silu);
        assert_eq!(
            Activation::from_name("gelu_pytorch_tanh").unwrap(),
            Activation::GeluTanh
        );
        let err = Activation::from_name("xielu").unwrap_err();
        assert!(
            err.contains("\"xielu\"") && err.contains("quick_gelu"),
            "{err}"
        );
        let x = Tensor::new(&[-1f32, 0.0, 2.0], &candle_core::Device::Cpu).unwrap();
        let q: Vec<f32> = Activation::QuickGelu.apply(&x).unwrap().to_vec1().unwrap();
        let expect = |v: f32| v / (1.0 + (-1.702 * v).exp());
        for (got, v) in q.iter().zip([-1f32, 0.0, 2.0]) {
            assert!((got - expect(v)).abs() < 1e-6);
        }
    }
}
