//! `edit` (one image, one instruction) and `demo` (a testbed scene end to end).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::backends::{EngineBuilder, GeneratorSpec, JudgeSpec, Workload};
use crate::cli::{DemoArgs, EditArgs};
use crate::edit::{load_image, resize_to_panel, EditContext, ImageLimits};
use crate::engine::outputs::write_outputs;
use crate::engine::report::CandidateStatus;
use crate::engine::{EditJob, EditReport, Engine, PhaseBars, StrategyConfig};
use crate::error::{EditError, EngineError, GenerateError};
use crate::generate::testbed::TestbedConfig;
use crate::judge::testbed::TestbedJudgeConfig;
use crate::models::testbed::{self, OutcomeLabel};
use crate::stop::StopSignal;
use crate::study::{finished_labels, pick_label};

/// `edit`: load, resize, run the strategy, write outputs, print where they are.
pub async fn edit(args: EditArgs) -> anyhow::Result<()> {
    let checked = check_edit(&args)?;
    let created = !args.out.exists();
    let lock = super::claim_output(&args.out, "--out")?;
    let out = args.out.clone();
    let result = edit_claimed(args, checked, lock).await;
    if result.is_err() && created {
        // A refusal while loading (a device this build cannot open, weights the loader
        // refuses) leaves no empty folder behind; anything written in it stays.
        super::remove_if_untouched(&out);
    }
    result
}

/// [`edit`] once its output folder is held (the lock is released when this returns).
async fn edit_claimed(
    args: EditArgs,
    checked: CheckedEdit,
    _lock: crate::fsio::OutputLock,
) -> anyhow::Result<()> {
    // Ctrl-C or SIGTERM (a scheduler's first word) stops the edit at its next step
    // boundary with exit 4, instead of killing it mid-write.
    let stop = StopSignal::default();
    stop.stop_on_signals("stopping the edit at its next step")?;
    let (w, h) = checked.edit.panel_size();
    // The latent grid of this edit's diptych [source | edit], by the VAE's downscale
    // factor (8 for FLUX's autoencoder).
    let flux_grid = match checked.generator.flux() {
        Some(flux) => {
            let f = flux.vae_downscale()?;
            Some((h as usize / f, 2 * w as usize / f))
        }
        None => None,
    };
    let init_latents = match &args.init_latents {
        Some(path) => {
            let latents = load_init_latents(path, flux_grid)?;
            let candidates = checked.strategy.candidate_count();
            if latents.len() > candidates {
                return Err(EditError::Invalid(format!(
                    "--init-latents {}: {} rows of latents, more than this edit's {candidates} candidate(s) (--seeds); give at most one per candidate",
                    path.display(),
                    latents.len()
                ))
                .into());
            }
            latents
        }
        None => Vec::new(),
    };
    let workload = Workload::new((w as usize, h as usize), false, [&checked.strategy]);
    let engine = EngineBuilder::new(
        checked.generator,
        checked.judge,
        args.engine.download,
        workload,
    )
    .allowing_unused_weights(args.engine.allow_unused_weights)
    .build_one()?;
    let (edit, strategy) = (checked.edit, checked.strategy);
    let job = EditJob {
        init_latents,
        cancel: stop,
        ..EditJob::new(edit, strategy)
    };
    let report = match run_and_write(&engine, job, &args.out).await {
        Err(e) if matches!(e.downcast_ref(), Some(EngineError::Cancelled)) => {
            // An edit is one unit: nothing of it is kept, and a rerun starts it over.
            return Err(super::Incomplete::EditStopped.into());
        }
        Err(e) => {
            // Latents that do not fit this edit are found once the generator knows its
            // shape: the error names the flag and the file they came from.
            if let (Some(path), Some(EngineError::Generate(GenerateError::Input(why)))) =
                (&args.init_latents, e.downcast_ref())
            {
                return Err(EditError::Invalid(format!(
                    "--init-latents {}: {why} (rows of [tokens, channels] packed, or [16, h, w] as diffusers saves them, for this --width and image)",
                    path.display()
                ))
                .into());
            }
            return Err(e);
        }
        Ok(report) => report,
    };
    print_summary(&report, &args.out);
    ended(&report, &args.out)
}

/// How an edit whose outputs are written ends: exit 3 (`Incomplete`) when its pick is not
/// the strategy's (no judge could score it) or its refine failed, else success.
fn ended(report: &EditReport, out: &Path) -> anyhow::Result<()> {
    match report.incomplete_reason() {
        Some(reason) => Err(super::Incomplete::Unfinished {
            reason,
            out: out.to_path_buf(),
        }
        .into()),
        None => Ok(()),
    }
}

/// An `edit` as checked: what to edit, how, and with what.
pub struct CheckedEdit {
    /// The source panel and instruction.
    pub edit: EditContext,
    /// The strategy.
    pub strategy: StrategyConfig,
    /// The generator.
    pub generator: GeneratorSpec,
    /// The judge (its preset read).
    pub judge: JudgeSpec,
}

/// Every check of `edit` that needs no weights and does no work: the image and
/// instruction, the strategy, the output path, the generator flags, and a judge that can
/// serve the strategy (its preset read, once). An error is bad input (exit 2).
pub fn check_edit(args: &EditArgs) -> anyhow::Result<CheckedEdit> {
    let image_path = args.image.as_deref().ok_or_else(|| {
        EditError::Invalid("--image is required (the source image to edit)".into())
    })?;
    let instruction = args
        .instruction
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            EditError::Invalid("--instruction is required and must not be empty".into())
        })?;
    let strategy = args.strategy.to_single_config()?;
    let judge = JudgeSpec::from_args(&args.engine.judge)?;
    judge.check_serves(&strategy)?;
    judge.preflight("--judge", true)?;
    let generator =
        super::generator_without_live_previews(&args.engine.generator, args.engine.download)?;
    if args.init_latents.is_some() && generator.flux().is_none() {
        // FLUX latents for the testbed simulator: most likely a forgotten --model-dir.
        return Err(EditError::Invalid(format!(
            "--init-latents holds FLUX latents, and no FLUX weights are named, so this run \
             would be the built-in testbed simulator: {}, or drop --init-latents",
            crate::backends::generator::NAME_THE_WEIGHTS
        ))
        .into());
    }
    if args.out.exists() && !args.out.is_dir() {
        return Err(EditError::Invalid(format!(
            "{}: --out names an existing file; give a folder (new or existing)",
            args.out.display()
        ))
        .into());
    }
    let source = load_image(image_path, ImageLimits::default())?;
    let panel = resize_to_panel(&source, args.width)
        .map_err(|e| EditError::Invalid(format!("{}: {e}", image_path.display())))?;
    let id = image_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "edit".into());
    if let Some(width) = strategy.refine {
        crate::edit::refine::refine_size(panel.dimensions(), width)?;
    }
    Ok(CheckedEdit {
        edit: EditContext::new(id, panel, instruction).with_original(Arc::new(source)),
        strategy,
        generator,
        judge,
    })
}

/// `demo`: a generated testbed scene through the chosen strategy, with the same outputs as
/// a real edit and a summary that says whether the pick is the correct outcome.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.to_single_config()?;
    if args.width == 0 || !args.width.is_multiple_of(16) {
        return Err(
            EditError::Invalid(format!("--width {} must be a multiple of 16", args.width)).into(),
        );
    }
    let _lock = super::claim_output(&args.out, "--out")?;
    let edit = testbed::make_edit(args.scene_seed, args.width);
    println!(
        "testbed scene {}: \"{}\" (a simulator, not an image editor)",
        args.scene_seed, edit.instruction
    );
    let outcomes = testbed::outcome_set(&edit, args.difficulty).map_err(EditError::Invalid)?;
    let source = edit.source.clone();
    let generator = GeneratorSpec::Testbed(TestbedConfig {
        difficulty: args.difficulty,
        contrast: args.contrast,
        ..TestbedConfig::default()
    });
    let judge = JudgeSpec::testbed(TestbedJudgeConfig {
        seed: args.judge_seed,
        ..TestbedJudgeConfig::default()
    });
    let workload = Workload::new(
        (args.width as usize, args.width as usize),
        false,
        [&strategy],
    );
    let engine = EngineBuilder::new(generator, judge, false, workload).build_one()?;
    let job = EditJob::new(edit, strategy);
    let report = run_and_write(&engine, job, &args.out).await?;
    source.save(args.out.join("source.png"))?;
    print_summary(&report, &args.out);
    let finished: Vec<String> = finished_labels(&report, &outcomes)
        .iter()
        .map(|(index, label)| format!("#{index} {label:?}"))
        .collect();
    println!("finished candidates: {}", finished.join(", "));
    match pick_label(&report, &outcomes) {
        Some(l) => println!(
            "the pick is {}: {l:?}",
            if l == OutcomeLabel::Correct {
                "CORRECT"
            } else {
                "WRONG"
            }
        ),
        None => println!("no finished pick"),
    }
    // As `edit` ends (demo exited 0 for a pick no judge could score).
    ended(&report, &args.out)
}

/// Runs one job with progress bars and writes its outputs.
pub async fn run_and_write(
    engine: &Engine,
    job: EditJob,
    out: &Path,
) -> anyhow::Result<EditReport> {
    let mut report = engine.run(job, Arc::new(PhaseBars::default())).await?;
    write_outputs(&mut report, out)?;
    Ok(report)
}

/// Reads `latents` from a safetensors file: `[C, ..latent_shape]` (packed) or `[C, 16, h, w]`
/// (unpacked, as diffusers makes them), one row per candidate. Unpacked latents must have
/// this edit's latent grid `(h, w)` where it is known: packing [16, w, h] gives as many
/// tokens as [16, h, w], so a transposed grid would otherwise run as another edit. Values
/// must be finite.
fn load_init_latents(
    path: &Path,
    grid: Option<(usize, usize)>,
) -> anyhow::Result<Vec<candle_core::Tensor>> {
    let invalid =
        |why: String| EditError::Invalid(format!("--init-latents {}: {why}", path.display()));
    if let Err(e) = std::fs::File::open(path) {
        return Err(invalid(e.to_string()).into());
    }
    if let Some(why) = crate::models::file_kind::not_safetensors(path) {
        return Err(invalid(format!("{why} (a `latents` tensor saved by safetensors)")).into());
    }
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| invalid(e.to_string()))?;
    let latents = tensors.get("latents").ok_or_else(|| {
        let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        EditError::Invalid(format!(
            "--init-latents {}: no tensor named `latents` (the file holds {})",
            path.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
    })?;
    let (bad, total) = crate::generate::non_finite_count(latents)?;
    if bad > 0 {
        return Err(invalid(format!(
            "`latents` holds {bad} non-finite value(s) (NaN or infinite) of {total}"
        ))
        .into());
    }
    if !latents.dtype().is_float() {
        return Err(invalid(format!(
            "`latents` is {:?}; initial latents are floating point (f32, f16 or bf16)",
            latents.dtype()
        ))
        .into());
    }
    // One candidate's unpacked latents without the candidate dimension, [16, h, w] on this
    // edit's grid, are that one candidate's (as the generator reads them).
    let one_unbatched = match grid {
        Some((h, w)) => latents.rank() == 3 && latents.dims()[1..] == [h, w],
        None => false,
    };
    let latents = if one_unbatched {
        &latents.unsqueeze(0)?
    } else {
        latents
    };
    // Unpacked diffusers-style latents [C, 16, h, w] are packed into 2x2 tokens [C, S, 64].
    let latents = if latents.rank() == 4 {
        if let Some((h, w)) = grid {
            let (lh, lw) = (latents.dim(2)?, latents.dim(3)?);
            if (lh, lw) != (h, w) {
                return Err(invalid(format!(
                    "`latents` is [{}, {}, {lh}, {lw}]; this edit's diptych needs [C, 16, {h}, {w}] (height, then width)",
                    latents.dim(0)?,
                    latents.dim(1)?
                ))
                .into());
            }
        }
        crate::models::flux::latents::pack(latents).map_err(|_| {
            invalid(format!(
                "`latents` is {:?}, which does not pack into 2x2 tokens ([C, 16, h, w] with h and w even)",
                latents.dims()
            ))
        })?
    } else {
        latents.clone()
    };
    let rows = latents.dim(0).context("latents tensor is a scalar")?;
    (0..rows)
        .map(|i| Ok(latents.get(i)?))
        .collect::<anyhow::Result<Vec<_>>>()
}

/// The short human summary printed after an edit.
pub fn print_summary(report: &EditReport, out: &Path) {
    let pruned = report
        .candidates
        .iter()
        .filter(|c| c.status == CandidateStatus::Pruned)
        .count();
    println!(
        "{}: {} candidates, {} pruned; NFE {} (best-of-N {}, random {})",
        report.strategy.kind.name(),
        report.candidates.len(),
        pruned,
        report.nfe.total,
        report.nfe.best_of_n_equivalent,
        report.nfe.random_equivalent
    );
    match &report.pick {
        Some(p) => println!(
            "pick: candidate {} (seed {}), VIE O {}; {}",
            p.index,
            p.seed,
            p.overall.map_or("n/a".into(), |o| format!("{o:.2}")),
            p.reason
        ),
        None => println!("no pick: nothing finished"),
    }
    if let Some(r) = &report.refine {
        println!(
            "refined to {}x{} at strength {}: {} forwards from step {} ({:.1} edit-step equivalents, outside the NFE above){}",
            r.size.0,
            r.size.1,
            r.strength,
            r.nfe,
            r.start_step,
            r.edit_step_equivalents,
            r.kept_from_source.map_or(String::new(), |k| format!(
                "; {:.0}% of the pixels kept from the source",
                100.0 * k
            ))
        );
    }
    for r in &report.runner_up_refines {
        println!(
            "also refined: candidate {} (seed {}) -> {} ({} forwards, {:.1} edit-step equivalents)",
            r.candidate,
            r.seed,
            r.file.as_deref().unwrap_or("(not written)"),
            r.nfe,
            r.edit_step_equivalents
        );
    }
    if let Some(adaptive) = &report.adaptive {
        println!(
            "stopped after {} round(s): {}",
            adaptive.rounds.len(),
            adaptive.stop_detail
        );
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    println!(
        "judge: {} calls, {} failed, {} cached, {} + {} tokens",
        report.judge_totals.calls,
        report.judge_totals.failures,
        report.judge_totals.cached,
        report.judge_totals.prompt_tokens,
        report.judge_totals.completion_tokens,
    );
    println!("time: {:.1} s in all", report.timings.total_s);
    println!("outputs in {}", out.display());
}
