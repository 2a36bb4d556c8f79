//! What `judge-eval` measures a judge on: human preference pairs and human ratings, read
//! from JSONL files (paths relative to the file), or generated on the testbed where the
//! truth is known.
//!
//! JSONL, one object per line, told apart by their fields:
//!
//! ```text
//! {"id": "p1", "source": "src.png", "instruction": "make the sky night",
//!  "edit_a": "a.png", "edit_b": "b.png", "preference": "a" | "b" | "tie", "task": "..."}
//! {"id": "r1", "source": "src.png", "instruction": "make the sky night",
//!  "edit": "e.png", "score": 7.5, "task": "..."}
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::stats::Label;
use crate::edit::{load_image, load_image_bytes, EditContext, ImageLimits};
use crate::error::EditError;
use crate::eval::item::{EvalItem, ItemSource};
use crate::fsio::fingerprint::Fingerprint;
use crate::models::testbed::outcomes::outcome_set;

/// Where an edited image comes from.
#[derive(Debug, Clone)]
pub enum EditedImage {
    /// An image file.
    File(PathBuf),
    /// Encoded image bytes (a parquet cell); `origin` names it in errors.
    Bytes {
        /// Encoded PNG/JPEG/WebP.
        bytes: Vec<u8>,
        /// `file.parquet row N column C`.
        origin: String,
    },
    /// A testbed edit part of the way from the source to the target: each pixel moved by
    /// `fraction` of its distance (0 = the source, 1 = the target).
    TestbedBlend(f32),
}

impl EditedImage {
    /// The image at the size of `edit`'s source panel (judges compare like with like).
    pub fn load(&self, edit: &EditContext) -> Result<RgbImage, EditError> {
        let image = match self {
            EditedImage::File(path) => load_image(path, ImageLimits::default())?,
            EditedImage::Bytes { bytes, origin } => {
                load_image_bytes(bytes, origin, ImageLimits::default())?
            }
            EditedImage::TestbedBlend(fraction) => return testbed_blend(edit, *fraction),
        };
        let (w, h) = edit.panel_size();
        Ok(if image.dimensions() == (w, h) {
            image
        } else {
            image::imageops::resize(&image, w, h, image::imageops::FilterType::Lanczos3)
        })
    }

    /// Adds this image's content to `f` under `name` (a blend by its fraction: the
    /// testbed draws it from the item's scene, which the item adds).
    fn fingerprint_into(&self, name: &str, f: &mut Fingerprint) {
        match self {
            EditedImage::File(path) => f.file(name, path),
            EditedImage::Bytes { bytes, .. } => f.bytes(name, bytes),
            EditedImage::TestbedBlend(fraction) => f.text(
                &format!("{name} testbed blend"),
                &fraction.to_bits().to_string(),
            ),
        };
    }
}

/// The source moved `fraction` of the way to the testbed target.
fn testbed_blend(edit: &EditContext, fraction: f32) -> Result<RgbImage, EditError> {
    let outcomes = outcome_set(edit, 0.5).map_err(EditError::Invalid)?;
    let target = &outcomes[0].image;
    let mut out = (*edit.source).clone();
    for (p, t) in out.pixels_mut().zip(target.pixels()) {
        for c in 0..3 {
            let s = p[c] as f32;
            p[c] = (s + fraction * (t[c] as f32 - s)).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

/// What the people who labelled an item said.
#[derive(Debug, Clone)]
pub enum HumanLabel {
    /// Which of two edits is better.
    Preference {
        /// Edit A.
        a: EditedImage,
        /// Edit B.
        b: EditedImage,
        /// Their preference.
        preferred: Label,
    },
    /// A score for one edit (any scale; only its order is used).
    Rating {
        /// The edit.
        edit: EditedImage,
        /// Their score.
        score: f64,
    },
}

/// One labelled item: the edit task and the human label.
#[derive(Debug, Clone)]
pub struct Case {
    /// The source, instruction, task (the id is the case's id).
    pub item: EvalItem,
    /// The human label and the edit(s) it is about.
    pub human: HumanLabel,
    /// The group of pairs this pair belongs to (EditReward-Bench's K candidates of one
    /// edit), for group accuracy.
    pub group: Option<String>,
}

impl Case {
    /// The fingerprint of what the judge is shown for this case: its kind (pair or
    /// rating), the source image's content, the instruction and the edited images'
    /// content ([`crate::fsio::fingerprint`]). The human label, task and group are left
    /// out: the judge never sees them, so a changed label needs no new judgement.
    pub fn content_fingerprint(&self) -> String {
        let kind = match self.human {
            HumanLabel::Preference { .. } => "pair",
            HumanLabel::Rating { .. } => "rating",
        };
        let mut f = Fingerprint::new(kind);
        self.item.fingerprint_into(&mut f);
        match &self.human {
            HumanLabel::Preference { a, b, .. } => {
                a.fingerprint_into("edit_a", &mut f);
                b.fingerprint_into("edit_b", &mut f);
            }
            HumanLabel::Rating { edit, .. } => edit.fingerprint_into("edit", &mut f),
        }
        f.finish()
    }
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> EditError {
    EditError::Invalid(format!("{}: {what}", path.display()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairLine {
    id: String,
    source: PathBuf,
    instruction: String,
    edit_a: PathBuf,
    edit_b: PathBuf,
    preference: Label,
    #[serde(default)]
    task: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatingLine {
    id: String,
    source: PathBuf,
    instruction: String,
    edit: PathBuf,
    score: f64,
    #[serde(default)]
    task: Option<String>,
}

/// Reads a JSONL file of pairs and ratings. Every referenced image must exist: a missing
/// one is named (file, line, field) before any judge is called.
pub fn load_jsonl(path: &Path) -> Result<Vec<Case>, EditError> {
    let file = std::fs::File::open(path).map_err(|e| invalid(path, format!("cannot open: {e}")))?;
    let root = path.parent().unwrap_or(Path::new("."));
    let mut cases = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = |what: String| invalid(path, format!("line {}: {what}", n + 1));
        let line = line.map_err(|e| at(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        let is_pair = value.get("edit_a").is_some() || value.get("preference").is_some();
        let is_rating = value.get("edit").is_some() || value.get("score").is_some();
        let exists = |field: &str, p: &Path| -> Result<PathBuf, EditError> {
            let full = root.join(p);
            if full.is_file() {
                Ok(full)
            } else {
                Err(at(format!("`{field}`: no such file {}", full.display())))
            }
        };
        let (item, human) = match (is_pair, is_rating) {
            (true, false) => {
                let l: PairLine =
                    serde_json::from_value(value).map_err(|e| at(format!("a pair line: {e}")))?;
                let source = ItemSource::File(exists("source", &l.source)?);
                let human = HumanLabel::Preference {
                    a: EditedImage::File(exists("edit_a", &l.edit_a)?),
                    b: EditedImage::File(exists("edit_b", &l.edit_b)?),
                    preferred: l.preference,
                };
                (item(l.id, source, l.instruction, l.task), human)
            }
            (false, true) => {
                let l: RatingLine =
                    serde_json::from_value(value).map_err(|e| at(format!("a rating line: {e}")))?;
                if !l.score.is_finite() {
                    return Err(at(format!(
                        "`score` must be a finite number, not {}",
                        l.score
                    )));
                }
                let source = ItemSource::File(exists("source", &l.source)?);
                let human = HumanLabel::Rating {
                    edit: EditedImage::File(exists("edit", &l.edit)?),
                    score: l.score,
                };
                (item(l.id, source, l.instruction, l.task), human)
            }
            (true, true) => {
                return Err(at(
                    "has fields of both a pair (`edit_a`, `edit_b`, `preference`) and a rating (`edit`, `score`)"
                        .into(),
                ))
            }
            (false, false) => {
                return Err(at(
                    "neither a pair (`edit_a`, `edit_b`, `preference`) nor a rating (`edit`, `score`)"
                        .into(),
                ))
            }
        };
        if item.instruction.trim().is_empty() {
            return Err(at("empty `instruction`".into()));
        }
        cases.push(Case {
            item,
            human,
            group: None,
        });
    }
    Ok(cases)
}

/// An item with no language.
pub(crate) fn item(
    id: String,
    source: ItemSource,
    instruction: String,
    task: Option<String>,
) -> EvalItem {
    EvalItem {
        id,
        source,
        instruction,
        task,
        language: None,
    }
}

/// Synthetic labelled data on testbed scenes, where the truth is known: `pairs` pairs and
/// `ratings` ratings of edits part of the way to the target (scenes `first_scene..`).
///
/// An edit's truth is how far it went: a blend by fraction `f` has the testbed's progress
/// `1 - (1 - f)^2` (its squared distance to the target shrinks by `(1 - f)^2`). A pair's
/// human preference is the edit that went further; one pair in ten shows the same edit twice
/// and is labelled a tie. A rating's human score is `10 * progress`. Fractions are drawn from
/// `seed` in [0.2, 0.9] (pairs) and [0, 1] (ratings).
pub fn testbed_cases(pairs: usize, ratings: usize, first_scene: u64, seed: u64) -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cases = Vec::with_capacity(pairs + ratings);
    for i in 0..pairs {
        let scene = first_scene + i as u64;
        let fa: f32 = rng.random_range(0.2..0.9);
        let fb: f32 = if i % 10 == 9 {
            fa
        } else {
            rng.random_range(0.2..0.9)
        };
        let preferred = if fa > fb {
            Label::A
        } else if fb > fa {
            Label::B
        } else {
            Label::Tie
        };
        cases.push(Case {
            item: item(
                format!("pair{i}"),
                ItemSource::Testbed(scene),
                String::new(),
                Some("testbed-pair".into()),
            ),
            human: HumanLabel::Preference {
                a: EditedImage::TestbedBlend(fa),
                b: EditedImage::TestbedBlend(fb),
                preferred,
            },
            group: None,
        });
    }
    for i in 0..ratings {
        let scene = first_scene + (pairs + i) as u64;
        let f: f32 = rng.random_range(0.0..1.0);
        let progress = 1.0 - (1.0 - f as f64).powi(2);
        cases.push(Case {
            item: item(
                format!("rating{i}"),
                ItemSource::Testbed(scene),
                String::new(),
                Some("testbed-rating".into()),
            ),
            human: HumanLabel::Rating {
                edit: EditedImage::TestbedBlend(f),
                score: 10.0 * progress,
            },
            group: None,
        });
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_are_told_apart_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("x.png");
        RgbImage::new(32, 32).save(&png).unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            "{\"id\":\"p\",\"source\":\"x.png\",\"instruction\":\"do\",\"edit_a\":\"x.png\",\"edit_b\":\"x.png\",\"preference\":\"tie\"}\n\
             \n\
             {\"id\":\"r\",\"source\":\"x.png\",\"instruction\":\"do\",\"edit\":\"x.png\",\"score\":3}\n",
        )
        .unwrap();
        let cases = load_jsonl(&data).unwrap();
        assert!(matches!(
            cases[0].human,
            HumanLabel::Preference {
                preferred: Label::Tie,
                ..
            }
        ));
        assert!(matches!(cases[1].human, HumanLabel::Rating { score, .. } if score == 3.0));

        let bad = |line: &str| {
            std::fs::write(&data, line).unwrap();
            load_jsonl(&data).unwrap_err().to_string()
        };
        let e = bad("{\"id\":\"p\",\"source\":\"x.png\",\"instruction\":\"do\",\"edit_a\":\"gone.png\",\"edit_b\":\"x.png\",\"preference\":\"a\"}");
        assert!(
            e.contains("line 1") && e.contains("`edit_a`") && e.contains("gone.png"),
            "{e}"
        );
        let e = bad("{\"id\":\"p\",\"source\":\"x.png\",\"instruction\":\"do\",\"edit_a\":\"x.png\",\"edit_b\":\"x.png\",\"preference\":\"left\"}");
        assert!(e.contains("line 1") && e.contains("left"), "{e}");
        let e = bad("{\"id\":\"p\",\"source\":\"x.png\",\"instruction\":\"do\"}");
        assert!(e.contains("neither a pair"), "{e}");
        let e = bad("{\"id\":\"p\",\"source\":\"x.png\",\"instruction\":\"do\",\"edit\":\"x.png\",\"edit_a\":\"x.png\"}");
        assert!(e.contains("both a pair"), "{e}");
        let e = bad("{\"id\":\"r\",\"source\":\"x.png\",\"instruction\":\"do\",\"edit\":\"x.png\",\"score\":3,\"extra\":1}");
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn testbed_blends_move_towards_the_target_as_labelled() {
        let cases = testbed_cases(20, 5, 40, 1);
        assert_eq!(cases.len(), 25);
        let ties = cases
            .iter()
            .filter(|c| {
                matches!(
                    c.human,
                    HumanLabel::Preference {
                        preferred: Label::Tie,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(ties, 2);
        let edit = cases[0].item.to_edit(128).unwrap();
        let target = outcome_set(&edit, 0.5).unwrap()[0].image.clone();
        let dist = |f: f32| {
            let img = EditedImage::TestbedBlend(f).load(&edit).unwrap();
            crate::models::testbed::outcomes::mse(&img, &target)
        };
        assert!(dist(0.0) > dist(0.5) && dist(0.5) > dist(1.0));
        assert_eq!(dist(1.0), 0.0);
    }
}
