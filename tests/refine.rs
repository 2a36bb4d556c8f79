//! The hi-res refine through the engine and the command line: the pick upscaled and run
//! image-to-image at the refine size, its forwards counted apart, the blend that keeps the
//! source, and `edit --refine` end to end through FLUX with random weights. (The refine
//! pass itself is matched against diffusers in tests/flux.rs.)

mod support;
use support::cli;

use std::sync::Arc;

use candle_core::Tensor;
use icedit_scale::edit::refine::{change_mask, upscale};
use icedit_scale::edit::EditContext;
use icedit_scale::engine::{
    EditJob, Engine, GeneratorWorker, Silent, StrategyConfig, StrategyKind,
};
use icedit_scale::error::GenerateError;
use icedit_scale::generate::testbed::{TestbedConfig, TestbedGenerator};
use icedit_scale::generate::{DecodePurpose, Generator, GeneratorInfo, PreparedEdit};
use icedit_scale::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use icedit_scale::models::testbed::make_edit;
use image::RgbImage;

fn engine() -> Engine {
    let edits = icedit_scale::models::testbed::TestbedEdits::default();
    let generator = TestbedGenerator::with_edits(TestbedConfig::default(), edits.clone());
    let judge = TestbedJudge::knowing(TestbedJudgeConfig::default(), edits);
    Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(generator))),
        Arc::new(judge),
        4,
    )
}

fn strategy(refine: Option<u32>, strength: f64, keep_unchanged: bool) -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::EarlyFilter,
        seeds: 4,
        probe_steps: 3,
        keep: 2,
        steps: 20,
        refine,
        refine_strength: strength,
        refine_keep_unchanged: keep_unchanged,
        ..StrategyConfig::default()
    }
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    total as f64 / a.as_raw().len() as f64
}

fn run(strategy: StrategyConfig) -> icedit_scale::engine::EditReport {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(engine().run(EditJob::new(make_edit(7, 64), strategy), Arc::new(Silent)))
        .unwrap()
}

#[test]
fn the_pick_is_refined_at_the_larger_size_and_its_forwards_are_counted_apart() {
    let plain = run(strategy(None, 0.35, false));
    let refined = run(strategy(Some(128), 0.35, false));
    // The edit itself is the same run: same NFE, same pick.
    assert_eq!(plain.nfe.total, refined.nfe.total);
    assert_eq!(
        plain.pick.as_ref().map(|p| p.index),
        refined.pick.as_ref().map(|p| p.index)
    );
    assert!(plain.refine.is_none() && plain.nfe.refine == 0);
    let r = refined.refine.as_ref().expect("a refine record");
    let (w, h) = refined.panel;
    assert_eq!(r.size, (128, 128 * h / w));
    // diffusers' get_timesteps: 20 * 0.35 = 7 steps run, from step 13.
    assert_eq!((r.start_step, r.nfe, r.steps), (13, 7, 20));
    assert_eq!(refined.nfe.refine, 7);
    assert!(!r.in_budget);
    // Four times the tokens: a refine forward costs four edit forwards (the testbed's cost
    // is its token ratio).
    assert!((r.step_cost - 4.0).abs() < 1e-9, "{}", r.step_cost);
    assert!((refined.nfe.refine_edit_step_equivalents - 28.0).abs() < 1e-9);
    assert_eq!(r.candidate, refined.pick.as_ref().unwrap().index);
    let image = r.image.as_ref().unwrap();
    assert_eq!(image.dimensions(), r.size);
}

/// A refine that re-runs one step starts from the upscaled pick noised to the last sigma
/// and returns its content: much closer to it than the edit is to its source.
#[test]
fn a_one_step_refine_returns_the_upscaled_edit() {
    let edit = make_edit(7, 64);
    let one = run(strategy(Some(128), 1.0 / 20.0, false));
    let r = one.refine.as_ref().unwrap();
    assert_eq!((r.start_step, r.nfe), (19, 1));
    let pick = one.picked().unwrap().images.final_image.clone().unwrap();
    let upscaled = upscale(&pick, r.size);
    let source = upscale(&edit.source, r.size);
    let refined = r.image.as_ref().unwrap();
    // Over the pixels the edit changed (by more than 30 levels somewhere).
    let changed: Vec<usize> = (0..upscaled.as_raw().len() / 3)
        .filter(|&i| {
            (0..3).any(|c| upscaled.as_raw()[3 * i + c].abs_diff(source.as_raw()[3 * i + c]) > 30)
        })
        .collect();
    assert!(!changed.is_empty(), "the pick changed nothing");
    let mean_over = |a: &RgbImage, b: &RgbImage| {
        let total: u64 = changed
            .iter()
            .flat_map(|&i| (0..3).map(move |c| 3 * i + c))
            .map(|j| a.as_raw()[j].abs_diff(b.as_raw()[j]) as u64)
            .sum();
        total as f64 / (3 * changed.len()) as f64
    };
    let near = mean_over(refined, &upscaled);
    let edited = mean_over(&upscaled, &source);
    eprintln!(
        "over the {} changed pixels: the one-step refine is {near:.2} levels from the upscaled pick, which is {edited:.2} from the source",
        changed.len()
    );
    assert!(near < 8.0, "one step moved the pick by {near:.2} levels");
    assert!(
        near * 4.0 < edited,
        "one step {near:.2} vs the edit's change {edited:.2}"
    );
    assert!(mean_abs_diff(refined, &upscaled) < 6.0);
}

/// The blend through the engine: the same edit refined with and without
/// `refine_keep_unchanged` (same seeds, so the same pick and refine). Where the change mask
/// is 0 the blended image is the source at the refined size pixel for pixel, where it is
/// 255 the refine; and the refine alone did move some of the kept pixels, so the check
/// is not vacuous.
#[test]
fn keep_unchanged_takes_the_source_where_the_edit_changed_nothing() {
    let edit = make_edit(7, 64);
    let blended = run(strategy(Some(128), 0.35, true));
    let plain = run(strategy(Some(128), 0.35, false));
    let r = blended.refine.as_ref().unwrap();
    assert_eq!(plain.refine.as_ref().unwrap().kept_from_source, None);
    let kept = r.kept_from_source.expect("the blend says how much it kept");
    assert!(kept > 0.0 && kept < 1.0, "{kept}");
    let pick = blended
        .picked()
        .unwrap()
        .images
        .final_image
        .clone()
        .unwrap();
    let mask = change_mask(&edit.source, &pick, r.size);
    let source = edit.source_at(r.size);
    let (out, refined) = (
        r.image.as_ref().unwrap(),
        plain.refine.as_ref().unwrap().image.as_ref().unwrap(),
    );
    let (mut zeros, mut moved) = (0usize, 0usize);
    for (x, y, m) in mask.enumerate_pixels() {
        match m[0] {
            0 => {
                zeros += 1;
                assert_eq!(out.get_pixel(x, y), source.get_pixel(x, y), "({x}, {y})");
                moved += usize::from(refined.get_pixel(x, y) != source.get_pixel(x, y));
            }
            255 => assert_eq!(out.get_pixel(x, y), refined.get_pixel(x, y), "({x}, {y})"),
            _ => {}
        }
    }
    assert_eq!(zeros as f32 / (r.size.0 * r.size.1) as f32, kept);
    assert!(moved > 0, "the refine changed none of the kept pixels");
    eprintln!("{zeros} pixels kept from the source, {moved} of them moved by the refine alone");
}

#[test]
fn edit_refine_runs_end_to_end_through_flux_with_random_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = cli(&[
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--random-weights",
        "small",
        "--width",
        "32",
        "--t5-tokens",
        "16",
        "--strategy",
        "random",
        "--judge",
        "none",
        "--steps",
        "4",
        "--refine",
        "64",
        "--refine-strength",
        "0.5",
        "--refine-keep-unchanged",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("refined to 64x"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let refine = &report["refine"];
    assert_eq!(refine["start_step"], 2);
    assert_eq!(refine["nfe"], 2);
    assert_eq!(report["nfe"]["refine"], 2);
    assert_eq!(report["nfe"]["total"], 4, "the edit's own NFE");
    assert_eq!(refine["in_budget"], false);
    assert_eq!(refine["keep_unchanged"], true);
    let kept = refine["kept_from_source"]
        .as_f64()
        .expect("kept_from_source");
    assert!((0.0..=1.0).contains(&kept), "{kept}");
    // Four times the image tokens, with 16 text tokens beside them: more than one edit
    // forward's FLOPs (at this toy size the text tokens keep it under four).
    assert!(
        refine["step_cost"].as_f64().unwrap() > 1.5,
        "{}",
        refine["step_cost"]
    );
    assert_eq!(report["pick_file"], "final.png");
    assert_eq!(report["edit_file"], "final_edit.png");
    let final_png = image::open(out.join("final.png")).unwrap();
    let (w, h) = (final_png.width(), final_png.height());
    assert_eq!(w, 64);
    assert_eq!(refine["size"], serde_json::json!([w, h]));
    let edit_png = image::open(out.join("final_edit.png")).unwrap();
    assert_eq!(edit_png.width(), 32);
}

#[test]
fn a_refine_no_wider_than_the_edit_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = cli(&[
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--width",
        "64",
        "--refine",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--refine 64"), "{stderr}");
    assert!(!out.join("report.json").exists());
}

/// `refine_best 3` refines the pick as before and then the next best finished candidates,
/// best first, each from its own seed; the ledger counts every refine forward.
#[test]
fn refine_best_refines_the_runner_ups_after_the_pick() {
    let one = run(strategy(Some(128), 0.35, false));
    // Best-of-N completes every seed: four finished candidates to rank.
    let mut three = strategy(Some(128), 0.35, false);
    three.kind = StrategyKind::BestOfN;
    let one_of_six = run(StrategyConfig {
        refine_best: 1,
        ..three.clone()
    });
    three.refine_best = 3;
    let report = run(three);
    // The pick's refine is the one a refine of the pick alone gives.
    let (pick, alone) = (
        report.refine.as_ref().unwrap(),
        one_of_six.refine.as_ref().unwrap(),
    );
    assert_eq!(pick.candidate, alone.candidate);
    assert_eq!(
        pick.image.as_ref().unwrap().as_raw(),
        alone.image.as_ref().unwrap().as_raw()
    );
    assert!(one.runner_up_refines.is_empty() && one_of_six.runner_up_refines.is_empty());
    // Two runner-ups: finished, not the pick, best first by VIE O.
    let ups = &report.runner_up_refines;
    assert_eq!(ups.len(), 2, "{:?}", report.notes);
    let overall = |i: usize| report.candidates[i].overall().unwrap_or(f32::NEG_INFINITY);
    let pick_o = overall(pick.candidate);
    for w in ups.windows(2) {
        assert!(overall(w[0].candidate) >= overall(w[1].candidate));
    }
    for r in ups {
        assert_ne!(r.candidate, pick.candidate);
        assert!(report.candidates[r.candidate].images.final_image.is_some());
        assert!(overall(r.candidate) <= pick_o);
        assert_eq!(r.seed, report.candidates[r.candidate].seed);
        assert_eq!(r.size, pick.size);
        assert_eq!(r.image.as_ref().unwrap().dimensions(), r.size);
    }
    assert_eq!(report.nfe.refine, 3 * pick.nfe);
    assert!(
        (report.nfe.refine_edit_step_equivalents - 3.0 * pick.edit_step_equivalents).abs() < 1e-9
    );
    assert_eq!(
        report.nfe.total, one_of_six.nfe.total,
        "the edit's own NFE is unchanged"
    );

    // Written beside the pick, named by candidate and seed.
    let dir = tempfile::tempdir().unwrap();
    let mut report = report;
    icedit_scale::engine::outputs::write_outputs(&mut report, dir.path()).unwrap();
    for r in &report.runner_up_refines {
        let file = r.file.as_deref().unwrap();
        assert!(file.starts_with("refined/c"), "{file}");
        assert_eq!(image::open(dir.path().join(file)).unwrap().width(), 128);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["runner_up_refines"].as_array().unwrap().len(), 2);
}

/// Asking for more refines than finished candidates refines them all and says so.
#[test]
fn refine_best_beyond_the_finished_candidates_refines_them_all_with_a_note() {
    let mut s = strategy(Some(128), 0.35, false);
    s.refine_best = 5; // keep 2: at most two finish
    let report = run(s);
    let finished = report
        .candidates
        .iter()
        .filter(|c| c.images.final_image.is_some())
        .count();
    assert_eq!(report.runner_up_refines.len(), finished - 1);
    assert!(
        report.notes.iter().any(|n| n.contains("refine_best 5")),
        "{:?}",
        report.notes
    );
}

#[test]
fn refine_best_without_a_refine_is_refused_naming_both_flags() {
    let result = cli(&[
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--refine-best",
        "2",
        "--out",
        "/nonexistent/never-written",
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--refine-best 2") && stderr.contains("--refine WIDTH"),
        "{stderr}"
    );
}

/// `edit --refine-best 2` through FLUX with random weights: the runner-up's refine is its
/// own image (another seed), written under refined/ at the refined size.
#[test]
fn edit_refine_best_writes_the_runner_up_beside_the_pick() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = cli(&[
        "edit",
        "--image",
        "tests/fixtures/flux/source.png",
        "--instruction",
        "make the sky night",
        "--random-weights",
        "small",
        "--width",
        "32",
        "--t5-tokens",
        "16",
        "--strategy",
        "best-of-n",
        "--seeds",
        "2",
        "--judge",
        "tests/fixtures/qwen2vl/judge-tiny.toml",
        "--steps",
        "4",
        "--refine",
        "64",
        "--refine-strength",
        "0.5",
        "--refine-best",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("also refined: candidate"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let ups = report["runner_up_refines"].as_array().unwrap();
    assert_eq!(ups.len(), 1);
    assert_ne!(ups[0]["candidate"], report["pick"]["index"]);
    assert_eq!(report["nfe"]["refine"], 4, "two refines of two forwards");
    let file = ups[0]["file"].as_str().unwrap();
    let runner_up = image::open(out.join(file)).unwrap().to_rgb8();
    let pick = image::open(out.join("final.png")).unwrap().to_rgb8();
    assert_eq!(runner_up.dimensions(), pick.dimensions());
    assert!(
        runner_up.as_raw() != pick.as_raw(),
        "another seed, another image"
    );
}

/// The testbed generator, out of memory whenever it is asked to prepare a panel wider
/// than the edit's (the refine's diptych): the search itself runs as usual.
struct NoRoomToRefine(TestbedGenerator);

impl Generator for NoRoomToRefine {
    fn info(&self) -> GeneratorInfo {
        self.0.info()
    }
    fn prepare(&mut self, edit: &EditContext) -> Result<PreparedEdit, GenerateError> {
        if edit.panel_size().0 > 64 {
            return Err(GenerateError::OutOfMemory("the refine's diptych".into()));
        }
        self.0.prepare(edit)
    }
    fn velocity(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError> {
        self.0.velocity(edit, latents, sigma)
    }
    fn decode(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError> {
        self.0.decode(edit, latents, purpose)
    }
    fn encode_start(
        &mut self,
        edit: &PreparedEdit,
        init: &RgbImage,
    ) -> Result<Tensor, GenerateError> {
        self.0.encode_start(edit, init)
    }
    fn release(&mut self, edit: &PreparedEdit) {
        self.0.release(edit)
    }
}

/// A refine that fails after the search keeps the search: the report (every candidate,
/// the pick at the edit's size, the NFE spent) with the refine's error, not an error that
/// drops them.
#[test]
fn a_failed_refine_keeps_the_finished_search() {
    let edits = icedit_scale::models::testbed::TestbedEdits::default();
    let generator = TestbedGenerator::with_edits(TestbedConfig::default(), edits.clone());
    let judge = TestbedJudge::knowing(TestbedJudgeConfig::default(), edits);
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(NoRoomToRefine(generator)))),
        Arc::new(judge),
        4,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt
        .block_on(engine.run(
            EditJob::new(make_edit(7, 64), strategy(Some(128), 0.35, false)),
            Arc::new(Silent),
        ))
        .expect("the search's report");
    let plain = run(strategy(None, 0.35, false));
    assert_eq!(report.nfe.total, plain.nfe.total);
    assert_eq!(report.candidates.len(), plain.candidates.len());
    assert!(report.pick.is_some() && report.refine.is_none());
    let error = report.refine_error.as_deref().expect("the refine's error");
    assert!(error.contains("out of device memory"), "{error}");
    let reason = report.incomplete_reason().expect("counted as unfinished");
    assert!(reason.contains("refine failed"), "{reason}");
    assert!(plain.incomplete_reason().is_none());
}

/// A refine that cannot be made at this panel is refused before the search runs, whatever
/// the front end (the engine checks it first).
#[test]
fn a_refine_that_cannot_be_made_is_refused_before_the_search() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let progress = Arc::new(Recorder(std::sync::Mutex::new(tx)));
    let result = rt.block_on(engine().run(
        EditJob::new(make_edit(7, 64), strategy(Some(64), 0.35, false)),
        progress,
    ));
    let error = result
        .expect_err("a refine no wider than the edit")
        .to_string();
    assert!(error.contains("64"), "{error}");
    assert!(rx.try_recv().is_err(), "no phase began");
}

/// Sends the name of every phase that begins.
struct Recorder(std::sync::Mutex<std::sync::mpsc::Sender<String>>);

impl icedit_scale::engine::Progress for Recorder {
    fn begin(&self, phase: &str, _: u64) {
        let _ = self.0.lock().unwrap().send(phase.to_string());
    }
    fn inc(&self, _: u64) {}
    fn end(&self) {}
}
