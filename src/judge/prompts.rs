//! Prompt templates for VLM judges: text files with `{instruction}`, `{step}`, `{steps}`
//! placeholders. The defaults in `prompts/` are embedded in the binary; a preset's
//! `prompts_dir` overrides any of them at run time.

use std::path::Path;

use super::JudgeError;

/// The four prompts a judge uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSet {
    /// Preview screening (images: source, preview).
    pub screen: String,
    /// Pairwise comparison (images: first, second, source).
    pub compare: String,
    /// VIE semantic consistency (images: source, edited).
    pub vie_sc: String,
    /// VIE perceptual quality (images: edited).
    pub vie_pq: String,
}

impl Default for PromptSet {
    fn default() -> Self {
        Self {
            screen: include_str!("../../prompts/screen.txt").to_string(),
            compare: include_str!("../../prompts/compare.txt").to_string(),
            vie_sc: include_str!("../../prompts/vie_sc.txt").to_string(),
            vie_pq: include_str!("../../prompts/vie_pq.txt").to_string(),
        }
    }
}

impl PromptSet {
    /// The defaults, with any of `screen.txt`, `compare.txt`, `vie_sc.txt`, `vie_pq.txt`
    /// found in `dir` replacing its default.
    pub fn load(dir: Option<&Path>) -> Result<Self, JudgeError> {
        let mut set = Self::default();
        let Some(dir) = dir else {
            return Ok(set);
        };
        if !dir.is_dir() {
            return Err(JudgeError::Config(format!(
                "prompts_dir {} is not a folder",
                dir.display()
            )));
        }
        for (name, slot) in [
            ("screen.txt", &mut set.screen),
            ("compare.txt", &mut set.compare),
            ("vie_sc.txt", &mut set.vie_sc),
            ("vie_pq.txt", &mut set.vie_pq),
        ] {
            let path = dir.join(name);
            if path.exists() {
                *slot = std::fs::read_to_string(&path).map_err(|e| {
                    JudgeError::Config(format!("cannot read prompt {}: {e}", path.display()))
                })?;
            }
        }
        Ok(set)
    }
}

impl PromptSet {
    /// The screening prompt for a preview taken at `stage`.
    pub fn screen_for(&self, instruction: &str, stage: super::PreviewStage) -> String {
        let (step, steps) = (stage.step.to_string(), stage.steps.to_string());
        render(
            &self.screen,
            &[
                ("instruction", instruction),
                ("step", &step),
                ("steps", &steps),
            ],
        )
    }

    /// The pairwise comparison prompt.
    pub fn compare_for(&self, instruction: &str) -> String {
        render(&self.compare, &[("instruction", instruction)])
    }

    /// The VIE semantic-consistency prompt.
    pub fn vie_sc_for(&self, instruction: &str) -> String {
        render(&self.vie_sc, &[("instruction", instruction)])
    }
}

/// Fills `{key}` placeholders.
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (key, value) in values {
        out = out.replace(&format!("{{{key}}}"), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_have_their_placeholders_and_dirs_override() {
        let set = PromptSet::default();
        assert!(set.screen.contains("{instruction}") && set.screen.contains("{step}"));
        assert!(set.vie_sc.contains("{instruction}"));
        let filled = render(&set.vie_sc, &[("instruction", "make it red")]);
        assert!(filled.contains("\"make it red\"") && !filled.contains("{instruction}"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vie_pq.txt"), "custom").unwrap();
        let loaded = PromptSet::load(Some(dir.path())).unwrap();
        assert_eq!(loaded.vie_pq, "custom");
        assert_eq!(loaded.screen, set.screen);
        assert!(PromptSet::load(Some(&dir.path().join("none"))).is_err());
    }
}
