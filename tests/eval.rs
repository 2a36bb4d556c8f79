//! The eval harness: datasets, an interrupted-and-resumed eval, and the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use icedit_scale::eval::dataset::{load, DatasetSpec, ItemSource, Selection};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn reads_the_emu_edit_and_gedit_parquet_layouts() {
    let emu = load(
        &DatasetSpec::EmuEdit {
            path: root().join("tests/fixtures/eval/emu_edit_sample.parquet"),
        },
        &Selection::default(),
    )
    .unwrap();
    assert_eq!(emu.len(), 3);
    assert_eq!(emu[0].id, "0");
    assert_eq!(emu[0].instruction, "make the sky night");
    assert_eq!(emu[1].task.as_deref(), Some("add"));
    let edit = emu[0].to_edit(48).unwrap();
    assert_eq!(edit.source.dimensions(), (48, 32));
    assert!(matches!(emu[0].source, ItemSource::Bytes { .. }));

    let only_background = load(
        &DatasetSpec::EmuEdit {
            path: root().join("tests/fixtures/eval/emu_edit_sample.parquet"),
        },
        &Selection {
            tasks: vec!["background".into()],
            ..Selection::default()
        },
    )
    .unwrap();
    assert_eq!(only_background.len(), 2);

    let gedit_en = load(
        &DatasetSpec::GeditBench {
            path: root().join("tests/fixtures/eval/gedit_sample.parquet"),
            language: Some("en".into()),
        },
        &Selection::default(),
    )
    .unwrap();
    assert_eq!(
        gedit_en.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["g0", "g2"]
    );
    assert_eq!(gedit_en[1].task.as_deref(), Some("subject-add"));
    assert_eq!(gedit_en[1].language.as_deref(), Some("en"));
}

const SUITE: &str = r#"
name = "resume-test"
width = 128
steps = 16
resamples = 500
[dataset]
kind = "testbed"
edits = 10
first_scene = 77
[selection_judge]
judge = "testbed"
seed = 0
[eval_judge]
judge = "testbed"
seed = 1
[[arms]]
name = "random"
strategy = "random"
[[arms]]
name = "best-of-4"
strategy = "best-of-n"
seeds = 4
[[arms]]
name = "ef-4-3-1"
strategy = "early-filter"
seeds = 4
probe_steps = 3
keep = 1
"#;

fn eval(suite: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_icedit-scale"));
    c.args([
        "eval",
        "--suite",
        suite.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// The arm named `name` in results.json's `arms`.
fn arm_of<'a>(json: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    json["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["arm"] == name)
        .unwrap_or_else(|| panic!("no arm {name} in {json}"))
}

/// results.json without the wall times, which differ between runs.
fn comparable(out: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("timing");
    v
}

#[test]
fn an_interrupted_eval_resumes_to_the_same_report() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(&suite, SUITE).unwrap();

    let whole = dir.path().join("whole");
    assert!(eval(&suite, &whole).status().unwrap().success());
    // 10 items x (random, best-of-4@2, best-of-4@3, best-of-4, ef-4-3-1).
    assert_eq!(lines(&whole.join("results.jsonl")), 50);

    // Kill a second run once some results are stored (the binary logs each fsynced append;
    // reading its log blocks until the next one, so nothing here waits on a clock), then
    // resume it.
    let resumed = dir.path().join("resumed");
    let mut child = eval(&suite, &resumed)
        .env("RUST_LOG", "error,icedit_scale::stored=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::io::BufReader::new(child.stderr.take().unwrap());
    for line in std::io::BufRead::lines(log) {
        if line.unwrap().contains("results stored") && lines(&resumed.join("results.jsonl")) >= 8 {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stored = lines(&resumed.join("results.jsonl"));
    assert!((8..50).contains(&stored), "killed after {stored} results");
    assert!(eval(&suite, &resumed).status().unwrap().success());
    assert_eq!(
        lines(&resumed.join("results.jsonl")),
        50,
        "nothing redone or lost"
    );
    assert_eq!(comparable(&whole), comparable(&resumed));

    // The report has the paired comparison and the plot.
    let md = std::fs::read_to_string(resumed.join("report.md")).unwrap();
    assert!(md.contains("| ef-4-3-1 |") && md.contains("Δ O vs random"));
    assert!(std::fs::read_to_string(resumed.join("score_vs_nfe.svg"))
        .unwrap()
        .contains("<svg"));
    let json = comparable(&resumed);
    let ef = arm_of(&json, "ef-4-3-1");
    assert_eq!(ef["nfe"], 4.0 * 3.0 + 13.0);
    assert_eq!(ef["vs_baseline"]["baseline"], "random");
    let random = arm_of(&json, "random");
    assert_eq!(random["derived_from"], "best-of-4");
    assert_eq!(random["nfe"], 16.0);
}

#[test]
fn every_committed_suite_parses_and_validates() {
    for entry in std::fs::read_dir(root().join("eval")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let suite = icedit_scale::eval::suite::Suite::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!suite.arms.is_empty());
        }
    }
    // Unknown keys are errors that name the key.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        SUITE.replace("resamples = 500", "resamples = 500\nbootstraps = 3"),
    )
    .unwrap();
    let err = icedit_scale::eval::suite::Suite::load(&bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.toml") && err.contains("bootstraps"),
        "{err}"
    );
}

/// A bad value inside an arm names the arm and the key (serde's message for a flattened
/// arm names neither), and a grid refuses values no combination could take and lists its
/// family does not read, instead of dropping them without a word.
#[test]
fn bad_arm_values_and_grid_lists_are_refused_by_arm_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("suite.toml");
    let load = |text: String| {
        std::fs::write(&path, text).unwrap();
        icedit_scale::eval::suite::Suite::load(&path)
            .unwrap_err()
            .to_string()
    };
    let err = load(SUITE.replace("strategy = \"early-filter\"", "strategy = \"early-filtre\""));
    assert!(
        err.contains("arm `ef-4-3-1`: `strategy`") && err.contains("early-filtre"),
        "{err}"
    );
    let err = load(SUITE.replace("seeds = 4\nprobe_steps", "seeds = -4\nprobe_steps"));
    assert!(err.contains("arm `ef-4-3-1`: `seeds` = -4"), "{err}");
    let err = load(SUITE.replace("keep = 1", "keep = \"one\""));
    assert!(err.contains("arm `ef-4-3-1`: `keep`"), "{err}");

    let grid = |lines: &str| format!("{SUITE}[[grid]]\n{lines}\n");
    let err = load(grid(
        "strategy = \"early-filter\"\nseeds = [4, 2000]\nprobe_steps = [2]",
    ));
    assert!(
        err.contains("grid 1 (early-filter): `seeds` value 2000"),
        "{err}"
    );
    let err = load(grid(
        "strategy = \"early-filter\"\nseeds = [4]\nkeep = [0, 1]",
    ));
    assert!(err.contains("`keep` value 0"), "{err}");
    let err = load(grid(
        "strategy = \"best-of-n\"\nseeds = [4, 8]\nkeep = [1, 2]",
    ));
    assert!(
        err.contains("grid 1 (best-of-n): `keep`: best-of-n does not use it"),
        "{err}"
    );
}

const GRID_SUITE: &str = r#"
name = "grid-test"
width = 128
steps = 16
resamples = 200
budget_nfe_mean = 40
[dataset]
kind = "testbed"
edits = 6
first_scene = 300
contrast = "loose"
[selection_judge]
judge = "testbed"
[eval_judge]
judge = "testbed"
seed = 1
[[arms]]
name = "random"
strategy = "random"
[[grid]]
strategy = "early-filter"
seeds = [1, 4]
probe_steps = [2]
keep = [1, 2]
[[grid]]
strategy = "adaptive"
seeds = [8]
probe_steps = [2]
keep = [1]
wave = [2]
target = [9.5]
"#;

#[test]
fn a_grid_expands_into_named_arms_and_a_mean_budget_holds_for_every_arm() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(&suite, GRID_SUITE).unwrap();
    let loaded = icedit_scale::eval::suite::Suite::load(&suite).unwrap();
    let names: Vec<&str> = loaded.arms.iter().map(|a| a.name.as_str()).collect();
    // Arms are named by the values they run: under the mean budget of 40 NFE, fixed arms
    // are sized to it (early-filter k = 2, M = 1: N*2 + 14 <= 40 -> N = 13; M = 2: N = 6),
    // so the grid's N = 1 and N = 4 are one arm, not two named after N values they do not
    // run. Adaptive keeps its N (the budget caps it per item).
    assert_eq!(
        names,
        [
            "random",
            "early-filter-13-2-1",
            "early-filter-6-2-2",
            "adaptive-8-2-1-w2-t9.5"
        ]
    );
    // The command line's budget replaces the suite's before the grid is named.
    let flagged = icedit_scale::eval::suite::Suite::load_with_budget(&suite, Some(60)).unwrap();
    let names: Vec<&str> = flagged.arms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "random",
            "early-filter-23-2-1",
            "early-filter-16-2-2",
            "adaptive-8-2-1-w2-t9.5"
        ]
    );
    for arm in &flagged.arms {
        let config = flagged.config(arm);
        assert_eq!(
            icedit_scale::eval::suite::grid_arm_name(&config),
            arm.name,
            "an arm's name states what it runs"
        );
    }
    let out = dir.path().join("out");
    assert!(eval(&suite, &out).status().unwrap().success());
    let json = comparable(&out);
    assert_eq!(json["suite"]["dataset"]["contrast"], 0.2);
    // Under the mean budget of 40 NFE, fixed arms are sized to it (early-filter k = 2,
    // M = 1: N*2 + 14 <= 40 -> N = 13) and no arm spends more than 40 on average.
    assert_eq!(json["strategies"]["early-filter-13-2-1"]["seeds"], 13);
    assert_eq!(json["strategies"]["early-filter-6-2-2"]["seeds"], 6);
    for arm in json["arms"].as_array().unwrap() {
        let nfe = arm["nfe"].as_f64().unwrap();
        assert!(nfe <= 40.0, "{}: {nfe}", arm["arm"]);
        assert!(arm["correct"]["lo"].as_f64().unwrap() <= arm["correct"]["mean"].as_f64().unwrap());
    }
    let stored = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let adaptive: Vec<u64> = stored
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["arm"] == "adaptive-8-2-1-w2-t9.5")
        .map(|r| r["nfe"].as_u64().unwrap())
        .collect();
    assert_eq!(adaptive.len(), 6);
    assert!(adaptive.iter().sum::<u64>() <= 6 * 40, "{adaptive:?}");
    // Both plots, with one legend entry per family, the front and the baseline.
    for plot in ["score_vs_nfe.svg", "correct_vs_nfe.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        for needle in [
            "early-filter",
            "adaptive",
            "Pareto front",
            "random baseline",
        ] {
            assert!(svg.contains(needle), "{plot} lacks {needle}");
        }
    }
}

const CACHE_SUITE: &str = r#"
name = "cache-test"
width = 64
steps = 8
resamples = 200
[dataset]
kind = "testbed"
edits = 3
first_scene = 500
[selection_judge]
judge = "testbed"
[[arms]]
name = "random"
strategy = "random"
[[arms]]
name = "random-fbc"
strategy = "random"
cache = "fbc:0.2"
[[arms]]
name = "best-of-2"
strategy = "best-of-n"
seeds = 2
"#;

#[test]
fn an_arm_carries_its_step_cache_and_both_kinds_of_forwards_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(&suite, CACHE_SUITE).unwrap();
    let loaded = icedit_scale::eval::suite::Suite::load(&suite).unwrap();
    let arm = |name: &str| loaded.arms.iter().find(|a| a.name == name).unwrap();
    assert_eq!(
        loaded.config(arm("random-fbc")).cache.to_string(),
        "fbc:0.2"
    );
    // A random arm is read from the best-of-N run only when that run had its cache.
    assert_eq!(
        loaded.random_source(arm("random")).map(|a| a.name.as_str()),
        Some("best-of-2")
    );
    assert!(loaded.random_source(arm("random-fbc")).is_none());

    let out = dir.path().join("out");
    assert!(eval(&suite, &out).status().unwrap().success());
    let stored = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = stored
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 9);
    for r in &rows {
        // The testbed generator has no step cache: every forward ran in full.
        assert_eq!(r["full_forwards"], r["nfe"], "{r}");
        assert_eq!(r["cached_forwards"], 0, "{r}");
        let derived = r["derived_from"].as_str();
        match r["arm"].as_str().unwrap() {
            "random" => assert_eq!(derived, Some("best-of-2")),
            _ => assert_eq!(derived, None, "{r}"),
        }
    }
    let json = comparable(&out);
    assert_eq!(json["strategies"]["random-fbc"]["cache"], "fbc:0.2");
    assert_eq!(json["strategies"]["random"]["cache"], "none");
    for a in json["arms"].as_array().unwrap() {
        assert_eq!(a["full_forwards"], a["nfe"], "{a}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| full forwards | cached forwards |"), "{md}");

    // A bad value is refused naming the key.
    std::fs::write(&suite, CACHE_SUITE.replace("fbc:0.2", "fbc:x")).unwrap();
    let err = icedit_scale::eval::suite::Suite::load(&suite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache \"fbc:x\": threshold \"x\" is not a number"),
        "{err}"
    );
}

/// The same cost columns when a cache did skip: FLUX with random small weights, one testbed
/// item, a 4-step random arm with a cache that reuses every step after the first
/// (`fbc:1000`) beside one without; the judges an OpenAI-compatible mock. The cached arm's
/// record, its arm mean and report.md's cost row all carry its 3 cached forwards beside 1
/// full one.
#[test]
fn an_arm_whose_cache_skipped_reports_its_cached_forwards() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let endpoint = runtime.block_on(wiremock::MockServer::start());
    runtime.block_on(
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(Endpoint {
                up: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            })
            .mount(&endpoint),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("judge.toml"),
        format!(
            "kind = \"openai\"\nmodel = \"test-vlm\"\napi_base = \"{}/v1\"\ncache_dir = \"\"\n",
            endpoint.uri()
        ),
    )
    .unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(
        &suite,
        r#"
name = "cache-flux"
width = 32
steps = 4
resamples = 100
[dataset]
kind = "testbed"
edits = 1
first_scene = 500
[selection_judge]
judge = "judge.toml"
[[arms]]
name = "random"
strategy = "random"
[[arms]]
name = "random-fbc"
strategy = "random"
cache = "fbc:1000"
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let mut run = eval(&suite, &out);
    run.args(["--random-weights", "small", "--t5-tokens", "16"]);
    let result = run.stderr(Stdio::piped()).output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stored = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let row = |arm: &str| -> serde_json::Value {
        stored
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["arm"] == arm)
            .unwrap_or_else(|| panic!("no {arm} in {stored}"))
    };
    let cached = row("random-fbc");
    assert_eq!(
        (
            &cached["nfe"],
            &cached["full_forwards"],
            &cached["cached_forwards"]
        ),
        (
            &serde_json::json!(4),
            &serde_json::json!(1),
            &serde_json::json!(3)
        ),
        "{cached}"
    );
    assert_eq!(row("random")["cached_forwards"], 0);
    let json = comparable(&out);
    let arm = arm_of(&json, "random-fbc");
    assert_eq!(
        (&arm["full_forwards"], &arm["cached_forwards"]),
        (&serde_json::json!(1.0), &serde_json::json!(3.0)),
        "{arm}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.lines()
            .any(|l| l.starts_with("| random-fbc | - |") && l.contains("| 1.0 | 3.0 |")),
        "{md}"
    );
}

/// A remote judge's endpoint (an OpenAI-compatible mock) that is down (503) until `up`,
/// then answers every call a screening and VIE-scoring strategy makes with one valid reply
/// per kind.
struct Endpoint {
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl wiremock::Respond for Endpoint {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
            return wiremock::ResponseTemplate::new(503);
        }
        // The screening prompt asks for one score and a verdict; VIE's for two scores.
        let content = if String::from_utf8_lossy(&request.body).contains("on track") {
            r#"{"score": 7, "pass": true, "reasoning": "on its way"}"#
        } else {
            r#"{"score": [7, 6], "reasoning": "fine"}"#
        };
        wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "test-vlm",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        }))
    }
}

/// A selection judge that scores nothing (its endpoint down) leaves the strategies' picks
/// as fallbacks: those are failures (exit 3), left out of the means, and a rerun with the
/// judge back redoes them, ending where a run with a working judge ends. (The same preset
/// file throughout: an edited preset is another judge, refused by `arms.json`.)
#[test]
fn picks_made_while_the_selection_judge_was_down_are_failures_a_rerun_redoes() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let endpoint = runtime.block_on(wiremock::MockServer::start());
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    runtime.block_on(
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(Endpoint { up: up.clone() })
            .mount(&endpoint),
    );
    let dir = tempfile::tempdir().unwrap();
    let judge = dir.path().join("selection.toml");
    let suite = dir.path().join("suite.toml");
    let text = SUITE.replace("edits = 10", "edits = 3").replace(
        "[selection_judge]\njudge = \"testbed\"\nseed = 0",
        "[selection_judge]\njudge = \"selection.toml\"",
    );
    assert!(text.contains("selection.toml"));
    std::fs::write(&suite, text).unwrap();

    std::fs::write(
        &judge,
        format!(
            "kind = \"openai\"\nmodel = \"test-vlm\"\napi_base = \"{}/v1\"\nmax_attempts = 1\n\
             backoff_s = 0.01\ncache_dir = \"\"\n",
            endpoint.uri()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    assert_eq!(eval(&suite, &out).status().unwrap().code(), Some(3));
    let json = comparable(&out);
    let arm = |name: &str| arm_of(&json, name).clone();
    for name in ["best-of-4", "best-of-4@2", "ef-4-3-1"] {
        assert_eq!(arm(name)["item_errors"], 3, "{name}: {}", arm(name));
        assert_eq!(arm(name)["scored"], 0, "{name}");
    }
    // Random needs no judge to pick: its edits are scored by the eval judge all the same.
    assert_eq!(arm("random")["item_errors"], 0, "{}", arm("random"));
    assert_eq!(arm("random")["scored"], 3, "{}", arm("random"));
    // The failed picks spent their compute: their cost is counted, not shown as free.
    assert_eq!(arm("best-of-4")["nfe"], 4.0 * 16.0, "{}", arm("best-of-4"));
    assert!(arm("ef-4-3-1")["nfe"].as_f64().unwrap() > 16.0);
    assert!(arm("best-of-4")["judge_failures"].as_f64().unwrap() > 0.0);
    let failed_run = comparable(&out);
    // The failures stand until retried: the report rebuilt from the records shows them.
    let mut report_only = eval(&suite, &out);
    report_only.arg("--report-only");
    assert!(report_only.status().unwrap().success());
    assert_eq!(comparable(&out), failed_run);
    // Reruns that fail again replace the failures instead of piling them up: after each
    // run the file holds one line per (item, arm) (3 items x 5 arms, best-of-4@2 and @3
    // included), and the message counts what the run handled: the 12 failures it
    // retried, not the whole suite.
    let units = lines(&out.join("results.jsonl"));
    assert_eq!(units, 15);
    for _ in 0..3 {
        let rerun = eval(&suite, &out).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&rerun.stderr);
        assert_eq!(rerun.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("12 of the 12 (item, arm) results this run handled failed"),
            "{stderr}"
        );
        assert_eq!(comparable(&out), failed_run);
        assert_eq!(lines(&out.join("results.jsonl")), units);
    }
    assert!(report_only.status().unwrap().success());
    assert_eq!(lines(&out.join("results.jsonl")), units);

    up.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(eval(&suite, &out).status().unwrap().success());
    let fresh = dir.path().join("fresh");
    assert!(eval(&suite, &fresh).status().unwrap().success());
    // Random kept what it ran while the judge was down (the same trajectory as best-of-4's
    // candidate 0, which a fresh run reads it from): only where it came from differs.
    let outcome = |out: &Path| {
        let mut json = comparable(out);
        for arm in json["arms"].as_array_mut().unwrap() {
            if arm["arm"] == "random" {
                let arm = arm.as_object_mut().unwrap();
                for provenance in [
                    "derived_from",
                    "selection_overall",
                    "judge_calls",
                    "judge_failures",
                    "judge_tokens",
                ] {
                    arm.remove(provenance);
                }
            }
        }
        json
    };
    assert_eq!(outcome(&out), outcome(&fresh));
}

/// Results stored under one arm's settings are not reused under others: editing an arm
/// or adding a mean budget and rerunning into the same folder is refused by arm name (the
/// report once listed the new settings beside the old results); a new arm is simply added.
#[test]
fn a_rerun_with_changed_arm_settings_is_refused_naming_the_arms() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    let small = SUITE.replace("edits = 10", "edits = 2");
    std::fs::write(&suite, &small).unwrap();
    let out = dir.path().join("out");
    assert!(eval(&suite, &out).status().unwrap().success());

    std::fs::write(&suite, small.replace("probe_steps = 3", "probe_steps = 2")).unwrap();
    let changed = eval(&suite, &out)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert_eq!(changed.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`ef-4-3-1`") && !stderr.contains("`random`"),
        "{stderr}"
    );

    std::fs::write(&suite, &small).unwrap();
    let budget = eval(&suite, &out)
        .args(["--budget-nfe-mean", "24"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(budget.status.code(), Some(2));

    // Another generator (the testbed at another difficulty or contrast) is refused too,
    // naming it, for every arm alike.
    for (flag, value) in [
        ("--testbed-difficulty", "0.9"),
        ("--testbed-contrast", "loose"),
    ] {
        let other = eval(&suite, &out)
            .args([flag, value])
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&other.stderr);
        assert_eq!(other.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains("`generator`"), "{flag}: {stderr}");
    }
    std::fs::write(
        &suite,
        small.replace(
            "kind = \"testbed\"\n",
            "kind = \"testbed\"\ncontrast = \"soft\"\n",
        ),
    )
    .unwrap();
    assert_eq!(eval(&suite, &out).status().unwrap().code(), Some(2));

    let more = format!(
        "{small}[[arms]]\nname = \"ef-4-2-1\"\nstrategy = \"early-filter\"\nseeds = 4\nprobe_steps = 2\nkeep = 1\n"
    );
    std::fs::write(&suite, &more).unwrap();
    assert!(eval(&suite, &out).status().unwrap().success());

    // A suite narrowed to one edit reports that edit alone, though the folder holds two
    // (its report once counted every stored result as the suite's).
    std::fs::write(&suite, more.replace("edits = 2", "edits = 1")).unwrap();
    for extra in [&[][..], &["--report-only"][..]] {
        assert!(eval(&suite, &out).args(extra).status().unwrap().success());
        let json = comparable(&out);
        assert_eq!(json["items"], 1, "{extra:?}");
        for arm in json["arms"].as_array().unwrap() {
            assert_eq!(arm["items"], 1, "{extra:?}: {arm}");
        }
    }
    assert_eq!(
        lines(&out.join("results.jsonl")),
        2 * comparable(&out)["arms"].as_array().unwrap().len()
    );
}

/// A preset judge is known by its contents in `arms.json`: the same suite named from
/// another folder finds its results again (it was refused as "other settings" when the
/// preset's path was stored as the suite joined it), a folder stored the old way is
/// brought up to date, and an edited preset is refused, naming the judge.
#[test]
fn a_preset_judge_is_known_by_its_contents_from_any_folder() {
    let dir = tempfile::tempdir().unwrap();
    let suite_dir = dir.path().join("suites");
    std::fs::create_dir_all(&suite_dir).unwrap();
    let preset = "kind = \"testbed\"\nnoise = 1.0\nfailure_rate = 0.0\n";
    std::fs::write(suite_dir.join("judge.toml"), preset).unwrap();
    let suite = SUITE.replace("edits = 10", "edits = 2").replacen(
        "judge = \"testbed\"\nseed = 0",
        "judge = \"judge.toml\"",
        1,
    );
    std::fs::write(suite_dir.join("suite.toml"), &suite).unwrap();
    let out = dir.path().join("out");
    let run = |cwd: &Path, suite: &str, extra: &[&str]| {
        let output = eval(Path::new(suite), &out)
            .args(extra)
            .current_dir(cwd)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // results.json echoes the suite as read, its preset's path as the suite joined it.
    let comparable = |out: &Path| {
        let mut v = comparable(out);
        v.as_object_mut().unwrap().remove("suite");
        v
    };
    let (code, stderr) = run(dir.path(), "suites/suite.toml", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let report = comparable(&out);
    let arms_file = out.join("arms.json");
    let arms = std::fs::read_to_string(&arms_file).unwrap();
    assert!(arms.contains("preset sha256:"), "{arms}");
    assert!(!arms.contains("judge.toml"), "{arms}");

    // From the suite's own folder, by a relative path, and by an absolute one.
    let absolute = suite_dir.join("suite.toml");
    for (cwd, path) in [
        (suite_dir.as_path(), "suite.toml"),
        (dir.path(), absolute.to_str().unwrap()),
    ] {
        let (code, stderr) = run(cwd, path, &["--report-only"]);
        assert_eq!(code, Some(0), "{path}: {stderr}");
        assert_eq!(comparable(&out), report, "{path}");
    }

    // arms.json as it was written before: the preset's path as the suite joined it.
    let mut stored: serde_json::Value = serde_json::from_str(&arms).unwrap();
    for settings in stored.as_object_mut().unwrap().values_mut() {
        settings["selection_judge"] = serde_json::json!({"judge": "suites/judge.toml", "seed": 0});
    }
    std::fs::write(&arms_file, stored.to_string()).unwrap();
    let (code, stderr) = run(dir.path(), "suites/suite.toml", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(comparable(&out), report);
    let upgraded = std::fs::read_to_string(&arms_file).unwrap();
    assert!(!upgraded.contains("judge.toml"), "{upgraded}");

    // Another preset under the same name is another judge.
    std::fs::write(suite_dir.join("judge.toml"), preset.replace("1.0", "2.0")).unwrap();
    let (code, stderr) = run(dir.path(), "suites/suite.toml", &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("`random` (selection_judge)"),
        "the refusal names what changed: {stderr}"
    );
}

/// A best-of-n read from best-of-N's first n candidates, none of which the selection judge
/// scored, is a failure (as the same arm run on its own is), not candidate 0 as a fallback
/// pick scored into the means; it keeps the compute it spent.
#[test]
fn a_derived_best_of_n_whose_candidates_were_all_unscored_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let judge = dir.path().join("flaky.toml");
    std::fs::write(&judge, "kind = \"testbed\"\nfailure_rate = 0.6\n").unwrap();
    let suite = dir.path().join("suite.toml");
    let text = SUITE.replace(
        "[selection_judge]\njudge = \"testbed\"\nseed = 0",
        "[selection_judge]\njudge = \"flaky.toml\"",
    );
    assert!(text.contains("flaky.toml"));
    std::fs::write(&suite, text).unwrap();
    let out = dir.path().join("out");
    assert_eq!(eval(&suite, &out).status().unwrap().code(), Some(3));
    let stored = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = stored
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let derived: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["arm"].as_str().unwrap().starts_with("best-of-4@"))
        .collect();
    // Prefixes that failed while best-of-4 itself picked a scored candidate.
    let failed: Vec<&&serde_json::Value> = derived
        .iter()
        .filter(|r| !r["error"].is_null() && !r["derived_from"].is_null())
        .collect();
    assert!(
        !failed.is_empty(),
        "no prefix lost all its scores: {derived:?}"
    );
    for r in &derived {
        if r["error"].is_null() {
            assert!(!r["selection"].is_null(), "a fallback pick was scored: {r}");
        }
    }
    for r in failed {
        assert!(r["selection"].is_null() && r["eval"].is_null(), "{r}");
        assert!(r["nfe"].as_u64().unwrap() > 0, "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("scored none of best-of-4's first"),
            "{r}"
        );
    }
    // A rerun runs best-of-4 again for its failed prefixes; best-of-4's own result is
    // done already, so it is neither stored again nor counted: the progress ends at most
    // at its total, and the file holds one line per (item, arm).
    let rerun = eval(&suite, &out).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert_eq!(rerun.status.code(), Some(3), "{stderr}");
    // The meter's last line: `eval: DONE/TOTAL in S s`.
    let (done, total) = stderr
        .lines()
        .filter_map(|l| l.rsplit("eval: ").next()?.split_once(" in "))
        .filter_map(|(count, _)| {
            let (done, total) = count.split_once('/')?;
            Some((done.parse::<usize>().ok()?, total.parse::<usize>().ok()?))
        })
        .next_back()
        .unwrap_or_else(|| panic!("no end of progress: {stderr}"));
    assert!(done <= total, "progress {done}/{total}");
    let stored = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let keys: Vec<(String, String)> = stored
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|r| (r["item"].to_string(), r["arm"].to_string()))
        .collect();
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "a unit has two lines");
    assert_eq!(keys.len(), 10 * 5);
}

/// Runs `eval` into `out` and sends it SIGINT once `results.jsonl` holds `at_least` lines
/// (read on the binary's log of each fsynced append, not on a clock); its exit code and
/// stderr.
fn interrupted_at(suite: &Path, out: &Path, at_least: usize) -> (Option<i32>, String) {
    let mut child = eval(suite, out)
        .env("RUST_LOG", "error,icedit_scale::stored=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut stderr = String::new();
    for line in log.by_ref() {
        let line = line.unwrap();
        stderr.push_str(&line);
        stderr.push('\n');
        if line.contains("results stored") && lines(&out.join("results.jsonl")) >= at_least {
            break;
        }
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    for line in log {
        stderr.push_str(&line.unwrap());
        stderr.push('\n');
    }
    (child.wait().unwrap().code(), stderr)
}

/// A stopped run says how many results IT handled, not how many the folder holds (it
/// once counted those earlier runs had finished too).
#[test]
fn a_stopped_eval_counts_the_results_it_handled() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    // Many items: the stop lands after the item in progress, far from the end. Judges
    // that never fail: no failure of the first run is retried (and superseded) by the
    // second, so the lines it adds are the results it handled.
    let never_fails = "kind = \"testbed\"\nfailure_rate = 0.0\n";
    std::fs::write(dir.path().join("sure.toml"), never_fails).unwrap();
    std::fs::write(
        dir.path().join("sure-eval.toml"),
        format!("{never_fails}seed = 1\n"),
    )
    .unwrap();
    let text = SUITE
        .replace("edits = 10", "edits = 40")
        .replace(
            "[selection_judge]\njudge = \"testbed\"\nseed = 0",
            "[selection_judge]\njudge = \"sure.toml\"",
        )
        .replace(
            "[eval_judge]\njudge = \"testbed\"\nseed = 1",
            "[eval_judge]\njudge = \"sure-eval.toml\"",
        );
    assert!(text.contains("sure.toml") && text.contains("sure-eval.toml"));
    std::fs::write(&suite, text).unwrap();
    let out = dir.path().join("out");
    let (code, _) = interrupted_at(&suite, &out, 5);
    assert_eq!(code, Some(4));
    let first = lines(&out.join("results.jsonl"));
    let (code, stderr) = interrupted_at(&suite, &out, first + 5);
    assert_eq!(code, Some(4), "{stderr}");
    let second = lines(&out.join("results.jsonl"));
    assert!(second < 200, "{second}");
    assert!(
        stderr.contains(&format!(
            "({} handled in this run, done, failed or invalid; {} left)",
            second - first,
            200 - second
        )),
        "{first} then {second} lines: {stderr}"
    );
}

/// A stored result stands only for the content it was run on: an item whose image or
/// instruction changed under the same id is run again (every arm of it), and the report
/// equals a fresh folder's (it once kept the old results). `--report-only` leaves such an
/// item out until a run redoes it.
#[test]
fn an_item_changed_under_the_same_id_is_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let image = |name: &str, seed: u8| {
        let img = image::RgbImage::from_fn(96, 72, |x, y| {
            let band = (y / 24) as u8;
            image::Rgb([
                seed.wrapping_mul(40).wrapping_add(band * 60),
                (x as u8).wrapping_mul(2),
                200u8.wrapping_sub(seed.wrapping_mul(30)),
            ])
        });
        img.save(dir.path().join(name)).unwrap();
    };
    for (name, seed) in [("a.png", 1), ("b.png", 2), ("c.png", 3)] {
        image(name, seed);
    }
    let data = dir.path().join("data.jsonl");
    let write = |first: (&str, &str)| {
        let line = |id: &str, image: &str, instruction: &str| {
            format!("{{\"id\":\"{id}\",\"image\":\"{image}\",\"instruction\":\"{instruction}\"}}\n")
        };
        let text = [
            line("i1", first.0, first.1),
            line("i2", "b.png", "change the background to teal"),
        ]
        .concat();
        std::fs::write(&data, text).unwrap();
    };
    write(("a.png", "change the background to grey"));
    let suite = dir.path().join("suite.toml");
    let text = SUITE.replace("width = 128", "width = 64").replace(
        "kind = \"testbed\"\nedits = 10\nfirst_scene = 77",
        "kind = \"jsonl\"\npath = \"data.jsonl\"",
    );
    assert!(text.contains("data.jsonl"));
    std::fs::write(&suite, text).unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let output = eval(&suite, out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let out = dir.path().join("out");
    run(&out, &[]);
    let before = comparable(&out);

    // i1 now names another image and instruction: its five results (random, best-of-4 and
    // its two prefixes, ef-4-3-1) are run again.
    write(("c.png", "remove the green triangle"));
    let rerun = run(&out, &[]);
    assert!(
        rerun.contains("5 stored result(s) of 1 item(s) whose image or instruction changed")
            && rerun.contains("run again"),
        "{rerun}"
    );
    let fresh = dir.path().join("fresh");
    run(&fresh, &[]);
    assert_eq!(comparable(&out), comparable(&fresh));
    assert_ne!(
        comparable(&out),
        before,
        "the changed item scores otherwise"
    );
    // One line per (item, arm) once the superseded lines are dropped.
    assert!(!run(&out, &[]).contains("changed"));
    assert_eq!(lines(&out.join("results.jsonl")), 10);

    // i2's image rewritten in place (same path): left out of a report rebuilt from the
    // records, then run again.
    image("b.png", 7);
    let report_only = run(&out, &["--report-only"]);
    assert!(
        report_only.contains("5 stored result(s) of 1 item(s)")
            && report_only.contains("left out of this report"),
        "{report_only}"
    );
    let json = comparable(&out);
    let random = arm_of(&json, "random");
    assert_eq!(random["items"], 1, "{random}");
    run(&out, &[]);
    let fresh = dir.path().join("fresh2");
    run(&fresh, &[]);
    assert_eq!(comparable(&out), comparable(&fresh));
}

const REFINE_SUITE: &str = r#"
name = "refine"
width = 64
steps = 10
base_seed = 0
resamples = 200
[dataset]
kind = "testbed"
edits = 6
first_scene = 100
[selection_judge]
judge = "testbed"
seed = 0
[[arms]]
name = "best-of-3"
strategy = "best-of-n"
seeds = 3
[[arms]]
name = "random"
strategy = "random"
[[arms]]
name = "best-of-3-refined"
strategy = "best-of-n"
seeds = 3
refine = 128
[[arms]]
name = "random-refined"
strategy = "random"
refine = 128
"#;

/// An arm with `refine` is scored on what it returns, the refined pick (here by the
/// selection judge afresh: two more calls), with the refine's cost in edit-step
/// equivalents; no best-of-N prefix is read from a refining arm (only its pick is refined).
/// Refining arms used to score the unrefined pick: identical records, no cost anywhere.
#[test]
fn an_arm_that_refines_is_scored_on_its_refined_edit_and_pays_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.toml");
    std::fs::write(&suite, REFINE_SUITE).unwrap();
    let out = dir.path().join("out");
    // Exit 3 or 0: the testbed judge fails some calls by design.
    eval(&suite, &out).status().unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = |item: &serde_json::Value, arm: &str| {
        rows.iter()
            .find(|r| r["item"] == *item && r["arm"] == arm)
            .unwrap_or_else(|| panic!("{item} {arm}"))
            .clone()
    };
    assert!(rows.iter().any(|r| r["arm"] == "best-of-3@2"));
    assert!(!rows.iter().any(|r| r["arm"] == "best-of-3-refined@2"));
    let mut differs = 0;
    for item in rows.iter().map(|r| r["item"].clone()) {
        let (plain, refined) = (row(&item, "random"), row(&item, "random-refined"));
        assert!(
            plain.get("refine_edit_step_equivalents").is_none(),
            "{plain}"
        );
        assert!(
            refined["refine_edit_step_equivalents"].as_f64().unwrap() > 0.0,
            "{refined}"
        );
        assert_eq!(
            refined["judge_calls"].as_u64().unwrap(),
            plain["judge_calls"].as_u64().unwrap() + 2,
            "{plain} {refined}"
        );
        differs += (plain["eval"] != refined["eval"]) as usize;
    }
    assert!(
        differs > 0,
        "every refined arm's score equals the unrefined one's"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| refine (edit-step equivalents) |"), "{md}");
}
