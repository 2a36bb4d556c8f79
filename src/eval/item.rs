//! One evaluation item: an id, where its source image comes from, the instruction and its
//! task type. Every dataset layout ([`super::dataset`], [`super::parquet`]) produces these.

use std::path::PathBuf;

use crate::edit::{load_image, load_image_bytes, resize_to_panel, EditContext, ImageLimits};
use crate::error::EditError;
use crate::fsio::fingerprint::Fingerprint;
use crate::models::testbed;

/// Where an item's source image comes from.
#[derive(Debug, Clone)]
pub enum ItemSource {
    /// An image file.
    File(PathBuf),
    /// Encoded image bytes (from a parquet cell); `origin` names it in errors.
    Bytes {
        /// Encoded PNG/JPEG/WebP.
        bytes: Vec<u8>,
        /// `file.parquet row N`.
        origin: String,
    },
    /// A testbed scene seed.
    Testbed(u64),
}

/// One evaluation item.
#[derive(Debug, Clone)]
pub struct EvalItem {
    /// Unique id.
    pub id: String,
    /// The source image.
    pub source: ItemSource,
    /// The instruction.
    pub instruction: String,
    /// Task type (for the per-task breakdown).
    pub task: Option<String>,
    /// Instruction language, when the dataset has one.
    pub language: Option<String>,
}

impl EvalItem {
    /// Adds what the models are shown of this item (its source image's content and its
    /// instruction) to `f`; the id, task and language are names, not content.
    pub fn fingerprint_into(&self, f: &mut Fingerprint) {
        match &self.source {
            ItemSource::File(path) => f.file("source", path),
            ItemSource::Bytes { bytes, .. } => f.bytes("source", bytes),
            ItemSource::Testbed(seed) => f.text("source testbed scene", &seed.to_string()),
        };
        f.text("instruction", &self.instruction);
    }

    /// The fingerprint of what the models are shown of this item (see
    /// [`Self::fingerprint_into`]).
    pub fn fingerprint(&self) -> String {
        let mut f = Fingerprint::new("item");
        self.fingerprint_into(&mut f);
        f.finish()
    }

    /// The item as an edit, resized to `width` (the image as loaded kept beside the panel,
    /// for a refine).
    pub fn to_edit(&self, width: u32) -> Result<EditContext, EditError> {
        let image = match &self.source {
            ItemSource::Testbed(seed) => return Ok(testbed::make_edit(*seed, width)),
            ItemSource::File(path) => load_image(path, ImageLimits::default())?,
            ItemSource::Bytes { bytes, origin } => {
                load_image_bytes(bytes, origin, ImageLimits::default())?
            }
        };
        let panel = resize_to_panel(&image, width)?;
        let mut edit = EditContext::new(self.id.clone(), panel, self.instruction.clone())
            .with_original(std::sync::Arc::new(image));
        if let Some(task) = &self.task {
            edit.meta.insert("task".into(), task.clone());
        }
        Ok(edit)
    }
}
