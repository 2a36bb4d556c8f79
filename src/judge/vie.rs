//! The VIEScore rubric for editing: SC = min of its two sub-scores, PQ = min of its two,
//! overall O = sqrt(SC * PQ).
//!
//! A judge that answers each call several times (a self-ensemble of sampled passes, as
//! EditScore's `num_pass`) reports every pass: SC and PQ are then the means over passes of
//! each pass's minimum, and O the mean over passes of each pass's sqrt(SC * PQ), pass i of
//! one call paired with pass i of the other (EditScore's default `average_last`
//! reduction, `editscore/__init__.py` in VectorSpaceLab/EditScore at 6e0f1b9).

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{CallUsage, Judge, JudgeError};
use crate::edit::EditContext;

/// A pair of 0-10 sub-scores with the judge's explanation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubScores {
    /// The two sub-scores in rubric order (the mean over passes, when there are several).
    pub scores: [f32; 2],
    /// Each pass's sub-scores, when the judge asked more than once (else empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<[f32; 2]>,
    /// The judge's explanation.
    pub reasoning: String,
    /// Cost of the call.
    pub usage: CallUsage,
}

impl SubScores {
    /// One answer's sub-scores.
    pub fn new(scores: [f32; 2], reasoning: impl Into<String>, usage: CallUsage) -> Self {
        Self {
            scores,
            passes: Vec::new(),
            reasoning: reasoning.into(),
            usage,
        }
    }

    /// The rubric combines a pair by its minimum (over several passes: the mean of each
    /// pass's minimum).
    pub fn min(&self) -> f32 {
        if self.passes.is_empty() {
            self.scores[0].min(self.scores[1])
        } else {
            self.passes.iter().map(|p| p[0].min(p[1])).sum::<f32>() / self.passes.len() as f32
        }
    }
}

/// A full VIE-style score of one finished edit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VieScore {
    /// Semantic consistency: (instruction followed, not over-edited).
    pub semantic: SubScores,
    /// Perceptual quality: (naturalness, absence of artifacts).
    pub perceptual: SubScores,
}

impl VieScore {
    /// SC = min of the semantic pair.
    pub fn sc(&self) -> f32 {
        self.semantic.min()
    }

    /// PQ = min of the perceptual pair.
    pub fn pq(&self) -> f32 {
        self.perceptual.min()
    }

    /// O = sqrt(SC * PQ), on the 0-10 scale; with as many passes on both sides, the mean
    /// of each pass's O.
    pub fn overall(&self) -> f32 {
        let (sc, pq) = (&self.semantic.passes, &self.perceptual.passes);
        if !sc.is_empty() && sc.len() == pq.len() {
            let per_pass = sc
                .iter()
                .zip(pq)
                .map(|(s, p)| (s[0].min(s[1]) * p[0].min(p[1])).max(0.0).sqrt());
            return per_pass.sum::<f32>() / sc.len() as f32;
        }
        (self.sc() * self.pq()).max(0.0).sqrt()
    }
}

/// The two calls of one VIE score, each with its own result, so a caller can count what
/// each cost (a failed half still cost what it cost) before combining them.
#[derive(Debug, Clone)]
pub struct ViePair {
    /// The semantic-consistency call.
    pub semantic: Result<SubScores, JudgeError>,
    /// The perceptual-quality call.
    pub perceptual: Result<SubScores, JudgeError>,
}

impl ViePair {
    /// The VIE score, if both halves answered within 0-10: a half-known score is not a
    /// score. The first failure is the reason.
    pub fn score(&self) -> Result<VieScore, JudgeError> {
        let semantic = self.semantic.clone()?;
        let perceptual = self.perceptual.clone()?;
        for (what, pair) in [("semantic", &semantic), ("perceptual", &perceptual)] {
            if pair.scores.iter().any(|s| !(0.0..=10.0).contains(s)) {
                return Err(JudgeError::parse(
                    format!("{what} sub-scores {:?} outside 0-10", pair.scores),
                    pair.reasoning.chars().take(200).collect::<String>(),
                )
                .with_usage(pair.usage.clone()));
            }
        }
        Ok(VieScore {
            semantic,
            perceptual,
        })
    }

    /// What each of the two calls cost, where known (a failed call that got a reply
    /// included).
    pub fn usages(&self) -> impl Iterator<Item = &CallUsage> {
        [&self.semantic, &self.perceptual]
            .into_iter()
            .filter_map(|r| match r {
                Ok(s) => Some(&s.usage),
                Err(e) => e.usage(),
            })
    }
}

/// Asks the judge for both sub-score pairs concurrently.
pub async fn vie_pair(judge: &dyn Judge, edit: &EditContext, edited: &RgbImage) -> ViePair {
    let (semantic, perceptual) = futures::join!(
        judge.semantic_consistency(edit, edited),
        judge.perceptual_quality(edit, edited)
    );
    ViePair {
        semantic,
        perceptual,
    }
}

/// Asks for both sub-score pairs concurrently and combines them ([`ViePair::score`]).
pub async fn vie_score(
    judge: &dyn Judge,
    edit: &EditContext,
    edited: &RgbImage,
) -> Result<VieScore, JudgeError> {
    vie_pair(judge, edit, edited).await.score()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: f32, b: f32) -> SubScores {
        SubScores::new([a, b], "", CallUsage::default())
    }

    #[test]
    fn overall_is_sqrt_of_min_products() {
        let s = VieScore {
            semantic: pair(8.0, 4.0),
            perceptual: pair(9.0, 10.0),
        };
        assert_eq!(s.sc(), 4.0);
        assert_eq!(s.pq(), 9.0);
        assert_eq!(s.overall(), 6.0);
        let zero = VieScore {
            semantic: pair(0.0, 10.0),
            perceptual: pair(10.0, 10.0),
        };
        assert_eq!(zero.overall(), 0.0);
    }

    #[test]
    fn passes_average_as_editscore_does() {
        // Two passes: SC (8, 4) then (6, 10); PQ (9, 10) then (4, 4).
        let mut semantic = pair(7.0, 7.0);
        semantic.passes = vec![[8.0, 4.0], [6.0, 10.0]];
        let mut perceptual = pair(6.5, 7.0);
        perceptual.passes = vec![[9.0, 10.0], [4.0, 4.0]];
        let s = VieScore {
            semantic,
            perceptual,
        };
        // SC = mean(4, 6) = 5, PQ = mean(9, 4) = 6.5,
        // O = mean(sqrt(4 * 9), sqrt(6 * 4)) = (6 + 4.898979) / 2.
        assert_eq!(s.sc(), 5.0);
        assert_eq!(s.pq(), 6.5);
        assert!((s.overall() - (6.0 + 24f32.sqrt()) / 2.0).abs() < 1e-6);
        assert!(s.overall() != (s.sc() * s.pq()).sqrt());
    }
}
