//! The VIEScore rubric for editing: SC = min of its two sub-scores, PQ = min of its two,
//! overall O = sqrt(SC * PQ).

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{CallUsage, Judge, JudgeError};
use crate::edit::EditContext;

/// A pair of 0-10 sub-scores with the judge's explanation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubScores {
    /// The two sub-scores in rubric order.
    pub scores: [f32; 2],
    /// The judge's explanation.
    pub reasoning: String,
    /// Cost of the call.
    pub usage: CallUsage,
}

impl SubScores {
    /// The rubric combines a pair by its minimum.
    pub fn min(&self) -> f32 {
        self.scores[0].min(self.scores[1])
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

    /// O = sqrt(SC * PQ), on the 0-10 scale.
    pub fn overall(&self) -> f32 {
        (self.sc() * self.pq()).max(0.0).sqrt()
    }
}

/// Asks the judge for both sub-score pairs concurrently and combines them. If either call
/// fails the whole score fails: a half-known score is not a score.
pub async fn vie_score(
    judge: &dyn Judge,
    edit: &EditContext,
    edited: &RgbImage,
) -> Result<VieScore, JudgeError> {
    let (semantic, perceptual) = futures::try_join!(
        judge.semantic_consistency(edit, edited),
        judge.perceptual_quality(edit, edited)
    )?;
    for (what, pair) in [("semantic", &semantic), ("perceptual", &perceptual)] {
        if pair.scores.iter().any(|s| !(0.0..=10.0).contains(s)) {
            return Err(JudgeError::Parse {
                reason: format!("{what} sub-scores {:?} outside 0-10", pair.scores),
                reply: pair.reasoning.chars().take(200).collect(),
            });
        }
    }
    Ok(VieScore {
        semantic,
        perceptual,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: f32, b: f32) -> SubScores {
        SubScores {
            scores: [a, b],
            reasoning: String::new(),
            usage: CallUsage::default(),
        }
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
}
