//! The public human-preference sets for image editing, read from local copies:
//!
//! - GenAI-Bench image editing (`TIGER-Lab/GenAI-Bench`, config `image_edition`, split
//!   `test_v1`): one pair per row, `source_image`, `left_output_image` (A),
//!   `right_output_image` (B), `instruct_prompt`, `vote_type` = `leftvote` | `rightvote` |
//!   `tievote` | `bothbad_vote`. Both tie votes are ties here: a pairwise judge has no
//!   "both bad" answer (EditReward scores GenAI-Bench the same way).
//! - EditReward-Bench (`TIGER-Lab/EditReward-Bench`, `2pair/`, `3pair/`, `4pair/`): one pair
//!   per row, `candidate_1` / `candidate_2` the two letters of `comparison_type` (`AvsB`),
//!   `ranking` the winner first (`A>B`) or a tie (any `=`); the rows of one `id` are one group
//!   of K candidates, correct only when every pair is (the benchmark's group accuracy).
//! - ImagenHub text-guided editing human ratings: `Text-Guided_IE_rater{1,2,3}.tsv` (`uid`,
//!   then one `[SC, PQ]` cell per model), with the images laid out beside them as
//!   `sources/<uid>` and `<Model>/<uid>` and the instructions in `instructions.jsonl`
//!   (`{"uid", "instruction"}`). A rating's human score is the mean over raters of
//!   sqrt(SC * PQ), ImagenHub's overall score.
//!
//! Column names and labels are those of the dataset cards and the benchmarks' own code
//! (sources in tests/fixtures/judge_eval/README.md).

use std::collections::BTreeMap;
use std::path::Path;

use super::data::{item, Case, EditedImage, HumanLabel};
use super::stats::Label;
use crate::error::EditError;
use crate::eval::item::{EvalItem, ItemSource};
use crate::eval::parquet::{field, files, image_bytes, rows, text};

fn bytes_of(
    file: &Path,
    n: usize,
    row: &parquet::record::Row,
    col: &str,
) -> Result<Vec<u8>, EditError> {
    field(row, col).and_then(image_bytes).ok_or_else(|| {
        EditError::Invalid(format!(
            "{} row {n}: no image bytes in `{col}`",
            file.display()
        ))
    })
}

fn text_of(
    file: &Path,
    n: usize,
    row: &parquet::record::Row,
    col: &str,
) -> Result<String, EditError> {
    field(row, col)
        .and_then(text)
        .ok_or_else(|| EditError::Invalid(format!("{} row {n}: no `{col}` column", file.display())))
}

fn edited(bytes: Vec<u8>, file: &Path, n: usize, col: &str) -> EditedImage {
    EditedImage::Bytes {
        bytes,
        origin: format!("{} row {n} `{col}`", file.display()),
    }
}

fn pair(
    item: EvalItem,
    a: EditedImage,
    b: EditedImage,
    preferred: Label,
    group: Option<String>,
) -> Case {
    Case {
        item,
        human: HumanLabel::Preference { a, b, preferred },
        group,
    }
}

/// GenAI-Bench's image-editing pairs from the parquet file(s) at `path`.
pub fn genai_bench(path: &Path) -> Result<Vec<Case>, EditError> {
    let mut cases = Vec::new();
    for file in files(path)? {
        let stem = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for (n, row) in rows(&file)?.into_iter().enumerate() {
            let vote = text_of(&file, n, &row, "vote_type")?;
            let preferred = match vote.as_str() {
                "leftvote" => Label::A,
                "rightvote" => Label::B,
                "tievote" | "bothbad_vote" => Label::Tie,
                other => {
                    return Err(EditError::Invalid(format!(
                        "{} row {n}: `vote_type` {other:?} is none of leftvote, rightvote, tievote, bothbad_vote",
                        file.display()
                    )))
                }
            };
            let source = ItemSource::Bytes {
                bytes: bytes_of(&file, n, &row, "source_image")?,
                origin: format!("{} row {n} `source_image`", file.display()),
            };
            cases.push(pair(
                item(
                    format!("genai-{stem}-{n}"),
                    source,
                    text_of(&file, n, &row, "instruct_prompt")?,
                    Some(vote),
                ),
                edited(
                    bytes_of(&file, n, &row, "left_output_image")?,
                    &file,
                    n,
                    "left_output_image",
                ),
                edited(
                    bytes_of(&file, n, &row, "right_output_image")?,
                    &file,
                    n,
                    "right_output_image",
                ),
                preferred,
                None,
            ));
        }
    }
    Ok(cases)
}

/// EditReward-Bench's pairs from the parquet file(s) at `path` (a folder holding `2pair/`,
/// `3pair/`, `4pair/`, or one of them, or one file).
pub fn editreward_bench(path: &Path) -> Result<Vec<Case>, EditError> {
    let mut cases = Vec::new();
    for file in files(path)? {
        for (n, row) in rows(&file)?.into_iter().enumerate() {
            let bad =
                |what: String| EditError::Invalid(format!("{} row {n}: {what}", file.display()));
            let id = text_of(&file, n, &row, "id")?;
            let comparison = text_of(&file, n, &row, "comparison_type")?;
            let (first, second) = comparison
                .split_once("vs")
                .filter(|(a, b)| a.len() == 1 && b.len() == 1)
                .ok_or_else(|| {
                    bad(format!(
                        "`comparison_type` {comparison:?} is not like \"AvsB\""
                    ))
                })?;
            let ranking = text_of(&file, n, &row, "ranking")?;
            let preferred = if ranking.contains('=') {
                Label::Tie
            } else {
                match ranking.split('>').next().map(str::trim) {
                    Some(w) if w == first => Label::A,
                    Some(w) if w == second => Label::B,
                    _ => {
                        return Err(bad(format!(
                            "`ranking` {ranking:?} names neither {first} nor {second} first"
                        )))
                    }
                }
            };
            let k = field(&row, "num_candidates")
                .and_then(text)
                .or_else(|| field(&row, "dataset").and_then(text));
            let source = ItemSource::Bytes {
                bytes: bytes_of(&file, n, &row, "source_image")?,
                origin: format!("{} row {n} `source_image`", file.display()),
            };
            cases.push(pair(
                item(
                    format!("{id}:{comparison}"),
                    source,
                    text_of(&file, n, &row, "instruction")?,
                    k.map(|k| format!("K={}", k.trim_end_matches("pair"))),
                ),
                edited(
                    bytes_of(&file, n, &row, "candidate_1")?,
                    &file,
                    n,
                    "candidate_1",
                ),
                edited(
                    bytes_of(&file, n, &row, "candidate_2")?,
                    &file,
                    n,
                    "candidate_2",
                ),
                preferred,
                Some(id),
            ));
        }
    }
    Ok(cases)
}

/// ImagenHub's text-guided editing ratings from the folder `dir` (see the module doc).
pub fn imagenhub(dir: &Path) -> Result<Vec<Case>, EditError> {
    let bad = |path: &Path, what: String| EditError::Invalid(format!("{}: {what}", path.display()));
    let mut raters: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tsv"))
        .collect();
    raters.sort();
    if raters.is_empty() {
        return Err(bad(dir, "no rater .tsv files".into()));
    }
    // (uid, model) -> each rater's sqrt(SC * PQ).
    let mut scores: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for tsv in &raters {
        let text = std::fs::read_to_string(tsv).map_err(|e| bad(tsv, e.to_string()))?;
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
        if header.first() != Some(&"uid") {
            return Err(bad(tsv, "the first column is not `uid`".into()));
        }
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let cells: Vec<&str> = line.split('\t').collect();
            for (model, cell) in header.iter().zip(&cells).skip(1) {
                let pair: Vec<f64> = cell
                    .trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .split(',')
                    .map(|v| v.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        bad(
                            tsv,
                            format!("line {}: `{model}` cell {cell:?} is not [SC, PQ]", n + 2),
                        )
                    })?;
                let [sc, pq] = pair[..] else {
                    return Err(bad(
                        tsv,
                        format!("line {}: `{model}` cell {cell:?} is not [SC, PQ]", n + 2),
                    ));
                };
                scores
                    .entry((cells[0].to_string(), model.to_string()))
                    .or_default()
                    .push((sc * pq).max(0.0).sqrt());
            }
        }
    }
    let instructions_path = dir.join("instructions.jsonl");
    let mut instructions = BTreeMap::new();
    let text = std::fs::read_to_string(&instructions_path)
        .map_err(|e| bad(&instructions_path, e.to_string()))?;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        #[derive(serde::Deserialize)]
        struct Line {
            uid: String,
            instruction: String,
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| bad(&instructions_path, format!("line {}: {e}", n + 1)))?;
        instructions.insert(l.uid, l.instruction);
    }
    let mut cases = Vec::new();
    for ((uid, model), rated) in scores {
        let instruction = instructions
            .get(&uid)
            .ok_or_else(|| bad(&instructions_path, format!("no instruction for `{uid}`")))?;
        let (source, output) = (dir.join("sources").join(&uid), dir.join(&model).join(&uid));
        for p in [&source, &output] {
            if !p.is_file() {
                return Err(bad(p, "not found (a rated image)".into()));
            }
        }
        cases.push(Case {
            item: item(
                format!("{uid}:{model}"),
                ItemSource::File(source),
                instruction.clone(),
                Some(model),
            ),
            human: HumanLabel::Rating {
                edit: EditedImage::File(output),
                score: rated.iter().sum::<f64>() / rated.len() as f64,
            },
            group: None,
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/judge_eval")
    }

    fn labels(cases: &[Case]) -> Vec<Label> {
        cases
            .iter()
            .map(|c| match &c.human {
                HumanLabel::Preference { preferred, .. } => *preferred,
                HumanLabel::Rating { .. } => panic!("a rating"),
            })
            .collect()
    }

    #[test]
    fn genai_bench_votes_become_labels() {
        let cases = genai_bench(&fixtures().join("genai_bench_image_edition.parquet")).unwrap();
        assert_eq!(cases.len(), 8);
        let l = labels(&cases);
        for (case, label) in cases.iter().zip(&l) {
            let vote = case.item.task.as_deref().unwrap();
            let want = match vote {
                "leftvote" => Label::A,
                "rightvote" => Label::B,
                _ => Label::Tie,
            };
            assert_eq!(*label, want, "{vote}");
        }
        let edit = cases[0].item.to_edit(64).unwrap();
        let HumanLabel::Preference { a, .. } = &cases[0].human else {
            unreachable!()
        };
        assert_eq!(a.load(&edit).unwrap().dimensions(), edit.panel_size());
    }

    #[test]
    fn editreward_bench_rows_are_pairs_in_groups() {
        let cases = editreward_bench(&fixtures()).unwrap_err();
        // The folder also holds GenAI-Bench's file, whose columns differ: named.
        assert!(
            cases.to_string().contains("genai_bench") && cases.to_string().contains("`id`"),
            "{cases}"
        );
        let two = editreward_bench(&fixtures().join("editreward_bench_2pair.parquet")).unwrap();
        assert_eq!(labels(&two), vec![Label::A, Label::B, Label::Tie, Label::B]);
        assert!(two.iter().all(|c| c.item.task.as_deref() == Some("K=2")));
        let three = editreward_bench(&fixtures().join("editreward_bench_3pair.parquet")).unwrap();
        // B > C > A: B>A, C>A, B>C over AvsB, AvsC, BvsC; then A > C > B.
        assert_eq!(
            labels(&three),
            vec![Label::B, Label::B, Label::A, Label::A, Label::A, Label::B]
        );
        let groups: Vec<&str> = three.iter().map(|c| c.group.as_deref().unwrap()).collect();
        assert_eq!(groups[0], groups[2]);
        assert_ne!(groups[2], groups[3]);
    }

    #[test]
    fn imagenhub_ratings_average_the_raters() {
        let cases = imagenhub(&fixtures().join("imagenhub_text_guided_ie")).unwrap();
        assert_eq!(cases.len(), 6);
        for c in &cases {
            let HumanLabel::Rating { score, .. } = c.human else {
                panic!()
            };
            assert!((0.0..=1.0).contains(&score));
        }
        // sample_100081_1.jpg, InstructPix2Pix: rater 1 says [1, 1].
        assert!(cases
            .iter()
            .any(|c| c.item.id == "sample_100081_1.jpg:InstructPix2Pix"));
    }
}
