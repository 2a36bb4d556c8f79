//! scripts/gpu-acceptance.sh and its report writer (scripts/acceptance_report.py) on the CPU,
//! with a stub binary and a stub Python that answer in a second: the one GPU run must leave a
//! report whatever happens, so these runs make steps fail, write null (NaN) figures and
//! malformed files, get stopped by a signal mid-step, and run out of time. The real binary's
//! profile-forward mode (`ICEDIT_PROFILE_FORWARD=1 bench flux`) runs at the small size too.
//! Needs bash, python3, coreutils' `timeout` and tar (scripts/test installs python3).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `icedit-scale` as far as the acceptance script can tell: `--version`, `plan`, and each
/// bench / edit writing its result file with null figures, q8_0 and the early-filter edit
/// failing, fp8 writing a malformed result. STUB_SLEEP makes every step sleep first.
const STUB_BIN: &str = r#"#!/usr/bin/env bash
out=""
prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
case "$1" in
  --version) echo "icedit-scale 0.0.0 (stub)"; exit 0 ;;
  plan) printf '| part | GB | resident |\n|---|---|---|\n| **peak** | **28.63** | decode |\n'; exit 0 ;;
esac
# A step has begun (the script wrote its report first): tell the test through its FIFO.
[[ -n ${STUB_READY_FIFO:-} ]] && echo "$1" >"$STUB_READY_FIFO"
[[ -n ${STUB_SLEEP:-} ]] && sleep "$STUB_SLEEP"
mkdir -p "$out"
case "$1" in
  bench)
    if [[ $2 == judge ]]; then
      echo '{"attention_check": {"rows": [{"name": "vision", "max_abs_diff": null, "pass": false, "fused_ms": null, "unfused_ms": 1.0}], "not_built": [], "disabled": true, "in_use": false}, "side_by_side": {"ratio_median": null, "rounds": []}}' >"$out/judge.json"
      echo "stub judge table" >"$out/judge.md"
      exit 0
    fi
    case "$out" in
      *flux-q8_0) echo "stub: q8_0 failed on purpose" >&2; exit 1 ;;
      *flux-fp8) echo '{"formats": "not a list"}' >"$out/flux.json"; exit 0 ;;
    esac
    cat >"$out/flux.json" <<'JSON'
{"parameters": 1, "image_tokens": 2048, "vae_encode_s": null, "vae_decode_s": null, "peak_rss_mib": null,
 "formats": [{"format": "dense", "linear_weight_bytes": null, "steps": [
   {"batch": 1, "step_s": null, "device_memory": null,
    "graph": {"nodes": {"kernels": 10, "memcpys": 1, "memsets": 0}, "step_s": 0.1, "max_abs_diff_vs_eager": null, "graph_memory_bytes": null}},
   {"batch": 4, "step_s": 0.5, "graph": {"nodes": null, "error": "capture refused | stub"}}]}],
 "fused_check": {"rows": [
   {"name": "attention (8 warps)", "shape": "q", "max_abs_diff": null, "tolerance": null, "pass": false, "fused_ms": null, "unfused_ms": null, "error": "launch failed"},
   {"name": "attention (cuDNN)", "shape": "q", "max_abs_diff": null, "tolerance": null, "pass": false, "error": "no cuDNN"}],
   "enabled": [], "disabled": ["attention"], "on_cuda": true, "flash_warps": null, "fp8_relative_error": null},
 "kernel_check": {"softmax_max_abs_diff": null, "bias_add_max_abs_diff": null},
 "completions": [{"cache": "none", "wall_s": null, "full_forwards": 24, "cached_forwards": 0, "flops": null, "full_flops": null},
                 {"cache": "fbc:0.12", "wall_s": 1.0, "full_forwards": 10, "cached_forwards": 14, "flops": 1, "full_flops": null}]}
JSON
    printf 'stub flux\n\nDevice memory by part (stub)\n\n| part | measured |\n|---|---|\n| weights | NaN |\n' >"$out/flux.md"
    ;;
  edit)
    case "$out" in
      */edit) echo "stub: edit failed on purpose" >&2; exit 3 ;;
      */refine) echo '{"refine": {"size": [1024, 512], "strength": null, "nfe": null, "image_tokens": null, "start_step": null, "steps": 28, "step_cost": null, "edit_step_equivalents": null, "seconds": null}, "timings": {"complete_s": null, "total_s": null}, "nfe": {"total": null}}' >"$out/report.json" ;;
      *) echo '{"timings": {"total_s": null}, "nfe": {"total": 80}, "pick": 1}' >"$out/report.json" ;;
    esac
    ;;
esac
exit 0
"#;

/// A python with torch, diffusers and transformers as far as the probe can tell; the
/// reference scripts write their result files with null figures.
const STUB_PYTHON: &str = r#"#!/usr/bin/env bash
if [[ $1 == - ]]; then
  cat >/dev/null
  printf 'torch 0.0-stub\ndiffusers 0.0-stub\ntransformers 0.0-stub\nhooks FirstBlockCacheConfig, TaylorSeerCacheConfig\n'
  exit 0
fi
script=$(basename "$1")
out=""
prev=""
vae=0
cache=0
for a in "$@"; do
  [[ $prev == --out ]] && out=$a
  [[ $a == --vae ]] && vae=1
  [[ $a == --cache ]] && cache=1
  prev=$a
done
[[ -n ${STUB_SLEEP:-} ]] && sleep "$STUB_SLEEP"
case $script in
  bench_diffusers_flux.py)
    if ((vae)); then
      echo '{"vae": {"encode_s": null, "decode_s": null, "iters": 1, "latents": [1, 16, 64, 128]}}' >"$out"
    elif ((cache)); then
      echo '{"completion": {"keep": 2}, "completions": [1]}' >"$out"
    else
      echo '{"steps": [{"batch": 1, "step_s": null}, {"batch": 4, "step_s": 0.2}], "peak_gpu_gib": null, "torch": "stub", "diffusers": "stub"}' >"$out"
    fi
    ;;
  bench_diffusers_edit.py)
    echo '{"runs": [{"edit_s": null, "nfe": 28}], "edit_s": null, "nfe": 28, "diptych": [1024, 512], "steps": 28, "diffusers": "stub", "text_encoders": {"t5": {"parameters": null, "tokens": 512, "encode_s": null}, "clip": {"parameters": null, "encode_s": null}}}' >"$out"
    ;;
  *) echo "stub python: $*" >&2; exit 2 ;;
esac
"#;

/// Nsight Compute that runs the command and writes an empty CSV (the failure the profile
/// step must record, not summarise).
const STUB_NCU: &str = r#"#!/usr/bin/env bash
log=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --log-file) log=$2; shift 2 ;;
    --profile-from-start | --metrics | --clock-control | --cache-control) shift 2 ;;
    --*) shift ;;
    *) break ;;
  esac
done
"$@"
rc=$?
: >"$log"
exit $rc
"#;

struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        for (name, text) in [
            ("icedit-scale", STUB_BIN),
            ("python", STUB_PYTHON),
            ("bin/ncu", STUB_NCU),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Stubs { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn report(&self) -> String {
        std::fs::read_to_string(self.path("report.md")).unwrap_or_default()
    }
    /// The acceptance script with the stubs, the small CPU configuration and `extra` env.
    fn command(&self, extra: &[(&str, &str)]) -> Command {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new("bash");
        cmd.arg(root.join("scripts/gpu-acceptance.sh"))
            .current_dir(root)
            .env("BIN", self.path("icedit-scale"))
            .env("PYTHON", self.path("python"))
            .env("OUT", self.path("out"))
            .env("REPORT", self.path("report.md"))
            .env("LOGS_TAR", self.path("logs.tar.gz"))
            .env("SIZE", "small")
            .env("DEVICE", "cpu")
            .env("DTYPE", "f32")
            .env("BATCHES", "1,4")
            .env("ITERS", "1")
            .env_remove("DEADLINE")
            .env_remove("TOTAL_LIMIT")
            .env_remove("SKIP")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    }
}

#[test]
fn the_report_is_written_with_failed_steps_null_figures_and_a_malformed_result() {
    let stubs = Stubs::new();
    let out = stubs
        .command(&[("PROFILE", "0"), ("EXTRAS", "1")])
        .output()
        .unwrap();
    let report = stubs.report();
    assert!(
        out.status.success(),
        "exit {:?}\n{}\n{}\nreport:\n{report}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The failed steps are lines of the steps table, with their logs' tails.
    assert!(report.contains("| flux-q8_0 | 1 |"), "{report}");
    assert!(report.contains("| edit | 3 |"), "{report}");
    assert!(report.contains("stub: edit failed on purpose"), "{report}");
    assert!(report.contains("stub: q8_0 failed on purpose"), "{report}");
    // Null figures print as NaN or -, and every section that read them stands.
    assert!(
        report.contains("| attention (8 warps) | q | NaN | NaN | **FAIL** |"),
        "{report}"
    );
    assert!(report.contains("launch failed"), "{report}");
    assert!(report.contains("Older fused kernels: softmax max |diff| NaN"));
    for heading in [
        "## Must show: what this run measured",
        "## Fused FLUX kernels: device check",
        "## FLUX transformer step: ours against diffusers",
        "## One early-filter edit beside diffusers' FluxFillPipeline",
        "## VAE encode / decode",
        "## Judge prefill against transformers (small,",
        "## Profile of one forward",
        "## Memory plan against nvidia-smi's peak",
        "## Hi-res refine on the device",
        "## Judge flash attention",
        "## The FLUX step replayed from a CUDA graph",
        "## FLUX attention: our flash kernel against cuDNN's fused SDPA",
        "## Device memory by part",
    ] {
        assert!(report.contains(heading), "no `{heading}`:\n{report}");
    }
    // The malformed fp8 result costs its own rows, and diffusers' malformed cache result its
    // own section, not the report.
    assert!(
        report.contains("flux-fp8/flux.json unreadable: AttributeError"),
        "{report}"
    );
    assert!(
        report.contains("| dense | - | 4 | 0.5000 | 0.2000 | 2.50 | 1.00 |"),
        "{report}"
    );
    assert!(
        report.contains("**Section `cache_section` failed:"),
        "{report}"
    );
    let failed_sections = report.matches("**Section `").count();
    assert_eq!(failed_sections, 1, "only cache_section may fail:\n{report}");
    assert!(
        report.contains("Run state: **finished** (exit 0"),
        "{report}"
    );
    assert!(report.contains("- 31, FLUX step batch 1, ours / diffusers <= 0.8x: not measured"));
    assert!(report.contains("- 36, refine pass time: not measured in this run"));
    assert!(report.contains("- 32, plan within 10% of nvidia-smi's peak, dense, batch 8"));
    assert!(report.contains(
        "| dense, batch 8, early-filter edit (the `edit` step's flags) | edit (3) | 28.63 |"
    ));
    // The extras ran after the Must-show steps.
    let table: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.starts_with("| step | exit"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    let at = |name: &str| {
        table
            .iter()
            .position(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no step {name}:\n{report}"))
    };
    assert!(at("diffusers-vae") < at("flux-graph"));
    assert!(at("refine") < at("flux-dense-unfused"));
    assert!(stubs.path("logs.tar.gz").exists());
}

#[test]
fn an_empty_profile_is_a_recorded_failure() {
    let stubs = Stubs::new();
    let path = format!(
        "{}:{}",
        stubs.path("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = stubs
        .command(&[
            ("PATH", &path),
            ("PROFILE", "1"),
            ("PROFILE_BEFORE", "1"),
            ("EXTRAS", "0"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report = stubs.report();
    assert!(
        report.contains("| profile-ours-csv | failed: no kernel rows in profile-ours.csv |"),
        "{report}"
    );
    assert!(report.contains("| profile-ours-before-csv | failed: no kernel rows"));
    assert!(report.contains("**profile-ours: Nsight Compute wrote no kernel rows**"));
    assert!(report.contains("- 31, profile table per forward: not measured in this run"));
    // The binary ran in profile-forward mode, under ncu with the range off at the start.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("env ICEDIT_PROFILE_FORWARD=1")
            && stdout.contains("--profile-from-start off"),
        "{stdout}"
    );
    assert!(
        report.contains("Run state: **finished** (exit 0"),
        "{report}"
    );
}

#[test]
fn a_signal_mid_step_leaves_a_report_naming_the_stopped_step() {
    let stubs = Stubs::new();
    let fifo = stubs.path("ready");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let mut child = stubs
        .command(&[
            ("STUB_SLEEP", "600"),
            ("STUB_READY_FIFO", fifo.to_str().unwrap()),
        ])
        .spawn()
        .unwrap();
    // Blocks until the first step's stub writes: the step has begun, and the report
    // written before it started is on disk (a kill nobody can trap, SIGKILL, leaves it).
    let first = std::fs::read_to_string(&fifo).unwrap();
    assert_eq!(first.trim(), "bench", "{first}");
    let before = stubs.report();
    assert!(
        before.contains("Run state: **partial**: written while step `kernel-check` was running"),
        "{before}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    let report = stubs.report();
    assert!(
        report.contains("| kernel-check | stopped (SIGTERM) |"),
        "{report}"
    );
    assert!(
        report.contains("Run state: **finished** (stopped by SIGTERM"),
        "{report}"
    );
}

#[test]
fn the_deadline_stops_a_slow_step_and_skips_the_rest_with_a_report() {
    let stubs = Stubs::new();
    let mut child = stubs
        .command(&[
            // Every step would sleep 10 minutes; the run has 60 s, 10 of them kept for
            // the report: the first step is stopped at the deadline (its limit is what is
            // left, however long the set-up took on a loaded machine) and the rest skipped.
            ("STUB_SLEEP", "600"),
            ("TOTAL_LIMIT", "60"),
            ("REPORT_RESERVE", "10"),
        ])
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    let report = stubs.report();
    assert!(
        report.contains("| kernel-check | 124 (stopped at its limit) |"),
        "{report}"
    );
    assert!(
        report.contains("| flux-dense | skipped (time spent) |"),
        "{report}"
    );
    assert!(
        report.contains("| diffusers-vae | skipped (time spent) |"),
        "{report}"
    );
    assert!(report.contains("Run state: **finished**"), "{report}");
}

#[test]
fn a_binary_that_cannot_start_skips_its_steps_and_says_why() {
    let stubs = Stubs::new();
    let missing = stubs.path("no-such-binary");
    let out = stubs
        .command(&[("BIN", missing.to_str().unwrap()), ("EXTRAS", "0")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report = stubs.report();
    assert!(report.contains("## Preflight"), "{report}");
    assert!(report.contains("BIN is not an executable file"), "{report}");
    assert!(
        report.contains("| kernel-check | skipped (BIN cannot start: preflight) |"),
        "{report}"
    );
    // The Python baselines still ran.
    assert!(report.contains("| diffusers | 0 |"), "{report}");
}

/// `ICEDIT_PROFILE_FORWARD=1 bench flux`: the acceptance run's profile of one forward, here
/// on the CPU (no libcuda: the forward runs unprofiled and the file says why).
#[test]
fn profile_forward_mode_runs_one_forward_and_writes_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_icedit-scale"))
        .args([
            "bench",
            "flux",
            "--size",
            "small",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--formats",
            "dense",
            "--batch",
            "1",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--no-tiny",
            "--width",
            "64",
            "--height",
            "64",
            "--t5-tokens",
            "16",
            "--out",
        ])
        .arg(dir.path())
        .env("ICEDIT_PROFILE_FORWARD", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("profile-forward.json")).unwrap())
            .unwrap();
    assert_eq!(json["format"], "dense");
    assert_eq!(json["batch"], 1);
    assert!(json["forward_s"].as_f64().unwrap() > 0.0);
    assert!(json["profiler"].as_str().unwrap().contains("libcuda"));
    // Not the whole bench: no flux.json.
    assert!(!dir.path().join("flux.json").exists());
}
