//! How much memory a device has free right now: CUDA's own count (`cuMemGetInfo`) for a
//! GPU, the kernel's `MemAvailable` for the CPU.

use candle_core::Device;

/// Free bytes on `device` and where the figure came from, or `None` when it cannot be
/// read (then the plan is printed but nothing is refused).
pub fn free_bytes(device: &Device) -> Option<(usize, &'static str)> {
    match device {
        Device::Cpu => cpu_available().map(|b| (b, "available (MemAvailable)")),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let stream = dev.cuda_stream();
            let context = stream.context();
            context.bind_to_thread().ok()?;
            context
                .mem_get_info()
                .ok()
                .map(|(free, _total)| (free, "free on the GPU (cuMemGetInfo)"))
        }
        _ => None,
    }
}

/// `MemAvailable` from `/proc/meminfo` in bytes (Linux).
fn cpu_available() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&info)
}

fn parse_meminfo(info: &str) -> Option<usize> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_mem_available() {
        let info =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(super::parse_meminfo(info), Some(20_000_000 * 1024));
        assert_eq!(super::parse_meminfo("MemTotal: 1 kB\n"), None);
    }
}
