//! Naming devices and dtypes the way users write them (`cuda:1`, `bf16`), for every model.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

/// The ggml types weights can be quantized to on load, as users write them (llama.cpp's
/// names, lower case).
pub const QUANTIZED_TYPES: [(&str, GgmlDType); 10] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q4_k", GgmlDType::Q4K),
    ("q3_k", GgmlDType::Q3K),
    ("q2_k", GgmlDType::Q2K),
];

/// Parses a quantized type name (`q8_0`, `q4_k`, ...; case-insensitive).
pub fn parse_ggml_dtype(name: &str) -> Result<GgmlDType, String> {
    let lower = name.to_ascii_lowercase();
    QUANTIZED_TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<_> = QUANTIZED_TYPES.iter().map(|(n, _)| *n).collect();
            format!("{name}: expected one of {}", names.join(", "))
        })
}

/// The user-facing name of a ggml type (`q4_k`), or its debug name for the float types.
pub fn ggml_dtype_name(dtype: GgmlDType) -> String {
    QUANTIZED_TYPES
        .iter()
        .find(|(_, t)| *t == dtype)
        .map_or_else(
            || format!("{dtype:?}").to_lowercase(),
            |(n, _)| n.to_string(),
        )
}

/// A device as named, before it is opened (plans compare placements without a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// Apple's GPU.
    Metal,
}

impl DeviceName {
    /// Parses `cpu`, `cuda[:N]` or `metal`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            cuda if cuda.starts_with("cuda") => match cuda.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("{cuda}: bad ordinal (expected cuda:N)")),
                None if cuda == "cuda" => Ok(Self::Cuda(0)),
                None => Err(format!("{cuda}: expected cuda or cuda:N")),
            },
            other => Err(format!("{other}: expected cpu, cuda[:N] or metal")),
        }
    }

    /// The name of an opened device (`cuda:0`, not candle's debug text).
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cpu => Self::Cpu,
            candle_core::DeviceLocation::Cuda { gpu_id } => Self::Cuda(gpu_id),
            candle_core::DeviceLocation::Metal { .. } => Self::Metal,
        }
    }

    /// Whether it is a GPU.
    pub fn is_gpu(&self) -> bool {
        *self != Self::Cpu
    }

    /// Opens the device; the error says what failed, the caller names the flag or field.
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Metal => Device::new_metal(0)
                .map_err(|e| format!("metal: {e} (build with --features metal)")),
            Self::Cuda(ordinal) => Device::new_cuda(ordinal)
                .map_err(|e| format!("{self}: {e} (build with --features cuda)")),
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

/// Parses `cpu`, `cuda[:N]` or `metal` and opens the device. The error says what was
/// expected; the caller names the flag or preset field it came from.
pub fn parse_device(name: &str) -> Result<Device, String> {
    DeviceName::parse(name)?.open()
}

/// Parses `f32`, `f16` or `bf16`; without a name, bf16 on a GPU and f32 on the CPU (candle's
/// CPU kernels lack bf16 convolutions).
pub fn parse_dtype(name: Option<&str>, device: &Device) -> Result<DType, String> {
    parse_dtype_on(name, !device.is_cpu())
}

/// [`parse_dtype`] for a device known only by whether it is a GPU.
pub fn parse_dtype_on(name: Option<&str>, gpu: bool) -> Result<DType, String> {
    Ok(match name {
        None if !gpu => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => return Err(format!("{other}: expected f32, f16 or bf16")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_say_what_was_expected() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu").unwrap_err().contains("expected cpu"));
        assert!(parse_device("cuda:x").unwrap_err().contains("ordinal"));
        assert_eq!(DeviceName::parse("cuda").unwrap(), DeviceName::Cuda(0));
        assert_eq!(DeviceName::parse("cuda:1").unwrap(), DeviceName::Cuda(1));
        assert_eq!(parse_dtype(None, &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(
            parse_dtype(Some("bf16"), &Device::Cpu).unwrap(),
            DType::BF16
        );
        assert_eq!(parse_ggml_dtype("Q4_K").unwrap(), GgmlDType::Q4K);
        assert_eq!(ggml_dtype_name(GgmlDType::Q8_0), "q8_0");
        assert!(parse_ggml_dtype("q9").unwrap_err().contains("q8_0, q5_1"));
        assert!(parse_dtype(Some("f64"), &Device::Cpu)
            .unwrap_err()
            .contains("f64"));
    }
}
