//! The settings a resumable run's stored results were made with, kept beside them, so a
//! rerun under other settings is refused instead of reusing them under the new settings'
//! name: `settings.json` (a batch's width or strategy, a judge-eval's judge) and eval's
//! `arms.json` (each arm's settings, through [`changed_settings`] and [`record_settings`]).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::EditError;

/// The file, under the run's output folder.
pub const SETTINGS_FILE: &str = "settings.json";

/// The settings of `current` whose value stored in `path` differs, each with the stored
/// value (a setting not stored yet is new, not changed: it was added after that run; no
/// file: nothing stored).
pub fn changed_settings(
    path: &Path,
    current: &Map<String, Value>,
) -> Result<Vec<(String, Value)>, EditError> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let stored: Map<String, Value> =
        super::read_json(path).map_err(|e| EditError::Invalid(e.to_string()))?;
    Ok(current
        .iter()
        .filter_map(|(key, now)| {
            let then = stored.get(key)?;
            (then != now).then(|| (key.clone(), then.clone()))
        })
        .collect())
}

/// Stores `current` in `path` over what is there (a setting stored before and absent from
/// `current` stays), atomically.
pub fn record_settings(path: &Path, current: &Map<String, Value>) -> Result<(), EditError> {
    let mut stored: Map<String, Value> = if path.is_file() {
        super::read_json(path).map_err(|e| EditError::Invalid(e.to_string()))?
    } else {
        Map::new()
    };
    stored.extend(current.clone());
    let json = serde_json::to_vec_pretty(&stored).expect("JSON values serialise");
    super::write_atomic(path, &json).map_err(|e| EditError::Invalid(e.to_string()))
}

/// Checks `current` (an object of named settings) against those stored in `out`'s
/// [`SETTINGS_FILE`], refusing with every setting that differs named (see
/// [`changed_settings`]); with `record`, stores `current` for the next run.
pub fn check_settings(
    out: &Path,
    current: &Map<String, Value>,
    record: bool,
) -> Result<(), EditError> {
    let path = out.join(SETTINGS_FILE);
    let changed = changed_settings(&path, current)?;
    if !changed.is_empty() {
        let named: Vec<String> = changed
            .iter()
            .map(|(key, then)| format!("`{key}` {then} there, {} now", current[key]))
            .collect();
        return Err(EditError::Invalid(format!(
            "{}: its results were made with other settings ({}); give a new --out, or the same settings",
            out.display(),
            named.join("; ")
        )));
    }
    if record {
        record_settings(&path, current)?;
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
