//! The plan's parts beside what `bench flux` measured of them on a CUDA device
//! ([`crate::models::cuda::memory`]): transformer weights per format, one forward's working
//! memory per batch, the VAE's weights and passes, and what lies outside candle's pool
//! against the plan's fixed overhead. One acceptance run then says which of the plan's
//! constants is off and by how much, part by part, instead of only whether the peak is.

use crate::models::flux::bench::{FluxBench, FluxBenchResult};

use super::footprint::{
    transformer_activation_bytes, transformer_weight_bytes, vae_activation_bytes, vae_parameters,
};
use super::overhead_bytes;

/// One part: what was measured and what the plan says, bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasuredPart {
    /// The part, as the plan's table names it.
    pub name: String,
    /// Measured on the device.
    pub measured: u64,
    /// The plan's figure for it.
    pub planned: u64,
    /// Bytes candle's pool held from the device at the part's peak (all that was resident
    /// then), where the part ran rather than sat.
    pub pool_peak: Option<u64>,
}

/// The parts `result` measured (none off CUDA), each beside the plan's figure for the
/// configuration `bench` ran.
pub fn measured_parts(bench: &FluxBench, result: &FluxBenchResult) -> Vec<MeasuredPart> {
    let (c, v, dtype) = (&bench.transformer, &bench.vae, bench.dtype);
    let mut parts = Vec::new();
    let mut part = |name: String, measured: u64, planned: usize, pool_peak: Option<u64>| {
        parts.push(MeasuredPart {
            name,
            measured,
            planned: planned as u64,
            pool_peak,
        })
    };
    for (format, timing) in bench.formats.iter().zip(&result.formats) {
        if let Some(bytes) = timing.weights_device_bytes {
            part(
                format!("transformer weights ({})", timing.format),
                bytes,
                transformer_weight_bytes(c, *format, dtype),
                None,
            );
        }
        for step in &timing.steps {
            if let Some(memory) = step.device_memory {
                let planned = transformer_activation_bytes(
                    c,
                    *format,
                    dtype,
                    step.batch,
                    result.image_tokens,
                    bench.t5_tokens,
                    true,
                );
                part(
                    format!(
                        "transformer forward (batch {}, {})",
                        step.batch, timing.format
                    ),
                    memory.working,
                    planned,
                    Some(memory.pool_peak),
                );
            }
        }
    }
    if let Some(vae) = &result.vae_device_memory {
        let pixels = 2 * bench.panel.0 * bench.panel.1;
        let pass = vae_activation_bytes(v, dtype, pixels, true);
        part(
            "VAE weights".into(),
            vae.weights,
            vae_parameters(v) * dtype.size_in_bytes(),
            None,
        );
        let encode = vae.encode;
        part(
            "VAE encode pass".into(),
            encode.working,
            pass,
            Some(encode.pool_peak),
        );
        let decode = vae.decode;
        part(
            "VAE decode pass".into(),
            decode.working,
            pass,
            Some(decode.pool_peak),
        );
        part(
            "outside the pool (context, kernels, cuBLAS) vs the plan's overhead".into(),
            vae.outside_pool,
            overhead_bytes(true),
            None,
        );
    }
    parts
}

/// [`measured_parts`] as a markdown table (empty when nothing was measured).
pub fn markdown(bench: &FluxBench, result: &FluxBenchResult) -> String {
    let parts = measured_parts(bench, result);
    if parts.is_empty() {
        return String::new();
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut md = String::from(
        "\nDevice memory by part (candle's CUDA pool: a part's bytes in use at its peak above those resident before it) beside the memory plan's figure for the same configuration; the last column is all the pool held from the device at that peak (add what lies outside the pool for what `nvidia-smi` saw then):\n\n| part | measured (MiB) | plan (MiB) | measured / plan | pool held at its peak (MiB) |\n|---|---|---|---|---|\n",
    );
    for p in &parts {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {} |\n",
            p.name,
            mib(p.measured),
            mib(p.planned),
            p.measured as f64 / p.planned.max(1) as f64,
            p.pool_peak.map_or("-".into(), |b| format!("{:.0}", mib(b)))
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::cuda::memory::PartMemory;
    use crate::models::flux::bench::{run, small_configs, VaeDeviceMemory};
    use crate::plan::footprint::WeightFormat;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device};

    const MIB: u64 = 1 << 20;

    #[test]
    fn each_measured_part_stands_beside_the_plans_figure_for_it() {
        let (transformer, vae) = small_configs();
        let q8 = WeightFormat::Quantized(GgmlDType::Q8_0);
        let bench = FluxBench {
            transformer,
            vae,
            panel: (64, 64),
            batches: vec![1, 2],
            t5_tokens: 16,
            steps: 4,
            warmup: 0,
            tiny: false,
            iters: 1,
            dtype: DType::F32,
            device: Device::Cpu,
            formats: vec![WeightFormat::Dense, q8],
            cache: None,
            graph: false,
        };
        let mut result = run(&bench).unwrap();
        // Off CUDA there is no pool to read: no parts, no table.
        assert!(measured_parts(&bench, &result).is_empty());
        assert_eq!(markdown(&bench, &result), "");

        // The figures a CUDA run fills in.
        for f in &mut result.formats {
            f.weights_device_bytes = Some(100 * MIB);
            for s in &mut f.steps {
                s.device_memory = Some(PartMemory {
                    working: 10 * MIB * s.batch as u64,
                    pool_peak: 500 * MIB,
                });
            }
        }
        result.vae_device_memory = Some(VaeDeviceMemory {
            weights: 7 * MIB,
            encode: PartMemory {
                working: 3 * MIB,
                pool_peak: 90 * MIB,
            },
            decode: PartMemory {
                working: 4 * MIB,
                pool_peak: 110 * MIB,
            },
            outside_pool: 1200 * MIB,
        });
        let parts = measured_parts(&bench, &result);
        let names: Vec<_> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "transformer weights (dense)",
                "transformer forward (batch 1, dense)",
                "transformer forward (batch 2, dense)",
                "transformer weights (q8_0)",
                "transformer forward (batch 1, q8_0)",
                "transformer forward (batch 2, q8_0)",
                "VAE weights",
                "VAE encode pass",
                "VAE decode pass",
                "outside the pool (context, kernels, cuBLAS) vs the plan's overhead",
            ]
        );
        let (c, v) = (&bench.transformer, &bench.vae);
        let planned = |i: usize| parts[i].planned as usize;
        assert_eq!(
            planned(0),
            transformer_weight_bytes(c, WeightFormat::Dense, DType::F32)
        );
        assert_eq!(planned(3), transformer_weight_bytes(c, q8, DType::F32));
        // Forwards are planned as on CUDA, at the bench's token counts.
        let forward = |format, batch| {
            transformer_activation_bytes(
                c,
                format,
                DType::F32,
                batch,
                result.image_tokens,
                16,
                true,
            )
        };
        assert_eq!(planned(2), forward(WeightFormat::Dense, 2));
        assert_eq!(planned(5), forward(q8, 2));
        assert_eq!(planned(6), vae_parameters(v) * 4);
        assert_eq!(
            planned(8),
            vae_activation_bytes(v, DType::F32, 2 * 64 * 64, true)
        );
        assert_eq!(planned(9), overhead_bytes(true));
        assert_eq!(parts[2].measured, 20 * MIB);
        assert_eq!(parts[8].pool_peak, Some(110 * MIB));
        assert_eq!(parts[0].pool_peak, None);

        let md = markdown(&bench, &result);
        // 1200 MiB outside the pool against the plan's 600 MiB.
        assert!(
            md.contains("| outside the pool (context, kernels, cuBLAS) vs the plan's overhead | 1200 | 600 | 2.00 | - |"),
            "{md}"
        );
        assert!(md.contains("| VAE decode pass | 4 |"), "{md}");
    }
}
