//! Expected scores from a remote judge's token logprobs.
//!
//! An OpenAI-compatible server returns each token of the reply with its most likely
//! alternatives. A score written as one token (`"8"`, or `"10"` where the tokenizer has
//! multi-digit tokens) gives a distribution over the scores directly. Tokenizers that write
//! numbers digit by digit (Qwen2's) spell 10 as `"1"`, `"0"`, so a `"1"` stands for 1 and
//! for 10 at once; it is split as the local judge splits it (`judge::qwen_vl::answer`):
//! P(1) * (1 - P("0" | "1")) to 1 and P(1) * P("0" | "1") to 10. That continuation is
//! known only where the reply itself chose `"1"`: a `"1"` among the alternatives of another
//! digit is ambiguous, and that score is then used as parsed. So is any score the tokens do
//! not spell as that same integer (`7.5`, a digit that is not the parsed value).

use std::ops::RangeInclusive;

/// A reply's tokens, each with its alternatives: `(token, [(alternative, logprob)])`.
pub type TokenLogprobs = [(String, Vec<(String, f32)>)];

/// A distribution over integer scores: `(value, probability)`, summing to 1.
pub type ScoreDistribution = Vec<(u32, f32)>;

/// For each of `parsed` (the values read from the reply's text, in order), the
/// distribution of that score among its tokens' alternatives, or `None` where the tokens do
/// not give one (see the module docs). The k-th number written after `key` is taken as the
/// k-th score; a fraction's denominator (`8/10`) is not a number of its own.
pub fn score_distributions(
    logprobs: &TokenLogprobs,
    key: &str,
    parsed: &[f32],
    range: RangeInclusive<u32>,
) -> Vec<Option<ScoreDistribution>> {
    let numbers = numbers_after(logprobs, key);
    parsed
        .iter()
        .enumerate()
        .map(|(k, &value)| {
            let number = numbers.get(k)?;
            let spelled = number.integer?;
            (value == spelled as f32 && range.contains(&spelled))
                .then(|| distribution(logprobs, number, &range))
                .flatten()
        })
        .collect()
}

/// The probability-weighted mean of a distribution.
pub fn expectation(distribution: &[(u32, f32)]) -> f32 {
    distribution.iter().map(|&(v, p)| v as f32 * p).sum()
}

/// A number written in the reply: where its digits start, how many tokens they take, and
/// its value when it is a whole number.
struct WrittenNumber {
    first: usize,
    tokens: usize,
    integer: Option<u32>,
}

fn digits(token: &str) -> Option<&str> {
    let t = token.trim();
    (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then_some(t)
}

/// A token that continues the digits before it (no space in between).
fn continues(token: &str) -> bool {
    !token.starts_with(char::is_whitespace) && digits(token).is_some()
}

/// The numbers written after the first occurrence of `key`, fractions' denominators left
/// out, decimals kept as numbers without an integer value.
fn numbers_after(logprobs: &TokenLogprobs, key: &str) -> Vec<WrittenNumber> {
    let mut text = String::new();
    let mut start = None;
    for (i, (token, _)) in logprobs.iter().enumerate() {
        text.push_str(token);
        if text.contains(key) {
            start = Some(i + 1);
            break;
        }
    }
    let Some(start) = start else {
        return Vec::new();
    };
    let tokens: Vec<&str> = logprobs.iter().map(|(t, _)| t.as_str()).collect();
    let mut numbers = Vec::new();
    let mut i = start;
    while i < tokens.len() {
        if digits(tokens[i]).is_none() {
            i += 1;
            continue;
        }
        let first = i;
        i += 1;
        while i < tokens.len() && continues(tokens[i]) {
            i += 1;
        }
        let written: String = tokens[first..i].iter().map(|t| t.trim()).collect();
        // A decimal part: "." then digits, or ".5" as one token.
        let mut decimal = false;
        if i < tokens.len() {
            let next = tokens[i];
            if next == "." && i + 1 < tokens.len() && continues(tokens[i + 1]) {
                decimal = true;
                i += 2;
                while i < tokens.len() && continues(tokens[i]) {
                    i += 1;
                }
            } else if next.len() > 1
                && next.starts_with('.')
                && next[1..].bytes().all(|b| b.is_ascii_digit())
            {
                decimal = true;
                i += 1;
            }
        }
        let denominator = first > 0 && tokens[first - 1].trim_end().ends_with('/');
        if denominator {
            continue;
        }
        numbers.push(WrittenNumber {
            first,
            tokens: i - first,
            integer: if decimal { None } else { written.parse().ok() },
        });
    }
    numbers
}

/// The distribution of one whole number written in one or two tokens (see the module docs).
fn distribution(
    logprobs: &TokenLogprobs,
    number: &WrittenNumber,
    range: &RangeInclusive<u32>,
) -> Option<ScoreDistribution> {
    if number.tokens > 2 {
        return None;
    }
    let (chosen, alternatives) = &logprobs[number.first];
    let chosen = digits(chosen)?;
    // Given the reply's first digit, how the number went on: in-range continuations by
    // value, and the probability that it ended there.
    let next = logprobs.get(number.first + 1);
    let mut dist: Vec<(u32, f32)> = Vec::new();
    for (alternative, logprob) in alternatives {
        let Some(written) = digits(alternative) else {
            continue;
        };
        let Ok(value) = written.parse::<u32>() else {
            continue;
        };
        if !range.contains(&value) {
            continue;
        }
        let p = logprob.exp();
        let can_go_on = value != 0 && value.saturating_mul(10) <= *range.end();
        if !can_go_on {
            dist.push((value, p));
            continue;
        }
        if written != chosen {
            // "1" beside a chosen "9": 1 or the start of 10, which the reply never says.
            return None;
        }
        let mut ended = 1.0;
        if let Some((_, next_alternatives)) = next {
            for (alternative, logprob) in next_alternatives {
                if !continues(alternative) {
                    continue;
                }
                let q = logprob.exp();
                ended -= q;
                let more = alternative.trim();
                let longer = format!("{written}{more}").parse::<u32>().ok();
                if let Some(longer) = longer.filter(|v| range.contains(v)) {
                    dist.push((longer, p * q));
                }
            }
        }
        dist.push((value, p * ended.max(0.0)));
    }
    // Merge duplicates ("7" and " 7") and normalise over the in-range scores.
    dist.sort_by_key(|d| d.0);
    dist.dedup_by(|a, b| {
        if a.0 == b.0 {
            b.1 += a.1;
            true
        } else {
            false
        }
    });
    let total: f32 = dist.iter().map(|d| d.1).sum();
    (total > 0.0).then(|| dist.into_iter().map(|(v, p)| (v, p / total)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply's tokens from `(token, [(alternative, probability)])`; a token without
    /// alternatives is certain.
    fn reply(tokens: &[(&str, &[(&str, f32)])]) -> Vec<(String, Vec<(String, f32)>)> {
        tokens
            .iter()
            .map(|(t, top)| {
                let top = if top.is_empty() {
                    vec![(t.to_string(), 0.0)]
                } else {
                    top.iter().map(|(a, p)| (a.to_string(), p.ln())).collect()
                };
                (t.to_string(), top)
            })
            .collect()
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-4
    }

    #[test]
    fn single_token_scores_give_their_alternatives() {
        let r = reply(&[
            ("{\"score\": [", &[]),
            ("8", &[("8", 0.6), ("7", 0.3), ("9", 0.1)]),
            (",", &[]),
            (" 6", &[(" 6", 0.5), (" 5", 0.5)]),
            ("]}", &[]),
        ]);
        let d = score_distributions(&r, "score", &[8.0, 6.0], 0..=10);
        assert!(close(expectation(d[0].as_ref().unwrap()), 7.8));
        assert!(close(expectation(d[1].as_ref().unwrap()), 5.5));
    }

    /// Qwen's tokenizer writes 10 as "1", "0": the "1" splits between 1 and 10 by the
    /// next token, and the "0" is not read as the next score.
    #[test]
    fn a_ten_written_digit_by_digit_is_one_score() {
        let r = reply(&[
            ("{\"", &[]),
            ("score", &[]),
            ("\":", &[]),
            (" [", &[]),
            ("1", &[("1", 0.8), ("9", 0.2)]),
            ("0", &[("0", 0.9), (",", 0.1)]),
            (",", &[]),
            (" ", &[]),
            ("9", &[("9", 0.7), ("8", 0.3)]),
            ("]}", &[]),
        ]);
        let d = score_distributions(&r, "score", &[10.0, 9.0], 0..=10);
        let first = d[0].as_ref().unwrap();
        // P(10) = 0.8 * 0.9, P(1) = 0.8 * 0.1, P(9) = 0.2.
        assert!(close(expectation(first), 10.0 * 0.72 + 0.08 + 9.0 * 0.2));
        assert!(close(expectation(d[1].as_ref().unwrap()), 8.7));
    }

    #[test]
    fn a_one_beside_another_digit_is_ambiguous_and_left_as_parsed() {
        let r = reply(&[
            ("{\"score\": [", &[]),
            ("9", &[("9", 0.7), ("1", 0.3)]),
            (", ", &[]),
            ("1", &[("1", 0.6), ("2", 0.4)]),
            (",", &[(",", 0.5), ("0", 0.5)]),
            ("]}", &[]),
        ]);
        let d = score_distributions(&r, "score", &[9.0, 1.0], 0..=10);
        assert!(d[0].is_none());
        // The chosen "1": half ends (1), half goes on to 10; "2" keeps its 0.4.
        let second = d[1].as_ref().unwrap();
        assert!(close(
            expectation(second),
            0.3 * 1.0 + 0.3 * 10.0 + 0.4 * 2.0
        ));
    }

    #[test]
    fn decimals_and_fractions_keep_their_parsed_values() {
        let r = reply(&[
            ("{\"score\": [\"", &[]),
            ("8", &[("8", 0.5), ("7", 0.5)]),
            ("/", &[]),
            ("1", &[]),
            ("0", &[]),
            ("\", ", &[]),
            ("7", &[("7", 0.5), ("6", 0.5)]),
            (".", &[]),
            ("5", &[("5", 0.5), ("0", 0.5)]),
            ("]}", &[]),
        ]);
        let d = score_distributions(&r, "score", &[8.0, 7.5], 0..=10);
        assert!(close(expectation(d[0].as_ref().unwrap()), 7.5));
        assert!(d[1].is_none(), "the decimal is not read as a whole score");
    }

    #[test]
    fn tokens_that_spell_another_value_are_not_used() {
        let r = reply(&[
            ("{\"score\": [", &[]),
            ("3", &[("3", 0.9), ("4", 0.1)]),
            ("]}", &[]),
        ]);
        assert!(score_distributions(&r, "score", &[7.0], 0..=10)[0].is_none());
        assert!(score_distributions(&r, "missing", &[3.0], 0..=10)[0].is_none());
    }

    #[test]
    fn a_preference_reads_its_two_values() {
        let r = reply(&[
            ("{\"better\": ", &[]),
            ("1", &[("1", 0.75), ("2", 0.25)]),
            ("}", &[]),
        ]);
        let d = score_distributions(&r, "better", &[1.0], 0..=2);
        let d = d[0].as_ref().unwrap();
        assert_eq!(d.len(), 2);
        assert!(close(d[0].1, 0.75) && close(d[1].1, 0.25));
    }
}
