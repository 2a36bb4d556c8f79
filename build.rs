//! With the `cuda` feature, compiles `src/models/cuda/kernels.cu`, `flash.cu`, `fp8.cu` and
//! `dequant.cu` to PTX (loaded by `models::cuda` at run time) and assembles each for the
//! target GPU with ptxas as a check (see [`assemble`]). With the `cudnn` feature, also
//! compiles `cudnn_sdpa.cpp` (cuDNN's fused attention through NVIDIA's cudnn-frontend
//! headers) and links it with libcudnn and the static CUDA runtime. Without them, does
//! nothing: CPU builds need no CUDA toolkit.

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
    println!("cargo:rerun-if-changed=src/models/cuda/cudnn_sdpa.cpp");
    println!("cargo:rerun-if-env-changed=CUDNN_FRONTEND_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=CUDNN_INCLUDE_DIR");
    describe_build();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // PTX for the given compute capability (default 8.0, the oldest with native bf16); the
    // driver compiles it for newer GPUs at load.
    let cap = compute_cap();
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
        assemble(&nvcc, &cap, source, &ptx);
    }
    if std::env::var_os("CARGO_FEATURE_CUDNN").is_some() {
        build_cudnn_shim();
    }
}

/// The compute capability the kernels are built for (default 8.0).
fn compute_cap() -> String {
    std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into())
}

/// `ICEDIT_BUILD_DESCRIPTION` for the crate (what `--version` prints, `crate::cli`): the
/// devices this build has beside the CPU and the kernels' target, e.g.
/// `cpu, cuda (kernels for sm_90), cudnn`. A literal, so `--version` allocates nothing.
fn describe_build() {
    let feature = |name: &str| std::env::var_os(format!("CARGO_FEATURE_{name}")).is_some();
    let mut parts = vec!["cpu".to_string()];
    if feature("CUDA") {
        parts.push(format!("cuda (kernels for sm_{})", compute_cap()));
    }
    if feature("CUDNN") {
        parts.push("cudnn".into());
    }
    if feature("METAL") {
        parts.push("metal".into());
    }
    println!(
        "cargo:rustc-env=ICEDIT_BUILD_DESCRIPTION={}",
        parts.join(", ")
    );
}

/// Assembles `ptx` for `sm_{cap}` with ptxas (beside nvcc, or on the PATH), as the driver
/// will when it loads the module: a kernel that does not assemble for that GPU (an
/// instruction it lacks, more static shared memory than a block may have) fails this build
/// instead of the first launch on a device. Register spills (a kernel held under its launch
/// bounds) are warnings; ptxas' resource report for each kernel is kept beside the PTX
/// (`<name>.ptxas.txt`). Without ptxas the check is skipped with a warning (the PTX is still
/// built and loads as before).
fn assemble(nvcc: &str, cap: &str, source: &str, ptx: &std::path::Path) {
    let beside = std::path::Path::new(nvcc).with_file_name("ptxas");
    let ptxas = if beside.is_file() {
        beside.display().to_string()
    } else {
        "ptxas".to_string()
    };
    let output = match Command::new(&ptxas)
        .arg(format!("-arch=sm_{cap}"))
        .arg("-v")
        .arg("-o")
        .arg(ptx.with_extension("cubin"))
        .arg(ptx)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            println!(
                "cargo:warning=no ptxas (`{ptxas}`: {e}): {source} was not assembled for sm_{cap} here"
            );
            return;
        }
    };
    // ptxas writes its resource report (-v) to stderr.
    let report = String::from_utf8_lossy(&output.stderr).into_owned();
    std::fs::write(ptx.with_extension("ptxas.txt"), &report)
        .unwrap_or_else(|e| panic!("writing ptxas' report for {source}: {e}"));
    assert!(
        output.status.success(),
        "ptxas -arch=sm_{cap} failed on the PTX of {source}:\n{report}"
    );
    let mut kernel = "";
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap_or(rest);
        }
        if line.contains("spill stores") && !line.contains(" 0 bytes spill stores") {
            println!(
                "cargo:warning={source}: {kernel} spills on sm_{cap}: {}",
                line.trim()
            );
        }
    }
}

/// A directory named by `var` that holds `header`, or a panic that says how to get it.
fn include_dir(var: &str, header: &str, package: &str) -> PathBuf {
    let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("the `cudnn` feature needs {var}: the directory of {header} (PyPI: {package})")
    });
    assert!(
        dir.join(header).is_file(),
        "{var}={}: no {header} there (PyPI: {package})",
        dir.display()
    );
    dir
}

/// Compiles the cuDNN attention shim and links what it needs.
fn build_cudnn_shim() {
    let frontend = include_dir(
        "CUDNN_FRONTEND_INCLUDE_DIR",
        "cudnn_frontend.h",
        "nvidia-cudnn-frontend, its include/",
    );
    let cudnn = include_dir(
        "CUDNN_INCLUDE_DIR",
        "cudnn.h",
        "nvidia-cudnn-cu13, nvidia/cudnn/include",
    );
    let cuda_home = PathBuf::from(std::env::var("CUDA_HOME").unwrap_or_else(|_| {
        panic!(
            "the `cudnn` feature needs CUDA_HOME (the toolkit: cuda_runtime.h, libcudart_static.a)"
        )
    }));
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .include(&frontend)
        .include(&cudnn)
        .include(cuda_home.join("include"))
        .file("src/models/cuda/cudnn_sdpa.cpp")
        .compile("icedit_cudnn_sdpa");
    // The CUDA runtime statically, so the carried binary needs no libcudart of its version.
    for lib in ["lib", "lib64", "targets/x86_64-linux/lib"] {
        let dir = cuda_home.join(lib);
        if dir.join("libcudart_static.a").is_file() {
            println!("cargo:rustc-link-search=native={}", dir.display());
        }
    }
    println!("cargo:rustc-link-lib=static=cudart_static");
    println!("cargo:rustc-link-lib=dylib=cudnn");
    for lib in ["dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
