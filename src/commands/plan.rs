//! `plan`: the memory plan of an edit, printed without loading anything.

use crate::backends::{GeneratorSpec, JudgeSpec, Workload};
use crate::cli::{EditArgs, GeneratorKind};
use crate::edit::{load_image, resize_to_panel, ImageLimits};
use crate::error::EditError;
use crate::plan::{self, gb};

/// Prints the plan as a table with the verdict against `--memory-budget` or the device's
/// free memory; a plan that does not fit ends with the refusal `edit` would give (exit 2).
pub fn plan(args: EditArgs) -> anyhow::Result<()> {
    // `plan` shares `edit`'s flags; those that act only when an edit runs are refused here.
    let edit_only = crate::cli::flags_given([
        ("--init-latents", args.init_latents.is_some()),
        ("--download", args.engine.download),
    ]);
    if let Some(flag) = edit_only.first() {
        return Err(EditError::Invalid(format!(
            "{flag} acts when an edit runs; plan loads and fetches nothing (it reads configs and file headers): drop {flag}"
        ))
        .into());
    }
    let panel = match &args.image {
        Some(path) => {
            let source = load_image(path, ImageLimits::default())?;
            let panel = resize_to_panel(&source, args.width)
                .map_err(|e| EditError::Invalid(format!("{}: {e}", path.display())))?;
            (panel.width() as usize, panel.height() as usize)
        }
        None => (args.width as usize, args.width as usize),
    };
    let strategy = args.strategy.to_single_config()?;
    let workload = Workload::new(panel, false, [&strategy]);
    // The plan is of a FLUX run: without weights named, of FLUX.1 Fill's published
    // configuration.
    let mut flags = args.engine.generator.clone();
    if flags.generator == GeneratorKind::Auto {
        flags.generator = GeneratorKind::Flux;
    }
    let g = &flags;
    let judge = JudgeSpec::from_args(&args.engine.judge)?;
    let generator = GeneratorSpec::from_args(g, args.engine.download)?;
    let Some(flux) = generator.flux() else {
        return Err(EditError::Invalid(
            "--generator testbed: the memory plan is of a FLUX run (the testbed holds no model)"
                .into(),
        )
        .into());
    };
    let (request, _) = flux.plan_request(judge.footprint(flux.device)?, &workload)?;
    // Planning a GPU run from a machine without one (a laptop, a login node) still prints
    // the plan; only the verdict needs the device's free memory.
    let (available, unopened) = match flux.available_memory() {
        Ok(available) => (available, None),
        Err(e) => (None, Some(e)),
    };
    // `--vae-tiling auto` as the plan check settles it.
    let request = flux.tiled_if_needed(request, available.map(|(bytes, _)| bytes));
    let weights = match &g.random_weights {
        _ if g.model_dir.is_some() || g.transformer.is_some() => {
            "the named weights' configs and headers".to_string()
        }
        Some(size) => format!("--random-weights {size}'s configuration"),
        None => "FLUX.1 Fill [dev]'s published configuration (no weights named)".to_string(),
    };
    println!(
        "Memory plan on {} ({:?}), panel {}x{} (diptych {}x{}), batch {}, {} T5 tokens; from {weights}.\n",
        g.device,
        request.dtype,
        panel.0,
        panel.1,
        2 * panel.0,
        panel.1,
        request.batch,
        request.t5_tokens
    );
    let memory_plan = request.plan();
    print!("{}", memory_plan.table(available.map(|(b, _)| b)));
    println!("\nEstimates from the configurations (working memory fitted on the CPU; see ARCHITECTURE.md).");
    if let Some(e) = unopened {
        println!(
            "No verdict: the device's free memory is unknown here ({e}); give --memory-budget GB to check a fit."
        );
    }
    // T5 and CLIP on the CPU beside a GPU: their host share against the host's memory.
    if let Some((host, source)) = flux.host_memory() {
        plan::check_host(&request, host, source).map_err(EditError::Invalid)?;
    }
    if let Some((bytes, source)) = available {
        plan::check(&request, bytes, source).map_err(EditError::Invalid)?;
        println!(
            "Fits: ~{:.1} GB at the peak, {:.1} GB {source}.",
            gb(memory_plan.peak_bytes),
            gb(bytes)
        );
        if request.cuda && memory_plan.peak_bytes + CUDA_MARGIN_BYTES > bytes {
            println!(
                "Tight: less than {:.1} GB to spare. The one GPU measurement so far (an H200) \
                 peaked ~2 GB above the plan plus the CUDA context (the allocator's cache; \
                 docs/memory.md, What fits): leave that margin, e.g. a --memory-budget of \
                 the card's size less 2.5 GB shows what lowers the peak enough.",
                gb(CUDA_MARGIN_BYTES)
            );
        }
    }
    Ok(())
}

/// What a CUDA run held beyond its plan on the one measurement so far: ~0.5 GB of context
/// and ~2 GB the allocator kept (docs/results/gpu-2026-12-04.md).
const CUDA_MARGIN_BYTES: usize = 2_500_000_000;
