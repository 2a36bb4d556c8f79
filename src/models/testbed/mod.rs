//! The built-in testbed's world: a simulator that behaves like ICEdit where it matters for
//! test-time scaling, with ground truth.
//!
//! It is **a simulator, not an image editor**. Scenes are procedurally generated
//! ([`scene`]); each edit has a finite set of outcomes, the correct target and plausible
//! failures, with priors set by a difficulty knob ([`outcomes`]); [`mixture`] is the exact
//! rectified-flow velocity of that mixture in a FLUX-shaped latent space ([`latent`]).
//! The testbed generator samples it through the same sampler, schedule, x0 previews and
//! state resume as FLUX; which outcome a seed lands on is decided by its noise, and early
//! previews already lean towards it. The testbed judge knows the truth from [`outcomes`]
//! and can be made to err like a VLM. So strategies can be compared exactly, on any machine.

pub mod latent;
pub mod mixture;
pub mod outcomes;
pub mod scene;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::edit::EditContext;
pub use outcomes::{classify, outcome_set, Outcome, OutcomeLabel, SCENE_META_KEY};
pub use scene::SceneEdit;

/// A testbed edit from a scene seed: the rendered source panel (`width` wide, 3:4 aspect
/// rounded down to a multiple of 16), the instruction, and the scene in `meta`.
pub fn make_edit(scene_seed: u64, width: u32) -> EditContext {
    let scene_edit = SceneEdit::generate(scene_seed);
    let height = (width * 3 / 4) / 16 * 16;
    let source = scene_edit.scene.render(width, height);
    let mut edit = EditContext::new(
        format!("scene{scene_seed}"),
        source,
        scene_edit.instruction.clone(),
    );
    edit.meta.insert(
        SCENE_META_KEY.to_string(),
        serde_json::to_string(&scene_edit).expect("serialisable"),
    );
    edit
}

/// The edits a testbed generator has prepared, so the testbed judge can refuse any other:
/// it knows the truth of a generated scene (its scene travels in the edit's meta) and of a
/// photo only because the testbed generator simulates that photo's edit; an image from
/// another generator has no truth it could know. Shared between one generator and its
/// judges; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TestbedEdits(Arc<Mutex<HashSet<[u8; 32]>>>);

impl TestbedEdits {
    /// Records an edit the generator prepared.
    pub fn record(&self, edit: &EditContext) {
        self.0
            .lock()
            .expect("testbed edits")
            .insert(fingerprint(edit));
    }

    /// Whether the generator prepared `edit`.
    pub fn contains(&self, edit: &EditContext) -> bool {
        self.0
            .lock()
            .expect("testbed edits")
            .contains(&fingerprint(edit))
    }
}

/// Whether `edit` is a generated testbed scene (its truth travels with it).
pub fn is_scene(edit: &EditContext) -> bool {
    edit.meta.contains_key(SCENE_META_KEY)
}

fn fingerprint(edit: &EditContext) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [edit.id.as_bytes(), edit.instruction.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(edit.source.as_raw());
    h.finalize().into()
}
