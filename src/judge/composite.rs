//! A composite judge: one judge screens previews, one compares, and the VIE score of a
//! finished edit is the mean over several judges (e.g. a cheap local judge screens, a
//! stronger one scores, or a panel of judges averages out each one's bias).
//!
//! No failure is hidden: a VIE call fails when any member's call fails (naming it), so a
//! score is always the mean of every member, never of whichever happened to answer.

use std::sync::Arc;

use async_trait::async_trait;
use image::RgbImage;
use serde::Deserialize;

use super::{CallUsage, Comparison, Judge, JudgeError, PreviewStage, ScreenVerdict, SubScores};
use crate::edit::EditContext;

/// A `kind = "composite"` preset: member presets by path, relative to this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositePreset {
    /// Display name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// Calls in flight at once (read by the engine).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// The judge that screens previews.
    pub screen: String,
    /// The judge that compares two edits (default: the screening judge).
    #[serde(default)]
    pub compare: Option<String>,
    /// The judges whose VIE sub-scores are averaged (at least one).
    pub score: Vec<String>,
}

impl CompositePreset {
    /// The preset as read from the file at `path`, checked.
    pub fn resolve(self, path: &std::path::Path) -> Result<Self, JudgeError> {
        let preset = self;
        if preset.score.is_empty() {
            return Err(JudgeError::Config(format!(
                "judge preset {}: `score` names no judge (give at least one preset)",
                path.display()
            )));
        }
        Ok(preset)
    }
}

/// The composite judge.
pub struct CompositeJudge {
    name: Option<String>,
    screen: Arc<dyn Judge>,
    compare: Arc<dyn Judge>,
    score: Vec<Arc<dyn Judge>>,
}

impl CompositeJudge {
    /// Screens with `screen`, compares with `compare` (or `screen`), scores with the mean
    /// of `score` (at least one judge).
    pub fn new(
        name: Option<String>,
        screen: Arc<dyn Judge>,
        compare: Option<Arc<dyn Judge>>,
        score: Vec<Arc<dyn Judge>>,
    ) -> Result<Self, JudgeError> {
        if score.is_empty() {
            return Err(JudgeError::Config(
                "a composite judge needs a scoring judge".into(),
            ));
        }
        Ok(Self {
            name,
            compare: compare.unwrap_or_else(|| screen.clone()),
            screen,
            score,
        })
    }

    /// Asks every scoring judge and averages: the pair is the mean of the members' pairs,
    /// and the passes weigh each member the same, so SC, PQ and O are the means of the
    /// members' own.
    async fn mean_of<'a, F>(&'a self, ask: F) -> Result<SubScores, JudgeError>
    where
        F: Fn(&'a dyn Judge) -> futures::future::BoxFuture<'a, Result<SubScores, JudgeError>>,
    {
        let answers = futures::future::join_all(self.score.iter().map(|j| ask(j.as_ref()))).await;
        let mut usage = CallUsage {
            cached: true,
            ..CallUsage::default()
        };
        let mut members = Vec::with_capacity(answers.len());
        let mut reasoning = Vec::with_capacity(answers.len());
        let mut failure = None;
        for (judge, answer) in self.score.iter().zip(answers) {
            let spent = match &answer {
                Ok(s) => Some(s.usage.clone()),
                Err(e) => e.usage().cloned(),
            };
            if let Some(u) = spent {
                add(&mut usage, &u);
            }
            match answer {
                Ok(s) => {
                    reasoning.push(format!("{}: {}", judge.name(), s.reasoning));
                    members.push(s);
                }
                Err(e) if failure.is_none() => failure = Some((judge.name(), e)),
                Err(_) => {}
            }
        }
        if let Some((name, e)) = failure {
            // Every member's cost is counted, on the failure too.
            return Err(match e {
                JudgeError::Parse { reason, reply, .. } => JudgeError::Parse {
                    reason: format!("{name}: {reason}"),
                    reply,
                    usage: Some(Box::new(usage)),
                },
                other => JudgeError::Failed(format!("{name}: {other}")),
            });
        }
        let n = members.len() as f32;
        let mean = |k: usize| members.iter().map(|m| m.scores[k]).sum::<f32>() / n;
        let mut scores = SubScores::new([mean(0), mean(1)], reasoning.join(" | "), usage);
        let passes = equal_weight_passes(&members);
        if passes.len() > 1 {
            scores.passes = passes;
        }
        Ok(scores)
    }
}

/// Longest pass list [`equal_weight_passes`] builds; past it each pass weighs the same
/// instead of each member (pass counts with a huge least common multiple).
const MAX_EQUAL_WEIGHT_PASSES: usize = 4096;

/// The members' passes as one list in which every member weighs the same: a member that
/// asked once enters with its pair, one that asked k times with its k passes, each pass
/// repeated so that every member fills as many places (the least common multiple of the
/// pass counts).
///
/// The rubric's minimum is then taken per pass, as each member takes it: entering a
/// multi-pass member by its mean pair would overstate it (the minimum of the means is at
/// least the mean of the minimums). Pass i of the semantic call still meets pass i of the
/// perceptual call when each member asked both calls as often.
fn equal_weight_passes(members: &[SubScores]) -> Vec<[f32; 2]> {
    let own = |m: &SubScores| -> Vec<[f32; 2]> {
        if m.passes.is_empty() {
            vec![m.scores]
        } else {
            m.passes.clone()
        }
    };
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let lcm = members
        .iter()
        .map(|m| own(m).len())
        .try_fold(1usize, |l, k| {
            let next = l / gcd(l, k) * k;
            (next * members.len() <= MAX_EQUAL_WEIGHT_PASSES).then_some(next)
        });
    members
        .iter()
        .flat_map(|m| {
            let passes = own(m);
            let repeat = lcm.map_or(1, |l| l / passes.len());
            passes
                .into_iter()
                .flat_map(move |p| std::iter::repeat_n(p, repeat))
        })
        .collect()
}

fn add(total: &mut CallUsage, u: &CallUsage) {
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += u.completion_tokens;
    total.attempts += u.attempts;
    total.cached &= u.cached;
    // The members run at once: the call takes as long as the slowest.
    total.latency_ms = total.latency_ms.max(u.latency_ms);
    total.retry_wait_ms = total.retry_wait_ms.max(u.retry_wait_ms);
}

#[async_trait]
impl Judge for CompositeJudge {
    fn name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let scorers: Vec<String> = self.score.iter().map(|j| j.name()).collect();
        format!(
            "composite (screen: {}; compare: {}; score: mean of [{}])",
            self.screen.name(),
            self.compare.name(),
            scorers.join(", ")
        )
    }

    fn screen_score_kind(&self) -> super::ScoreKind {
        self.screen.screen_score_kind()
    }

    fn screen_quantile(&self) -> Option<f32> {
        self.screen.screen_quantile()
    }

    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        self.screen.screen(edit, preview, stage).await
    }

    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        self.compare.compare(edit, first, second).await
    }

    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.mean_of(|j| Box::pin(j.semantic_consistency(edit, edited)))
            .await
    }

    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.mean_of(|j| Box::pin(j.perceptual_quality(edit, edited)))
            .await
    }
}
