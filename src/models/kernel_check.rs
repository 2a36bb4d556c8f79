//! The device self-check of a fused kernel: its output against the unfused operations it
//! replaces on the same inputs, held to a bound relative to the output's size, and both
//! timed on CUDA when it passes. `bench flux` and `bench judge` run these before timing
//! anything, and a kernel that fails is turned off, never timed.

use candle_core::{DType, Device, Result, Tensor};
use serde::Serialize;

use super::bench::timed_after;

/// One fused computation against the unfused operations on the same inputs.
#[derive(Debug, Clone, Serialize)]
pub struct KernelCheckRow {
    /// What was checked (`attention (8 warps)`, `modulate`, `vision windows`, ...).
    pub name: String,
    /// The inputs' shape and dtype.
    pub shape: String,
    /// Largest |fused - unfused| (NaN when either side holds a NaN or an infinity).
    pub max_abs_diff: f32,
    /// Largest |unfused| (the scale the tolerance is relative to).
    pub max_abs_ref: f32,
    /// The bound: the relative tolerance times `max_abs_ref`.
    pub tolerance: f32,
    /// `max_abs_diff <= tolerance` (and finite).
    pub pass: bool,
    /// Milliseconds per call, fused (CUDA only, and only when it passed).
    pub fused_ms: Option<f64>,
    /// Milliseconds per call, unfused (CUDA only, and only when the fused one passed).
    pub unfused_ms: Option<f64>,
    /// Why the fused side did not run (a launch or library error): the row fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Relative tolerance of a fused kernel against the unfused operations in `dtype`: 4 to 8
/// units in the last place of the output's largest values. The unfused side rounds between
/// its passes (candle's RoPE even multiplies in bf16), the fused one once; a wrong index
/// or fragment gives errors of the values' own size.
pub fn tolerance_rel(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1.0 / 32.0,
        DType::F16 => 1.0 / 256.0,
        _ => 1e-4,
    }
}

/// Largest |a - b| (NaN when either holds a non-finite value) and largest |b|.
fn diff_and_scale(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let max = |t: &Tensor| -> Result<f32> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
    let diff = max_abs_diff(&a, &b)?;
    let finite = a.sum_all()?.to_scalar::<f32>()?.is_finite()
        && b.sum_all()?.to_scalar::<f32>()?.is_finite();
    Ok((if finite { diff } else { f32::NAN }, max(&b)?))
}

/// Largest |a - b| over every element, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()
}

/// `fused` against `unfused` on `dev`, passing within `rel` times the unfused output's
/// largest value; both timed on CUDA (1 warm-up + 5 calls) when it passes.
pub fn check(
    dev: &Device,
    name: &str,
    rel: f32,
    shape: String,
    fused: &dyn Fn() -> Result<Tensor>,
    unfused: &dyn Fn() -> Result<Tensor>,
) -> Result<KernelCheckRow> {
    compare(dev, name, rel, shape, &fused()?, fused, unfused)
}

/// [`check`] with the fused side's first output already computed.
fn compare(
    dev: &Device,
    name: &str,
    rel: f32,
    shape: String,
    fused_out: &Tensor,
    fused: &dyn Fn() -> Result<Tensor>,
    unfused: &dyn Fn() -> Result<Tensor>,
) -> Result<KernelCheckRow> {
    let (diff, scale) = diff_and_scale(fused_out, &unfused()?)?;
    let tolerance = rel * scale;
    let pass = diff <= tolerance;
    let (fused_ms, unfused_ms) = if dev.is_cuda() && pass {
        (
            Some(timed_after(dev, 1, 5, fused)? * 1e3),
            Some(timed_after(dev, 1, 5, unfused)? * 1e3),
        )
    } else {
        (None, None)
    };
    tracing::info!(
        name,
        diff,
        tolerance,
        pass,
        ?fused_ms,
        ?unfused_ms,
        "kernel check"
    );
    Ok(KernelCheckRow {
        name: name.into(),
        shape,
        max_abs_diff: diff,
        max_abs_ref: scale,
        tolerance,
        pass,
        fused_ms,
        unfused_ms,
        error: None,
    })
}

/// [`check`], with an error of the fused side (a cuBLASLt status, a launch failure)
/// recorded as a failing row instead of ending the run.
pub fn check_or_error(
    dev: &Device,
    name: &str,
    rel: f32,
    shape: String,
    fused: &dyn Fn() -> Result<Tensor>,
    unfused: &dyn Fn() -> Result<Tensor>,
) -> Result<KernelCheckRow> {
    match fused() {
        Ok(out) => compare(dev, name, rel, shape, &out, fused, unfused),
        Err(e) => {
            tracing::warn!(name, error = %e, "kernel check: the fused side failed");
            Ok(KernelCheckRow {
                name: name.into(),
                shape,
                max_abs_diff: f32::NAN,
                max_abs_ref: f32::NAN,
                tolerance: f32::NAN,
                pass: false,
                fused_ms: None,
                unfused_ms: None,
                error: Some(e.to_string()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_passes_within_its_bound_and_fails_beyond_or_on_a_nan() -> Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::new(&[1f32, -4.0, 2.0], &dev)?;
        let near = Tensor::new(&[1.01f32, -4.0, 2.0], &dev)?;
        let far = Tensor::new(&[1.5f32, -4.0, 2.0], &dev)?;
        let nan = Tensor::new(&[f32::NAN, -4.0, 2.0], &dev)?;
        let row = |t: &Tensor| {
            check(&dev, "x", 0.01, "[3]".into(), &|| Ok(t.clone()), &|| {
                Ok(base.clone())
            })
        };
        let r = row(&near)?;
        assert!(r.pass && (r.tolerance - 0.04).abs() < 1e-7, "{r:?}");
        assert!(r.fused_ms.is_none(), "timed only on CUDA");
        assert!(!row(&far)?.pass);
        let r = row(&nan)?;
        assert!(!r.pass && r.max_abs_diff.is_nan());
        let r = check_or_error(
            &dev,
            "x",
            0.01,
            "[3]".into(),
            &|| candle_core::bail!("no algorithm"),
            &|| Ok(base.clone()),
        )?;
        assert!(
            !r.pass
                && r.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("no algorithm")),
            "{r:?}"
        );
        Ok(())
    }
}
