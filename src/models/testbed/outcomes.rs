//! The finite set of outcomes a testbed edit can land on: the correct target and plausible
//! failures, with prior weights set by a difficulty knob.
//!
//! The generator and the judge both derive the set from the [`EditContext`] through
//! [`outcome_set`], so they agree on what "correct" is without sharing state.

use std::sync::Arc;

use image::{imageops, Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::scene::{EditOp, SceneEdit, Shape, BACKGROUNDS, COLOURS};
use crate::edit::EditContext;

/// `EditContext::meta` key holding a testbed item's [`SceneEdit`] as JSON.
pub const SCENE_META_KEY: &str = "testbed.scene";

/// What an outcome is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeLabel {
    /// The instruction carried out exactly.
    Correct,
    /// Nothing changed.
    Unchanged,
    /// The operation applied to the wrong object.
    WrongObject,
    /// The right kind of edit with the wrong colour (or the wrong kind of edit).
    WrongColour,
    /// Half done: the left half of the changed region edited, the right half not.
    Partial,
    /// The correct edit smeared with artifacts.
    Artifacts,
}

/// One possible result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What it is.
    pub label: OutcomeLabel,
    /// Prior probability (the set sums to 1).
    pub prior: f32,
    /// The right panel it corresponds to.
    pub image: Arc<RgbImage>,
}

/// Prior weights: the correct outcome's share falls linearly with difficulty in [0, 1].
fn prior(label: OutcomeLabel, difficulty: f32) -> f32 {
    let d = difficulty.clamp(0.0, 1.0);
    match label {
        OutcomeLabel::Correct => 1.0 - 0.8 * d,
        _ => 0.05 + 0.2 * d,
    }
}

/// The outcome set of an edit. Testbed items carry their scene under [`SCENE_META_KEY`];
/// any other image gets a generic synthetic edit derived from (source, instruction): a
/// colour shift of one region. That fallback is a simulation, not an edit of the photo.
pub fn outcome_set(edit: &EditContext, difficulty: f32) -> Result<Vec<Outcome>, String> {
    let (w, h) = edit.panel_size();
    let images: Vec<(OutcomeLabel, RgbImage)> = match edit.meta.get(SCENE_META_KEY) {
        Some(json) => {
            let se: SceneEdit =
                serde_json::from_str(json).map_err(|e| format!("meta {SCENE_META_KEY}: {e}"))?;
            scene_outcomes(&se, w, h)
        }
        None => generic_outcomes(&edit.source, &edit.instruction),
    };
    let total: f32 = images.iter().map(|(l, _)| prior(*l, difficulty)).sum();
    Ok(images
        .into_iter()
        .map(|(label, image)| Outcome {
            label,
            prior: prior(label, difficulty) / total,
            image: Arc::new(image),
        })
        .collect())
}

fn scene_outcomes(se: &SceneEdit, w: u32, h: u32) -> Vec<(OutcomeLabel, RgbImage)> {
    let source = se.scene.render(w, h);
    let target = se.target().render(w, h);
    let n = se.scene.shapes.len();
    let other = |t: usize| (t + 1) % n;
    let wrong_object_op = match &se.op {
        EditOp::Recolour { target, colour } => EditOp::Recolour {
            target: other(*target),
            colour: *colour,
        },
        EditOp::Remove { target } => EditOp::Remove {
            target: other(*target),
        },
        EditOp::Move { target, dx } => EditOp::Move {
            target: other(*target),
            dx: *dx,
        },
        EditOp::Add { shape } => EditOp::Add {
            shape: Shape {
                x: 1.0 - shape.x,
                y: 1.0 - shape.y,
                ..*shape
            },
        },
        EditOp::Background { .. } => EditOp::Recolour {
            target: 0,
            colour: (se.scene.shapes[0].colour + 3) % COLOURS.len(),
        },
    };
    let wrong_colour_op = match &se.op {
        EditOp::Recolour { target, colour } => EditOp::Recolour {
            target: *target,
            colour: (colour + 1 + (colour + 1 == se.scene.shapes[*target].colour) as usize)
                % COLOURS.len(),
        },
        EditOp::Add { shape } => EditOp::Add {
            shape: Shape {
                colour: (shape.colour + 2) % COLOURS.len(),
                ..*shape
            },
        },
        EditOp::Background { colour, .. } => {
            let alt = BACKGROUNDS
                .iter()
                .map(|b| b.1)
                .find(|c| c != colour && *c != se.scene.background)
                .unwrap_or([90, 60, 30]);
            EditOp::Background {
                colour: alt,
                name: "other".into(),
            }
        }
        // Wrong kind of edit: recolour the object instead of removing or moving it.
        EditOp::Remove { target } | EditOp::Move { target, .. } => EditOp::Recolour {
            target: *target,
            colour: (se.scene.shapes[*target].colour + 2) % COLOURS.len(),
        },
    };
    let wrong_object = SceneEdit::apply(&se.scene, &wrong_object_op).render(w, h);
    let wrong_colour = SceneEdit::apply(&se.scene, &wrong_colour_op).render(w, h);
    let partial = half_done(&source, &target);
    let artifacts = smear(&target, hash_str(&se.instruction));
    vec![
        (OutcomeLabel::Correct, target),
        (OutcomeLabel::Unchanged, source),
        (OutcomeLabel::WrongObject, wrong_object),
        (OutcomeLabel::WrongColour, wrong_colour),
        (OutcomeLabel::Partial, partial),
        (OutcomeLabel::Artifacts, artifacts),
    ]
}

fn generic_outcomes(source: &RgbImage, instruction: &str) -> Vec<(OutcomeLabel, RgbImage)> {
    let h = hash_str(instruction);
    let (w, ht) = source.dimensions();
    // The "edit" shifts colours in one third of the panel; the wrong object is another third.
    let third = |i: u64| (i % 3) as u32 * (w / 3);
    let (region, wrong_region) = (third(h), third(h + 1));
    let shift = [(h >> 8) as u8 | 64, (h >> 16) as u8, (h >> 24) as u8 | 32];
    let alt_shift = [shift[2], shift[0], shift[1]];
    let recolour = |x0: u32, s: [u8; 3]| {
        let mut img = source.clone();
        for y in 0..ht {
            for x in x0..(x0 + w / 3).min(w) {
                let p = img.get_pixel_mut(x, y);
                for c in 0..3 {
                    p[c] = p[c].wrapping_add(s[c]);
                }
            }
        }
        img
    };
    let target = recolour(region, shift);
    vec![
        (OutcomeLabel::Correct, target.clone()),
        (OutcomeLabel::Unchanged, source.clone()),
        (OutcomeLabel::WrongObject, recolour(wrong_region, shift)),
        (OutcomeLabel::WrongColour, recolour(region, alt_shift)),
        (OutcomeLabel::Partial, half_done(source, &target)),
        (OutcomeLabel::Artifacts, smear(&target, h)),
    ]
}

fn hash_str(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The edit carried out on the left half of the region it changes only. (Not a pixel blend:
/// a blend would sit at the latent midpoint of source and target and attract undecided
/// trajectories.)
fn half_done(source: &RgbImage, target: &RgbImage) -> RgbImage {
    let changed: Vec<u32> = source
        .enumerate_pixels()
        .zip(target.pixels())
        .filter(|((_, _, s), t)| s != t)
        .map(|((x, _, _), _)| x)
        .collect();
    let (lo, hi) = (
        changed.iter().copied().min().unwrap_or(0),
        changed.iter().copied().max().unwrap_or(0),
    );
    let mid = (lo + hi) / 2;
    RgbImage::from_fn(source.width(), source.height(), |x, y| {
        if x <= mid {
            *target.get_pixel(x, y)
        } else {
            *source.get_pixel(x, y)
        }
    })
}

/// `a * (1 - t) + b * t`, per channel.
pub fn blend(a: &RgbImage, b: &RgbImage, t: f32) -> RgbImage {
    RgbImage::from_fn(a.width(), a.height(), |x, y| {
        let (pa, pb) = (a.get_pixel(x, y), b.get_pixel(x, y));
        Rgb(std::array::from_fn(|c| {
            (pa[c] as f32 * (1.0 - t) + pb[c] as f32 * t).round() as u8
        }))
    })
}

/// The target with a band of high-frequency streaks: what a broken sample looks like.
fn smear(target: &RgbImage, seed: u64) -> RgbImage {
    let mut img = target.clone();
    let (w, h) = img.dimensions();
    let y0 = (seed % 2) as u32 * h / 2;
    for y in y0..(y0 + h / 2).min(h) {
        for x in 0..w {
            if (x / 2 + y) % 4 < 2 {
                let p = img.get_pixel_mut(x, y);
                *p = Rgb([255 - p[0], 255 - p[1] / 2, p[2] / 3]);
            }
        }
    }
    img
}

/// Mean squared difference per channel value (0..65025) between two images of one size.
pub fn mse(a: &RgbImage, b: &RgbImage) -> f32 {
    let (sa, sb) = (a.as_raw(), b.as_raw());
    let total: f64 = sa
        .iter()
        .zip(sb)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    (total / sa.len().max(1) as f64) as f32
}

/// Which outcome an image is nearest to (compared at 1/4 of the outcomes' resolution, so
/// small reconstruction noise does not matter; an image of another size, such as a hi-res
/// refine of the edit, is brought to that size too).
pub fn classify(outcomes: &[Outcome], image: &RgbImage) -> OutcomeLabel {
    let (w, h) = outcomes
        .first()
        .expect("outcome sets are never empty")
        .image
        .dimensions();
    let small = |i: &RgbImage| {
        imageops::resize(
            i,
            (w / 4).max(1),
            (h / 4).max(1),
            imageops::FilterType::Triangle,
        )
    };
    let probe = small(image);
    outcomes
        .iter()
        .map(|o| (o.label, mse(&small(&o.image), &probe)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(l, _)| l)
        .expect("outcome sets are never empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_sets_are_distinct_and_priors_follow_difficulty() {
        for seed in 0..30 {
            let edit = super::super::make_edit(seed, 64);
            let set = outcome_set(&edit, 0.5).unwrap();
            assert_eq!(set.len(), 6);
            assert!((set.iter().map(|o| o.prior).sum::<f32>() - 1.0).abs() < 1e-5);
            for (i, a) in set.iter().enumerate() {
                assert_eq!(classify(&set, &a.image), a.label, "seed {seed}");
                for b in &set[i + 1..] {
                    assert!(
                        mse(&a.image, &b.image) > 0.0,
                        "seed {seed}: {:?} = {:?}",
                        a.label,
                        b.label
                    );
                }
            }
        }
        let edit = super::super::make_edit(3, 64);
        let easy = outcome_set(&edit, 0.0).unwrap()[0].prior;
        let hard = outcome_set(&edit, 1.0).unwrap()[0].prior;
        assert!(easy > 0.7 && hard < 0.2, "{easy} {hard}");
    }

    #[test]
    fn generic_fallback_for_arbitrary_images() {
        let edit = EditContext::new(
            "x",
            RgbImage::from_pixel(48, 32, Rgb([100, 50, 20])),
            "make it pop",
        );
        let set = outcome_set(&edit, 0.5).unwrap();
        assert_eq!(set[0].label, OutcomeLabel::Correct);
        assert!(mse(&set[0].image, &edit.source) > 0.0);
    }
}
