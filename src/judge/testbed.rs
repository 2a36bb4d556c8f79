//! `TestbedJudge`: an oracle that knows each testbed edit's outcomes, with a configurable
//! error model that emulates a VLM (score noise, position bias, failures to answer).
//!
//! Scores come from distances: SC's instruction sub-score from how much closer the image
//! is to the target than the source is, its over-edit sub-score from how much changed
//! outside the edit region; PQ's sub-scores from artifact energy (high-frequency content
//! beyond the target's). Everything is deterministic given the judge's seed and the
//! inputs: the noise and failures are drawn from a hash of (seed, call, image bytes).

use async_trait::async_trait;
use image::{imageops, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, ScreenVerdict, SubScores,
};
use crate::edit::EditContext;
use crate::models::testbed::outcomes::{classify, mse, outcome_set, OutcomeLabel};
use crate::models::testbed::{is_scene, TestbedEdits};

/// The error model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
pub struct TestbedJudgeConfig {
    /// Seed of the error model.
    pub seed: u64,
    /// Standard deviation of the noise added to every 0-10 score.
    pub noise: f32,
    /// Probability that a comparison answers "first" whatever it sees.
    pub position_bias: f32,
    /// Probability that a call fails (recorded as a failure, never scored).
    pub failure_rate: f32,
}

impl Default for TestbedJudgeConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            noise: 0.8,
            position_bias: 0.15,
            failure_rate: 0.02,
        }
    }
}

/// A testbed judge preset (`kind = "testbed"`): the error model as a file, so a simulated
/// judge can stand in wherever a preset is asked for (`judge-eval`, eval suites).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestbedPreset {
    /// Display name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// Calls in flight at once (read by the engine).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    seed: Option<u64>,
    noise: Option<f32>,
    position_bias: Option<f32>,
    failure_rate: Option<f32>,
}

impl TestbedJudgeConfig {
    /// The error model of a `kind = "testbed"` preset read from `path`: `seed`, `noise` (0
    /// to 10), `position_bias` and `failure_rate` (0 to 1); a missing field keeps its
    /// default.
    pub fn from_preset(preset: &TestbedPreset, path: &std::path::Path) -> Result<Self, JudgeError> {
        let d = Self::default();
        let c = Self {
            seed: preset.seed.unwrap_or(d.seed),
            noise: preset.noise.unwrap_or(d.noise),
            position_bias: preset.position_bias.unwrap_or(d.position_bias),
            failure_rate: preset.failure_rate.unwrap_or(d.failure_rate),
        };
        let check = super::preset::FieldCheck::new(path);
        check.within(
            "noise",
            c.noise,
            0.0,
            10.0,
            "standard deviation on the 0-10 scale",
        )?;
        check.within("position_bias", c.position_bias, 0.0, 1.0, "a probability")?;
        check.within("failure_rate", c.failure_rate, 0.0, 1.0, "a probability")?;
        Ok(c)
    }
}

/// The oracle judge of the testbed.
pub struct TestbedJudge {
    config: TestbedJudgeConfig,
    /// The edits of the testbed generator it works with, if any.
    known: Option<TestbedEdits>,
}

/// Ground-truth measurements of one image.
struct Truth {
    /// 1 = exactly the target, 0 = no closer than the source, < 0 = further.
    progress: f32,
    /// Mean squared change outside the region the target changes (0..65025).
    spill: f32,
    /// Extra high-frequency energy over the target's.
    artifacts: f32,
    label: OutcomeLabel,
}

impl TestbedJudge {
    /// A judge with `config` that knows generated testbed scenes only.
    pub fn new(config: TestbedJudgeConfig) -> Self {
        Self {
            config,
            known: None,
        }
    }

    /// A judge that also knows the edits a testbed generator recorded in `edits` (photos it
    /// simulated an edit of).
    pub fn knowing(config: TestbedJudgeConfig, edits: TestbedEdits) -> Self {
        Self {
            config,
            known: Some(edits),
        }
    }

    /// Refuses an edit whose truth it cannot know: one neither a generated scene nor
    /// prepared by its testbed generator (an image from FLUX, say).
    fn check_known(&self, edit: &EditContext) -> Result<(), JudgeError> {
        if is_scene(edit) || self.known.as_ref().is_some_and(|k| k.contains(edit)) {
            return Ok(());
        }
        Err(JudgeError::Config(format!(
            "the testbed judge knows only testbed scenes and the edits a testbed generator prepared; \
             edit `{}` is neither, so it has no truth to score it against (use a judge preset from judges/)",
            edit.id
        )))
    }

    fn rng(&self, call: &str, images: &[&RgbImage]) -> ChaCha8Rng {
        let mut h = Sha256::new();
        h.update(self.config.seed.to_le_bytes());
        h.update(call.as_bytes());
        for i in images {
            h.update(i.as_raw());
        }
        let d = h.finalize();
        ChaCha8Rng::seed_from_u64(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
    }

    /// Fails with the configured probability.
    fn maybe_fail(&self, rng: &mut ChaCha8Rng, call: &str) -> Result<(), JudgeError> {
        if rng.random::<f32>() < self.config.failure_rate {
            return Err(JudgeError::Failed(format!(
                "testbed judge: simulated failure to answer ({call})"
            )));
        }
        Ok(())
    }

    fn noisy(&self, rng: &mut ChaCha8Rng, score: f32) -> f32 {
        let n = Normal::new(0.0, self.config.noise.max(1e-6)).expect("valid sigma");
        (score + n.sample(rng)).clamp(0.0, 10.0)
    }

    fn truth(edit: &EditContext, image: &RgbImage) -> Result<Truth, JudgeError> {
        let outcomes = outcome_set(edit, 0.5).map_err(JudgeError::Failed)?;
        let target = &outcomes[0].image;
        let source = edit.source.as_ref();
        let (tw, th) = target.dimensions();
        // A larger image (a hi-res refine of the edit) is judged at the panel's size: the
        // testbed's truth has no finer detail to reward.
        let resized;
        let image = match image.dimensions() {
            d if d == (tw, th) => image,
            (w, h) if w > tw && h > th => {
                resized = imageops::resize(image, tw, th, imageops::FilterType::Triangle);
                &resized
            }
            d => {
                return Err(JudgeError::Failed(format!(
                    "testbed judge: image is {d:?}, the edit's panel is {:?}",
                    (tw, th)
                )))
            }
        };
        let full = mse(source, target).max(1.0);
        let progress = 1.0 - mse(image, target) / full;
        let (mut spill, mut outside) = (0f64, 0usize);
        for ((p, s), t) in image.pixels().zip(source.pixels()).zip(target.pixels()) {
            if s == t {
                outside += 1;
                spill += (0..3)
                    .map(|c| (p[c] as f64 - s[c] as f64).powi(2))
                    .sum::<f64>()
                    / 3.0;
            }
        }
        let spill = (spill / outside.max(1) as f64) as f32;
        let artifacts = (high_freq(image) - high_freq(target)).max(0.0);
        Ok(Truth {
            progress,
            spill,
            artifacts,
            label: classify(&outcomes, image),
        })
    }

    fn sc_pair(t: &Truth) -> [f32; 2] {
        let follows = 10.0 * t.progress.clamp(0.0, 1.0);
        // A change of 40 grey levels RMS everywhere outside the region costs all 10 points.
        let restraint = 10.0 * (1.0 - (t.spill.sqrt() / 40.0)).clamp(0.0, 1.0);
        [follows, restraint]
    }

    fn pq_pair(t: &Truth) -> [f32; 2] {
        let natural = 10.0 * (1.0 - t.artifacts / 1500.0).clamp(0.0, 1.0);
        let clean = 10.0 * (1.0 - t.artifacts / 800.0).clamp(0.0, 1.0);
        [natural, clean]
    }
}

/// Mean squared difference between horizontally and vertically adjacent pixels.
fn high_freq(image: &RgbImage) -> f32 {
    let (w, h) = image.dimensions();
    let mut sum = 0f64;
    let mut n = 0usize;
    for y in 0..h.saturating_sub(1) {
        for x in 0..w.saturating_sub(1) {
            let p = image.get_pixel(x, y);
            for q in [image.get_pixel(x + 1, y), image.get_pixel(x, y + 1)] {
                sum += (0..3)
                    .map(|c| (p[c] as f64 - q[c] as f64).powi(2))
                    .sum::<f64>()
                    / 3.0;
                n += 1;
            }
        }
    }
    (sum / n.max(1) as f64) as f32
}

fn usage() -> CallUsage {
    CallUsage {
        attempts: 1,
        ..CallUsage::default()
    }
}

#[async_trait]
impl Judge for TestbedJudge {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "testbed oracle (noise {}, position bias {}, failure rate {}, seed {})",
            c.noise, c.position_bias, c.failure_rate, c.seed
        )
    }

    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        self.check_known(edit)?;
        let mut rng = self.rng("screen", &[preview]);
        self.maybe_fail(&mut rng, "screen")?;
        let t = Self::truth(edit, preview)?;
        let [follows, restraint] = Self::sc_pair(&t);
        let score = self.noisy(&mut rng, follows.min(restraint));
        Ok(ScreenVerdict {
            pass: score >= 5.0,
            score,
            reasoning: format!(
                "step {}/{}: preview nearest to {:?} (progress {:.2})",
                stage.step, stage.steps, t.label, t.progress
            ),
            usage: usage(),
        })
    }

    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        self.check_known(edit)?;
        let mut rng = self.rng("compare", &[first, second]);
        self.maybe_fail(&mut rng, "compare")?;
        if rng.random::<f32>() < self.config.position_bias {
            return Ok(Comparison {
                preferred: Preference::First,
                p_first: None,
                reasoning: "position bias: answered first".into(),
                usage: usage(),
            });
        }
        let (a, b) = (Self::truth(edit, first)?, Self::truth(edit, second)?);
        let sa = self.noisy(&mut rng, Self::sc_pair(&a)[0]);
        let sb = self.noisy(&mut rng, Self::sc_pair(&b)[0]);
        let preferred = match sa.total_cmp(&sb) {
            std::cmp::Ordering::Greater => Preference::First,
            std::cmp::Ordering::Less => Preference::Second,
            std::cmp::Ordering::Equal => Preference::Tie,
        };
        Ok(Comparison {
            preferred,
            p_first: None,
            reasoning: format!(
                "first ~ {:?} ({sa:.1}), second ~ {:?} ({sb:.1})",
                a.label, b.label
            ),
            usage: usage(),
        })
    }

    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.check_known(edit)?;
        let mut rng = self.rng("vie_sc", &[edited]);
        self.maybe_fail(&mut rng, "vie_sc")?;
        let t = Self::truth(edit, edited)?;
        let [a, b] = Self::sc_pair(&t);
        Ok(SubScores {
            scores: [self.noisy(&mut rng, a), self.noisy(&mut rng, b)],
            passes: Vec::new(),
            reasoning: format!("nearest outcome {:?}; progress {:.2}", t.label, t.progress),
            usage: usage(),
        })
    }

    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.check_known(edit)?;
        let mut rng = self.rng("vie_pq", &[edited]);
        self.maybe_fail(&mut rng, "vie_pq")?;
        let t = Self::truth(edit, edited)?;
        let [a, b] = Self::pq_pair(&t);
        Ok(SubScores {
            scores: [self.noisy(&mut rng, a), self.noisy(&mut rng, b)],
            passes: Vec::new(),
            reasoning: format!("artifact energy {:.0}", t.artifacts),
            usage: usage(),
        })
    }
}
