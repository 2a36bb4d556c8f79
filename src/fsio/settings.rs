//! `settings.json` beside a resumable run's stored results: what they were made with, so a
//! rerun under other settings is refused instead of reusing them under the new settings'
//! name (a batch's width or strategy, a judge-eval's judge).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::EditError;

/// The file, under the run's output folder.
pub const SETTINGS_FILE: &str = "settings.json";

/// Checks `current` (an object of named settings) against those stored in `out`, refusing
/// with every setting that differs named (a setting the stored file lacks is not checked:
/// it was added after that run); with `record`, writes `current` for the next run.
pub fn check_settings(
    out: &Path,
    current: &Map<String, Value>,
    record: bool,
) -> Result<(), EditError> {
    let path = out.join(SETTINGS_FILE);
    if path.is_file() {
        let stored: Map<String, Value> =
            super::read_json(&path).map_err(|e| EditError::Invalid(e.to_string()))?;
        let changed: Vec<String> = current
            .iter()
            .filter_map(|(key, now)| {
                let then = stored.get(key)?;
                (then != now).then(|| format!("`{key}` {then} there, {now} now"))
            })
            .collect();
        if !changed.is_empty() {
            return Err(EditError::Invalid(format!(
                "{}: its results were made with other settings ({}); give a new --out, or the same settings",
                out.display(),
                changed.join("; ")
            )));
        }
    }
    if record {
        let json = serde_json::to_vec_pretty(current).expect("JSON values serialise");
        super::write_atomic(&path, &json).map_err(|e| EditError::Invalid(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_changed_setting_is_refused_by_name_and_a_new_one_is_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let first = settings(json!({"width": 256, "judge": "testbed (seed 0)"}));
        check_settings(dir.path(), &first, true).unwrap();
        check_settings(dir.path(), &first, true).unwrap();
        let err = check_settings(
            dir.path(),
            &settings(json!({"width": 512, "judge": "testbed (seed 0)"})),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`width` 256 there, 512 now"), "{err}");
        // Not recorded by the refused run; a setting the stored file lacks is taken.
        let more = settings(json!({"width": 256, "judge": "testbed (seed 0)", "budget": 80}));
        check_settings(dir.path(), &more, false).unwrap();
        assert!(!std::fs::read_to_string(dir.path().join(SETTINGS_FILE))
            .unwrap()
            .contains("budget"));
    }
}
