//! The ICEdit in-context prompt.

/// The fixed part of the prompt, byte for byte as the ICEdit LoRA was trained.
pub const PROMPT_PREFIX: &str = "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the same as on the left but ";

/// Builds the diptych prompt for an instruction.
///
/// The instruction is inserted as ICEdit's released code does: surrounding whitespace is
/// trimmed, nothing else changes, and no trailing period is added.
pub fn icedit_prompt(instruction: &str) -> String {
    format!("{PROMPT_PREFIX}{}", instruction.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_byte_exact() {
        assert_eq!(
            icedit_prompt("make the sky night"),
            "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the same as on the left but make the sky night"
        );
    }

    #[test]
    fn trims_but_keeps_the_instruction_verbatim() {
        assert!(icedit_prompt("  Make it red \n").ends_with("but Make it red"));
        assert!(!icedit_prompt("add a hat").ends_with('.'));
    }
}
