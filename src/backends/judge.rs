//! The judge a command runs with, chosen once: `--judge testbed | none | PRESET.toml` is
//! read into a [`JudgeSpec`] at the command boundary (each preset file read once, a
//! composite's members with it) and passed down by value. What `download` fetches
//! ([`JudgeSpec::downloads`]), what the memory plan counts ([`JudgeSpec::footprint`]) and
//! what gets built ([`JudgeSpec::build`]) are methods of that one value, so adding a judge
//! kind is a new [`JudgeKind`] variant the compiler walks you through.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::JudgeArgs;
use crate::device::{parse_dtype_on, DeviceName};
use crate::engine::{StrategyConfig, StrategyKind};
use crate::error::EditError;
use crate::hub::{self, RepoRequest};

use super::download::checkpoint_request;
use crate::judge::composite::{CompositeJudge, CompositePreset};
use crate::judge::openai::{OpenAiConfig, OpenAiJudge};
use crate::judge::preset::TaggedPreset;
use crate::judge::qwen_vl::{LocalJudgeConfig, Qwen2VlJudge};
use crate::judge::reward::{RewardJudge, RewardPreset};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig, TestbedPreset};
use crate::judge::{Judge, JudgeError};
use crate::models::testbed::TestbedEdits;
use crate::plan::{self, JudgeFootprint, Placement};

/// Calls in flight for the built-in testbed judge and testbed presets (it answers at once).
const TESTBED_CONCURRENCY: usize = 8;
/// Calls in flight for a preset that sets no `max_concurrency`.
const PRESET_CONCURRENCY: usize = 4;

/// A judge as chosen: its kind with every field read and checked, and the head every kind
/// shares.
#[derive(Debug, Clone)]
pub struct JudgeSpec {
    /// The name logs and errors use: the preset's `name`, else its file, else the
    /// built-in's.
    pub name: String,
    /// The preset file, `None` for the built-ins.
    pub source: Option<PathBuf>,
    /// Calls in flight at once: `--judge-concurrency`, else the preset's `max_concurrency`,
    /// else the kind's default.
    pub concurrency: usize,
    /// What kind of judge, with its settings.
    pub kind: JudgeKind,
}

/// The judge kinds, one per preset `kind` plus the built-ins.
#[derive(Debug, Clone)]
pub enum JudgeKind {
    /// `--judge none`: no judge (only `--strategy random` runs without one).
    None,
    /// The testbed's oracle with an error model (`--judge testbed`, or `kind = "testbed"`).
    Testbed(TestbedJudgeConfig),
    /// An OpenAI-compatible API (`kind = "openai"`).
    Remote(OpenAiConfig),
    /// Qwen-VL in this process (`kind = "qwen2vl"`).
    Local(LocalJudgeConfig),
    /// A reward model (`kind = "reward"`).
    Reward(RewardPreset),
    /// Members that screen, compare and score (`kind = "composite"`).
    Composite(CompositeSpec),
}

/// A composite's members, each preset file read once however many roles it plays.
#[derive(Debug, Clone)]
pub struct CompositeSpec {
    /// The composite's own `name`.
    pub name: Option<String>,
    /// The distinct member presets, in the order first named.
    pub members: Vec<JudgeSpec>,
    /// Index into `members` of the screening judge.
    pub screen: usize,
    /// Index of the comparing judge (default: the screening one).
    pub compare: Option<usize>,
    /// Indices of the judges whose VIE scores are averaged.
    pub score: Vec<usize>,
}

/// A preset file as written: the `kind` key picks the struct the rest is read into.
#[derive(Debug)]
enum PresetFile {
    Remote(OpenAiConfig),
    Local(LocalJudgeConfig),
    Reward(RewardPreset),
    Testbed(TestbedPreset),
    Composite(CompositePreset),
}

impl PresetFile {
    /// The `kind` values, as preset files write them.
    const KINDS: [&'static str; 5] = ["openai", "qwen2vl", "reward", "testbed", "composite"];

    /// Reads the preset at `path`; errors name the file and the key.
    fn read(path: &Path) -> Result<Self, JudgeError> {
        let preset = TaggedPreset::read(path, &Self::KINDS)?;
        Ok(match preset.kind() {
            "openai" => Self::Remote(preset.body()?),
            "qwen2vl" => Self::Local(preset.body()?),
            "reward" => Self::Reward(preset.body()?),
            "testbed" => Self::Testbed(preset.body()?),
            "composite" => Self::Composite(preset.body()?),
            other => unreachable!("TaggedPreset::read refuses kind {other:?}"),
        })
    }
}

/// What names a judge preset in stored settings: its contents' SHA-256, so the same file
/// reached by another path (another working folder, an absolute path) is the same judge,
/// and an edited file is another.
pub fn preset_identity(preset: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(preset)?;
    Ok(format!("preset sha256:{:x}", Sha256::digest(&bytes)))
}

impl JudgeSpec {
    /// What names this judge in a run's stored settings: a preset by its contents (the same
    /// file by another path is the same judge), a built-in by its name and `seed`.
    pub fn identity(&self, seed: Option<u64>) -> Result<String, EditError> {
        match &self.source {
            Some(preset) => preset_identity(preset)
                .map_err(|e| EditError::Invalid(format!("--judge {}: {e}", preset.display()))),
            None => Ok(format!("{} (seed {})", self.name, seed.unwrap_or_default())),
        }
    }

    /// The judge `--judge`, `--judge-concurrency` and `--judge-seed` choose; a preset file
    /// is read here, once.
    pub fn from_args(args: &JudgeArgs) -> Result<Self, JudgeError> {
        let choice = args.judge.as_deref().unwrap_or(JudgeArgs::DEFAULT_JUDGE);
        if args.judge_seed.is_some() && choice != "testbed" {
            return Err(JudgeError::Config(format!(
                "--judge-seed seeds the built-in testbed judge; --judge {choice} does not take it \
                 (a testbed preset sets `seed` in its file)"
            )));
        }
        let mut spec = match choice {
            "testbed" => Self::testbed(TestbedJudgeConfig {
                seed: args.judge_seed.unwrap_or(0),
                ..TestbedJudgeConfig::default()
            }),
            "none" => Self::none(),
            preset => Self::from_file(Path::new(preset))?,
        };
        if let Some(n) = args.judge_concurrency {
            spec.concurrency = n;
        }
        Ok(spec)
    }

    /// `--judge none`.
    pub fn none() -> Self {
        Self {
            name: "none".into(),
            source: None,
            concurrency: 1,
            kind: JudgeKind::None,
        }
    }

    /// The built-in testbed judge with this error model.
    pub fn testbed(config: TestbedJudgeConfig) -> Self {
        Self {
            name: "testbed".into(),
            source: None,
            concurrency: TESTBED_CONCURRENCY,
            kind: JudgeKind::Testbed(config),
        }
    }

    /// Reads a preset file (and a composite's member files, relative to its folder), each
    /// once; every field is checked, errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, JudgeError> {
        Self::read(path, true)
    }

    fn read(path: &Path, allow_composite: bool) -> Result<Self, JudgeError> {
        let file = PresetFile::read(path)?;
        let (kind, name, max_concurrency) = match file {
            PresetFile::Remote(c) => {
                let c = c.resolve(path)?;
                let head = (c.name.clone(), c.max_concurrency);
                (JudgeKind::Remote(c), head.0, head.1)
            }
            PresetFile::Local(c) => {
                let c = c.resolve(path)?;
                let head = (c.name.clone(), c.max_concurrency);
                (JudgeKind::Local(c), head.0, head.1)
            }
            PresetFile::Reward(p) => {
                let p = p.resolve(path)?;
                let head = (p.name.clone(), p.max_concurrency);
                (JudgeKind::Reward(p), head.0, head.1)
            }
            PresetFile::Testbed(p) => {
                let config = TestbedJudgeConfig::from_preset(&p, path)?;
                (JudgeKind::Testbed(config), p.name, p.max_concurrency)
            }
            PresetFile::Composite(_) if !allow_composite => {
                return Err(JudgeError::Config(format!(
                    "judge preset {}: a composite's member cannot be a composite",
                    path.display()
                )))
            }
            PresetFile::Composite(p) => {
                let p = p.resolve(path)?;
                let head = (p.name.clone(), p.max_concurrency);
                (JudgeKind::Composite(read_members(path, p)?), head.0, head.1)
            }
        };
        let default = match kind {
            JudgeKind::Testbed(_) => TESTBED_CONCURRENCY,
            _ => PRESET_CONCURRENCY,
        };
        Ok(Self {
            name: name.unwrap_or_else(|| path.display().to_string()),
            source: Some(path.to_path_buf()),
            concurrency: max_concurrency.unwrap_or(default),
            kind,
        })
    }

    /// Loads checkpoints holding tensors the model does not read (`--allow-unused-weights`),
    /// logging each, instead of refusing them: for local and reward models, a composite's
    /// members included.
    pub fn allow_unused_weights(&mut self) {
        match &mut self.kind {
            JudgeKind::Local(c) => c.allow_unused_weights = true,
            JudgeKind::Reward(p) => p.allow_unused_weights = true,
            JudgeKind::Composite(c) => c.members.iter_mut().for_each(Self::allow_unused_weights),
            JudgeKind::None | JudgeKind::Testbed(_) | JudgeKind::Remote(_) => {}
        }
    }

    /// Whether it is `--judge none`.
    pub fn is_none(&self) -> bool {
        matches!(self.kind, JudgeKind::None)
    }

    /// `--judge none` serves only `random`: there is nothing to choose among one candidate.
    pub fn check_serves(&self, strategy: &StrategyConfig) -> Result<(), EditError> {
        if self.is_none() && strategy.kind != StrategyKind::Random {
            return Err(EditError::Invalid(format!(
                "--judge none: {} needs a judge to choose among candidates; only --strategy random runs without one",
                strategy.kind.name()
            )));
        }
        Ok(())
    }

    /// What can be refused without building the judge, for commands to call before they
    /// touch their output folder: a remote judge's (or a composite member's) API key
    /// variable is set, and a judge that must give VIE scores (`needs_vie`: it scores
    /// returned edits) is not a reward model. `flag` names where the judge was chosen.
    pub fn preflight(&self, flag: &str, needs_vie: bool) -> Result<(), EditError> {
        match &self.kind {
            JudgeKind::Remote(c) => match &c.api_key_env {
                Some(var) if std::env::var_os(var).is_none() => Err(EditError::Invalid(format!(
                    "{flag} {}: the judge's API key variable {var} is not set (export {var}=...)",
                    self.name
                ))),
                _ => Ok(()),
            },
            JudgeKind::Reward(_) if needs_vie => Err(EditError::Invalid(format!(
                "{flag}: {} is a reward model and gives no VIE scores; use a composite preset \
                 (kind = \"composite\") that screens or compares with it and scores with a VIE judge",
                self.name
            ))),
            JudgeKind::Composite(c) => c
                .members
                .iter()
                .try_for_each(|m| m.preflight(flag, false)),
            _ => Ok(()),
        }
    }

    /// What the judge's weights need from the Hugging Face Hub: a local judge's checkpoint
    /// and adapter, a reward judge's base model and checkpoint, a composite's members'
    /// (each repository once). Remote and testbed judges need nothing.
    pub fn downloads(&self) -> Vec<RepoRequest> {
        let mut requests: Vec<RepoRequest> = Vec::new();
        let mut add = |r: RepoRequest| {
            if !requests.iter().any(|q| q.repo_id == r.repo_id) {
                requests.push(r);
            }
        };
        match &self.kind {
            JudgeKind::Local(c) => {
                if let (None, Some(model)) = (&c.model_dir, &c.model) {
                    add(checkpoint_request(model));
                }
                if let Some(adapter) = c.adapter.as_deref().filter(|a| hub::names_repo(a)) {
                    add(checkpoint_request(adapter));
                }
            }
            JudgeKind::Reward(p) => {
                if let (None, Some(model)) = (&p.model_dir, &p.model) {
                    add(checkpoint_request(model));
                }
                if hub::names_repo(&p.weights) {
                    add(RepoRequest::new(&p.weights).include(["*.safetensors", "*.json"]));
                }
            }
            JudgeKind::Composite(c) => c.members.iter().flat_map(|m| m.downloads()).for_each(add),
            JudgeKind::None | JudgeKind::Testbed(_) | JudgeKind::Remote(_) => {}
        }
        requests
    }

    /// What the judge holds in memory, for the plan: a local or reward model's parameters
    /// (from its files, else the published size of its Hub id) in its dtype, and where it
    /// runs; a composite's local members together. `None` for judges that hold no model
    /// here (remote, testbed) or whose size is unknown (warned).
    pub fn footprint(
        &self,
        generator_device: DeviceName,
    ) -> Result<Option<JudgeFootprint>, JudgeError> {
        // One call's prompts and the pixels of each of their two images (the source and a
        // candidate): a local judge batches up to max_batch prompts of images capped at
        // max_pixels (else a 512 px preview's); a reward model scores one pair a call.
        let (model, model_dir, device, dtype, (batch, image_pixels)) = match &self.kind {
            JudgeKind::Local(c) => (
                &c.model,
                &c.model_dir,
                &c.device,
                &c.dtype,
                (c.max_batch.max(1), c.max_pixels.unwrap_or(PREVIEW_PIXELS)),
            ),
            JudgeKind::Reward(p) => (
                &p.model,
                &p.model_dir,
                &p.device,
                &p.dtype,
                (1, p.image_pixels),
            ),
            JudgeKind::Composite(c) => {
                let parts = c
                    .members
                    .iter()
                    .map(|m| m.footprint(generator_device))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(combined(parts.into_iter().flatten().collect()));
            }
            JudgeKind::None | JudgeKind::Testbed(_) | JudgeKind::Remote(_) => return Ok(None),
        };
        let setup = |field: &str, e: String| {
            JudgeError::Config(format!("judge preset {}: {field} {e}", self.name))
        };
        let device = DeviceName::parse(device).map_err(|e| setup("device", e))?;
        let dtype =
            parse_dtype_on(dtype.as_deref(), device.is_gpu()).map_err(|e| setup("dtype", e))?;
        let stored = model_dir.as_deref().and_then(plan::peek::stored_parameters);
        let known = model.as_deref().and_then(published_parameters);
        let Some(parameters) = stored.or(known) else {
            tracing::warn!(
                "memory plan: the size of judge {} is unknown; it is not counted",
                self.name
            );
            return Ok(None);
        };
        let e = dtype.size_in_bytes();
        // The checkpoint's own dimensions, else the published ones of its Hub id.
        let dims = model_dir
            .as_deref()
            .and_then(checkpoint_dims)
            .or_else(|| model.as_deref().and_then(published_dims));
        let working_bytes = match dims {
            Some(d) => plan::footprint::vl_judge_working_bytes(&d, batch, image_pixels, 2, e),
            // Dimensions unknown: the presets' former flat figure (1.5 GB in bf16), which
            // covers a 3B-7B judge at max_batch 8 with 512 px previews.
            None => {
                tracing::warn!(
                    "memory plan: the dimensions of judge {} are unknown; its working memory is a flat estimate",
                    self.name
                );
                750_000_000 * e
            }
        };
        Ok(Some(JudgeFootprint {
            name: model.clone().unwrap_or_else(|| self.name.clone()),
            parameters,
            bytes_per_parameter: e,
            working_bytes,
            placement: if device == generator_device {
                Placement::Device
            } else {
                Placement::Elsewhere
            },
        }))
    }

    /// Builds the judge (`None` for `--judge none`). A testbed judge knows the testbed
    /// generator's edits (`testbed`); without them it is refused, since it can score only
    /// what it simulated. Local models load on their first call, not here.
    pub fn build(
        &self,
        testbed: Option<&TestbedEdits>,
    ) -> Result<Option<Arc<dyn Judge>>, JudgeError> {
        let judge: Arc<dyn Judge> = match &self.kind {
            JudgeKind::None => return Ok(None),
            JudgeKind::Testbed(config) => match (testbed, &self.source) {
                (Some(edits), _) => Arc::new(TestbedJudge::knowing(*config, edits.clone())),
                // A testbed preset outside the testbed answers for generated scenes only.
                (None, Some(_)) => Arc::new(TestbedJudge::new(*config)),
                (None, None) => {
                    return Err(JudgeError::Config(
                        "--judge testbed (the default judge) knows only the testbed generator's edits (their truth is simulated); \
                         with FLUX give a judge preset (--judge judges/NAME.toml), or --judge none with --strategy random"
                            .into(),
                    ))
                }
            },
            JudgeKind::Remote(config) => Arc::new(OpenAiJudge::new(config.clone())?),
            JudgeKind::Local(config) => {
                let setup = |field: &str, e: String| {
                    JudgeError::Config(format!("judge preset {}: {field} {e}", self.name))
                };
                let device = DeviceName::parse(&config.device)
                    .and_then(|d| d.open())
                    .map_err(|e| setup("device", e))?;
                let dtype = crate::device::parse_dtype(config.dtype.as_deref(), &device)
                    .map_err(|e| setup("dtype", e))?;
                Arc::new(Qwen2VlJudge::new(config.clone(), device, dtype)?)
            }
            JudgeKind::Reward(preset) => {
                let path = self.source.as_deref().unwrap_or(Path::new(&self.name));
                Arc::new(RewardJudge::new(preset.clone(), path)?)
            }
            JudgeKind::Composite(c) => {
                let members = c
                    .members
                    .iter()
                    .map(|m| {
                        m.build(testbed)?.ok_or_else(|| {
                            JudgeError::Config(format!("composite {}: member {} is no judge", self.name, m.name))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| JudgeError::Config(format!("composite {}: {e}", self.name)))?;
                Arc::new(CompositeJudge::new(
                    c.name.clone(),
                    members[c.screen].clone(),
                    c.compare.map(|i| members[i].clone()),
                    c.score.iter().map(|&i| members[i].clone()).collect(),
                )?)
            }
        };
        Ok(Some(judge))
    }
}

/// A composite's member files, relative to its folder, each read once.
fn read_members(path: &Path, preset: CompositePreset) -> Result<CompositeSpec, JudgeError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    let mut members: Vec<JudgeSpec> = Vec::new();
    let mut index = |member: &str| -> Result<usize, JudgeError> {
        let file = base.join(member);
        if let Some(i) = files.iter().position(|f| *f == file) {
            return Ok(i);
        }
        let spec = JudgeSpec::read(&file, false).map_err(|e| {
            JudgeError::Config(format!(
                "composite {}: member {member}: {e}",
                path.display()
            ))
        })?;
        files.push(file);
        members.push(spec);
        Ok(members.len() - 1)
    };
    let screen = index(&preset.screen)?;
    let compare = preset.compare.as_deref().map(&mut index).transpose()?;
    let score = preset
        .score
        .iter()
        .map(|m| index(m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CompositeSpec {
        name: preset.name,
        members,
        screen,
        compare,
        score,
    })
}

/// Several members' footprints as one: those on the generator's device add up there; the
/// rest count as elsewhere.
pub(super) fn combined(parts: Vec<JudgeFootprint>) -> Option<JudgeFootprint> {
    let placement = if parts.iter().any(|p| p.placement == Placement::Device) {
        Placement::Device
    } else {
        Placement::Elsewhere
    };
    let here: Vec<&JudgeFootprint> = parts.iter().filter(|p| p.placement == placement).collect();
    let first = here.first()?;
    // Bytes are what the plan needs; express the sum in the first member's bytes per
    // parameter (members may differ in dtype).
    let e = first.bytes_per_parameter;
    let weight_bytes: usize = here
        .iter()
        .map(|p| p.parameters * p.bytes_per_parameter)
        .sum();
    Some(JudgeFootprint {
        name: here
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(" + "),
        parameters: weight_bytes.div_ceil(e),
        bytes_per_parameter: e,
        working_bytes: here.iter().map(|p| p.working_bytes).sum(),
        placement,
    })
}

/// The local judges' checkpoints as published on the Hub, for plans made before a
/// checkpoint is on disk: parameters (their Hub pages' safetensors totals) and dimensions
/// (their `config.json`): language model (hidden, layers, heads, KV heads, MLP width; heads
/// 128 wide), vision tower (width, MLP width, patch).
const PUBLISHED: &[(&str, f64, [usize; 8])] = &[
    (
        "Qwen/Qwen2-VL-2B-Instruct",
        2.21e9,
        [1536, 28, 12, 2, 8960, 1280, 5120, 14],
    ),
    (
        "Qwen/Qwen2-VL-7B-Instruct",
        8.29e9,
        [3584, 28, 28, 4, 18944, 1280, 5120, 14],
    ),
    (
        "Qwen/Qwen2-VL-72B-Instruct",
        73.4e9,
        [8192, 80, 64, 8, 29568, 1280, 5120, 14],
    ),
    (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        3.75e9,
        [2048, 36, 16, 2, 11008, 1280, 3420, 14],
    ),
    (
        "Qwen/Qwen2.5-VL-7B-Instruct",
        8.29e9,
        [3584, 28, 28, 4, 18944, 1280, 3420, 14],
    ),
    (
        "Qwen/Qwen2.5-VL-32B-Instruct",
        33.5e9,
        [5120, 64, 40, 8, 27648, 1280, 3420, 14],
    ),
    (
        "Qwen/Qwen2.5-VL-72B-Instruct",
        73.4e9,
        [8192, 80, 64, 8, 29568, 1280, 3420, 14],
    ),
    (
        "Qwen/Qwen3-VL-2B-Instruct",
        2.13e9,
        [2048, 28, 16, 8, 6144, 1024, 4096, 16],
    ),
    (
        "Qwen/Qwen3-VL-4B-Instruct",
        4.44e9,
        [2560, 36, 32, 8, 9728, 1024, 4096, 16],
    ),
    (
        "Qwen/Qwen3-VL-8B-Instruct",
        8.77e9,
        [4096, 36, 32, 8, 12288, 1152, 4304, 16],
    ),
    (
        "Qwen/Qwen3-VL-32B-Instruct",
        33.4e9,
        [5120, 64, 64, 8, 25600, 1152, 4304, 16],
    ),
];

/// Pixels of a 512 px square preview: what a judge without `max_pixels` is planned to see.
const PREVIEW_PIXELS: usize = 512 * 512;

/// The dimensions in a checkpoint folder's `config.json`, if it has a readable one.
fn checkpoint_dims(dir: &std::path::Path) -> Option<plan::footprint::VlJudgeDims> {
    let root = crate::hub::cache::resolve_snapshot(dir).unwrap_or_else(|_| dir.to_path_buf());
    let text = std::fs::read_to_string(root.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let config = crate::models::qwen_vl::config::Qwen2VlConfig::from_json(&json).ok()?;
    Some(plan::footprint::VlJudgeDims::of_config(&config))
}

fn published_dims(model: &str) -> Option<plan::footprint::VlJudgeDims> {
    let (_, _, [hidden, layers, heads, kv_heads, intermediate, vision_hidden, vision_mlp, patch]) =
        published(model)?;
    Some(plan::footprint::VlJudgeDims {
        hidden: *hidden,
        layers: *layers,
        heads: *heads,
        kv_heads: *kv_heads,
        head_dim: 128,
        intermediate: *intermediate,
        vision_hidden: *vision_hidden,
        vision_intermediate: *vision_mlp,
        patch: *patch,
        merge: 2,
    })
}

fn published_parameters(model: &str) -> Option<usize> {
    published(model).map(|(_, parameters, _)| *parameters as usize)
}

/// `model`'s row of [`PUBLISHED`] (Hub ids compared without case).
fn published(model: &str) -> Option<&'static (&'static str, f64, [usize; 8])> {
    PUBLISHED
        .iter()
        .find(|(name, _, _)| name.eq_ignore_ascii_case(model))
}
