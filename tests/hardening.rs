//! Bad input is refused before any work, with exit code 2 and a message that names the
//! flag, field or file, the value and the bound; runs that stop early or end with failed
//! items say so in their exit code; an output folder has one writer at a time.
//!
//! Each test pins one defect found by trying the CLI as a new and as a hostile user.

mod support;
use support::{cli, cli_env};

use std::path::Path;

use icedit_scale::cli::{Cli, Command};
use icedit_scale::commands::{self, EXIT_BAD_INPUT, EXIT_SOME_FAILED, EXIT_STOPPED};
use icedit_scale::fsio::OutputLock;
use icedit_scale::stop::StopSignal;

const IMAGE: &str = "tests/fixtures/flux/source.png";

/// Runs `edit` on the fixture image with `extra` flags, output under `out`.
fn edit(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "edit",
        "--image",
        IMAGE,
        "--instruction",
        "make the sky night",
        "--out",
        out.to_str().unwrap(),
    ];
    if !extra.contains(&"--width") {
        args.extend(["--width", "32"]);
    }
    args.extend_from_slice(extra);
    cli(&args)
}

/// Asserts exit code 2, that stderr says all of `needles`, and that no work started: the
/// output folder got no report.
fn refused(out: &Path, result: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(EXIT_BAD_INPUT), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(!out.join("report.json").exists(), "work ran: {stderr}");
}

#[test]
fn the_testbed_judge_refuses_a_flux_generator_before_loading_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = edit(&out, &["--model-dir", "tests/fixtures/flux/tiny"]);
    refused(&out, &result, &["--judge testbed", "judge preset"]);
}

#[test]
fn numeric_options_beyond_their_bounds_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--width", "100000"], &["--width", "1536"]),
        (&["--width", "20000"], &["--width", "1536"]),
        (&["--width", "40"], &["--width", "multiple of 16"]),
        (&["--seeds", "100000000"], &["--seeds 100000000", "1024"]),
        (&["--steps", "4000000000"], &["--steps 4000000000", "1000"]),
        (
            &["--judge-concurrency", "0"],
            &["--judge-concurrency", "between 1 and 256"],
        ),
        (
            &["--batch-size", "0"],
            &["--batch-size", "between 1 and 64"],
        ),
        (
            &["--testbed-difficulty", "7"],
            &["--testbed-difficulty", "between 0 and 1"],
        ),
        (
            &["--testbed-difficulty", "NaN"],
            &["--testbed-difficulty", "NaN"],
        ),
        (
            &["--testbed-contrast", "0"],
            &[
                "--testbed-contrast",
                "merge all outcomes",
                "sharp, soft, loose",
            ],
        ),
        (
            &["--budget-nfe", "99"],
            &["--budget-nfe 99", "100 NFE with 2 seeds"],
        ),
        (
            &["--strategy", "adaptive", "--wave", "0"],
            &["--wave 0", "between 1 and the number of seeds"],
        ),
        (
            &["--strategy", "adaptive", "--target", "12"],
            &["--target 12", "VIE O between 0 and 10"],
        ),
        (
            &["--testbed-contrast", "vague"],
            &["--testbed-contrast", "sharp, soft, loose"],
        ),
        (&["--guidance", "inf"], &["--guidance"]),
        (&["--t5-tokens", "0"], &["--t5-tokens"]),
        (&["--seed-list", "3,3,3"], &["--seed-list repeats seed 3"]),
        (
            &["--seed", "18446744073709551615"],
            &["--seed 18446744073709551615", "passes the largest seed"],
        ),
    ];
    for (flags, needles) in cases {
        refused(&out, &edit(&out, flags), needles);
    }
}

#[test]
fn an_output_path_that_is_a_file_is_refused_before_the_edit_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("taken.txt");
    std::fs::write(&file, "mine").unwrap();
    let result = edit(&file, &[]);
    refused(&file, &result, &["--out names an existing file"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

#[test]
fn flux_without_weights_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = edit(
        &out,
        &[
            "--generator",
            "flux",
            "--judge",
            "none",
            "--strategy",
            "random",
        ],
    );
    refused(&out, &result, &["--model-dir"]);
}

#[test]
fn a_judge_other_than_random_needs_a_judge() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = edit(&out, &["--judge", "none"]);
    refused(
        &out,
        &result,
        &["early-filter needs a judge", "--judge none"],
    );
    // random needs none: a plain edit, its pick unscored and said so.
    let result = edit(
        &out,
        &["--judge", "none", "--strategy", "random", "--steps", "4"],
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("VIE O n/a"), "{stdout}");
    assert!(stdout.contains("unscored (no judge)"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["judge"], "none");
    assert_eq!(report["judge_totals"]["calls"], 0);
}

#[test]
fn judge_presets_with_unusable_values_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases = [
        ("timeout_s = 0", "`timeout_s` = 0"),
        (
            "api_base = \"not a url\"",
            "`api_base` = \"not a url\" is not a URL",
        ),
        ("api_base = \"ftp://x/v1\"", "is not an http(s) URL"),
        ("max_attempts = 0", "`max_attempts` = 0"),
        ("max_concurrency = 0", "`max_concurrency` = 0"),
        ("temperature = -1.0", "`temperature` = -1"),
        ("top_logprobs = 50", "`top_logprobs` = 50"),
    ];
    for (line, needle) in cases {
        let preset = dir.path().join("judge.toml");
        std::fs::write(
            &preset,
            format!("kind = \"openai\"\nmodel = \"gpt-4o\"\n{line}\n"),
        )
        .unwrap();
        let result = edit(&out, &["--judge", preset.to_str().unwrap()]);
        refused(&out, &result, &[needle, "judge.toml"]);
    }
    let local = dir.path().join("local.toml");
    std::fs::write(
        &local,
        "kind = \"qwen2vl\"\nmodel = \"Qwen/x\"\nmax_batch = 0\n",
    )
    .unwrap();
    let result = edit(&out, &["--judge", local.to_str().unwrap()]);
    refused(&out, &result, &["`max_batch` = 0"]);
}

#[test]
fn merge_of_a_missing_folder_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let result = cli(&[
        "merge",
        "--out",
        dir.path().join("merged").to_str().unwrap(),
        dir.path().join("no-such-shard").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(EXIT_BAD_INPUT), "{stderr}");
    assert!(stderr.contains("no-such-shard does not exist"), "{stderr}");
}

/// A manifest of `n` items whose images do not exist.
fn broken_manifest(dir: &Path, n: usize) -> std::path::PathBuf {
    let manifest = dir.join("edits.jsonl");
    let lines: String = (0..n)
        .map(|i| {
            format!("{{\"id\": \"e{i}\", \"image\": \"missing{i}.png\", \"instruction\": \"x\"}}\n")
        })
        .collect();
    std::fs::write(&manifest, lines).unwrap();
    manifest
}

#[test]
fn a_batch_whose_items_all_failed_exits_with_its_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = broken_manifest(dir.path(), 3);
    let out = dir.path().join("out");
    let result = cli(&[
        "batch",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--width",
        "32",
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(EXIT_SOME_FAILED), "{stderr}");
    assert!(stderr.contains("3 of 3 items failed"), "{stderr}");
}

#[test]
fn a_second_run_on_a_busy_output_folder_is_refused_with_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = broken_manifest(dir.path(), 1);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let _held = OutputLock::acquire(&out).unwrap();
    let result = cli(&[
        "batch",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(EXIT_BAD_INPUT), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another icedit-scale run (pid {})",
            std::process::id()
        )),
        "{stderr}"
    );
    assert!(!out.join("summary.jsonl").exists());
    // The same for edit and eval.
    let result = edit(&out, &[]);
    refused(&out, &result, &["in use by another icedit-scale run"]);
    let result = cli(&[
        "eval",
        "--suite",
        "eval/testbed-small.toml",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(result.status.code(), Some(EXIT_BAD_INPUT));
}

#[tokio::test]
async fn a_stopped_batch_exits_with_its_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = broken_manifest(dir.path(), 3);
    let out = dir.path().join("out");
    let cli = <Cli as clap::Parser>::try_parse_from([
        "icedit-scale",
        "batch",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let Some(Command::Batch(args)) = cli.command else {
        unreachable!()
    };
    let stop = StopSignal::default();
    stop.stop();
    let err = commands::batch::batch_until(*args, stop).await.unwrap_err();
    assert_eq!(commands::exit_code(&err), EXIT_STOPPED, "{err:#}");
    assert!(
        err.to_string()
            .contains("run the same command again to resume"),
        "{err}"
    );
}

#[tokio::test]
async fn sigterm_asks_for_a_stop_like_ctrl_c() {
    let stop = StopSignal::default();
    stop.stop_on_signals("stopping (test)").unwrap();
    // Without the handler, SIGTERM would end this test process.
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    stop.stopped().await;
    assert!(stop.is_set());
}

#[test]
fn hub_flags_still_parse_alongside_the_bounds() {
    // The bounded parsers must not break defaults: every subcommand's defaults parse.
    for args in [
        vec!["icedit-scale", "demo"],
        vec!["icedit-scale", "study"],
        vec!["icedit-scale", "bench", "pipeline"],
        vec!["icedit-scale", "bench", "memory"],
        vec!["icedit-scale", "bench", "flux"],
        vec!["icedit-scale", "bench", "judge"],
        vec!["icedit-scale", "eval", "--suite", "s.toml", "--out", "o"],
    ] {
        <Cli as clap::Parser>::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    let _ = cli_env;
}

#[test]
fn scene_seeds_never_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let result = cli(&[
        "study",
        "--first-scene",
        "18446744073709551615",
        "--edits",
        "2",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(EXIT_BAD_INPUT), "{stderr}");
    assert!(stderr.contains("--first-scene"), "{stderr}");
}
