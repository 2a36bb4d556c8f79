//! Building the generator and judge a command asked for.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::cli::{GeneratorArgs, GeneratorKind, JudgeArgs};
use crate::device::{parse_device, parse_dtype};
use crate::error::{EditError, JudgeError};
use crate::generate::flux::{FluxGenerator, FluxOptions};
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::generate::Generator;
use crate::judge::openai::OpenAiJudge;
use crate::judge::qwen_vl::{LocalJudgeConfig, Qwen2VlJudge};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use crate::judge::Judge;
use crate::models::flux::FluxPaths;

/// A judge with the number of calls it should have in flight at once.
pub struct JudgeHandle {
    /// The judge.
    pub judge: Arc<dyn Judge>,
    /// Concurrency limit for the engine.
    pub concurrency: usize,
}

/// The generator backend `args` select.
pub fn build_generator(args: &GeneratorArgs) -> anyhow::Result<Box<dyn Generator>> {
    let flux_files = args.model_dir.is_some() || args.transformer.is_some();
    let kind = match (args.generator, flux_files) {
        (GeneratorKind::Auto, true) => GeneratorKind::Flux,
        (GeneratorKind::Auto, false) => GeneratorKind::Testbed,
        (kind, _) => kind,
    };
    match kind {
        GeneratorKind::Testbed => {
            tracing::info!("generator: built-in testbed (a simulator, not an image editor)");
            Ok(Box::new(TestbedGenerator::new(TestbedConfig {
                difficulty: args.testbed_difficulty,
                max_batch: args.batch_size.max(1),
            })))
        }
        GeneratorKind::Flux => Ok(Box::new(build_flux(args)?)),
        GeneratorKind::Auto => unreachable!("resolved above"),
    }
}

fn build_flux(args: &GeneratorArgs) -> anyhow::Result<FluxGenerator> {
    let device =
        parse_device(&args.device).map_err(|e| EditError::Invalid(format!("--device {e}")))?;
    let mut options = FluxOptions::new(FluxPaths {
        model_dir: args.model_dir.clone(),
        transformer: args.transformer.clone(),
        vae: args.vae.clone(),
        text_encoders: args.text_encoders.clone(),
    });
    options.dtype = parse_dtype(args.dtype.as_deref(), &device)
        .map_err(|e| EditError::Invalid(format!("--dtype {e}")))?;
    options.device = device;
    options.lora = args.lora.clone();
    options.lora_scale = args.lora_scale;
    options.guidance = args.guidance;
    options.t5_tokens = args.t5_tokens;
    options.keep_text_encoders = args.keep_text_encoders;
    options.max_batch = args.batch_size.max(1);
    if options.lora.is_none() {
        tracing::warn!("no --lora: running FLUX.1 Fill without the ICEdit LoRA");
    }
    tracing::info!(dtype = ?options.dtype, device = %args.device, "generator: FLUX.1 Fill");
    Ok(FluxGenerator::load(options)?)
}

/// The fields every judge preset has; the rest belongs to its backend.
#[derive(Debug, Deserialize)]
struct PresetHead {
    kind: String,
    #[serde(default)]
    max_concurrency: Option<usize>,
}

/// Reads a preset's `kind` and `max_concurrency`, naming the file on error.
fn preset_head(path: &Path) -> Result<PresetHead, JudgeError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        JudgeError::Config(format!("cannot read judge preset {}: {e}", path.display()))
    })?;
    toml::from_str(&text)
        .map_err(|e| JudgeError::Config(format!("judge preset {}: {e}", path.display())))
}

/// Loads the backend a preset's `kind` names.
fn judge_from_preset(kind: &str, path: &Path) -> Result<Arc<dyn Judge>, JudgeError> {
    match kind {
        "openai" => Ok(Arc::new(OpenAiJudge::from_preset(path)?)),
        "qwen2vl" => {
            let config = LocalJudgeConfig::from_file(path)?;
            let setup = |field: &str, e: String| {
                JudgeError::Config(format!("judge preset {}: {field} {e}", path.display()))
            };
            let device = parse_device(&config.device).map_err(|e| setup("device", e))?;
            let dtype =
                parse_dtype(config.dtype.as_deref(), &device).map_err(|e| setup("dtype", e))?;
            Ok(Arc::new(Qwen2VlJudge::new(config, device, dtype)?))
        }
        other => Err(JudgeError::Config(format!(
            "judge preset {}: unknown kind {other:?} (known: \"openai\", \"qwen2vl\"; or --judge testbed)",
            path.display()
        ))),
    }
}

/// The judge `args` select: `testbed` or a preset file.
pub fn build_judge(args: &JudgeArgs) -> anyhow::Result<JudgeHandle> {
    if args.judge == "testbed" {
        return Ok(JudgeHandle {
            judge: Arc::new(TestbedJudge::new(TestbedJudgeConfig {
                seed: args.judge_seed,
                ..TestbedJudgeConfig::default()
            })),
            concurrency: args.judge_concurrency.unwrap_or(8),
        });
    }
    let path = Path::new(&args.judge);
    let head = preset_head(path).with_context(|| format!("loading judge {}", args.judge))?;
    let judge = judge_from_preset(&head.kind, path)?;
    Ok(JudgeHandle {
        judge,
        concurrency: args.judge_concurrency.or(head.max_concurrency).unwrap_or(4),
    })
}
