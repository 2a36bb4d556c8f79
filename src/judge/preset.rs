//! Field checks every judge preset shares: a value outside its bound is refused when the
//! preset is read, with the file, the field, the value, the bound and why, instead of
//! surfacing later as every call failing (a zero timeout) or a run that never starts (zero
//! concurrency).

use std::fmt::Display;
use std::path::Path;

use super::JudgeError;

/// The most judge calls one engine keeps in flight: beyond it a remote endpoint answers
/// 429s and a local judge only queues.
pub const MAX_CONCURRENCY: usize = 256;

/// A preset file read as far as its `kind` key, which picks the struct the rest is read
/// into ([`Self::body`]). Read in two steps rather than as an internally tagged enum: serde
/// buffers such an enum's fields, and a bad value's message then names neither its key nor
/// its line.
pub struct TaggedPreset {
    path: std::path::PathBuf,
    text: String,
    kind: String,
}

impl TaggedPreset {
    /// Reads the TOML preset at `path` and its `kind`, naming the file when it cannot be
    /// read or parsed, or has no `kind` among `kinds`. Each read is logged (target
    /// `icedit_scale::preset`, debug), so a run can be seen to read each preset once.
    pub fn read(path: &Path, kinds: &[&str]) -> Result<Self, JudgeError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            JudgeError::Config(format!("cannot read judge preset {}: {e}", path.display()))
        })?;
        tracing::debug!(target: "icedit_scale::preset", path = %path.display(), "read judge preset");
        let fail =
            |what: String| JudgeError::Config(format!("judge preset {}: {what}", path.display()));
        let table = toml::de::DeTable::parse(&text).map_err(|e| fail(e.to_string()))?;
        let expected = kinds.join(", ");
        let kind = match table.get_ref().get("kind").map(|v| v.get_ref()) {
            None => return Err(fail(format!("no `kind` (one of {expected})"))),
            Some(value) => match value.as_str() {
                Some(kind) if kinds.contains(&kind) => kind.to_string(),
                _ => {
                    return Err(fail(format!(
                        "`kind` = {}: expected one of {expected}",
                        toml_text(value)
                    )))
                }
            },
        };
        Ok(Self {
            path: path.to_path_buf(),
            text,
            kind,
        })
    }

    /// The `kind` key's value.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The file's keys other than `kind`, read into `T`; serde's message names the key and
    /// shows the line of a bad value.
    pub fn body<T: serde::de::DeserializeOwned>(&self) -> Result<T, JudgeError> {
        let fail = |e: toml::de::Error| {
            JudgeError::Config(format!("judge preset {}: {e}", self.path.display()))
        };
        let mut table = toml::de::DeTable::parse(&self.text).map_err(fail)?;
        table.get_mut().remove("kind");
        T::deserialize(toml::de::Deserializer::from(table)).map_err(|mut e| {
            e.set_input(Some(&self.text));
            fail(e)
        })
    }
}

/// A parsed TOML value as a message quotes it.
fn toml_text(value: &toml::de::DeValue<'_>) -> String {
    match value.as_str() {
        Some(text) => format!("{text:?}"),
        None => {
            let kind = value.type_str();
            let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("{article} {kind}")
        }
    }
}

/// Checks preset fields of one file.
pub struct FieldCheck<'a> {
    path: &'a Path,
}

impl<'a> FieldCheck<'a> {
    /// Checks for the preset at `path`.
    pub fn new(path: &'a Path) -> Self {
        Self { path }
    }

    /// `value` must lie in `lo..=hi` (and be a number, for floats); `why` says where the
    /// bound comes from.
    pub fn within<T: PartialOrd + Display + Copy>(
        &self,
        field: &str,
        value: T,
        lo: T,
        hi: T,
        why: &str,
    ) -> Result<(), JudgeError> {
        // `!(lo <= v && v <= hi)` also refuses NaN.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(lo <= value && value <= hi) {
            return Err(self.refuse(
                field,
                value,
                &format!("must be between {lo} and {hi} ({why})"),
            ));
        }
        Ok(())
    }

    /// The same for an optional field.
    pub fn within_opt<T: PartialOrd + Display + Copy>(
        &self,
        field: &str,
        value: Option<T>,
        lo: T,
        hi: T,
        why: &str,
    ) -> Result<(), JudgeError> {
        match value {
            Some(v) => self.within(field, v, lo, hi, why),
            None => Ok(()),
        }
    }

    /// An optional float with no bound of its own must still be a number (TOML writes
    /// `nan` and `inf`).
    pub fn finite_opt(&self, field: &str, value: Option<f32>) -> Result<(), JudgeError> {
        match value {
            Some(v) if !v.is_finite() => Err(self.refuse(field, v, "must be a finite number")),
            _ => Ok(()),
        }
    }

    /// The error for `field = value`.
    pub fn refuse(&self, field: &str, value: impl Display, what: &str) -> JudgeError {
        JudgeError::Config(format!(
            "judge preset {}: `{field}` = {value} {what}",
            self.path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_outside_its_bound_names_file_field_value_and_bound() {
        let check = FieldCheck::new(Path::new("judges/x.toml"));
        let err = check
            .within("timeout_s", 0.0, 0.1, 3600.0, "seconds per attempt")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "judge config: judge preset judges/x.toml: `timeout_s` = 0 must be between 0.1 and 3600 (seconds per attempt)"
        );
        assert!(check.within("t", f64::NAN, 0.0, 1.0, "x").is_err());
        assert!(check
            .within("t", f64::INFINITY, 0.0, f64::MAX, "x")
            .is_err());
        let err = check.finite_opt("pass_reward", Some(f32::NAN)).unwrap_err();
        assert!(
            err.to_string()
                .contains("`pass_reward` = NaN must be a finite number"),
            "{err}"
        );
        check.finite_opt("pass_reward", Some(-2.5)).unwrap();
        assert!(check.within("n", 4usize, 1, 8, "x").is_ok());
    }
}
