//! `TestbedGenerator`: the testbed's mixture flow ([`crate::models::testbed::mixture`]) as a
//! [`Generator`], sampled on FLUX's schedule so strategies see what they would with FLUX.

use candle_core::Tensor;
use image::RgbImage;

use crate::edit::{make_diptych, EditContext};
use crate::error::GenerateError;
use crate::generate::{DecodePurpose, Generator, GeneratorInfo, PreparedEdit, PreparedSet};
use crate::models::flux::scheduler::DynamicShift;
use crate::models::testbed::latent::LatentMap;
use crate::models::testbed::mixture::Mixture;
use crate::models::testbed::TestbedEdits;

/// Options of the testbed generator.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct TestbedConfig {
    /// 0 = the correct outcome dominates, 1 = failures dominate.
    pub difficulty: f32,
    /// Outcome contrast in (0, 1]: 1 = outcome latents as their images give them, whose
    /// early previews name the final outcome almost always; lower values decide the
    /// outcome later (see [`crate::models::testbed::mixture`] and [`PreviewReliability`]).
    #[serde(default = "full_contrast")]
    pub contrast: f32,
    /// Candidates per velocity call.
    pub max_batch: usize,
}

impl Default for TestbedConfig {
    fn default() -> Self {
        Self {
            difficulty: 0.5,
            contrast: 1.0,
            max_batch: 8,
        }
    }
}

fn full_contrast() -> f32 {
    1.0
}

/// Named outcome contrasts, by how often a step-4 x0 preview names the final outcome (measured
/// by `study` at difficulty 0.5, N = 8, 50 steps, 512 px; docs/testbed.md quotes the runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewReliability {
    /// Full contrast: previews as reliable as the testbed has always had.
    Sharp,
    /// Previews misname the final outcome for about one candidate in five.
    Soft,
    /// Previews name the final outcome for only about 60% of candidates.
    Loose,
}

impl PreviewReliability {
    /// The preset names, most reliable first.
    pub const NAMES: [&'static str; 3] = ["sharp", "soft", "loose"];

    /// The preset named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sharp" => Some(Self::Sharp),
            "soft" => Some(Self::Soft),
            "loose" => Some(Self::Loose),
            _ => None,
        }
    }

    /// A contrast as a user writes it: a preset name or a number in (0, 1].
    pub fn parse_contrast(text: &str) -> Result<f32, String> {
        if let Some(preset) = Self::from_name(text) {
            return Ok(preset.contrast());
        }
        let names = Self::NAMES.join(", ");
        match text.trim().parse::<f32>() {
            Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
            Ok(0.0) => Err(format!(
                "0 is not above 0 (0 would merge all outcomes); give a number in (0, 1] or a preset: {names}"
            )),
            _ => Err(format!(
                "`{text}` is neither a number in (0, 1] (1 = outcome latents as their images give them) nor a preset: {names}"
            )),
        }
    }

    /// The outcome contrast it stands for.
    pub fn contrast(self) -> f32 {
        match self {
            Self::Sharp => 1.0,
            Self::Soft => 0.5,
            Self::Loose => 0.2,
        }
    }
}

/// The built-in simulator generator.
pub struct TestbedGenerator {
    config: TestbedConfig,
    map: LatentMap,
    edits: PreparedSet<PreparedScene>,
    seen: TestbedEdits,
}

/// A prepared testbed edit: its mixture flow and the source panel.
struct PreparedScene {
    mixture: Mixture,
    source: std::sync::Arc<RgbImage>,
}

impl TestbedGenerator {
    /// A generator with `config`.
    pub fn new(config: TestbedConfig) -> Self {
        Self::with_edits(config, TestbedEdits::default())
    }

    /// A generator that records each edit it prepares in `seen` (shared with the testbed
    /// judges that may score them).
    pub fn with_edits(config: TestbedConfig, seen: TestbedEdits) -> Self {
        Self {
            config,
            map: LatentMap::default(),
            edits: PreparedSet::default(),
            seen,
        }
    }

    /// The edits this generator has prepared.
    pub fn edits(&self) -> TestbedEdits {
        self.seen.clone()
    }
}

impl Generator for TestbedGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            name: "testbed".into(),
            detail: format!(
                "simulator: exact mixture flow over outcomes, difficulty {}, outcome contrast {}",
                self.config.difficulty, self.config.contrast
            ),
            max_batch: self.config.max_batch,
            settings: serde_json::json!({
                "difficulty": self.config.difficulty,
                "contrast": self.config.contrast,
            }),
        }
    }

    fn prepare(&mut self, edit: &EditContext) -> Result<PreparedEdit, GenerateError> {
        let mixture = Mixture::new(
            edit,
            self.config.difficulty,
            self.config.contrast,
            &self.map,
        )?;
        self.seen.record(edit);
        let latent_shape = mixture.latent_shape();
        let image_tokens = latent_shape[0];
        let key = self.edits.insert(PreparedScene {
            mixture,
            source: edit.source.clone(),
        });
        Ok(PreparedEdit {
            key,
            image_tokens,
            latent_shape,
            // The simulator stands in for FLUX, so it samples on FLUX's schedule.
            mu: DynamicShift::FLUX.mu(image_tokens),
        })
    }

    fn velocity(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError> {
        Ok(self.edits.get(edit)?.mixture.velocity(latents, sigma)?)
    }

    fn decode(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        _purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError> {
        Ok(self.edits.get(edit)?.mixture.decode(latents, &self.map)?)
    }

    fn encode_start(
        &mut self,
        edit: &PreparedEdit,
        init: &RgbImage,
    ) -> Result<Tensor, GenerateError> {
        let scene = self.edits.get(edit)?;
        if init.dimensions() != scene.source.dimensions() {
            return Err(GenerateError::Input(format!(
                "start image {:?}: this edit's panel is {:?}",
                init.dimensions(),
                scene.source.dimensions()
            )));
        }
        let mut diptych = make_diptych(&scene.source).image;
        image::imageops::replace(&mut diptych, init, scene.source.width() as i64, 0);
        let values = self.map.encode(&diptych);
        Ok(Tensor::from_vec(
            values,
            edit.latent_shape.as_slice(),
            &self.device(),
        )?)
    }

    fn release(&mut self, edit: &PreparedEdit) {
        self.edits.remove(edit);
    }

    fn limit_batch(&mut self, max_batch: usize) {
        self.config.max_batch = max_batch.max(1);
    }
}
