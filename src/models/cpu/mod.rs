//! Fused CPU kernels for the f32 hot spots candle runs as several passes.
//!
//! On the CPU, candle computes softmax attention as three tensor operations (scores, a
//! softmax with a scalar `exp` per element, the weighted sum), each streaming a
//! `[heads, len, len]` buffer through memory; for the Qwen2-VL vision tower on 2 cores
//! that was twice torch's fused attention (`bench judge`). Likewise a biased linear layer
//! writes its output twice and quick-GELU three times. The kernels here keep
//! intermediates in cache and vectorize `exp`. They run only for contiguous f32 tensors on
//! the CPU; callers keep the tensor path for every other device and dtype.

pub mod activation;
pub mod attention;
pub mod exp;
pub mod linear;

/// Defines `$name` to run `$body` compiled for AVX2 + FMA when the CPU has them (checked
/// at run time, so the binary still runs on older x86), else as compiled for the baseline.
/// `$body` should be `#[inline(always)]` so it is compiled into each variant.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn wide($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Runs `work` on a thread of rayon's pool when `device` is the CPU and the caller is not
/// one already; otherwise (a GPU, or already on the pool) right here.
///
/// candle's CPU kernels and `gemm` split their work on rayon's pool. Asked from a thread
/// outside the pool, each split queues the job for the pool's threads and puts the asking
/// thread to sleep until they finish: a sleep and a wake per operation, thousands per
/// prefill (a Qwen2-VL-2B prefill on 2 cores counted ~38k voluntary context switches, where
/// torch's OpenMP threads had 270). From a pool thread, a split starts on that thread at
/// once and the other half is stolen by an idle one. So a model's forward pass enters the
/// pool once, here.
pub fn on_pool<R: Send>(device: &candle_core::Device, work: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() && rayon::current_thread_index().is_none() {
        rayon::scope(|_| work())
    } else {
        work()
    }
}

/// Whether `t` is an f32 tensor on the CPU laid out contiguously (what the kernels read).
pub fn is_dense_cpu_f32(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

/// Largest absolute difference between two f32 tensors of one shape (the kernels' tests
/// compare against candle's unfused operations with it).
#[cfg(test)]
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    super::kernel_check::max_abs_diff(a, b).unwrap()
}

#[cfg(test)]
mod pool_tests {
    use candle_core::Device;

    #[test]
    fn cpu_work_runs_on_the_pool_once() {
        assert!(rayon::current_thread_index().is_none());
        let (outer, inner) = super::on_pool(&Device::Cpu, || {
            let outer = rayon::current_thread_index();
            // Already on the pool: a nested call stays on the same thread.
            let inner = super::on_pool(&Device::Cpu, rayon::current_thread_index);
            (outer, inner)
        });
        assert!(outer.is_some());
        assert_eq!(outer, inner);
    }
}
