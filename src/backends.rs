//! Building the generator and judge a command asked for.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::cli::{GeneratorArgs, GeneratorKind, JudgeArgs};
use crate::error::JudgeError;
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::generate::Generator;
use crate::judge::openai::OpenAiJudge;
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use crate::judge::Judge;

/// A judge with the number of calls it should have in flight at once.
pub struct JudgeHandle {
    /// The judge.
    pub judge: Arc<dyn Judge>,
    /// Concurrency limit for the engine.
    pub concurrency: usize,
}

/// The generator backend `args` select.
pub fn build_generator(args: &GeneratorArgs) -> anyhow::Result<Box<dyn Generator>> {
    let kind = match (args.generator, &args.model_dir) {
        (GeneratorKind::Auto, Some(_)) => GeneratorKind::Flux,
        (GeneratorKind::Auto, None) => GeneratorKind::Testbed,
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
        GeneratorKind::Flux => bail!("the FLUX generator is not part of this build yet"),
        GeneratorKind::Auto => unreachable!("resolved above"),
    }
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
        other => Err(JudgeError::Config(format!(
            "judge preset {}: unknown kind {other:?} (known: \"openai\"; or --judge testbed)",
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
