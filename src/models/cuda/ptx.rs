//! The PTX build.rs compiles from our `.cu` files, each included once in the binary, with
//! the module name a device loads it under (once, whichever kernel asks first).

/// `kernels.cu`: the scaled softmax, the row-bias add and the FLUX glue kernels.
pub const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/icedit_kernels.ptx"));
/// [`KERNELS`]' module name.
pub const KERNELS_MODULE: &str = "icedit_kernels";
/// `flash.cu`: FLUX's and the judge's flash attention.
pub const FLASH: &str = include_str!(concat!(env!("OUT_DIR"), "/icedit_flash.ptx"));
/// [`FLASH`]' module name.
pub const FLASH_MODULE: &str = "icedit_flash";
/// `fp8.cu`: the activations' amax and their e4m3 quantization for the fp8 GEMM.
pub const FP8: &str = include_str!(concat!(env!("OUT_DIR"), "/icedit_fp8.ptx"));
/// [`FP8`]' module name.
pub const FP8_MODULE: &str = "icedit_fp8";
/// `dequant.cu`: ggml blocks (Q8_0, Q4_0, Q4_K) into bf16 / f16 in one pass.
pub const DEQUANT: &str = include_str!(concat!(env!("OUT_DIR"), "/icedit_dequant.ptx"));
/// [`DEQUANT`]' module name.
pub const DEQUANT_MODULE: &str = "icedit_dequant";
