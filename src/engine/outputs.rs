//! Writing an edit's outputs: the final edit, every preview, survivors' finals, a contact
//! sheet and `report.json`.
//!
//! Layout of the output folder:
//! ```text
//! final.png                      the returned edit (the refined one with a refine)
//! final_edit.png                 with a refine: the pick at the edit's size
//! refined/c01_s000001.png        with refine_best > 1: the runner-ups' refines
//! previews/c03_s000003_step04.png  candidate 3 (seed 3)'s preview at step 4
//! short/c03_s000003.png          tournament short runs
//! finals/c03_s000003.png         finished candidates
//! contact_sheet.png              previews (or short runs) with verdicts and scores
//! report.json                    the full record (schema in docs/outputs.md)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::contact_sheet::contact_sheet;
use super::report::{CandidateRecord, EditReport};
use crate::error::EngineError;
use crate::fsio::write_atomic;

fn write_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes `image` as the PNG `out/rel`, atomically and fsynced; returns `rel`.
pub fn save_png(out: &Path, rel: &str, image: &RgbImage) -> Result<String, EngineError> {
    let path = out.join(rel);
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| write_err(&path, e))?;
    write_atomic(&path, &bytes)?;
    Ok(rel.to_string())
}

/// A candidate's file stem in an edit's folder (`c03_s000003`): the server names the
/// previews it writes while the edit runs the same way, so their URLs stay valid.
pub fn candidate_stem(index: usize, seed: u64) -> String {
    format!("c{index:02}_s{seed:06}")
}

fn stem(c: &CandidateRecord) -> String {
    candidate_stem(c.index, c.seed)
}

/// Writes every output of `report` under `out` and fills in the file names in the report.
/// Returns the path of `report.json`.
pub fn write_outputs(report: &mut EditReport, out: &Path) -> Result<PathBuf, EngineError> {
    write_outputs_except(report, out, &HashSet::new())
}

/// [`write_outputs`], leaving the images at the paths in `written` (relative to `out`) as
/// they are: the server's relay wrote those, durably, from the same images while the edit
/// ran, so encoding them again would only spend time.
pub fn write_outputs_except(
    report: &mut EditReport,
    out: &Path,
    written: &HashSet<String>,
) -> Result<PathBuf, EngineError> {
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    let save = |out: &Path, rel: &str, image: &RgbImage| {
        if written.contains(rel) {
            Ok(rel.to_string())
        } else {
            save_png(out, rel, image)
        }
    };
    for c in &mut report.candidates {
        let name = stem(c);
        for (screen, image) in c.screens.iter_mut().zip(&c.images.previews) {
            let rel = format!("previews/{name}_step{:02}.png", screen.step);
            screen.preview_file = Some(save(out, &rel, image)?);
        }
        if let Some(image) = &c.images.short_run {
            c.short_run_file = Some(save(out, &format!("short/{name}.png"), image)?);
        }
        if let Some(image) = &c.images.final_image {
            c.final_file = Some(save(out, &format!("finals/{name}.png"), image)?);
        }
    }
    let picked = report.picked().and_then(|c| c.images.final_image.clone());
    let refined = report.refine.as_ref().and_then(|r| r.image.clone());
    match (picked, refined) {
        (Some(edit), Some(refined)) => {
            report.edit_file = Some(save(out, "final_edit.png", &edit)?);
            let file = save(out, "final.png", &refined)?;
            if let Some(r) = report.refine.as_mut() {
                r.file = Some(file.clone());
            }
            report.pick_file = Some(file);
        }
        (Some(edit), None) => report.pick_file = Some(save(out, "final.png", &edit)?),
        (None, _) => {}
    }
    for r in &mut report.runner_up_refines {
        if let Some(image) = &r.image {
            let rel = format!("refined/{}.png", candidate_stem(r.candidate, r.seed));
            r.file = Some(save(out, &rel, image)?);
        }
    }
    let sheet = contact_sheet(report);
    save(out, "contact_sheet.png", &sheet)?;
    let path = out.join("report.json");
    // What the edit before this one in `out` wrote, by its report (unreadable: nothing).
    let earlier: Option<EditReport> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let json = serde_json::to_vec_pretty(report).map_err(|e| write_err(&path, e))?;
    write_atomic(&path, &json)?;
    remove_stale_outputs(earlier.as_ref(), report, out)?;
    Ok(path)
}

/// The image files `report` names under its folder, as paths relative to it.
fn named_outputs(report: &EditReport) -> std::collections::HashSet<&str> {
    let mut named: std::collections::HashSet<&str> = report
        .candidates
        .iter()
        .flat_map(|c| {
            c.screens
                .iter()
                .filter_map(|s| s.preview_file.as_deref())
                .chain(c.short_run_file.as_deref())
                .chain(c.final_file.as_deref())
        })
        .chain(
            report
                .runner_up_refines
                .iter()
                .filter_map(|r| r.file.as_deref()),
        )
        .chain(report.edit_file.as_deref())
        .chain(report.pick_file.as_deref())
        .collect();
    named.insert("contact_sheet.png");
    named
}

/// Whether `rel` is a name this layout writes: `final.png` or `final_edit.png`, or a PNG
/// right inside `previews/`, `short/`, `finals/` or `refined/` (a report read from disk is
/// not trusted to name anything else).
fn in_layout(rel: &str) -> bool {
    if matches!(rel, "final.png" | "final_edit.png") {
        return true;
    }
    rel.split_once('/').is_some_and(|(dir, file)| {
        matches!(dir, "previews" | "short" | "finals" | "refined")
            && file.ends_with(".png")
            && !file.contains(['/', '\\'])
            && !file.starts_with('.')
    })
}

/// Removes the images the edit whose report was in `out` before (`earlier`) wrote there
/// and `report` does not name (a reused `--out`, a retried batch item), so the images
/// beside `report.json` are its own. Only files the earlier report names are touched:
/// without one, nothing is removed, and anything else in the folder is the user's.
fn remove_stale_outputs(
    earlier: Option<&EditReport>,
    report: &EditReport,
    out: &Path,
) -> Result<(), EngineError> {
    let Some(earlier) = earlier else {
        return Ok(());
    };
    let named = named_outputs(report);
    let mut removed = 0;
    for rel in named_outputs(earlier) {
        if named.contains(rel) || !in_layout(rel) {
            continue;
        }
        let path = out.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(&path, e)),
        }
    }
    if removed > 0 {
        tracing::info!(
            "{}: removed {removed} image(s) of the earlier edit there that this one does not name",
            out.display()
        );
    }
    Ok(())
}
