//! Batch runs: resume after a stop, sharding + merge, bad items.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use icedit_scale::batch::{merge_shards, run_batch, BatchOptions, ItemStatus, Shard};
use icedit_scale::edit::EditContext;
use icedit_scale::engine::{Engine, GeneratorWorker, StrategyConfig, StrategyKind};
use icedit_scale::judge::{Comparison, Judge, JudgeError, PreviewStage, ScreenVerdict, SubScores};
use icedit_scale::stop::StopSignal;
use image::{Rgb, RgbImage};
use support::{PixelJudge, SignGenerator};

fn engine() -> Engine {
    engine_judged_by(Arc::new(PixelJudge))
}

fn engine_judged_by(judge: Arc<dyn Judge>) -> Engine {
    Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(SignGenerator))),
        judge,
        4,
    )
}

/// PixelJudge that asks the batch to stop, from inside the pipeline, once `summary.jsonl`
/// holds `after` records. Items still waiting always call the judge after that, so the
/// stop lands mid-batch however fast the machine is (a watcher task could miss it).
struct StopWhenDurable {
    stop: StopSignal,
    summary: PathBuf,
    after: usize,
}

impl StopWhenDurable {
    fn check(&self) {
        let lines = std::fs::read_to_string(&self.summary).map_or(0, |t| t.lines().count());
        if lines >= self.after {
            self.stop.stop();
        }
    }
}

#[async_trait]
impl Judge for StopWhenDurable {
    fn name(&self) -> String {
        PixelJudge.name()
    }
    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        self.check();
        PixelJudge.screen(edit, preview, stage).await
    }
    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        self.check();
        PixelJudge.compare(edit, first, second).await
    }
    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.check();
        PixelJudge.semantic_consistency(edit, edited).await
    }
    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.check();
        PixelJudge.perceptual_quality(edit, edited).await
    }
}

/// A manifest of `n` good items (plus the extra lines) with their images.
fn manifest(dir: &Path, n: usize, extra: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut text = String::new();
    for i in 0..n {
        RgbImage::from_pixel(32, 32, Rgb([i as u8, 0, 0]))
            .save(dir.join(format!("img/{i}.png")))
            .unwrap();
        text.push_str(&format!(
            "{{\"id\": \"item{i}\", \"image\": \"img/{i}.png\", \"instruction\": \"edit {i}\"}}\n"
        ));
    }
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    let path = dir.join("edits.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

fn options(manifest: &Path, out: &Path, shard: Shard) -> BatchOptions {
    BatchOptions {
        manifest: manifest.to_path_buf(),
        root: None,
        out: out.to_path_buf(),
        shard,
        strategy: StrategyConfig {
            seeds: 4,
            probe_steps: 2,
            keep: 2,
            steps: 6,
            ..StrategyConfig::default()
        },
        queue: 3,
        width: 32,
        progress: false,
        budget_nfe_mean: None,
    }
}

fn summary(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("summary.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

#[test]
fn stopped_batch_resumes_to_the_same_result_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 12, &[]);
    let full = dir.path().join("full");
    block_on(run_batch(
        &engine(),
        &options(&m, &full, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();

    // Stop once a few items are durable; in-flight ones still finish and are saved.
    let part = dir.path().join("part");
    let stop = StopSignal::default();
    let judge = StopWhenDurable {
        stop: stop.clone(),
        summary: part.join("summary.jsonl"),
        after: 3,
    };
    let outcome = block_on(run_batch(
        &engine_judged_by(Arc::new(judge)),
        &options(&m, &part, Shard::ALL),
        &stop,
    ))
    .unwrap();
    assert!(outcome.cancelled);
    assert!(outcome.done >= 3 && outcome.done < 12, "{outcome:?}");
    let resumed = block_on(run_batch(
        &engine(),
        &options(&m, &part, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();
    assert_eq!(resumed.already_done, outcome.done);
    assert_eq!(resumed.done + outcome.done, 12);
    // Exactly one record per item, identical to the uninterrupted run.
    assert_eq!(summary(&part), summary(&full));
    assert_eq!(summary(&full).len(), 12);
    let a = std::fs::read(full.join("items/item5/final.png")).unwrap();
    let b = std::fs::read(part.join("items/item5/final.png")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn four_shards_merged_equal_one_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 16, &[]);
    let whole = dir.path().join("whole");
    block_on(run_batch(
        &engine(),
        &options(&m, &whole, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();
    let shard_dirs: Vec<PathBuf> = (0..4)
        .map(|i| {
            let out = dir.path().join(format!("shard{i}"));
            let shard = Shard { index: i, count: 4 };
            let o = block_on(run_batch(
                &engine(),
                &options(&m, &out, shard),
                &StopSignal::default(),
            ))
            .unwrap();
            assert_eq!(o.done + o.other_shards, 16);
            out
        })
        .collect();
    let merged_dir = dir.path().join("merged");
    let merged = merge_shards(&shard_dirs, &merged_dir).unwrap();
    assert!(merged.warnings.is_empty(), "{:?}", merged.warnings);
    // Half the set merges, with a warning naming what is missing.
    let partial = merge_shards(&shard_dirs[..2], &dir.path().join("partial")).unwrap();
    assert_eq!(
        partial.warnings,
        vec!["shard(s) 2/4, 3/4 are missing: the merged summary covers 2 of 4 shards".to_string()]
    );
    let strip = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("output_dir");
                r
            })
            .collect()
    };
    assert_eq!(strip(summary(&merged_dir)), strip(summary(&whole)));
    assert_eq!(summary(&whole).len(), 16);
    // Shards run with other settings are refused naming the setting (they were merged into
    // one table); a generator named otherwise (other paths on another machine) is a warning.
    let settings = |dir: &std::path::Path, width: u32, model: &str| {
        let json =
            serde_json::json!({ "width": width, "generator": { "flux": { "model_dir": model } } });
        std::fs::write(dir.join("settings.json"), json.to_string()).unwrap();
    };
    for (i, dir) in shard_dirs.iter().enumerate() {
        settings(dir, 256, &format!("/node{i}/flux"));
    }
    let across = merge_shards(&shard_dirs, &dir.path().join("across")).unwrap();
    assert_eq!(across.warnings.len(), 3, "{:?}", across.warnings);
    assert!(
        across.warnings[0].contains("`generator`"),
        "{:?}",
        across.warnings
    );
    // Another experiment's generator (the testbed at another difficulty) is refused,
    // naming the setting and both values, not warned about as if only paths differed.
    let testbed = |dir: &std::path::Path, difficulty: f32| {
        let json = serde_json::json!({
            "width": 256,
            "generator": { "testbed": { "difficulty": difficulty, "contrast": 1.0 } },
        });
        std::fs::write(dir.join("settings.json"), json.to_string()).unwrap();
    };
    for dir in &shard_dirs {
        testbed(dir, 0.8);
    }
    assert!(merge_shards(&shard_dirs, &dir.path().join("same"))
        .unwrap()
        .warnings
        .is_empty());
    testbed(&shard_dirs[1], 0.9);
    let err = merge_shards(&shard_dirs, &dir.path().join("other-experiment"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`generator.testbed.difficulty` 0.8 there, 0.9 here")
            && err.contains("shard1"),
        "{err}"
    );
    for (i, dir) in shard_dirs.iter().enumerate() {
        settings(dir, 256, &format!("/node{i}/flux"));
    }
    settings(&shard_dirs[2], 512, "/node2/flux");
    let err = merge_shards(&shard_dirs, &dir.path().join("mixed"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`width` 256 there, 512 here") && err.contains("shard2"),
        "{err}"
    );
    for dir in &shard_dirs {
        std::fs::remove_file(dir.join("settings.json")).unwrap();
    }
    // Into one of its own shards (or a folder inside one): refused, that shard untouched.
    let before = std::fs::read(shard_dirs[0].join("summary.jsonl")).unwrap();
    for out in [shard_dirs[0].clone(), shard_dirs[0].join("merged")] {
        let err = merge_shards(&shard_dirs, &out).unwrap_err().to_string();
        assert!(err.contains("shard folder"), "{err}");
    }
    assert_eq!(
        std::fs::read(shard_dirs[0].join("summary.jsonl")).unwrap(),
        before
    );
}

/// More shards than items: the shards that own none finish with an empty summary, and
/// the whole set still merges, with no shard called missing.
#[test]
fn shards_that_own_no_item_merge_with_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 2, &[]);
    let shard_dirs: Vec<PathBuf> = (0..8)
        .map(|i| {
            let out = dir.path().join(format!("shard{i}"));
            let shard = Shard { index: i, count: 8 };
            block_on(run_batch(
                &engine(),
                &options(&m, &out, shard),
                &StopSignal::default(),
            ))
            .unwrap();
            out
        })
        .collect();
    assert!(
        shard_dirs.iter().any(|d| summary(d).is_empty()),
        "the test needs a shard without items"
    );
    let merged = merge_shards(&shard_dirs, &dir.path().join("merged")).unwrap();
    assert!(merged.warnings.is_empty(), "{:?}", merged.warnings);
    assert_eq!(merged.results.len(), 2);
    // A folder that is no batch's output is still refused.
    let stray = dir.path().join("stray");
    std::fs::create_dir_all(&stray).unwrap();
    let mut with_stray = shard_dirs.clone();
    with_stray.push(stray);
    assert!(merge_shards(&with_stray, &dir.path().join("merged2")).is_err());
}

#[test]
fn bad_items_are_reported_and_skipped_and_outages_retried() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        2,
        &[
            "{\"id\": \"missing\", \"image\": \"img/none.png\", \"instruction\": \"x\"}",
            "{\"id\": \"empty\", \"image\": \"img/0.png\", \"instruction\": \"\"}",
            "{\"id\": \"escape\", \"image\": \"../0.png\", \"instruction\": \"x\"}",
            "{\"id\": \"item0\", \"image\": \"img/1.png\", \"instruction\": \"dup\"}",
            "{\"id\": \"down\", \"image\": \"img/1.png\", \"instruction\": \"judge outage\"}",
            "garbage",
        ],
    );
    let out = dir.path().join("out");
    let o = block_on(run_batch(
        &engine(),
        &options(&m, &out, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();
    assert_eq!((o.done, o.failed, o.invalid), (2, 2, 4), "{o:?}");
    let s = summary(&out);
    let by_id = |id: &str| s.iter().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(by_id("missing")["status"], "failed");
    assert!(by_id("missing")["reason"]
        .as_str()
        .unwrap()
        .contains("none.png"));
    assert!(by_id("down")["reason"].as_str().unwrap().contains("503"));
    assert_eq!(by_id("#line-4")["status"], "invalid");
    assert!(by_id("#line-4")["reason"]
        .as_str()
        .unwrap()
        .contains("\"empty\": empty instruction"));
    assert!(by_id("#line-5")["reason"]
        .as_str()
        .unwrap()
        .contains("outside"));
    assert!(by_id("#line-6")["reason"]
        .as_str()
        .unwrap()
        .contains("duplicate id"));
    assert_eq!(by_id("item0")["status"], "ok");
    assert!(by_id("#line-8")["reason"]
        .as_str()
        .unwrap()
        .contains("not a JSON object"));
    let table = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(table.contains("| 8 | 2 | 2 | 4 |"), "{table}");

    // A rerun retries the failed items only; the invalid lines, still there, are counted
    // again (the exit code says so) but not recorded twice.
    let again = block_on(run_batch(
        &engine(),
        &options(&m, &out, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();
    assert_eq!((again.already_done, again.failed, again.invalid), (2, 2, 4));
    assert_eq!(summary(&out).len(), 8);
    assert!(summary(&out)
        .iter()
        .all(|r| r["status"] != serde_json::json!(ItemStatus::Ok) || r["overall"].is_number()));
}

/// An invalid line's record is keyed where no item id can be (an item may be called
/// `line-2`), and a line mended since the last run leaves no invalid record behind.
#[test]
fn invalid_lines_never_shadow_items_and_mended_lines_leave_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        0,
        &[
            "{\"id\": \"line-2\", \"image\": \"img/a.png\", \"instruction\": \"x\"}",
            "not json",
        ],
    );
    RgbImage::from_pixel(32, 32, Rgb([9, 0, 0]))
        .save(dir.path().join("img/a.png"))
        .unwrap();
    let out = dir.path().join("out");
    let run = || {
        block_on(run_batch(
            &engine(),
            &options(&m, &out, Shard::ALL),
            &StopSignal::default(),
        ))
        .unwrap()
    };
    let o = run();
    assert_eq!((o.done, o.invalid), (1, 1), "{o:?}");
    let s = summary(&out);
    assert_eq!(s.len(), 2, "{s:?}");
    let status = |id: &str| {
        summary(&out)
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| r["status"].clone())
    };
    assert_eq!(status("line-2"), Some(serde_json::json!("ok")));
    assert_eq!(status("#line-2"), Some(serde_json::json!("invalid")));

    // The bad line mended: it runs, and its old invalid record goes.
    let text = std::fs::read_to_string(&m).unwrap().replace(
        "not json",
        "{\"id\": \"mended\", \"image\": \"img/a.png\", \"instruction\": \"y\"}",
    );
    std::fs::write(&m, text).unwrap();
    let o = run();
    assert_eq!((o.done, o.already_done, o.invalid), (1, 1, 0), "{o:?}");
    assert_eq!(status("#line-2"), None);
    assert_eq!(summary(&out).len(), 2);
}

/// The real binary, killed with SIGKILL mid-batch and rerun, ends with exactly one result
/// per item, identical to an uninterrupted run.
#[test]
fn killed_process_rerun_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 40, &[]);
    let bin = env!("CARGO_BIN_EXE_icedit-scale");
    let args = |out: &Path| {
        let mut c = std::process::Command::new(bin);
        c.args(["batch", "--manifest"])
            .arg(&m)
            .arg("--out")
            .arg(out)
            .args([
                "--width",
                "32",
                "--seeds",
                "4",
                "--probe-steps",
                "2",
                "--keep",
                "2",
            ])
            .args(["--steps", "8", "--queue", "3", "--generator", "testbed"])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let full = dir.path().join("full");
    assert!(args(&full).status().unwrap().success());

    let part = dir.path().join("part");
    // Each fsynced summary line is logged; reading the log blocks until the next one, so
    // the kill follows the fifth stored item without waiting on a clock.
    let mut child = args(&part)
        .env("RUST_LOG", "error,icedit_scale::stored=debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let summary_path = part.join("summary.jsonl");
    let log = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut stored = 0;
    for line in std::io::BufRead::lines(log) {
        if line.unwrap().contains("results stored") {
            stored += 1;
            if stored >= 5 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up.
    child.wait().unwrap();
    let done_before = std::fs::read_to_string(&summary_path)
        .unwrap()
        .lines()
        .count();
    assert!(
        done_before < 40,
        "the batch finished before it could be killed"
    );
    assert!(args(&part).status().unwrap().success());
    assert_eq!(summary(&part), summary(&full));
    assert_eq!(summary(&part).len(), 40);
}

#[test]
fn two_batches_on_one_output_folder_never_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 2, &[]);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let first = icedit_scale::fsio::OutputLock::acquire(&out).unwrap();
    let err = block_on(run_batch(
        &engine(),
        &options(&m, &out, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("in use by another icedit-scale run"),
        "{err}"
    );
    assert!(
        !out.join("summary.jsonl").exists(),
        "the second run wrote nothing"
    );
    drop(first);
    block_on(run_batch(
        &engine(),
        &options(&m, &out, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();
}

#[cfg(unix)]
#[test]
fn symlinks_cannot_lead_a_manifest_out_of_its_root_but_dots_that_stay_inside_can() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    for path in [root.join("images/x.png"), outside.join("secret.png")] {
        RgbImage::from_pixel(32, 32, Rgb([9, 0, 0]))
            .save(path)
            .unwrap();
    }
    std::os::unix::fs::symlink(outside.join("secret.png"), root.join("images/link.png")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("linkdir")).unwrap();
    let manifest = root.join("edits.jsonl");
    std::fs::write(
        &manifest,
        [
            r#"{"id": "file-link", "image": "images/link.png", "instruction": "x"}"#,
            r#"{"id": "dir-link", "image": "linkdir/secret.png", "instruction": "x"}"#,
            r#"{"id": "dots", "image": "images/../images/x.png", "instruction": "x"}"#,
            r#"{"id": "escape", "image": "../outside/secret.png", "instruction": "x"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = block_on(run_batch(
        &engine(),
        &options(&manifest, &out, Shard::ALL),
        &StopSignal::default(),
    ))
    .unwrap();
    assert_eq!((o.done, o.invalid), (1, 3));
    let records = summary(&out);
    let reason = |line: u64| {
        records
            .iter()
            .find(|r| r["line"] == line)
            .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
            .unwrap()
    };
    for line in [1, 2, 4] {
        assert!(
            reason(line).contains("outside the manifest root"),
            "line {line}: {}",
            reason(line)
        );
    }
    assert!(reason(1).contains("it resolves to"), "{}", reason(1));
    assert!(records
        .iter()
        .any(|r| r["id"] == "dots" && r["status"] == "ok"));
}

#[test]
fn a_mean_budget_holds_over_the_batch_for_adaptive_and_fixed_strategies() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 12, &[]);
    // Adaptive: waves of 2 probed 2 steps, one completion (4) per wave, up to 8 seeds
    // (most 8*2 + 4*4 = 32); a mean of 12 lets an item spend more only if others saved.
    let adaptive = StrategyConfig {
        kind: StrategyKind::Adaptive,
        seeds: 8,
        probe_steps: 2,
        keep: 1,
        wave: 2,
        target: 9.5,
        steps: 6,
        ..StrategyConfig::default()
    };
    for (strategy, mean) in [
        (adaptive.clone(), 12),
        (options(&m, dir.path(), Shard::ALL).strategy, 14),
    ] {
        let out = dir.path().join(format!("{}-{mean}", strategy.kind.name()));
        let opts = BatchOptions {
            strategy: strategy.clone(),
            budget_nfe_mean: Some(mean),
            ..options(&m, &out, Shard::ALL)
        };
        let outcome = block_on(run_batch(&engine(), &opts, &StopSignal::default())).unwrap();
        assert_eq!(outcome.done, 12, "{outcome:?} {:?}", summary(&out));
        let spent: Vec<u64> = summary(&out)
            .iter()
            .map(|r| r["nfe"].as_u64().unwrap())
            .collect();
        assert!(spent.iter().sum::<u64>() <= 12 * mean as u64, "{spent:?}");
        if strategy.kind == StrategyKind::EarlyFilter {
            // Sized to the mean: N*2 + 2*4 <= 14 -> N = 3, 14 NFE each.
            assert!(spent.iter().all(|&n| n <= 14), "{spent:?}");
        }
    }
    // A mean below what one adaptive wave needs (2*2 + 4) is refused up front.
    let opts = BatchOptions {
        strategy: adaptive,
        budget_nfe_mean: Some(7),
        ..options(&m, &dir.path().join("low"), Shard::ALL)
    };
    let err = block_on(run_batch(&engine(), &opts, &StopSignal::default())).unwrap_err();
    assert!(err.to_string().contains("--budget-nfe-mean 7"), "{err}");
}

/// Lines may set their own strategy: adaptive lines placed before lines of the batch's
/// fixed strategy must not eat the share the fixed ones are sized to (the last item used
/// to be left a few NFE and fail at every rerun). A line's own `seeds` that the budget
/// overrides is said in its report.
#[test]
fn adaptive_lines_before_fixed_ones_leave_them_their_mean_and_overridden_seeds_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    // Adaptive lines: waves of 2 probed 2 steps, one completion (4) per wave, up to 8
    // seeds (most 32, first wave 8); a target no image reaches, so each would spend its
    // most if allowed.
    let adaptive = r#""strategy": "adaptive", "seeds": 8, "probe_steps": 2, "keep": 1, "wave": 2, "target": 10"#;
    let mut lines: Vec<String> = (0..3)
        .map(|i| {
            format!(r#"{{"id": "ad{i}", "image": "img/{i}.png", "instruction": "edit {i}", {adaptive}}}"#)
        })
        .collect();
    lines.push(r#"{"id": "five", "image": "img/3.png", "instruction": "x", "seeds": 5}"#.into());
    let extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    let m = manifest(dir.path(), 6, &extra);
    // Reorder: the adaptive lines first, then the fixed ones.
    let text = std::fs::read_to_string(&m).unwrap();
    let (fixed, adaptive_lines): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| !l.contains("adaptive"));
    std::fs::write(
        &m,
        format!("{}\n{}\n", adaptive_lines.join("\n"), fixed.join("\n")),
    )
    .unwrap();
    // Best-of-N of 6 steps sized to a mean of 12: N = 2, 12 NFE per item.
    let mean = 12;
    for queue in [1, 3] {
        let out = dir.path().join(format!("q{queue}"));
        let opts = BatchOptions {
            strategy: StrategyConfig {
                kind: StrategyKind::BestOfN,
                ..options(&m, &out, Shard::ALL).strategy
            },
            budget_nfe_mean: Some(mean),
            queue,
            ..options(&m, &out, Shard::ALL)
        };
        let outcome = block_on(run_batch(&engine(), &opts, &StopSignal::default())).unwrap();
        let records = summary(&out);
        assert_eq!((outcome.done, outcome.failed), (10, 0), "{records:?}");
        let spent: u64 = records.iter().map(|r| r["nfe"].as_u64().unwrap()).sum();
        assert!(
            spent <= 10 * mean as u64,
            "{spent} > 10 x {mean}: {records:?}"
        );
        for r in records.iter().filter(|r| r["strategy"] == "best-of-n") {
            assert_eq!(r["nfe"], 12, "{r}");
            let id = r["id"].as_str().unwrap();
            let report: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join(format!("items/{id}/report.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(
                report["strategy"]["budget_nfe"], 12,
                "{id}: {}",
                report["strategy"]
            );
            let notes = report["notes"].to_string();
            if id == "five" {
                assert_eq!(report["strategy"]["seeds"], 2);
                assert!(
                    notes.contains("`seeds` 5 not run") && notes.contains("--budget-nfe-mean 12"),
                    "{notes}"
                );
            } else {
                assert!(!notes.contains("`seeds`"), "{id}: {notes}");
            }
        }
    }
}

/// What the command refuses before any work, naming the flag: a rerun under other settings
/// (its finished items would count as done under these), a mean budget the batch's own
/// strategy cannot fit, a `--root` that is not a folder, a folder given as the manifest.
#[test]
fn the_command_refuses_other_settings_an_unfittable_budget_and_a_missing_root() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 3, &[]);
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
            .args(["batch", "--manifest"])
            .arg(&m)
            .arg("--out")
            .arg(&out)
            .args(["--width", "32", "--steps", "8", "--probe-steps", "2"])
            .args(extra)
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let first = run(&["--seeds", "4"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let refused = run(&["--seeds", "6"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`strategy`") && err.contains("other settings"),
        "{err}"
    );
    assert!(run(&["--seeds", "4"]).status.success());
    // The generator is a setting too: the testbed at another difficulty makes other edits.
    let other = run(&["--seeds", "4", "--testbed-difficulty", "0.9"]);
    let err = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{err}");
    assert!(err.contains("`generator`"), "{err}");

    let fresh = |extra: &[&str], needle: &str| {
        std::fs::remove_dir_all(&out).ok();
        let r = run(extra);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.join("summary.jsonl").exists(), "{extra:?} ran items");
    };
    fresh(&["--budget-nfe-mean", "10"], "--budget-nfe-mean 10");
    fresh(
        &["--root", "/nonexistent-root"],
        "--root /nonexistent-root: not a folder",
    );
    let folder = std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .args(["batch", "--manifest"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&folder.stderr);
    assert_eq!(folder.status.code(), Some(2), "{err}");
    assert!(err.contains("a folder"), "{err}");
}

/// A manifest edited between runs: a line whose image content, instruction or strategy
/// changed under the same id is redone (its outputs replaced; it was once "already done"
/// with the old edit), and an item gone from the manifest leaves the summary and its table
/// (its folder kept), whose lines follow the manifest as it is now. Sharded runs of the
/// edited manifest merge to what one fresh run gives.
#[test]
fn changed_lines_are_redone_and_lines_gone_from_the_manifest_leave_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), 3, &[]);
    let out = dir.path().join("out");
    let run = |out: &Path, shard: Shard| {
        block_on(run_batch(
            &engine(),
            &options(&m, out, shard),
            &StopSignal::default(),
        ))
        .unwrap()
    };
    let line = |i: usize, instruction: &str, extra: &str| {
        format!("{{\"id\": \"item{i}\", \"image\": \"img/{i}.png\", \"instruction\": \"{instruction}\"{extra}}}\n")
    };
    assert_eq!(run(&out, Shard::ALL).done, 3);
    let report = |id: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(format!("items/{id}/report.json"))).unwrap())
            .unwrap()
    };

    // item0's instruction and item1's image (rewritten in place) changed; item2 did not.
    std::fs::write(
        &m,
        [
            line(0, "edit zero", ""),
            line(1, "edit 1", ""),
            line(2, "edit 2", ""),
        ]
        .concat(),
    )
    .unwrap();
    RgbImage::from_pixel(32, 32, Rgb([200, 90, 10]))
        .save(dir.path().join("img/1.png"))
        .unwrap();
    let o = run(&out, Shard::ALL);
    assert_eq!((o.changed, o.done, o.already_done), (2, 2, 1), "{o:?}");
    assert_eq!(report("item0")["instruction"], "edit zero");
    let fresh = dir.path().join("fresh");
    run(&fresh, Shard::ALL);
    assert_eq!(summary(&out), summary(&fresh));

    // item0 and item1 gone, item2 now on line 1 with its own strategy: the summary holds
    // item2 alone, redone, and the table counts one item.
    std::fs::write(
        &m,
        line(2, "edit 2", ", \"strategy\": \"best-of-n\", \"seeds\": 2"),
    )
    .unwrap();
    let o = run(&out, Shard::ALL);
    assert_eq!((o.changed, o.done, o.dropped), (1, 1, 2), "{o:?}");
    let s = summary(&out);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!((&s[0]["id"], &s[0]["line"]), (&"item2".into(), &1.into()));
    assert_eq!(
        (&s[0]["strategy"], &s[0]["nfe"]),
        (&"best-of-n".into(), &12.into())
    );
    let table = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(table.contains("\n| 1 | 1 | 0 | 0 |"), "{table}");
    assert!(
        out.join("items/item0/report.json").is_file(),
        "folders are kept"
    );

    // Unchanged but moved: already done, renumbered.
    std::fs::write(
        &m,
        [
            line(5, "edit 5", ""),
            line(2, "edit 2", ", \"strategy\": \"best-of-n\", \"seeds\": 2"),
        ]
        .concat(),
    )
    .unwrap();
    RgbImage::from_pixel(32, 32, Rgb([5, 0, 0]))
        .save(dir.path().join("img/5.png"))
        .unwrap();
    let o = run(&out, Shard::ALL);
    assert_eq!((o.changed, o.done, o.already_done), (0, 1, 1), "{o:?}");
    let lines: Vec<_> = summary(&out).iter().map(|r| r["line"].clone()).collect();
    assert_eq!(lines, [1, 2]);

    // Two shards run on the first manifest, then on the edited one, merge to a fresh run.
    let shards: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("s{i}"))).collect();
    let edited = std::fs::read_to_string(&m).unwrap();
    std::fs::write(
        &m,
        [
            line(0, "edit 0", ""),
            line(1, "edit 1", ""),
            line(3, "edit 3", ""),
        ]
        .concat(),
    )
    .unwrap();
    RgbImage::from_pixel(32, 32, Rgb([3, 0, 0]))
        .save(dir.path().join("img/3.png"))
        .unwrap();
    for (i, s) in shards.iter().enumerate() {
        run(s, Shard { index: i, count: 2 });
    }
    std::fs::write(&m, edited).unwrap();
    for (i, s) in shards.iter().enumerate() {
        run(s, Shard { index: i, count: 2 });
    }
    let merged = dir.path().join("merged");
    merge_shards(&shards, &merged).unwrap();
    let whole = dir.path().join("whole");
    run(&whole, Shard::ALL);
    let strip = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("output_dir");
                r
            })
            .collect()
    };
    assert_eq!(strip(summary(&merged)), strip(summary(&whole)));
}

/// Items removed from the manifest no longer count in the table or the exit code: a
/// manifest cut down to its good lines exits 0 with a table of those lines alone (it once
/// kept the removed lines' failures in the table, "items 4, failed 2", and exited 0).
#[test]
fn the_table_and_the_exit_code_cover_the_manifest_as_it_is_now() {
    let dir = tempfile::tempdir().unwrap();
    let good = [
        "{\"id\": \"g1\", \"image\": \"img/0.png\", \"instruction\": \"edit 0\"}",
        "{\"id\": \"g2\", \"image\": \"img/1.png\", \"instruction\": \"edit 1\"}",
    ];
    let bad = [
        "{\"id\": \"b1\", \"image\": \"img/missing1.png\", \"instruction\": \"x\"}",
        "{\"id\": \"b2\", \"image\": \"img/missing2.png\", \"instruction\": \"x\"}",
    ];
    let m = manifest(dir.path(), 2, &[]);
    let write = |lines: &[&str]| std::fs::write(&m, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let batch = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
            .args(["batch", "--manifest"])
            .arg(&m)
            .arg("--out")
            .arg(&out)
            .args([
                "--width",
                "32",
                "--seeds",
                "2",
                "--probe-steps",
                "2",
                "--keep",
                "1",
            ])
            .args(["--steps", "6", "--generator", "testbed"])
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    write(&[bad[0], good[0], bad[1], good[1]]);
    let first = batch();
    assert_eq!(first.status.code(), Some(3), "{first:?}");
    let table = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(table.contains("\n| 4 | 2 | 2 | 0 |"), "{table}");

    write(&good);
    let second = batch();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert_eq!(second.status.code(), Some(0), "{second:?}");
    assert!(
        stdout.contains("2 item(s) no longer in this shard's part of the manifest were dropped"),
        "{stdout}"
    );
    let table = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(table.contains("\n| 2 | 2 | 0 | 0 |"), "{table}");
    assert!(!table.contains("b1") && !table.contains("b2"), "{table}");
    let lines: Vec<_> = summary(&out).iter().map(|r| r["line"].clone()).collect();
    assert_eq!(lines, [1, 2]);
}

/// A batch refines each item's pick (`--refine`), a line may turn it off (`"refine": 0`) or
/// ask its own width, and summary.jsonl and the table carry the refine's cost beside the
/// NFE, which it stays out of.
#[test]
fn batch_items_are_refined_and_their_refine_cost_is_recorded() {
    use icedit_scale::generate::testbed::{TestbedConfig, TestbedGenerator};
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest(
        dir.path(),
        2,
        &[
            r#"{"id": "plain", "image": "img/0.png", "instruction": "edit", "refine": 0}"#,
            r#"{"id": "wide", "image": "img/1.png", "instruction": "edit", "refine": 96}"#,
        ],
    );
    let out = dir.path().join("out");
    let mut opts = options(&manifest, &out, Shard::ALL);
    opts.strategy.refine = Some(64);
    let engine = Engine::new(
        Arc::new(GeneratorWorker::spawn(Box::new(TestbedGenerator::new(
            TestbedConfig::default(),
        )))),
        Arc::new(PixelJudge),
        4,
    );
    let run = block_on(run_batch(&engine, &opts, &StopSignal::default())).unwrap();
    assert_eq!(run.failed + run.invalid, 0, "{run:?}");
    let records = summary(&out);
    let record = |id: &str| records.iter().find(|r| r["id"] == id).unwrap().clone();
    for (id, width) in [
        ("item0", Some(64)),
        ("item1", Some(64)),
        ("plain", None),
        ("wide", Some(96)),
    ] {
        let r = record(id);
        assert_eq!(r["status"], "ok", "{r}");
        let folder = out.join(r["output_dir"].as_str().unwrap());
        let final_png = image::open(folder.join("final.png")).unwrap();
        match width {
            Some(w) => {
                assert_eq!(final_png.width(), w, "{id}");
                assert_eq!(
                    image::open(folder.join("final_edit.png")).unwrap().width(),
                    32
                );
                // Strength 0.35 of 6 steps starts at step int(6 - 6 x 0.35) = 3: the last
                // 3 rerun at the refine size, outside the edit's NFE.
                assert_eq!(r["refine_nfe"], 3, "{r}");
                assert!(
                    r["refine_edit_step_equivalents"].as_f64().unwrap() >= 2.0,
                    "{r}"
                );
                let report: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(folder.join("report.json")).unwrap())
                        .unwrap();
                assert_eq!(r["nfe"], report["nfe"]["total"], "{id}");
                assert_eq!(r["refine_nfe"], report["nfe"]["refine"], "{id}");
            }
            None => {
                assert_eq!(final_png.width(), 32, "{id}");
                assert!(r.get("refine_nfe").is_none(), "{r}");
                assert!(r.get("refine_edit_step_equivalents").is_none(), "{r}");
            }
        }
    }
    let table = icedit_scale::batch::store::table(
        &records
            .iter()
            .map(|r| serde_json::from_value(r.clone()).unwrap())
            .collect::<Vec<_>>(),
    );
    assert!(
        table.contains("| refine (edit-step equivalents) |"),
        "{table}"
    );
}
