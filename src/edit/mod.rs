//! The edit task: what one instruction-based edit is, independent of any model.
//!
//! Loading and resizing the source image ([`image_io`]), the diptych and its mask
//! ([`diptych`]) and the ICEdit in-context prompt ([`prompt`]) live here, so that every
//! generator and judge sees the same prepared input.

pub mod diptych;
pub mod image_io;
pub mod prompt;
pub mod refine;

use std::collections::BTreeMap;
use std::sync::Arc;

use image::RgbImage;

pub use diptych::{
    crop_right_panel, make_diptych, panel_size, panel_width_error, resize_to_panel, Diptych,
    DEFAULT_PANEL_WIDTH, MAX_PANEL_SIDE,
};
pub use image_io::{check_decodes, load_image, load_image_bytes, ImageLimits};
pub use prompt::{icedit_prompt, PROMPT_PREFIX};

/// One edit as every backend sees it: the resized source panel and the instruction.
///
/// `meta` carries backend-neutral key/value facts about the item (e.g. a dataset's task
/// type, or the scene description of a testbed edit); backends that need nothing from it
/// ignore it.
#[derive(Debug, Clone)]
pub struct EditContext {
    /// Stable identifier (manifest id, or derived from the file name).
    pub id: String,
    /// The source image, already resized to the panel size (W x H, both multiples of 16).
    pub source: Arc<RgbImage>,
    /// The user's instruction, e.g. "make the sky night".
    pub instruction: String,
    /// Free-form facts about the item.
    pub meta: BTreeMap<String, String>,
    /// The source as loaded, before it was resized to the panel: a hi-res refine resizes
    /// it to its own size. `None` when only the panel is known (the refine upscales it).
    pub original: Option<Arc<RgbImage>>,
}

impl EditContext {
    /// Builds a context from an already-resized source panel.
    pub fn new(id: impl Into<String>, source: RgbImage, instruction: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            source: Arc::new(source),
            instruction: instruction.into(),
            meta: BTreeMap::new(),
            original: None,
        }
    }

    /// The same context, knowing the source as loaded before resizing.
    pub fn with_original(mut self, original: Arc<RgbImage>) -> Self {
        self.original = Some(original);
        self
    }

    /// The source at `size` (for a refine): the original resized when it is known (Lanczos),
    /// else the panel upscaled.
    pub fn source_at(&self, size: (u32, u32)) -> RgbImage {
        refine::upscale(self.original.as_deref().unwrap_or(&self.source), size)
    }

    /// The in-context prompt the generator is conditioned on.
    pub fn prompt(&self) -> String {
        icedit_prompt(&self.instruction)
    }

    /// Panel (width, height) in pixels.
    pub fn panel_size(&self) -> (u32, u32) {
        self.source.dimensions()
    }
}
