//! Tolerant parsing of judge replies.
//!
//! Real VLM replies wrap their JSON in prose or code fences, use single quotes, leave
//! trailing commas, write scores as strings or "8/10". We find the JSON object, repair
//! the common defects and read the fields with serde_json. Anything still unreadable is a
//! [`JudgeError::Parse`]: a reply never becomes a guessed score.

use serde_json::Value;

use super::JudgeError;

fn parse_error(reason: impl Into<String>, reply: &str) -> JudgeError {
    JudgeError::parse(reason, reply.chars().take(400).collect::<String>())
}

/// Whether the `'` at `i` is an apostrophe inside a word ("don't"), not a quote.
fn is_apostrophe(chars: &[char], i: usize) -> bool {
    let prev = i.checked_sub(1).map(|j| chars[j]);
    prev.is_some_and(|c| c.is_alphanumeric())
        && chars.get(i + 1).is_some_and(|c| c.is_alphanumeric())
}

/// The first balanced `{...}` in `text`, respecting quoted strings.
fn first_object(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let start = chars.iter().position(|&c| c == '{')?;
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for i in start..chars.len() {
        let ch = chars[i];
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == q && !(q == '\'' && is_apostrophe(&chars, i)) {
                quote = None;
            }
            continue;
        }
        match ch {
            '"' | '\'' => quote = Some(ch),
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(chars[start..=i].iter().collect());
                }
            }
            _ => {}
        }
    }
    None
}

/// Repairs single-quoted strings and trailing commas (outside double-quoted strings).
fn repair(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_double = false;
    let mut in_single = false;
    let mut escaped = false;
    let chars: Vec<char> = json.chars().collect();
    for (i, &ch) in chars.iter().enumerate() {
        if escaped {
            escaped = false;
            out.push(ch);
            continue;
        }
        if ch == '\\' && (in_double || in_single) {
            escaped = true;
            out.push(ch);
            continue;
        }
        match ch {
            '"' if in_single => out.push_str("\\\""),
            '"' => {
                in_double = !in_double;
                out.push(ch);
            }
            '\'' if !in_double => {
                if in_single && is_apostrophe(&chars, i) {
                    out.push(ch);
                } else {
                    in_single = !in_single;
                    out.push('"');
                }
            }
            ',' if !in_double && !in_single => {
                let rest = chars[i + 1..].iter().find(|c| !c.is_whitespace());
                if !matches!(rest, Some('}') | Some(']')) {
                    out.push(ch);
                }
            }
            _ => out.push(ch),
        }
    }
    out
}

/// Finds and parses the JSON object of a reply (fenced, embedded in prose, or repaired).
pub fn reply_object(reply: &str) -> Result<serde_json::Map<String, Value>, JudgeError> {
    let object = first_object(reply).ok_or_else(|| parse_error("no JSON object", reply))?;
    let value: Value = serde_json::from_str(&object)
        .or_else(|_| serde_json::from_str(&repair(&object)))
        .map_err(|e| parse_error(format!("invalid JSON: {e}"), reply))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(parse_error("not a JSON object", reply)),
    }
}

/// A 0-10 score from a number, "8", "8/10" or "8.5 out of 10"; out-of-range is an error.
pub fn score_value(v: &Value, reply: &str) -> Result<f32, JudgeError> {
    score_value_in(v, reply, 10.0)
}

/// A score on 0..=`top` (a number or a numeric string).
pub fn score_value_in(v: &Value, reply: &str, top: f64) -> Result<f32, JudgeError> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let head: String = s
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            head.parse::<f64>().ok()
        }
        _ => None,
    }
    .ok_or_else(|| parse_error(format!("score {v} is not a number"), reply))?;
    if !(0.0..=top).contains(&n) {
        return Err(parse_error(format!("score {n} outside 0-{top}"), reply));
    }
    Ok(n as f32)
}

/// `score` as exactly `n` 0-10 values (a bare number counts as a list of one).
pub fn scores(
    map: &serde_json::Map<String, Value>,
    n: usize,
    reply: &str,
) -> Result<Vec<f32>, JudgeError> {
    scores_in(map, n, reply, 10.0)
}

/// `score` as exactly `n` values on 0..=`top`.
pub fn scores_in(
    map: &serde_json::Map<String, Value>,
    n: usize,
    reply: &str,
    top: f64,
) -> Result<Vec<f32>, JudgeError> {
    let field = map
        .get("score")
        .or_else(|| map.get("scores"))
        .ok_or_else(|| parse_error("missing field `score`", reply))?;
    let items: Vec<&Value> = match field {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    if items.len() != n {
        return Err(parse_error(
            format!("expected {n} score(s), got {}", items.len()),
            reply,
        ));
    }
    items
        .into_iter()
        .map(|v| score_value_in(v, reply, top))
        .collect()
}

/// The `reasoning` text (empty if absent: reasoning is optional).
pub fn reasoning(map: &serde_json::Map<String, Value>) -> String {
    match map.get("reasoning").or_else(|| map.get("reason")) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// A yes/no field: booleans, "yes"/"no", "pass"/"fail", "true"/"false".
pub fn verdict(
    map: &serde_json::Map<String, Value>,
    key: &str,
    reply: &str,
) -> Result<bool, JudgeError> {
    match map.get(key) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "yes" | "pass" | "true" | "keep" => Ok(true),
            "no" | "fail" | "false" | "prune" => Ok(false),
            other => Err(parse_error(
                format!("`{key}` is {other:?}, not yes/no"),
                reply,
            )),
        },
        Some(other) => Err(parse_error(
            format!("`{key}` is {other}, not yes/no"),
            reply,
        )),
        None => Err(parse_error(format!("missing field `{key}`"), reply)),
    }
}

/// The preferred image of a comparison: 1/2, "first"/"second", "tie"/0.
pub fn preference(
    map: &serde_json::Map<String, Value>,
    reply: &str,
) -> Result<super::Preference, JudgeError> {
    use super::Preference;
    let v = map
        .get("better")
        .ok_or_else(|| parse_error("missing field `better`", reply))?;
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_ascii_lowercase(),
        other => other.to_string(),
    };
    match text.as_str() {
        "1" | "first" | "image 1" | "a" => Ok(Preference::First),
        "2" | "second" | "image 2" | "b" => Ok(Preference::Second),
        "0" | "tie" | "equal" | "neither" | "both" => Ok(Preference::Tie),
        other => Err(parse_error(format!("`better` is {other:?}"), reply)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two(reply: &str) -> Result<Vec<f32>, JudgeError> {
        scores(&reply_object(reply)?, 2, reply)
    }

    #[test]
    fn reads_nasty_real_world_replies() {
        assert_eq!(
            two(r#"{"score": [8, 6], "reasoning": "ok"}"#).unwrap(),
            vec![8.0, 6.0]
        );
        let fenced = "Here is my evaluation:\n```json\n{\n  \"score\": [7, 9],\n  \"reasoning\": \"The {sky} is dark.\"\n}\n```\nLet me know!";
        assert_eq!(two(fenced).unwrap(), vec![7.0, 9.0]);
        let single = "{'score': [5, 10], 'reasoning': 'the cat doesn't look edited',}";
        assert_eq!(two(single).unwrap(), vec![5.0, 10.0]);
        assert_eq!(
            two(r#"{"score": ["8/10", "9.5"], }"#).unwrap(),
            vec![8.0, 9.5]
        );
        let map = reply_object(single).unwrap();
        assert_eq!(reasoning(&map), "the cat doesn't look edited");
        let screen =
            reply_object(r#"Sure! {"pass": "Yes", "score": 7, "reasoning": "promising"}"#).unwrap();
        assert!(verdict(&screen, "pass", "").unwrap());
        let cmp = reply_object(r#"{"better": "Image 2", "reasoning": "b is sharper"}"#).unwrap();
        assert_eq!(
            preference(&cmp, "").unwrap(),
            super::super::Preference::Second
        );
    }

    #[test]
    fn rejects_what_cannot_be_read_without_guessing() {
        for bad in [
            "I would rate this an 8.",
            r#"{"score": [8]}"#,
            r#"{"score": [11, 3]}"#,
            r#"{"score": ["high", 3]}"#,
            r#"{"reasoning": "no score"}"#,
            r#"{"score": [8, 6"#,
            "",
        ] {
            let err = two(bad).unwrap_err();
            assert!(matches!(err, JudgeError::Parse { .. }), "{bad}: {err}");
        }
    }
}
