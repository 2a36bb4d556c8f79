//! Reading answers off the next-token distribution instead of generating them.
//!
//! The judge primes the assistant's reply with the start of the JSON it asked for (e.g.
//! `{"score": [`), so the next token *is* the answer. The probability of each candidate
//! answer (`"0"` … `"10"`, `" true"`, `"1"`) is read from the logits; where candidates share
//! leading tokens (`"1"` and `"10"`), the shared token is fed through the KV cache and the
//! walk continues until they part.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

use crate::models::qwen_vl::model::{PromptState, Qwen2Vl};

/// The probability mass the model puts on each candidate continuation.
pub struct Choice {
    /// P(candidate), unnormalised, in the candidates' order.
    pub probs: Vec<f32>,
    /// Extra tokens fed to tell candidates apart.
    pub tokens_fed: u64,
}

impl Choice {
    /// Total mass on the candidates (how sure the model is that it answers at all).
    pub fn mass(&self) -> f32 {
        self.probs.iter().sum()
    }

    /// The probabilities renormalised over the candidates.
    pub fn normalised(&self) -> Vec<f32> {
        let mass = self.mass().max(f32::MIN_POSITIVE);
        self.probs.iter().map(|p| p / mass).collect()
    }

    /// Index of the most likely candidate.
    pub fn argmax(&self) -> usize {
        self.probs
            .iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |best, (i, &p)| if p > best.1 { (i, p) } else { best },
            )
            .0
    }
}

/// P(each candidate token sequence) after `session`, whose next-token logits are `logits`
/// (`[vocab]`, f32). A candidate that is a prefix of another ends where the others go on:
/// P("1") = P(1) * (1 - P(0 | 1)) next to P("10") = P(1) * P(0 | 1).
pub fn choose(
    model: &Qwen2Vl,
    session: &PromptState,
    logits: &Tensor,
    candidates: &[Vec<u32>],
) -> Result<Choice> {
    let mut probs = vec![0f32; candidates.len()];
    let mut tokens_fed = 0;
    let members: Vec<(usize, &[u32])> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.as_slice()))
        .collect();
    walk(
        model,
        session,
        &softmax(logits)?,
        &members,
        1.0,
        &mut probs,
        &mut tokens_fed,
    )?;
    Ok(Choice { probs, tokens_fed })
}

fn softmax(logits: &Tensor) -> Result<Vec<f32>> {
    candle_nn::ops::softmax_last_dim(&logits.unsqueeze(0)?)?
        .squeeze(0)?
        .to_vec1::<f32>()
}

fn walk(
    model: &Qwen2Vl,
    session: &PromptState,
    next: &[f32],
    members: &[(usize, &[u32])],
    scale: f32,
    out: &mut [f32],
    tokens_fed: &mut u64,
) -> Result<()> {
    let mut groups: BTreeMap<u32, Vec<(usize, &[u32])>> = BTreeMap::new();
    let mut ended = Vec::new();
    for &(i, rest) in members {
        match rest.split_first() {
            None => ended.push(i),
            Some((&t, tail)) => groups.entry(t).or_default().push((i, tail)),
        }
    }
    let prob = |t: u32| next.get(t as usize).copied().unwrap_or(0.0);
    let continuing: f32 = groups.keys().map(|&t| prob(t)).sum();
    for i in ended {
        out[i] = scale * (1.0 - continuing).max(0.0);
    }
    for (t, group) in groups {
        let p = scale * prob(t);
        if group.len() == 1 {
            // Nothing else starts this way: the first distinguishing token decides.
            out[group[0].0] = p;
            continue;
        }
        let mut branch = session.clone();
        let logits = model.extend(&mut branch, &[t])?;
        *tokens_fed += 1;
        walk(
            model,
            &branch,
            &softmax(&logits)?,
            &group,
            p,
            out,
            tokens_fed,
        )?;
    }
    Ok(())
}

/// Expected value and most likely value of a 0-10 score from the probabilities of the
/// candidates `"0"` … `"10"`.
pub fn score_summary(choice: &Choice) -> (f32, usize) {
    let p = choice.normalised();
    let expected = p.iter().enumerate().map(|(v, q)| v as f32 * q).sum();
    (expected, choice.argmax())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_follow_the_distribution() {
        let mut probs = vec![0.0; 11];
        probs[7] = 0.3;
        probs[8] = 0.1;
        let choice = Choice {
            probs,
            tokens_fed: 0,
        };
        let (expected, best) = score_summary(&choice);
        assert!((expected - 7.25).abs() < 1e-6);
        assert_eq!(best, 7);
        assert!((choice.mass() - 0.4).abs() < 1e-6);
    }
}
