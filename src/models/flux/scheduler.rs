//! FLUX's scheduler settings: the dynamic shift `mu`, linear in the number of image tokens
//! (diffusers `FluxFillPipeline.calculate_shift`), with the line read from the checkpoint's
//! `scheduler/scheduler_config.json` (FLUX.1's values without one).

use serde::{Deserialize, Serialize};

/// The dynamic-shift line: `mu` goes from `base_shift` at `base_image_seq_len` tokens to
/// `max_shift` at `max_image_seq_len` tokens (field names as in `scheduler_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DynamicShift {
    /// Token count at which `mu = base_shift`.
    pub base_image_seq_len: f64,
    /// Token count at which `mu = max_shift`.
    pub max_image_seq_len: f64,
    /// `mu` at `base_image_seq_len`.
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len`.
    pub max_shift: f64,
}

impl DynamicShift {
    /// FLUX.1 [dev] and Fill [dev]: 256 -> 0.5, 4096 -> 1.15.
    pub const FLUX: Self = Self {
        base_image_seq_len: 256.0,
        max_image_seq_len: 4096.0,
        base_shift: 0.5,
        max_shift: 1.15,
    };

    /// The shift `mu` for an image of `image_tokens` packed tokens.
    pub fn mu(&self, image_tokens: usize) -> f64 {
        let m =
            (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len);
        let b = self.base_shift - m * self.base_image_seq_len;
        image_tokens as f64 * m + b
    }
}

/// `scheduler/scheduler_config.json` (diffusers' `FlowMatchEulerDiscreteScheduler`), read
/// field by field: the shift line is honoured, and a field that would change the schedule
/// in a way this code does not implement is refused. Missing fields take FLUX.1's values.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    base_image_seq_len: f64,
    max_image_seq_len: f64,
    base_shift: f64,
    max_shift: f64,
    use_dynamic_shifting: bool,
    num_train_timesteps: f64,
    shift_terminal: Option<f64>,
    invert_sigmas: bool,
    stochastic_sampling: bool,
    use_karras_sigmas: bool,
    use_exponential_sigmas: bool,
    use_beta_sigmas: bool,
    time_shift_type: String,
}

impl Default for SchedulerConfig {
    /// FLUX.1 [dev]'s and Fill [dev]'s file.
    fn default() -> Self {
        let line = DynamicShift::FLUX;
        Self {
            base_image_seq_len: line.base_image_seq_len,
            max_image_seq_len: line.max_image_seq_len,
            base_shift: line.base_shift,
            max_shift: line.max_shift,
            use_dynamic_shifting: true,
            num_train_timesteps: 1000.0,
            shift_terminal: None,
            invert_sigmas: false,
            stochastic_sampling: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".into(),
        }
    }
}

impl SchedulerConfig {
    /// The dynamic-shift line this config asks for, or why this code cannot run it (the
    /// field and its value).
    pub fn dynamic_shift(&self) -> Result<DynamicShift, String> {
        let unsupported = |field: &str, value: String| {
            Err(format!(
                "`{field}` = {value} is not supported (FluxFillPipeline's FLUX.1 schedule: dynamic exponential shifting of plain sigmas)"
            ))
        };
        if !self.use_dynamic_shifting {
            return unsupported("use_dynamic_shifting", "false".into());
        }
        if let Some(t) = self.shift_terminal {
            return unsupported("shift_terminal", t.to_string());
        }
        for (field, on) in [
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ] {
            if on {
                return unsupported(field, "true".into());
            }
        }
        if self.time_shift_type != "exponential" {
            return unsupported("time_shift_type", format!("{:?}", self.time_shift_type));
        }
        if self.num_train_timesteps != 1000.0 {
            return unsupported("num_train_timesteps", self.num_train_timesteps.to_string());
        }
        let line = DynamicShift {
            base_image_seq_len: self.base_image_seq_len,
            max_image_seq_len: self.max_image_seq_len,
            base_shift: self.base_shift,
            max_shift: self.max_shift,
        };
        let finite = [
            line.base_image_seq_len,
            line.max_image_seq_len,
            line.base_shift,
            line.max_shift,
        ]
        .iter()
        .all(|v| v.is_finite());
        if !finite || line.max_image_seq_len <= line.base_image_seq_len {
            return Err(format!(
                "`base_image_seq_len` {} and `max_image_seq_len` {} must be finite and increasing (with finite shifts)",
                line.base_image_seq_len, line.max_image_seq_len
            ));
        }
        Ok(line)
    }
}

impl Default for DynamicShift {
    fn default() -> Self {
        Self::FLUX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_s_shift_line_is_honoured_and_other_schedules_refused() {
        let read = |json: &str| {
            serde_json::from_str::<SchedulerConfig>(json)
                .unwrap()
                .dynamic_shift()
        };
        assert_eq!(read("{}").unwrap(), DynamicShift::FLUX);
        let shifted = read(r#"{"base_shift": 0.9, "max_shift": 3.0}"#).unwrap();
        assert!((shifted.mu(256) - 0.9).abs() < 1e-12 && (shifted.mu(4096) - 3.0).abs() < 1e-12);
        for (json, field) in [
            (r#"{"use_dynamic_shifting": false}"#, "use_dynamic_shifting"),
            (r#"{"shift_terminal": 0.2}"#, "shift_terminal"),
            (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
            (r#"{"time_shift_type": "linear"}"#, "time_shift_type"),
            (r#"{"max_image_seq_len": 100}"#, "max_image_seq_len"),
        ] {
            let e = read(json).unwrap_err();
            assert!(e.contains(field), "{json}: {e}");
        }
        // FLUX.1 Fill's own file (the fixture's copy of it) gives FLUX.1's line.
        let fixture = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/flux/tiny/scheduler/scheduler_config.json"
        ))
        .unwrap();
        assert_eq!(read(&fixture).unwrap(), DynamicShift::FLUX);
    }

    #[test]
    fn mu_for_a_512_square_source() {
        // 1024x512 diptych -> 128x64 latent -> 64x32 = 2048 packed tokens.
        let mu = DynamicShift::FLUX.mu(2048);
        assert!((mu - 0.80333).abs() < 1e-4, "{mu}");
        assert!((DynamicShift::FLUX.mu(256) - 0.5).abs() < 1e-12);
        assert!((DynamicShift::FLUX.mu(4096) - 1.15).abs() < 1e-12);
    }
}
