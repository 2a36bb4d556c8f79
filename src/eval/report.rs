//! The eval report: per arm mean VIE O/SC/PQ with bootstrap intervals, paired differences
//! against the random baseline with a paired t-test and win/tie/loss, a per-task breakdown
//! (micro and macro means), cost per item, judge failures counted apart, and a plot of
//! score against NFE. Written as `results.json`, `report.md` and `score_vs_nfe.svg`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::plot::{write_plot, PlotSpec, Point};
use super::stats::{
    bootstrap_mean, mean, paired_t_test, win_tie_loss, Estimate, PairedTest, WinTieLoss,
};
use super::store::{ArmResult, EvalScore};
use super::suite::Suite;
use crate::engine::{StrategyConfig, StrategyKind};

/// One arm's aggregates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmSummary {
    /// Arm name.
    pub arm: String,
    /// Read from another arm's runs.
    pub derived_from: Option<String>,
    /// Items with a result.
    pub items: usize,
    /// Items the evaluation judge scored.
    pub scored: usize,
    /// Items whose scoring failed (not in the means).
    pub eval_failures: usize,
    /// Items that could not be run at all.
    pub item_errors: usize,
    /// Mean VIE O (evaluation judge) with its 95% bootstrap interval.
    pub overall: Option<Estimate>,
    /// Mean SC.
    pub sc: Option<Estimate>,
    /// Mean PQ.
    pub pq: Option<Estimate>,
    /// Mean O by the selection judge (reported when the judges differ).
    pub selection_overall: Option<f64>,
    /// Testbed: fraction of returned edits that are the correct outcome.
    pub correct_rate: Option<f64>,
    /// Testbed: the same with its 95% bootstrap interval.
    #[serde(default)]
    pub correct: Option<Estimate>,
    /// NFE per item.
    pub nfe: f64,
    /// Of the NFE per item, forwards run in full.
    #[serde(default)]
    pub full_forwards: f64,
    /// Of the NFE per item, forwards served from the step cache (each counts as one NFE).
    #[serde(default)]
    pub cached_forwards: f64,
    /// Hi-res refine forwards per item, in forwards of the edit's size (outside the NFE).
    #[serde(default)]
    pub refine_edit_step_equivalents: f64,
    /// Judge calls per item (selection + evaluation).
    pub judge_calls: f64,
    /// Failed judge results per item.
    pub judge_failures: f64,
    /// Judge tokens per item.
    pub judge_tokens: f64,
    /// Per task: (items scored, mean O).
    pub tasks: BTreeMap<String, (usize, f64)>,
    /// Mean over task means (GEdit-style).
    pub macro_overall: Option<f64>,
    /// Paired comparison with the baseline.
    pub vs_baseline: Option<Paired>,
}

/// A paired comparison over items both arms scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    /// The baseline arm.
    pub baseline: String,
    /// Mean difference (this - baseline) with its bootstrap interval.
    pub difference: Estimate,
    /// Paired t-test.
    pub test: Option<PairedTest>,
    /// Wins, ties, losses.
    pub wtl: WinTieLoss,
}

/// Wall time per item, kept apart so reruns compare equal on everything else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    /// Arm name.
    pub arm: String,
    /// Mean wall seconds per item.
    pub wall_s: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// The suite as written.
    pub suite: Suite,
    /// Each arm's strategy as it ran: the suite's values with the defaults filled in.
    pub strategies: BTreeMap<String, StrategyConfig>,
    /// Items evaluated.
    pub items: usize,
    /// Whether the returned edits were scored by the selection judge itself.
    pub same_judge: bool,
    /// Per arm, in suite order.
    pub arms: Vec<ArmSummary>,
    /// Wall times.
    pub timing: Vec<Timing>,
}

fn overall(r: &ArmResult) -> Option<f64> {
    match &r.eval {
        Some(EvalScore::Ok(s)) => Some(s.overall),
        _ => None,
    }
}

/// Aggregates stored results; `arm_order` lists the arms to report (derived ones included).
pub fn build(suite: &Suite, results: &[ArmResult], arm_order: &[String]) -> EvalReport {
    let seed = 0x1ced;
    fn by_arm<'a>(
        results: &'a [ArmResult],
        arm: &'a str,
    ) -> impl Iterator<Item = &'a ArmResult> + 'a {
        results.iter().filter(move |r| r.arm == arm)
    }
    let baseline = suite
        .arms
        .iter()
        .find(|a| suite.config(a).kind == crate::engine::StrategyKind::Random)
        .map(|a| a.name.clone());
    let base_scores: BTreeMap<&str, f64> = baseline
        .as_deref()
        .map(|b| {
            by_arm(results, b)
                .filter_map(|r| overall(r).map(|o| (r.item.as_str(), o)))
                .collect()
        })
        .unwrap_or_default();
    let mut arms = Vec::new();
    let mut timing = Vec::new();
    for (i, name) in arm_order.iter().enumerate() {
        // Item order, whatever order the results were stored in (a resumed run appends
        // in a different order; sums must not depend on it).
        let mut rows: Vec<&ArmResult> = by_arm(results, name).collect();
        rows.sort_by(|a, b| a.item.cmp(&b.item));
        if rows.is_empty() {
            continue;
        }
        let ok: Vec<&ArmResult> = rows.iter().copied().filter(|r| r.error.is_none()).collect();
        // Costs are per item run: a failure that spent compute (a pick the selection judge
        // could not score) counts, one that never ran (an unreadable image) does not.
        let ran: Vec<&ArmResult> = rows
            .iter()
            .copied()
            .filter(|r| r.error.is_none() || r.nfe > 0)
            .collect();
        let per =
            |f: &dyn Fn(&ArmResult) -> f64| mean(&ran.iter().map(|r| f(r)).collect::<Vec<_>>());
        let pick = |f: &dyn Fn(&super::store::Scores) -> f64| -> Vec<f64> {
            ok.iter()
                .filter_map(|r| match &r.eval {
                    Some(EvalScore::Ok(s)) => Some(f(s)),
                    _ => None,
                })
                .collect()
        };
        let o = pick(&|s| s.overall);
        let s_seed = seed + i as u64;
        let mut tasks: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in &ok {
            if let (Some(t), Some(v)) = (&r.task, overall(r)) {
                tasks.entry(t.clone()).or_default().push(v);
            }
        }
        let tasks: BTreeMap<String, (usize, f64)> = tasks
            .into_iter()
            .map(|(t, v)| (t, (v.len(), mean(&v))))
            .collect();
        let macro_overall =
            (!tasks.is_empty()).then(|| mean(&tasks.values().map(|(_, m)| *m).collect::<Vec<_>>()));
        let vs_baseline = match &baseline {
            Some(b) if b != name => {
                let pairs: Vec<(f64, f64)> = ok
                    .iter()
                    .filter_map(|r| Some((overall(r)?, *base_scores.get(r.item.as_str())?)))
                    .collect();
                let diffs: Vec<f64> = pairs.iter().map(|(a, b)| a - b).collect();
                bootstrap_mean(&diffs, suite.resamples, 0.95, s_seed ^ 0xd1ff).map(|difference| {
                    Paired {
                        baseline: b.clone(),
                        difference,
                        test: paired_t_test(&diffs),
                        wtl: win_tie_loss(&pairs, 1e-6),
                    }
                })
            }
            _ => None,
        };
        // Over the items VIE O averages (those the eval judge scored), so the two columns
        // compare like with like.
        let selection: Vec<f64> = ok
            .iter()
            .filter(|r| matches!(r.eval, Some(EvalScore::Ok(_))))
            .filter_map(|r| r.selection.map(|s| s.overall))
            .collect();
        let correct: Vec<f64> = ok
            .iter()
            .filter_map(|r| r.correct.map(|c| c as u8 as f64))
            .collect();
        arms.push(ArmSummary {
            arm: name.clone(),
            derived_from: rows[0].derived_from.clone(),
            items: rows.len(),
            scored: o.len(),
            eval_failures: ok
                .iter()
                .filter(|r| matches!(r.eval, Some(EvalScore::Failed(_))))
                .count(),
            item_errors: rows.len() - ok.len(),
            overall: bootstrap_mean(&o, suite.resamples, 0.95, s_seed),
            sc: bootstrap_mean(&pick(&|s| s.sc), suite.resamples, 0.95, s_seed + 1000),
            pq: bootstrap_mean(&pick(&|s| s.pq), suite.resamples, 0.95, s_seed + 2000),
            selection_overall: (!selection.is_empty()).then(|| mean(&selection)),
            correct_rate: (!correct.is_empty()).then(|| mean(&correct)),
            correct: bootstrap_mean(&correct, suite.resamples, 0.95, s_seed + 3000),
            nfe: per(&|r| r.nfe as f64),
            full_forwards: per(&|r| r.full_forwards() as f64),
            cached_forwards: per(&|r| r.cached_forwards as f64),
            refine_edit_step_equivalents: per(&|r| r.refine_edit_step_equivalents),
            judge_calls: per(&|r| r.judge_calls as f64),
            judge_failures: per(&|r| r.judge_failures as f64),
            judge_tokens: per(&|r| r.judge_tokens as f64),
            tasks,
            macro_overall,
            vs_baseline,
        });
        timing.push(Timing {
            arm: name.clone(),
            wall_s: per(&|r| r.wall_s),
        });
    }
    let items = results
        .iter()
        .map(|r| &r.item)
        .collect::<std::collections::HashSet<_>>()
        .len();
    EvalReport {
        suite: suite.clone(),
        strategies: suite
            .arms
            .iter()
            .map(|a| (a.name.clone(), suite.config(a)))
            .collect(),
        items,
        same_judge: suite.same_judge(),
        arms,
        timing,
    }
}

fn format_p(p: f64) -> String {
    if p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

fn est(e: &Option<Estimate>) -> String {
    match e {
        Some(e) => format!("{:.2} [{:.2}, {:.2}]", e.mean, e.lo, e.hi),
        None => "-".into(),
    }
}

/// A suite's judge as the report names it: the built-in testbed judge with its seed, a
/// preset by its file (a preset takes no seed).
fn judge_label(judge: &crate::eval::suite::SuiteJudge) -> String {
    if judge.judge == "testbed" {
        format!("`testbed` (seed {})", judge.seed)
    } else {
        format!("`{}`", judge.judge)
    }
}

impl EvalReport {
    /// The markdown report.
    pub fn markdown(&self) -> String {
        let s = &self.suite;
        let mut md = format!("# Eval: {}\n\n{}\n\n", s.name, s.description);
        md.push_str(&format!(
            "{} items, {} steps, width {}; selection judge {}, evaluation judge {}.{}\nIntervals are 95% percentile bootstrap ({} resamples); differences are paired per item against the random baseline, with a paired t-test.\n\n",
            self.items,
            s.base_strategy().steps,
            s.width,
            judge_label(&s.selection_judge),
            judge_label(s.eval_judge()),
            if self.same_judge {
                " **The same judge selects and scores: scores favour the strategies that select.**"
            } else {
                ""
            },
            s.resamples
        ));
        let testbed = self.arms.iter().any(|a| a.correct_rate.is_some());
        md.push_str("| arm | NFE | VIE O | SC | PQ | Δ O vs random | p | win/tie/loss |");
        md.push_str(if testbed { " correct |" } else { "" });
        md.push_str(if self.same_judge {
            "\n"
        } else {
            " O (selection judge) |\n"
        });
        md.push_str("|---|---|---|---|---|---|---|---|");
        md.push_str(if testbed { "---|" } else { "" });
        md.push_str(if self.same_judge { "\n" } else { "---|\n" });
        for a in &self.arms {
            let (d, p, wtl) = match &a.vs_baseline {
                Some(v) => (
                    format!(
                        "{:+.2} [{:+.2}, {:+.2}]",
                        v.difference.mean, v.difference.lo, v.difference.hi
                    ),
                    v.test.map_or("-".into(), |t| format_p(t.p)),
                    format!("{}/{}/{}", v.wtl.wins, v.wtl.ties, v.wtl.losses),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            md.push_str(&format!(
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                a.arm,
                a.nfe,
                est(&a.overall),
                est(&a.sc),
                est(&a.pq),
                d,
                p,
                wtl
            ));
            if testbed {
                md.push_str(&match a.correct {
                    Some(c) => format!(
                        " {:.1}% [{:.1}, {:.1}] |",
                        100.0 * c.mean,
                        100.0 * c.lo,
                        100.0 * c.hi
                    ),
                    None => " - |".into(),
                });
            }
            if !self.same_judge {
                md.push_str(&format!(
                    " {} |",
                    a.selection_overall
                        .map_or("-".into(), |o| format!("{o:.2}"))
                ));
            }
            md.push('\n');
        }
        md.push_str("\n## Cost per item and failures\n\nA forward served from the step cache (an arm's `cache`) counts as one NFE, as a full one does; a hi-res refine's forwards are counted apart (in edit-step equivalents) and outside budgets. Costs, and the NFE column above, are means over the items each arm ran, failed ones included: a pick the selection judge could not score spent its compute. Items unscored: the eval judge failed on the returned edit; items failed: the arm gave no edit of its own (the selection judge scored none of its candidates, or the item could not run).\n\n| arm | derived from | wall (s) | full forwards | cached forwards | refine (edit-step equivalents) | judge calls | judge tokens | failed judge results | items unscored | items failed |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (a, t) in self.arms.iter().zip(&self.timing) {
            md.push_str(&format!(
                "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {} | {} |\n",
                a.arm,
                a.derived_from.as_deref().unwrap_or("-"),
                t.wall_s,
                a.full_forwards,
                a.cached_forwards,
                a.refine_edit_step_equivalents,
                a.judge_calls,
                a.judge_tokens,
                a.judge_failures,
                a.eval_failures,
                a.item_errors
            ));
        }
        let tasks: std::collections::BTreeSet<&String> =
            self.arms.iter().flat_map(|a| a.tasks.keys()).collect();
        if !tasks.is_empty() {
            md.push_str("\n## Per task (mean VIE O; items scored)\n\n| arm | micro | macro |");
            for t in &tasks {
                md.push_str(&format!(" {t} |"));
            }
            md.push_str("\n|---|---|---|");
            md.push_str(&"---|".repeat(tasks.len()));
            md.push('\n');
            for a in &self.arms {
                md.push_str(&format!(
                    "| {} | {} | {} |",
                    a.arm,
                    a.overall.map_or("-".into(), |e| format!("{:.2}", e.mean)),
                    a.macro_overall.map_or("-".into(), |m| format!("{m:.2}"))
                ));
                for t in &tasks {
                    md.push_str(&match a.tasks.get(*t) {
                        Some((n, m)) => format!(" {m:.2} ({n}) |"),
                        None => " - |".into(),
                    });
                }
                md.push('\n');
            }
        }
        md.push_str("\n![mean VIE O against NFE per item](score_vs_nfe.svg)\n");
        if testbed {
            md.push_str("\n![correct-outcome rate against NFE per item](correct_vs_nfe.svg)\n");
        }
        md
    }

    /// The strategy family of an arm (derived best-of-n prefixes are best-of-N; `random`
    /// read from best-of-N's candidate 0 is random).
    pub fn family(&self, arm: &ArmSummary) -> Option<StrategyKind> {
        if let Some(own) = self.strategies.get(&arm.arm) {
            return Some(own.kind);
        }
        let source = arm.derived_from.as_deref()?;
        Some(self.strategies.get(source)?.kind)
    }

    /// Plot points of every arm with a value, scaled by `scale`.
    fn points(&self, value: fn(&ArmSummary) -> Option<Estimate>, scale: f64) -> Vec<Point> {
        self.arms
            .iter()
            .filter_map(|a| {
                let v = value(a)?;
                Some(Point {
                    arm: a.arm.clone(),
                    family: self.family(a)?,
                    nfe: a.nfe,
                    value: Estimate {
                        mean: v.mean * scale,
                        lo: v.lo * scale,
                        hi: v.hi * scale,
                        n: v.n,
                    },
                })
            })
            .collect()
    }

    /// Writes `score_vs_nfe.svg` (mean VIE O) and, on the testbed, `correct_vs_nfe.svg`
    /// (correct-outcome rate), each with its Pareto front (see [`super::plot`]).
    pub fn plot(&self, out: &Path) -> anyhow::Result<()> {
        let name = &self.suite.name;
        write_plot(
            &PlotSpec {
                title: format!("{name}: mean VIE O against NFE per item"),
                y_desc: "mean VIE O, evaluation judge (95% CI)",
                percent: false,
            },
            &self.points(|a| a.overall, 1.0),
            &out.join("score_vs_nfe.svg"),
        )?;
        write_plot(
            &PlotSpec {
                title: format!("{name}: correct-outcome rate against NFE per item"),
                y_desc: "correct outcome, % of items (95% CI)",
                percent: true,
            },
            &self.points(|a| a.correct, 100.0),
            &out.join("correct_vs_nfe.svg"),
        )
    }

    /// Writes `results.json`, `report.md` and `score_vs_nfe.svg` under `out`.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        crate::fsio::write_atomic(&out.join("results.json"), &serde_json::to_vec_pretty(self)?)?;
        crate::fsio::write_atomic(&out.join("report.md"), self.markdown().as_bytes())?;
        self.plot(out)
    }
}
