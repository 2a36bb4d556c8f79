//! `bench judge --versus`: our prefill and another implementation's (transformers, through
//! `scripts/bench_transformers_judge.py --serve`), timed in alternating rounds while both
//! models stay loaded.
//!
//! Timing each side in its own process minutes apart measures the machine as much as the
//! code: on shared 2-core VMs one side's prefill moved by 30% between runs while the other
//! was not running. Here both processes hold their model, and each round times one prefill
//! of each, back to back, the side that goes first alternating; the verdict is the median of
//! the per-round ratios.
//!
//! The reference process speaks a line protocol on its stdin and stdout (other stdout
//! lines, e.g. library chatter, are skipped; stderr passes through):
//! - once loaded and warmed up, it prints one JSON object with `"ready": true` and the
//!   prompt it times (`prompt_tokens`, `image_side`, `dtype`; `transformers`, `attention`,
//!   `torch` name it);
//! - for each line `prefill` it reads, it runs one prefill and prints
//!   `{"prefill_s": seconds}`;
//! - at the end of its stdin it exits.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use candle_core::Result;
use serde::{Deserialize, Serialize};

/// What the reference process said it times, from its ready line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceInfo {
    /// Tokens per prompt.
    pub prompt_tokens: usize,
    /// Square image side, pixels.
    pub image_side: usize,
    /// Weight dtype as torch names it (`f32`, `bf16`).
    pub dtype: String,
    /// transformers' version.
    #[serde(default)]
    pub transformers: String,
    /// The attention implementation (`sdpa`).
    #[serde(default)]
    pub attention: String,
    /// torch's version.
    #[serde(default)]
    pub torch: String,
}

/// A running reference process (killed when dropped).
pub struct ReferenceProcess {
    command: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ReferenceProcess {
    /// Starts `command` under `sh -c`; it loads its model while the caller loads ours.
    pub fn spawn(command: &str) -> Result<Self> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| candle_core::Error::Msg(format!("--versus `{command}`: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            candle_core::bail!("--versus `{command}`: no pipes to the process");
        };
        Ok(Self {
            command: command.to_string(),
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// Waits for the ready line and checks that it times the prompt we time.
    pub fn ready(
        &mut self,
        prompt_tokens: usize,
        image_side: usize,
        dtype: &str,
    ) -> Result<ReferenceInfo> {
        let line = self.answer("ready")?;
        let info: ReferenceInfo = serde_json::from_value(line).map_err(|e| {
            candle_core::Error::Msg(format!("--versus `{}`: ready line: {e}", self.command))
        })?;
        let theirs = (info.prompt_tokens, info.image_side, info.dtype.as_str());
        if let Some(why) = prompt_mismatch(theirs, (prompt_tokens, image_side, dtype)) {
            candle_core::bail!("--versus `{}`: {why}", self.command);
        }
        Ok(info)
    }

    /// Asks for one prefill and returns the seconds the process measured.
    pub fn prefill(&mut self) -> Result<f64> {
        writeln!(self.stdin, "prefill")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| {
                candle_core::Error::Msg(format!("--versus `{}`: writing: {e}", self.command))
            })?;
        let answer = self.answer("prefill_s")?;
        match answer["prefill_s"].as_f64() {
            Some(s) if s.is_finite() && s > 0.0 => Ok(s),
            _ => candle_core::bail!(
                "--versus `{}`: `prefill_s` must be positive seconds, got {}",
                self.command,
                answer["prefill_s"]
            ),
        }
    }

    /// The next JSON object on stdout that has `field`.
    fn answer(&mut self, field: &str) -> Result<serde_json::Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let read = self.stdout.read_line(&mut line).map_err(|e| {
                candle_core::Error::Msg(format!("--versus `{}`: reading: {e}", self.command))
            })?;
            if read == 0 {
                let status = self
                    .child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                candle_core::bail!(
                    "--versus `{}` ended ({status}) before sending `{field}` (its stderr is above)",
                    self.command
                );
            }
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(line.trim()) {
                if value.get(field).is_some() {
                    return Ok(value);
                }
            }
        }
    }
}

impl Drop for ReferenceProcess {
    fn drop(&mut self) {
        // Its timings are in; nothing it does now matters, so do not wait on its exit.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a reference's timing, taken on `theirs` = (prompt tokens, image side, dtype), cannot
/// be set beside ours taken on `ours`; `None` when it can. Shared by `--versus` processes
/// and `--reference` files.
pub fn prompt_mismatch(theirs: (usize, usize, &str), ours: (usize, usize, &str)) -> Option<String> {
    let ((tokens, side, dtype), (our_tokens, our_side, our_dtype)) = (theirs, ours);
    if (tokens, side) != (our_tokens, our_side) {
        return Some(format!(
            "times {tokens} tokens with {side} px images, this run times {our_tokens} tokens with {our_side} px images (match --image-side and --text-tokens)"
        ));
    }
    (dtype != our_dtype).then(|| format!("dtype {dtype} but this run uses {our_dtype}"))
}

/// Which side ran first in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum First {
    /// Our prefill, then the reference's.
    Ours,
    /// The reference's prefill, then ours.
    Reference,
}

/// One round: one prefill of each side, back to back.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// Who went first.
    pub first: First,
    /// Our seconds.
    pub ours_s: f64,
    /// The reference's seconds.
    pub reference_s: f64,
}

impl Round {
    /// `ours_s / reference_s`.
    pub fn ratio(&self) -> f64 {
        self.ours_s / self.reference_s
    }
}

/// The rounds and their summary.
#[derive(Debug, Clone, Serialize)]
pub struct SideBySide {
    /// The reference command line.
    pub command: String,
    /// What it said it times.
    pub reference: ReferenceInfo,
    /// Every round, in order.
    pub rounds: Vec<Round>,
    /// Median of our seconds.
    pub ours_median_s: f64,
    /// Median of the reference's seconds.
    pub reference_median_s: f64,
    /// Median of the per-round ratios ours / reference: the verdict.
    pub ratio_median: f64,
    /// Smallest per-round ratio.
    pub ratio_min: f64,
    /// Largest per-round ratio.
    pub ratio_max: f64,
    /// Rounds in which ours was faster.
    pub ours_faster: usize,
}

/// Runs `rounds` rounds of `ours` (seconds of one of our prefills) against the reference's,
/// even rounds ours first, odd rounds the reference first.
pub fn run_rounds(
    rounds: usize,
    reference: &mut ReferenceProcess,
    info: ReferenceInfo,
    mut ours: impl FnMut() -> Result<f64>,
) -> Result<SideBySide> {
    if rounds == 0 {
        candle_core::bail!("--rounds must be at least 1");
    }
    let mut done = Vec::with_capacity(rounds);
    for index in 0..rounds {
        let round = if index % 2 == 0 {
            let ours_s = ours()?;
            let reference_s = reference.prefill()?;
            Round {
                first: First::Ours,
                ours_s,
                reference_s,
            }
        } else {
            let reference_s = reference.prefill()?;
            let ours_s = ours()?;
            Round {
                first: First::Reference,
                ours_s,
                reference_s,
            }
        };
        tracing::info!(
            round = index + 1,
            ours_s = round.ours_s,
            reference_s = round.reference_s,
            "side by side"
        );
        done.push(round);
    }
    Ok(summarize(reference.command.clone(), info, done))
}

fn summarize(command: String, reference: ReferenceInfo, rounds: Vec<Round>) -> SideBySide {
    let ratios: Vec<f64> = rounds.iter().map(Round::ratio).collect();
    SideBySide {
        command,
        reference,
        ours_median_s: median(rounds.iter().map(|r| r.ours_s).collect()),
        reference_median_s: median(rounds.iter().map(|r| r.reference_s).collect()),
        ratio_median: median(ratios.clone()),
        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ours_faster: rounds.iter().filter(|r| r.ours_s < r.reference_s).count(),
        rounds,
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl SideBySide {
    /// The rounds as a markdown table with the medians.
    pub fn markdown(&self) -> String {
        let r = &self.reference;
        let mut md = format!(
            "\nSide by side with transformers {} ({}, torch {}), both models loaded, {} rounds of one prefill each, the side going first alternating:\n\n| round | first | ours (s) | transformers (s) | ours / transformers |\n|---|---|---|---|---|\n",
            r.transformers,
            r.attention,
            r.torch,
            self.rounds.len()
        );
        for (i, round) in self.rounds.iter().enumerate() {
            let first = match round.first {
                First::Ours => "ours",
                First::Reference => "transformers",
            };
            md.push_str(&format!(
                "| {} | {first} | {:.3} | {:.3} | {:.3}x |\n",
                i + 1,
                round.ours_s,
                round.reference_s,
                round.ratio()
            ));
        }
        md.push_str(&format!(
            "| **median** | | **{:.3}** | **{:.3}** | **{:.3}x** |\n\nOurs was faster in {} of {} rounds; per-round ratios from {:.3}x to {:.3}x. Reference command: `{}`\n",
            self.ours_median_s,
            self.reference_median_s,
            self.ratio_median,
            self.ours_faster,
            self.rounds.len(),
            self.ratio_min,
            self.ratio_max,
            self.command
        ));
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in reference: chatter, then the ready line, then one fixed answer per
    /// request; it appends each request to `log` so the test sees what was asked.
    fn fake(ready: &str, seconds: &str, log: &std::path::Path) -> String {
        format!(
            "echo 'loading...'; echo '{ready}'; while read line; do echo \"$line\" >> {}; echo '{{\"prefill_s\": {seconds}}}'; done",
            log.display()
        )
    }

    const READY: &str = r#"{"ready": true, "prompt_tokens": 32, "image_side": 56, "dtype": "f32", "transformers": "5.25.0", "attention": "sdpa", "torch": "2.15.0"}"#;

    #[test]
    fn rounds_alternate_and_the_median_ratio_is_the_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests");
        let mut process = ReferenceProcess::spawn(&fake(READY, "2.0", &log)).unwrap();
        let info = process.ready(32, 56, "f32").unwrap();
        assert_eq!(info.transformers, "5.25.0");
        let mut ours = [1.0, 3.0, 1.5, 2.5, 1.8].into_iter();
        let result = run_rounds(5, &mut process, info, || Ok(ours.next().unwrap())).unwrap();
        drop(process);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "prefill\n".repeat(5)
        );
        let firsts: Vec<First> = result.rounds.iter().map(|r| r.first).collect();
        use First::*;
        assert_eq!(firsts, [Ours, Reference, Ours, Reference, Ours]);
        // Ratios 0.5, 1.5, 0.75, 1.25, 0.9: median 0.9; ours faster in three rounds.
        assert!((result.ratio_median - 0.9).abs() < 1e-12);
        assert!((result.ratio_min - 0.5).abs() < 1e-12);
        assert!((result.ratio_max - 1.5).abs() < 1e-12);
        assert_eq!(result.ours_faster, 3);
        assert!((result.ours_median_s - 1.8).abs() < 1e-12);
        assert!((result.reference_median_s - 2.0).abs() < 1e-12);
        let md = result.markdown();
        assert!(md.contains("| **median** | | **1.800** | **2.000** | **0.900x** |"));
        assert!(md.contains("Ours was faster in 3 of 5 rounds"));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn a_reference_that_times_another_prompt_or_dies_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests");
        let mut process = ReferenceProcess::spawn(&fake(READY, "2.0", &log)).unwrap();
        let err = process.ready(33, 56, "f32").unwrap_err().to_string();
        assert!(
            err.contains("times 32 tokens") && err.contains("33 tokens"),
            "{err}"
        );
        let mut process = ReferenceProcess::spawn(&fake(READY, "2.0", &log)).unwrap();
        let err = process.ready(32, 56, "bf16").unwrap_err().to_string();
        assert!(err.contains("dtype f32"), "{err}");

        let mut dies = ReferenceProcess::spawn("echo 'import error' >&2; exit 3").unwrap();
        let err = dies.ready(32, 56, "f32").unwrap_err().to_string();
        assert!(
            err.contains("before sending `ready`") && err.contains("3"),
            "{err}"
        );

        let mut bad = ReferenceProcess::spawn(&fake(READY, "-1", &log)).unwrap();
        bad.ready(32, 56, "f32").unwrap();
        let err = bad.prefill().unwrap_err().to_string();
        assert!(err.contains("positive seconds"), "{err}");
    }
}
