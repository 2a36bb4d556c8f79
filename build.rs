//! With the `cuda` feature, compiles `src/models/cuda/kernels.cu`, `flash.cu`, `fp8.cu` and
//! `dequant.cu` to PTX (loaded by `models::cuda` at run time). Without it, does nothing: CPU
//! builds need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/models/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/models/cuda/flash.cu");
    println!("cargo:rerun-if-changed=src/models/cuda/fp8.cu");
    println!("cargo:rerun-if-changed=src/models/cuda/dequant.cu");
    println!("cargo:rerun-if-changed=src/models/cuda/common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // PTX for the given compute capability (default 8.0, the oldest with native bf16); the
    // driver compiles it for newer GPUs at load.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| {
            std::env::var("CUDA_HOME")
                .ok()
                .map(|h| format!("{h}/bin/nvcc"))
        })
        .unwrap_or_else(|| "nvcc".into());
    for (source, ptx) in [
        ("src/models/cuda/kernels.cu", "icedit_kernels.ptx"),
        ("src/models/cuda/flash.cu", "icedit_flash.ptx"),
        ("src/models/cuda/fp8.cu", "icedit_fp8.ptx"),
        ("src/models/cuda/dequant.cu", "icedit_dequant.ptx"),
    ] {
        let ptx = out.join(ptx);
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(source)
            .status()
            .unwrap_or_else(|e| panic!("running `{nvcc}` for {source}: {e}"));
        assert!(status.success(), "`{nvcc}` failed on {source}");
    }
}
