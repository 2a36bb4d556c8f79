//! What a part of the work holds on a CUDA device, measured the way the memory plan counts
//! it (issue 32: a plan calibrated on the GPU).
//!
//! candle allocates every tensor with `cuMemAllocAsync` from the device's current memory
//! pool, so the pool's own counters see exactly the bytes our tensors occupy: the bytes in
//! use now, and the high-water mark of bytes in use since it was last reset (the peak
//! inside a forward, which no sampling of `nvidia-smi` at 250 ms can catch). What lies
//! outside the pool (the CUDA context, loaded kernels, cuBLAS's own workspaces) is the
//! device's used memory less the pool's reserved bytes. [`PoolMeter::working_peak`] gives
//! one part's working memory: the high-water mark while it ran above what was in use
//! before it started.
//!
//! Off CUDA, or without the `cuda` feature, there is no meter (`PoolMeter::new` is `None`).
//! A measurement never fails the work it measures: a counter the driver will not give is
//! logged and left out (`None`).

use candle_core::{Device, Result};
use serde::Serialize;

/// The device's memory at one moment, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMemory {
    /// Bytes of live allocations from the pool now.
    pub pool_used: u64,
    /// The most bytes in use from the pool since the last [`PoolMeter::reset_high`].
    pub pool_used_high: u64,
    /// Bytes the pool holds from the device now (in use or cached for reuse).
    pub pool_reserved: u64,
    /// The most bytes the pool held from the device since the last
    /// [`PoolMeter::reset_high`]: what `nvidia-smi` sees of the pool at the peak.
    pub pool_reserved_high: u64,
    /// Bytes in use on the whole device (`cuMemGetInfo`: total less free; other processes
    /// included).
    pub device_used: u64,
}

impl DeviceMemory {
    /// Device memory outside the pool: the context, kernel images, libraries' workspaces
    /// (and other processes').
    pub fn outside_pool(&self) -> u64 {
        self.device_used.saturating_sub(self.pool_reserved)
    }
}

/// What one part of the work held on the device, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PartMemory {
    /// Its working memory: the most bytes in use while it ran, less those in use when it
    /// started (its result, if kept, is part of that peak).
    pub working: u64,
    /// The pool's reserved bytes at their peak while it ran (everything resident then,
    /// not only this part).
    pub pool_peak: u64,
}

/// Reads the memory pool candle allocates from on one CUDA device.
pub struct PoolMeter {
    #[cfg(feature = "cuda")]
    inner: imp::Meter,
}

impl std::fmt::Debug for PoolMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolMeter")
    }
}

impl PoolMeter {
    /// The meter of `device`'s current pool; `None` off CUDA, or where the device
    /// allocates without a pool (then candle's buffers are not stream-ordered either).
    pub fn new(device: &Device) -> Option<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return imp::Meter::new(dev).map(|inner| Self { inner });
        }
        let _ = device;
        None
    }

    /// Waits for the device's queued work, then reads the counters (`None`, logged, where
    /// the driver refuses).
    pub fn read(&self) -> Option<DeviceMemory> {
        #[cfg(feature = "cuda")]
        return logged(self.inner.read());
        #[cfg(not(feature = "cuda"))]
        unreachable!("a PoolMeter exists only on CUDA")
    }

    /// Bytes of live allocations from the pool now ([`Self::read`]'s `pool_used`).
    pub fn in_use(&self) -> Option<u64> {
        self.read().map(|m| m.pool_used)
    }

    /// Waits for the device's queued work, then starts the high-water marks afresh from
    /// the figures now; `false` (logged) where the driver refuses.
    pub fn reset_high(&self) -> bool {
        #[cfg(feature = "cuda")]
        return logged(self.inner.reset_high()).is_some();
        #[cfg(not(feature = "cuda"))]
        unreachable!("a PoolMeter exists only on CUDA")
    }

    /// Runs `work` and returns its result with what it held at its peak (`None` where the
    /// counters could not be read; `work`'s own error is returned as it is).
    pub fn working_peak<T>(
        &self,
        work: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<PartMemory>)> {
        let before = if self.reset_high() {
            self.in_use()
        } else {
            None
        };
        let out = work()?;
        let part = before.and_then(|before| {
            self.read().map(|after| PartMemory {
                working: after.pool_used_high.saturating_sub(before),
                pool_peak: after.pool_reserved_high,
            })
        });
        Ok((out, part))
    }
}

/// Bytes the device's CUDA-graph memory holds now (the buffers of live graphs' allocation
/// nodes, kept reserved between replays); `None` off CUDA or where the driver refuses.
pub fn graph_memory_reserved(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return logged(imp::graph_memory_reserved(dev));
    }
    let _ = device;
    None
}

/// A counter's value, or `None` with the driver's refusal logged.
#[cfg(feature = "cuda")]
fn logged<T>(read: Result<T>) -> Option<T> {
    read.map_err(|e| tracing::warn!(error = %e, "device memory counter not read"))
        .ok()
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::result::{device, mem_pool};
    use candle_core::cuda_backend::cudarc::driver::sys::{
        self, CUgraphMem_attribute, CUmemPool_attribute,
    };
    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

    use super::DeviceMemory;

    pub fn graph_memory_reserved(dev: &CudaDevice) -> Result<u64> {
        let stream = dev.cuda_stream();
        stream.synchronize().w()?;
        let ctx = stream.context();
        ctx.bind_to_thread().w()?;
        let mut value = 0u64;
        // SAFETY: the attribute is a cuuint64_t, written into `value`, for a live device.
        unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                ctx.cu_device(),
                CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
                (&mut value as *mut u64).cast(),
            )
        }
        .result()
        .w()?;
        Ok(value)
    }

    pub struct Meter {
        pool: sys::CUmemoryPool,
        stream: Arc<CudaStream>,
    }

    // SAFETY: a pool handle is a plain driver handle, usable from any thread that binds
    // the context (every call below does).
    unsafe impl Send for Meter {}
    unsafe impl Sync for Meter {}

    impl Meter {
        pub fn new(dev: &CudaDevice) -> Option<Self> {
            let stream = dev.cuda_stream();
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                return None;
            }
            ctx.bind_to_thread().ok()?;
            // SAFETY: the device comes from a live context.
            let pool = unsafe { device::get_mem_pool(ctx.cu_device()) }.ok()?;
            Some(Self { pool, stream })
        }

        fn attribute(&self, attr: CUmemPool_attribute) -> Result<u64> {
            let mut value = 0u64;
            // SAFETY: these attributes are cuuint64_t, written into `value`.
            unsafe { mem_pool::get_attribute(self.pool, attr, (&mut value as *mut u64).cast()) }
                .w()?;
            Ok(value)
        }

        pub fn read(&self) -> Result<DeviceMemory> {
            self.stream.synchronize().w()?;
            let ctx = self.stream.context();
            ctx.bind_to_thread().w()?;
            let (free, total) = ctx.mem_get_info().w()?;
            Ok(DeviceMemory {
                pool_used: self.attribute(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                pool_used_high: self
                    .attribute(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                pool_reserved: self
                    .attribute(CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
                pool_reserved_high: self
                    .attribute(CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                device_used: (total - free) as u64,
            })
        }

        pub fn reset_high(&self) -> Result<()> {
            self.stream.synchronize().w()?;
            self.stream.context().bind_to_thread().w()?;
            for attr in [
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero = 0u64;
                // SAFETY: setting a high-water mark takes a cuuint64_t 0 (the only value
                // the driver accepts: it restarts the mark from the current figure).
                unsafe { mem_pool::set_attribute(self.pool, attr, (&mut zero as *mut u64).cast()) }
                    .w()?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_is_no_meter_off_cuda() {
        assert!(PoolMeter::new(&Device::Cpu).is_none());
        assert_eq!(graph_memory_reserved(&Device::Cpu), None);
    }

    #[test]
    fn memory_outside_the_pool_is_the_device_use_less_the_pool() {
        let m = DeviceMemory {
            pool_used: 5,
            pool_used_high: 9,
            pool_reserved: 8,
            pool_reserved_high: 8,
            device_used: 20,
        };
        assert_eq!(m.outside_pool(), 12);
        // Another process freeing memory between the two reads never underflows.
        let odd = DeviceMemory {
            device_used: 4,
            ..m
        };
        assert_eq!(odd.outside_pool(), 0);
    }
}
