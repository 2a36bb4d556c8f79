//! The judge-eval report: agreement with people, position bias, failures and cost, with
//! bootstrap intervals; written as `results.json` and `report.md`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::stats::{
    bootstrap, follows_position, kendall_tau_b, label_a_first, label_b_first, pearson, rate,
    spearman, verdict, Estimate, Label,
};
use super::store::{ItemCalls, Judgement};
use crate::fsio::write_atomic;

/// Agreement on preference pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairAgreement {
    /// Pairs in the data.
    pub pairs: usize,
    /// Pairs whose two calls both answered (the statistics below are over these).
    pub answered: usize,
    /// Verdict equals the human label, ties included as a third answer, over every
    /// answered pair.
    pub accuracy_with_ties: Option<Estimate>,
    /// Over answered pairs the humans did not call a tie; a judge's tie counts as wrong.
    pub accuracy_without_ties: Option<Estimate>,
    /// Each answered call on its own (one order), over pairs the humans did not call a tie.
    pub accuracy_per_call: Option<Estimate>,
    /// Share of answered pairs where both calls chose the same position.
    pub position_bias: Option<Estimate>,
    /// Share of answered pairs whose verdict is a tie.
    pub judge_ties: Option<Estimate>,
    /// Groups of pairs (EditReward-Bench's K candidates) whose every pair the verdict got
    /// right, over groups with every pair answered and no human tie.
    pub group_accuracy: Option<Estimate>,
    /// `accuracy_without_ties` per task type.
    pub per_task: BTreeMap<String, Estimate>,
}

/// Agreement with human ratings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatingAgreement {
    /// Ratings in the data.
    pub ratings: usize,
    /// Ratings the judge answered (both VIE calls, or the reward call).
    pub answered: usize,
    /// What the judge's number is: `vie_o` (0-10) or `reward` (the model's own scale).
    pub judge_score: String,
    /// Spearman's rho of the judge's number against the human score.
    pub spearman: Option<Estimate>,
    /// Kendall's tau-b of the judge's number against the human score.
    pub kendall: Option<Estimate>,
    /// Pearson's r of the judge's number against the human score.
    pub pearson: Option<Estimate>,
}

/// What the judge cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeCost {
    /// Calls made.
    pub calls: usize,
    /// Calls that gave no answer.
    pub failed_calls: usize,
    /// `failed_calls / calls` with its interval.
    pub failure_rate: Option<Estimate>,
    /// Calls served from the reply cache.
    pub cached_calls: usize,
    /// Prompt tokens billed.
    pub prompt_tokens: u64,
    /// Completion tokens billed.
    pub completion_tokens: u64,
    /// Summed wall time of the calls (they may overlap).
    pub call_seconds: f64,
}

/// `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeEvalReport {
    /// The judge, as it names itself.
    pub judge: String,
    /// Where the labels came from.
    pub data: Vec<String>,
    /// Labelled items.
    pub items: usize,
    /// Bootstrap resamples behind every interval (95%, percentile).
    pub resamples: usize,
    /// Preference pairs, if the data has any.
    pub pairs: Option<PairAgreement>,
    /// Ratings, if the data has any.
    pub ratings: Option<RatingAgreement>,
    /// Calls, failures, tokens, time.
    pub cost: JudgeCost,
    /// Items not judged yet (an interrupted run) or whose judging failed.
    pub not_judged: Vec<String>,
    /// Of `not_judged`, those a run tried and could not judge, with why (the judge could
    /// not be reached, or their images could not be read); the others were never tried.
    #[serde(default)]
    pub failed_to_judge: Vec<NotJudged>,
}

/// An item a run tried and could not judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotJudged {
    /// Its id.
    pub id: String,
    /// Why (the stored record's error).
    pub reason: String,
}

impl NotJudged {
    /// Whether the judge was down (every call failed unreached), not the item unreadable.
    pub fn judge_unreached(&self) -> bool {
        self.reason.starts_with(super::runner::JUDGE_UNREACHED)
    }
}

impl JudgeEvalReport {
    /// Builds the report from the stored judgements, taken in `order` (the dataset's ids, so
    /// a resumed run gives the same intervals); ids without a finished judgement are listed
    /// as not judged.
    pub fn build(
        judge: String,
        data: Vec<String>,
        order: &[String],
        records: &[Judgement],
        resamples: usize,
    ) -> Self {
        let by_id: BTreeMap<&str, &Judgement> = records
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| (r.id.as_str(), r))
            .collect();
        let mut not_judged = Vec::new();
        let mut judged = Vec::new();
        let failed: BTreeMap<&str, &str> = records
            .iter()
            .filter_map(|r| Some((r.id.as_str(), r.error.as_deref()?)))
            .collect();
        let failed_to_judge = order
            .iter()
            .filter(|id| !by_id.contains_key(id.as_str()))
            .filter_map(|id| {
                Some(NotJudged {
                    id: id.clone(),
                    reason: failed.get(id.as_str())?.to_string(),
                })
            })
            .collect();
        for id in order {
            match by_id
                .get(id.as_str())
                .and_then(|r| r.judged.as_ref().map(|j| (*r, j)))
            {
                Some(found) => judged.push(found),
                None => not_judged.push(id.clone()),
            }
        }
        let seed = 0x5eed;

        // Pairs.
        let mut pairs = 0;
        let mut answered: Vec<(Label, Label, bool)> = Vec::new(); // (human, verdict, positional)
        let mut per_call: Vec<bool> = Vec::new();
        let mut per_task: BTreeMap<String, Vec<bool>> = BTreeMap::new();
        // group -> Some(all right so far), or None once a pair is unanswered or a tie.
        let mut groups: BTreeMap<String, Option<bool>> = BTreeMap::new();
        // Ratings.
        let mut ratings = 0;
        let mut rated: Vec<(f64, f64)> = Vec::new(); // (human, judge O or reward)
        let mut reward_ratings = 0;
        // Cost.
        let mut cost = JudgeCost::default();
        let mut failed: Vec<bool> = Vec::new();
        for (record, j) in &judged {
            for (fail, usage) in j.calls() {
                cost.calls += 1;
                cost.failed_calls += usize::from(fail);
                cost.cached_calls += usize::from(usage.cached);
                cost.prompt_tokens += usage.prompt_tokens;
                cost.completion_tokens += usage.completion_tokens;
                cost.call_seconds += usage.latency_ms as f64 / 1000.0;
                failed.push(fail);
            }
            match j {
                ItemCalls::Pair {
                    human,
                    a_first,
                    b_first,
                } => {
                    pairs += 1;
                    if *human != Label::Tie {
                        for label in [
                            a_first.answer.map(label_a_first),
                            b_first.answer.map(label_b_first),
                        ]
                        .into_iter()
                        .flatten()
                        {
                            per_call.push(label == *human);
                        }
                    }
                    let answered_pair = a_first.answer.zip(b_first.answer);
                    if let Some(group) = &record.group {
                        let entry = groups.entry(group.clone()).or_insert(Some(true));
                        *entry = match (*entry, answered_pair) {
                            (Some(ok), Some((ab, ba))) if *human != Label::Tie => {
                                Some(ok && verdict(ab, ba) == *human)
                            }
                            _ => None,
                        };
                    }
                    if let Some((ab, ba)) = answered_pair {
                        let v = verdict(ab, ba);
                        answered.push((*human, v, follows_position(ab, ba)));
                        if *human != Label::Tie {
                            if let Some(task) = &record.task {
                                per_task.entry(task.clone()).or_default().push(v == *human);
                            }
                        }
                    }
                }
                ItemCalls::Reward { human, reward } => {
                    ratings += 1;
                    reward_ratings += 1;
                    if let Some(r) = reward.answer {
                        rated.push((*human, f64::from(r)));
                    }
                }
                ItemCalls::Rating { human, overall, .. } => {
                    ratings += 1;
                    if let Some(o) = overall {
                        rated.push((*human, f64::from(*o)));
                    }
                }
            }
        }
        cost.failure_rate = rate(&failed, resamples, seed);

        let pairs = (pairs > 0).then(|| {
            let with_ties: Vec<bool> = answered.iter().map(|(h, v, _)| h == v).collect();
            let without_ties: Vec<bool> = answered
                .iter()
                .filter(|(h, _, _)| *h != Label::Tie)
                .map(|(h, v, _)| h == v)
                .collect();
            let positional: Vec<bool> = answered.iter().map(|(_, _, p)| *p).collect();
            let ties: Vec<bool> = answered.iter().map(|(_, v, _)| *v == Label::Tie).collect();
            PairAgreement {
                pairs,
                answered: answered.len(),
                accuracy_with_ties: rate(&with_ties, resamples, seed + 1),
                accuracy_without_ties: rate(&without_ties, resamples, seed + 2),
                accuracy_per_call: rate(&per_call, resamples, seed + 3),
                position_bias: rate(&positional, resamples, seed + 4),
                judge_ties: rate(&ties, resamples, seed + 5),
                group_accuracy: rate(
                    &groups.values().flatten().copied().collect::<Vec<bool>>(),
                    resamples,
                    seed + 10,
                ),
                per_task: per_task
                    .iter()
                    .filter_map(|(t, hits)| Some((t.clone(), rate(hits, resamples, seed + 6)?)))
                    .collect(),
            }
        });
        let ratings = (ratings > 0).then(|| {
            let correlation = |f: fn(&[f64], &[f64]) -> Option<f64>, s: u64| {
                bootstrap(rated.len(), resamples, 0.95, s, |idx| {
                    let (h, o): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| rated[i]).unzip();
                    f(&h, &o)
                })
            };
            RatingAgreement {
                ratings,
                answered: rated.len(),
                judge_score: if reward_ratings > 0 {
                    "reward"
                } else {
                    "vie_o"
                }
                .into(),
                spearman: correlation(spearman, seed + 7),
                kendall: correlation(kendall_tau_b, seed + 8),
                pearson: correlation(pearson, seed + 9),
            }
        });
        Self {
            judge,
            data,
            items: order.len(),
            resamples,
            pairs,
            ratings,
            cost,
            not_judged,
            failed_to_judge,
        }
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let est = |e: &Option<Estimate>| match e {
            Some(e) => format!("{:.3} [{:.3}, {:.3}] (n = {})", e.mean, e.lo, e.hi, e.n),
            None => "—".into(),
        };
        let pct = |e: &Option<Estimate>| match e {
            Some(e) => format!(
                "{:.1}% [{:.1}, {:.1}] (n = {})",
                100.0 * e.mean,
                100.0 * e.lo,
                100.0 * e.hi,
                e.n
            ),
            None => "—".into(),
        };
        let mut md = format!(
            "# Judge eval: {}\n\nData: {}. {} labelled items. Intervals are 95% percentile bootstrap over items ({} resamples).\n\n",
            self.judge,
            self.data.join(", "),
            self.items,
            self.resamples
        );
        if let Some(p) = &self.pairs {
            md.push_str(&format!(
                "## Preference pairs\n\nEach pair is asked twice, A shown first and B shown first; the verdict is the sum of the two votes, so orders that contradict each other give a tie. {} pairs, {} with both calls answered.\n\n| statistic | value |\n|---|---|\n",
                p.pairs, p.answered
            ));
            for (name, e) in [
                (
                    "accuracy without ties (human ties left out; a judge tie is wrong)",
                    &p.accuracy_without_ties,
                ),
                (
                    "accuracy with ties (tie is a third answer)",
                    &p.accuracy_with_ties,
                ),
                (
                    "accuracy per call (one order, human ties left out)",
                    &p.accuracy_per_call,
                ),
                (
                    "position bias (same position chosen in both orders)",
                    &p.position_bias,
                ),
                ("judge ties", &p.judge_ties),
                (
                    "group accuracy (every pair of a group right)",
                    &p.group_accuracy,
                ),
            ] {
                md.push_str(&format!("| {name} | {} |\n", pct(e)));
            }
            if !p.per_task.is_empty() {
                md.push_str("\n| task | accuracy without ties |\n|---|---|\n");
                for (task, e) in &p.per_task {
                    md.push_str(&format!("| {task} | {} |\n", pct(&Some(*e))));
                }
            }
            md.push('\n');
        }
        if let Some(r) = &self.ratings {
            md.push_str(&format!(
                "## Ratings\n\n{} against the human score. {} ratings, {} answered.\n\n| statistic | value |\n|---|---|\n| Spearman rho | {} |\n| Kendall tau-b | {} |\n| Pearson r | {} |\n\n",
                if r.judge_score == "reward" {
                    "The reward model's reward (its own scale, not a 0-10 VIE score)"
                } else {
                    "VIE O = sqrt(SC * PQ) (0-10)"
                },
                r.ratings,
                r.answered,
                est(&r.spearman),
                est(&r.kendall),
                est(&r.pearson)
            ));
        }
        let c = &self.cost;
        md.push_str(&format!(
            "## Failures and cost\n\n| | |\n|---|---|\n| calls | {} ({} from the cache) |\n| failed calls | {} |\n| failure rate | {} |\n| tokens | {} prompt, {} completion |\n| call time | {:.1} s (summed; calls overlap) |\n\nA failed call is never scored: pairs and ratings with a failed call are left out of the agreement statistics above and counted here.\n",
            c.calls,
            c.cached_calls,
            c.failed_calls,
            pct(&c.failure_rate),
            c.prompt_tokens,
            c.completion_tokens,
            c.call_seconds
        ));
        if !self.not_judged.is_empty() {
            // Say what happened: an outage, unreadable images and a stopped run are
            // different problems with different remedies.
            let unreached = self
                .failed_to_judge
                .iter()
                .filter(|f| f.judge_unreached())
                .count();
            let unreadable = self.failed_to_judge.len() - unreached;
            let untried = self.not_judged.len() - self.failed_to_judge.len();
            let causes: Vec<String> = [
                (unreached, "the judge could not be reached for any of their calls (an outage: see the reasons in judgements.jsonl)"),
                (unreadable, "their images could not be read"),
                (untried, "never tried (the run was stopped before them)"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
            md.push_str(&format!(
                "\n{} items not judged ({}; a rerun retries them): {}\n",
                self.not_judged.len(),
                causes.join("; "),
                self.not_judged
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        md
    }

    /// Writes `results.json` and `report.md` into `out`.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        write_atomic(&out.join("results.json"), &serde_json::to_vec_pretty(self)?)?;
        write_atomic(&out.join("report.md"), self.markdown().as_bytes())?;
        Ok(())
    }
}
