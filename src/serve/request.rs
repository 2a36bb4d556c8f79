//! One edit request as the API receives it: OpenAI's `images/edits` fields plus our scaling
//! knobs, from a multipart form or a JSON body, checked against the server's limits. What
//! passes is an [`EditRequest`]: plain data, journaled before the request is accepted.
//!
//! Field names of the OpenAI endpoint (`image`, `prompt`, `n`, `size`, `response_format`,
//! `output_format`, `user`, and `model`, `quality`, `background`, ... that we accept and
//! ignore) are from openai-python `types/image_edit_params.py` (see DESIGN.md, Serving).

use std::collections::BTreeMap;

use axum::extract::multipart::{Multipart, MultipartError};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::edit::{panel_width_error, DEFAULT_PANEL_WIDTH, MAX_PANEL_SIDE};
use crate::engine::strategy::StrategyField;
use crate::engine::{Seeds, StrategyConfig, StrategyKind, StrategyOverrides, ValueSource};

/// What the server accepts per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest uploaded image, in bytes.
    pub max_upload_bytes: usize,
    /// Largest decoded image, in pixels (width x height).
    pub max_pixels: u64,
    /// Most seed candidates per edit.
    pub max_seeds: usize,
    /// Most steps of the full schedule.
    pub max_steps: usize,
    /// Longest instruction, in characters.
    pub max_prompt_chars: usize,
    /// Uploads decoded at once (the check that an image decodes holds its pixels).
    pub max_decodes: usize,
    /// Widest hi-res refine planned at start-up (`serve --max-refine`), as a square panel:
    /// a request whose refine panel has more pixels is refused; 0 refuses refines.
    pub max_refine: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 20 << 20,
            max_pixels: 50_000_000,
            max_seeds: 32,
            max_steps: 100,
            max_prompt_chars: 2000,
            max_decodes: 2,
            max_refine: 1024,
        }
    }
}

/// Longest OpenAI `user` id, in characters (it is journaled with the edit).
pub const MAX_USER_CHARS: usize = 256;

impl Limits {
    /// The largest request body: the image as base64 in JSON (4/3 of its bytes) and 1 MiB
    /// for the other fields.
    pub fn max_body_bytes(&self) -> u64 {
        self.max_upload_bytes as u64 / 3 * 4 + (1 << 20)
    }
}

/// How the response carries images (OpenAI `response_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Base64 PNG in the JSON.
    B64Json,
    /// A URL on this server.
    Url,
}

/// An accepted edit request: everything needed to run it again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    /// The instruction (OpenAI `prompt`).
    pub instruction: String,
    /// The strategy the edit runs (defaults with the request's fields laid over them,
    /// sized to `budget_nfe` when one was asked for).
    pub strategy: StrategyConfig,
    /// Finished candidates returned, best first (OpenAI `n`, 1-10).
    pub n: usize,
    /// Panel width the source is resized to (from `size`, default 512).
    pub width: u32,
    /// `size` as the request sent it (`WxH`, a width, or `auto`), if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// The height `size` names, if it names one: accepted only when it is the height the
    /// image has at that width ([`crate::serve::jobs::inspect_upload`] checks it against
    /// the image header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_height: Option<u32>,
    /// How images come back.
    pub response_format: ResponseFormat,
    /// The client's end-user id (OpenAI `user`), kept for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Decode a preview of every candidate at every step for the live page.
    #[serde(default)]
    pub live_previews: bool,
}

/// A request's fields before checking: text values by name, and the image.
#[derive(Debug, Default)]
pub struct RawRequest {
    /// Field name -> value as text (JSON numbers and booleans as their JSON text).
    pub fields: BTreeMap<String, String>,
    /// The uploaded image's bytes.
    pub image: Option<Vec<u8>>,
}

/// OpenAI fields we accept and ignore (one model, PNG out, no moderation knobs).
pub const IGNORED: &[&str] = &[
    "model",
    "quality",
    "background",
    "output_compression",
    "input_fidelity",
    "moderation",
];

/// Why a `mask` is refused, whether it comes as text or as a file.
const MASK_UNSUPPORTED: &str =
    "`mask` is not supported: ICEdit edits the whole image from the instruction";

/// Every field a request may carry (the image included), ignored ones apart.
pub const KNOWN: &[&str] = &[
    "image",
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "user",
    "mask",
    "stream",
    "partial_images",
    "strategy",
    "seeds",
    "seed_list",
    "probe_steps",
    "keep",
    "steps",
    "seed",
    "wave",
    "target",
    "budget_nfe",
    "refine",
    "refine_strength",
    "refine_keep_unchanged",
    "refine_best",
    "cache",
    "live_previews",
];

/// A field sent twice: refused rather than the last one winning, where a proxy that checked
/// the first and the server that used the last would disagree.
fn given_twice(name: &str) -> ApiError {
    ApiError::bad_field(
        name,
        format!("`{name}` is given twice; give each field once"),
    )
}

/// A JSON object's entries in their order, repeats kept (serde_json's map keeps the last
/// of a repeated key without a word). Each value is held as its raw text, borrowed from the
/// body: a value tree costs ~20x its text (a 27 MB array of zeros is ~0.5 GB as
/// `serde_json::Value`s), so only small values of text fields are ever parsed into one.
struct Entries<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

/// Largest JSON value of a field other than `image`, in bytes of its text: every field is a
/// short string, a number or (`seed_list`) a list of at most a few hundred seeds.
const MAX_JSON_FIELD_BYTES: usize = 64 << 10;

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries<'de>, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A multipart read that failed, naming the field being read when there was one: when the
/// connection cut the body at its size limit, that field is the one that crossed it.
fn multipart_error(e: MultipartError, limits: &Limits, field: Option<&str>) -> ApiError {
    let mut error = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(
            field.unwrap_or("image"),
            format!(
                "the request is larger than this server accepts (images up to {} bytes)",
                limits.max_upload_bytes
            ),
        )
    } else {
        ApiError::bad_request(format!("unreadable multipart body: {}", e.body_text()))
    };
    if let Some(field) = field {
        error.param = Some(field.to_string());
    }
    error
}

impl RawRequest {
    /// Reads a multipart form (as the OpenAI clients send it): `image` (or `image[]`) as a
    /// file, every other field as text.
    pub async fn from_multipart(mut form: Multipart, limits: &Limits) -> Result<Self, ApiError> {
        let mut raw = Self::default();
        while let Some(mut field) = form
            .next_field()
            .await
            .map_err(|e| multipart_error(e, limits, None))?
        {
            let name = field.name().unwrap_or_default().to_string();
            let name = name.strip_suffix("[]").unwrap_or(&name).to_string();
            if name == "image" {
                if raw.image.is_some() {
                    return Err(ApiError::bad_field("image", "one image per edit"));
                }
                let mut bytes = Vec::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| multipart_error(e, limits, Some("image")))?
                {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > limits.max_upload_bytes {
                        return Err(too_big(limits));
                    }
                }
                raw.image = Some(bytes);
            } else if name == "mask" {
                // OpenAI clients send a mask as a file: refused for what it is, not for
                // its bytes (it is not read).
                return Err(ApiError::bad_field("mask", MASK_UNSUPPORTED));
            } else {
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| multipart_error(e, limits, Some(&name)))?;
                let text = String::from_utf8(bytes.to_vec()).map_err(|e| {
                    ApiError::bad_field(
                        &name,
                        format!(
                            "`{name}` is not UTF-8 text (byte {} is not)",
                            e.utf8_error().valid_up_to()
                        ),
                    )
                })?;
                if raw.fields.contains_key(&name) {
                    return Err(given_twice(&name));
                }
                raw.fields.insert(name, text);
            }
        }
        Ok(raw)
    }

    /// Reads a JSON object: `image` as base64 (optionally a `data:` URL), other fields as
    /// JSON values.
    pub fn from_json(body: &[u8], limits: &Limits) -> Result<Self, ApiError> {
        let Entries(entries) = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("unreadable JSON body: {e}")))?;
        let mut seen = std::collections::HashSet::new();
        if let Some((name, _)) = entries.iter().find(|(k, _)| !seen.insert(k.as_str())) {
            return Err(given_twice(name));
        }
        let mut raw = Self::default();
        for (name, value) in entries {
            if name == "image" {
                let text: Option<std::borrow::Cow<str>> = serde_json::from_str(value.get())
                    .map_err(|_| {
                        ApiError::bad_field("image", "`image` must be base64 text (or a data: URL)")
                    })?;
                let Some(text) = text else { continue };
                let text = text.as_ref();
                let b64 = text.split_once(";base64,").map_or(text, |(_, b)| b);
                if b64.len() / 4 * 3 > limits.max_upload_bytes + 3 {
                    return Err(too_big(limits));
                }
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| {
                        ApiError::bad_field("image", format!("`image` is not base64: {e}"))
                    })?;
                if bytes.len() > limits.max_upload_bytes {
                    return Err(too_big(limits));
                }
                raw.image = Some(bytes);
            } else {
                let text = value.get();
                if text.len() > MAX_JSON_FIELD_BYTES {
                    return Err(ApiError::too_large(
                        &name,
                        format!(
                            "`{name}` is {} bytes of JSON; a field other than `image` may have at most {MAX_JSON_FIELD_BYTES}",
                            text.len()
                        ),
                    ));
                }
                let v = serde_json::from_str(text)
                    .map_err(|e| ApiError::bad_request(format!("unreadable JSON body: {e}")))?;
                if let Some(text) = json_field(&name, v)? {
                    raw.fields.insert(name, text);
                }
            }
        }
        Ok(raw)
    }
}

/// Fields whose value is text: in JSON they must be strings.
const TEXT_FIELDS: &[&str] = &[
    "prompt",
    "size",
    "response_format",
    "output_format",
    "user",
    "strategy",
];

/// A JSON field's value as the text a form would carry: strings as they are, numbers and
/// booleans as written, `seed_list` as a list of numbers; `null` is a field not given.
/// Anything else is refused by name (a list or an object is never a prompt).
fn json_field(name: &str, value: serde_json::Value) -> Result<Option<String>, ApiError> {
    use serde_json::Value;
    let kind = match &value {
        Value::Null => return Ok(None),
        Value::String(_) => "text",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let wrong = |expected: &str| {
        ApiError::bad_field(name, format!("`{name}` must be {expected}, not {kind}"))
    };
    if TEXT_FIELDS.contains(&name) {
        return match value {
            Value::String(s) => Ok(Some(s)),
            _ => Err(wrong("text (a JSON string)")),
        };
    }
    match value {
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Array(items) if name == "seed_list" => {
            if let Some(item) = items.iter().find(|i| !i.is_u64()) {
                return Err(ApiError::bad_field(
                    name,
                    format!("`seed_list` holds whole numbers, not {item}"),
                ));
            }
            Ok(Some(
                items
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ))
        }
        _ => Err(wrong("a number, a boolean or text")),
    }
}

fn too_big(limits: &Limits) -> ApiError {
    ApiError::too_large(
        "image",
        format!(
            "`image` is larger than this server accepts ({} bytes at most)",
            limits.max_upload_bytes
        ),
    )
}

/// Parses a field's text as a number, naming the field when it is not one.
fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
    text.trim().parse().map_err(|_| {
        // A number that is not a count (-1, 2.5, 1e30 where a count is read) is told so.
        let what = match text.trim().parse::<f64>() {
            Ok(_) => "a whole number of 0 or more (within its bound)",
            Err(_) => "a number",
        };
        ApiError::bad_field(name, format!("`{name}` must be {what}, not {text:?}"))
    })
}

fn boolean(name: &str, text: &str) -> Result<bool, ApiError> {
    match text.trim() {
        "true" | "1" | "on" => Ok(true),
        "false" | "0" | "off" | "" => Ok(false),
        other => Err(ApiError::bad_field(
            name,
            format!("`{name}` must be true or false, not {other:?}"),
        )),
    }
}

impl EditRequest {
    /// Checks `raw`'s fields (the image is checked when it is decoded) and lays them over
    /// `defaults`. Every refusal names its field.
    pub fn from_raw(
        raw: &RawRequest,
        defaults: &StrategyConfig,
        limits: &Limits,
    ) -> Result<Self, ApiError> {
        let f = &raw.fields;
        if let Some(unknown) = f
            .keys()
            .find(|k| !KNOWN.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()))
        {
            return Err(ApiError::bad_field(
                unknown,
                format!("unknown field `{unknown}` (fields: {})", KNOWN.join(", ")),
            ));
        }
        if raw.image.is_none() {
            return Err(ApiError::bad_field(
                "image",
                "`image` is required (the source image)",
            ));
        }
        if f.contains_key("mask") {
            return Err(ApiError::bad_field("mask", MASK_UNSUPPORTED));
        }
        for name in ["stream", "partial_images"] {
            if f.get(name)
                .is_some_and(|v| !matches!(v.trim(), "" | "false" | "0"))
            {
                return Err(ApiError::bad_field(
                    name,
                    format!("`{name}` is not supported here: POST /v1/edits and follow /v1/edits/{{id}}/events"),
                ));
            }
        }
        let instruction = f
            .get("prompt")
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::bad_field("prompt", "`prompt` (the edit instruction) is required")
            })?
            .to_string();
        let chars = instruction.chars().count();
        if chars > limits.max_prompt_chars {
            return Err(ApiError::bad_field(
                "prompt",
                format!(
                    "`prompt` is {chars} characters; this server accepts at most {} (FLUX reads 512 T5 tokens, about 2000 characters)",
                    limits.max_prompt_chars
                ),
            ));
        }
        let user = f.get("user").cloned().filter(|u| !u.is_empty());
        if let Some(u) = &user {
            let chars = u.chars().count();
            if chars > MAX_USER_CHARS {
                return Err(ApiError::bad_field(
                    "user",
                    format!(
                        "`user` is {chars} characters; an end-user id is at most {MAX_USER_CHARS}"
                    ),
                ));
            }
        }
        let n = match f.get("n") {
            Some(t) => number::<usize>("n", t)?,
            None => 1,
        };
        if !(1..=10).contains(&n) {
            return Err(ApiError::bad_field(
                "n",
                format!("`n` must be 1 to 10, not {n}"),
            ));
        }
        // `size` up to the edit width (ICEdit's 512) sets the panel; a larger one edits at
        // 512 and refines the pick to `size`.
        let mut size_refine = None;
        let mut size_height = None;
        let size_sent = f
            .get("size")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let width = match size_sent.as_deref() {
            None | Some("auto") => DEFAULT_PANEL_WIDTH,
            Some(size) => {
                // `WIDTHxHEIGHT` as OpenAI writes it (or the width alone). The height must
                // be the one the image has at that width (checked against the image
                // header, `inspect_upload`); a malformed one is refused here.
                let (w, h) = parse_size(size).ok_or_else(|| {
                    ApiError::bad_field(
                        "size",
                        format!(
                            "`size` must be WIDTHxHEIGHT (e.g. 512x512) or a width, not {size:?}"
                        ),
                    )
                })?;
                if let Some(reason) = panel_width_error(w) {
                    return Err(ApiError::bad_field(
                        "size",
                        format!("`size` {size}: {reason}"),
                    ));
                }
                if let Some(h) = h.filter(|&h| h > MAX_PANEL_SIDE) {
                    return Err(ApiError::bad_field(
                        "size",
                        format!(
                            "`size` {size}: a height of {h} px is above the {MAX_PANEL_SIDE} px this server makes"
                        ),
                    ));
                }
                size_height = h;
                if w > DEFAULT_PANEL_WIDTH {
                    size_refine = Some(w);
                    DEFAULT_PANEL_WIDTH
                } else {
                    w
                }
            }
        };
        // A `size` wider than the edit names the refine: a `refine` that says otherwise
        // would leave one of the two ignored.
        if let (Some(from_size), Some(refine)) = (size_refine, f.get("refine")) {
            let refine = refine.trim();
            if !refine.is_empty() && refine.parse::<u32>().ok() != Some(from_size) {
                return Err(ApiError::bad_field(
                    "refine",
                    format!(
                        "`refine` {refine} disagrees with `size` {from_size} (a `size` wider than {DEFAULT_PANEL_WIDTH} refines to its width): send one of them"
                    ),
                ));
            }
        }
        let response_format = match f.get("response_format").map(|s| s.trim()) {
            None | Some("") | Some("b64_json") => ResponseFormat::B64Json,
            Some("url") => ResponseFormat::Url,
            Some(other) => {
                return Err(ApiError::bad_field(
                    "response_format",
                    format!("`response_format` must be b64_json or url, not {other:?}"),
                ))
            }
        };
        if let Some(format) = f.get("output_format").map(|s| s.trim()) {
            if !format.is_empty() && format != "png" {
                return Err(ApiError::bad_field(
                    "output_format",
                    format!("`output_format` {format:?}: this server returns png"),
                ));
            }
        }
        let strategy = strategy(f, defaults, limits, size_refine)?;
        if let Some(refine) = strategy.refine.filter(|&r| r <= width) {
            return Err(ApiError::bad_field(
                "refine",
                format!("`refine` {refine} must be wider than the edit's panel ({width})"),
            ));
        }
        Ok(Self {
            instruction,
            strategy,
            n,
            width,
            size: size_sent,
            size_height,
            response_format,
            user,
            live_previews: match f.get("live_previews") {
                Some(t) => boolean("live_previews", t)?,
                None => false,
            },
        })
    }
}

/// `WIDTHxHEIGHT` (or `X`) or a width alone, as numbers: `None` when malformed (a height
/// of 0 included).
pub fn parse_size(size: &str) -> Option<(u32, Option<u32>)> {
    let (w, h) = match size.split_once(['x', 'X']) {
        Some((w, h)) => (w.trim(), Some(h.trim())),
        None => (size.trim(), None),
    };
    let h = match h {
        Some(h) => Some(h.parse::<u32>().ok().filter(|&h| h > 0)?),
        None => None,
    };
    Some((w.parse().ok()?, h))
}

impl EditRequest {
    /// The request field that set the refine (`size` when its width is wider than the
    /// edit, else `refine`), for refusals that name it.
    pub fn refine_field(&self) -> &'static str {
        match self.size.as_deref().and_then(parse_size) {
            Some((w, _)) if w > DEFAULT_PANEL_WIDTH => "size",
            _ => "refine",
        }
    }
}

/// The request's strategy: its fields over the defaults, sized to `budget_nfe`, checked
/// (names as the request writes them) and held to the server's limits.
/// The request's strategy: `defaults` with the fields given replacing its values. A `size`
/// wider than the edit's panel refines to it (`size_refine`) unless `refine` is given.
fn strategy(
    f: &BTreeMap<String, String>,
    defaults: &StrategyConfig,
    limits: &Limits,
    size_refine: Option<u32>,
) -> Result<StrategyConfig, ApiError> {
    let opt = |name: &str| {
        f.get(name)
            .map(|s| s.as_str())
            .filter(|s| !s.trim().is_empty())
    };
    let kind = match opt("strategy") {
        Some(s) => Some(
            serde_json::from_value::<StrategyKind>(serde_json::Value::String(s.trim().into()))
                .map_err(|_| {
                    ApiError::bad_field(
                        "strategy",
                        format!(
                            "unknown `strategy` {s:?} (random, best-of-n, early-filter, tournament, successive-halving, adaptive)"
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let seeds = match (opt("seed_list"), opt("seeds")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_field(
                "seed_list",
                "give `seeds` (a count) or `seed_list`, not both",
            ))
        }
        (Some(list), None) => Some(Seeds::List(
            list.split(',')
                .map(|s| number::<u64>("seed_list", s))
                .collect::<Result<_, _>>()?,
        )),
        (None, Some(n)) => Some(Seeds::Count(number("seeds", n)?)),
        (None, None) => None,
    };
    let overrides = StrategyOverrides {
        strategy: kind,
        seeds,
        probe_steps: opt("probe_steps")
            .map(|t| number("probe_steps", t))
            .transpose()?,
        keep: opt("keep").map(|t| number("keep", t)).transpose()?,
        steps: opt("steps").map(|t| number("steps", t)).transpose()?,
        seed: opt("seed").map(|t| number("seed", t)).transpose()?,
        wave: opt("wave").map(|t| number("wave", t)).transpose()?,
        target: opt("target").map(|t| number("target", t)).transpose()?,
        refine: match opt("refine") {
            Some(t) => Some(number("refine", t)?),
            None => size_refine,
        },
        refine_strength: opt("refine_strength")
            .map(|t| number("refine_strength", t))
            .transpose()?,
        refine_keep_unchanged: opt("refine_keep_unchanged")
            .map(|t| boolean("refine_keep_unchanged", t))
            .transpose()?,
        refine_best: opt("refine_best")
            .map(|t| number("refine_best", t))
            .transpose()?,
        cache: opt("cache")
            .map(|t| {
                crate::generate::StepCache::parse_as(t.trim(), "`cache`")
                    .map_err(|e| ApiError::bad_field("cache", e))
            })
            .transpose()?,
    };
    let mut s = overrides.apply(defaults);
    if let Some(budget) = opt("budget_nfe") {
        let budget: usize = number("budget_nfe", budget)?;
        if overrides.seeds.is_some() {
            return Err(ApiError::bad_field(
                "budget_nfe",
                "`budget_nfe` sets the number of seeds: give it without `seeds` or `seed_list`",
            ));
        }
        s = s.fit_to_budget(budget).map_err(|e| {
            ApiError::bad_field("budget_nfe", format!("`budget_nfe` {budget}: {e}"))
        })?;
        // The largest N within the budget, held to what this server runs: fewer seeds
        // spend less, so the budget still holds as a cap.
        s.seeds = s.seeds.min(limits.max_seeds);
    }
    s.check(&ValueSource::Request).map_err(|e| {
        // A refine the request did not name came from its `size`; seeds it gave as a
        // list came from `seed_list`.
        let field = match e.field {
            StrategyField::Refine if opt("refine").is_none() => "size",
            StrategyField::Seeds if opt("seed_list").is_some() => "seed_list",
            field => field.key(),
        };
        // A value the request did not send is the server's default (its flag): say so,
        // or the client is told to fix a field it never wrote.
        let message = if opt(field).is_some() {
            e.message.clone()
        } else {
            format!(
                "{} (`{field}` is the server's default, --{}: send `{field}` to choose another)",
                e.message,
                field.replace('_', "-")
            )
        };
        ApiError::bad_field(field, message)
    })?;
    if s.candidate_count() > limits.max_seeds {
        let field = if s.seed_list.is_some() {
            "seed_list"
        } else {
            "seeds"
        };
        return Err(ApiError::bad_field(
            field,
            format!(
                "`{field}`: {} seed candidates asked for; this server runs at most {} per edit",
                s.candidate_count(),
                limits.max_seeds
            ),
        ));
    }
    if s.steps > limits.max_steps {
        return Err(ApiError::bad_field(
            "steps",
            format!(
                "`steps` {}: this server runs at most {}",
                s.steps, limits.max_steps
            ),
        ));
    }
    // A tournament's short run has its own schedule: the same per-run limit holds.
    if s.kind == StrategyKind::Tournament && s.probe_steps > limits.max_steps {
        return Err(ApiError::bad_field(
            "probe_steps",
            format!(
                "`probe_steps` {} (the tournament's short run): this server runs at most {} steps a run",
                s.probe_steps, limits.max_steps
            ),
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(fields: &[(&str, &str)]) -> RawRequest {
        RawRequest {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            image: Some(vec![1, 2, 3]),
        }
    }

    fn parse(fields: &[(&str, &str)]) -> Result<EditRequest, ApiError> {
        EditRequest::from_raw(&raw(fields), &StrategyConfig::default(), &Limits::default())
    }

    /// A large JSON value outside `image` is refused by its size before it is parsed into
    /// a value tree (20x its text in memory); the image's own text is read as text.
    #[test]
    fn a_json_field_larger_than_any_real_one_is_refused_unparsed() {
        let zeros = vec!["0"; 200_000].join(",");
        for key in ["seed_list", "anything"] {
            let body = format!(r#"{{"prompt": "x", "{key}": [{zeros}]}}"#);
            let Err(e) = RawRequest::from_json(body.as_bytes(), &Limits::default()) else {
                panic!("{key}: a 400 kB list was accepted")
            };
            assert_eq!(e.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE, "{e}");
            assert_eq!(e.param.as_deref(), Some(key));
            assert!(e.message.contains("bytes of JSON"), "{e}");
        }
        use base64::Engine as _;
        let image = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 300_000]);
        let body = format!(r#"{{"prompt": "x", "seed_list": [1, 2], "image": "{image}"}}"#);
        let ok = RawRequest::from_json(body.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(ok.image.as_deref().map(<[u8]>::len), Some(300_000));
        assert_eq!(ok.fields["seed_list"], "1,2");
        let body = r#"{"prompt": "x", "image": 5}"#;
        let Err(e) = RawRequest::from_json(body.as_bytes(), &Limits::default()) else {
            panic!("a number as the image was accepted")
        };
        assert_eq!(e.param.as_deref(), Some("image"));
    }

    #[test]
    fn a_json_key_given_twice_is_refused_naming_it() {
        let Err(e) = RawRequest::from_json(
            br#"{"prompt": "x", "seeds": 2, "prompt": "y"}"#,
            &Limits::default(),
        ) else {
            panic!("a repeated key was accepted")
        };
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("given twice"), "{e}");
        let ok =
            RawRequest::from_json(br#"{"prompt": "x", "seeds": 2}"#, &Limits::default()).unwrap();
        assert_eq!(ok.fields["prompt"], "x");
    }

    #[test]
    fn every_strategy_knob_is_a_known_request_field() {
        use crate::engine::strategy::StrategyField;
        for field in StrategyField::ALL {
            assert!(KNOWN.contains(&field.key()), "{} is not read", field.key());
        }
    }

    #[test]
    fn refine_best_goes_with_a_refine_from_refine_or_size() {
        let r = parse(&[("prompt", "x"), ("size", "1024"), ("refine_best", "2")]).unwrap();
        assert_eq!((r.strategy.refine, r.strategy.refine_best), (Some(1024), 2));
        let r = parse(&[("prompt", "x"), ("refine", "768"), ("refine_best", "3")]).unwrap();
        assert_eq!((r.strategy.refine, r.strategy.refine_best), (Some(768), 3));
        let e = parse(&[("prompt", "x"), ("refine_best", "2")]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("refine_best"), "{e}");
        assert!(
            e.message.contains("`refine`") || e.message.contains("refine WIDTH"),
            "{e}"
        );
        let e = parse(&[("prompt", "x"), ("size", "1024"), ("refine_best", "0")]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("refine_best"), "{e}");
    }

    #[test]
    fn openai_fields_and_our_knobs_are_read() {
        let r = parse(&[
            ("prompt", "make the sky night"),
            ("n", "2"),
            ("size", "256x256"),
            ("response_format", "url"),
            ("model", "anything"),
            ("strategy", "successive-halving"),
            ("seeds", "6"),
            ("probe_steps", "3"),
            ("steps", "20"),
        ])
        .unwrap();
        assert_eq!(r.instruction, "make the sky night");
        assert_eq!((r.n, r.width), (2, 256));
        assert_eq!(r.response_format, ResponseFormat::Url);
        assert_eq!(r.strategy.kind, StrategyKind::SuccessiveHalving);
        assert_eq!(
            (r.strategy.seeds, r.strategy.probe_steps, r.strategy.steps),
            (6, 3, 20)
        );
        assert!(!r.strategy.cache.is_on());
        let r = parse(&[
            ("prompt", "x"),
            ("cache", "taylorseer:interval=4,order=1,lite"),
        ])
        .unwrap();
        assert_eq!(
            r.strategy.cache.to_string(),
            "taylorseer:interval=4,order=1,warmup=3,factors=bf16,lite"
        );
        let e = parse(&[("prompt", "x"), ("cache", "fbc:-1")]).unwrap_err();
        assert!(
            e.to_string().contains("`cache` \"fbc:-1\": threshold -1"),
            "{e}"
        );
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "prompt"),
            (&[("prompt", "x"), ("n", "11")], "n"),
            (&[("prompt", "x"), ("n", "two")], "n"),
            (&[("prompt", "x"), ("size", "1000x1000")], "size"),
            (&[("prompt", "x"), ("seeds", "33")], "seeds"),
            (&[("prompt", "x"), ("seed_list", "5,5")], "seed_list"),
            (&[("prompt", "x"), ("steps", "101")], "steps"),
            (&[("prompt", "x"), ("probe_steps", "0")], "probe_steps"),
            (
                &[
                    ("prompt", "x"),
                    ("strategy", "tournament"),
                    ("probe_steps", "101"),
                ],
                "probe_steps",
            ),
            (
                &[
                    ("prompt", "x"),
                    ("strategy", "tournament"),
                    ("probe_steps", "100000000000"),
                ],
                "probe_steps",
            ),
            (&[("prompt", "x"), ("strategy", "best")], "strategy"),
            (&[("prompt", "x"), ("mask", "...")], "mask"),
            (&[("prompt", "x"), ("stream", "true")], "stream"),
            (&[("prompt", "x"), ("probe_stepz", "3")], "probe_stepz"),
            (
                &[("prompt", "x"), ("response_format", "jpg")],
                "response_format",
            ),
            (&[("prompt", "x"), ("budget_nfe", "3")], "budget_nfe"),
            (&[("prompt", "x"), ("cache", "fbc:fast")], "cache"),
            (&[("prompt", "x"), ("size", "64x")], "size"),
            (&[("prompt", "x"), ("size", "64x0")], "size"),
            (&[("prompt", "x"), ("size", "64xabc")], "size"),
            (&[("prompt", "x"), ("size", "512x1552")], "size"),
            (
                &[("prompt", "x"), ("size", "1024"), ("refine", "768")],
                "refine",
            ),
        ];
        for (fields, param) in cases {
            let e = parse(fields).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(*param), "{fields:?}: {e}");
            assert!(e.message.contains(param), "{fields:?}: {e}");
            assert_eq!(e.status, 400, "{fields:?}");
        }
        // A bound broken by a value the request did not send names the server's default.
        let e = parse(&[("prompt", "x"), ("strategy", "adaptive"), ("seeds", "2")]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("wave"));
        assert!(e.message.contains("the server's default, --wave"), "{e}");
        let e = parse(&[
            ("prompt", "x"),
            ("strategy", "adaptive"),
            ("seeds", "2"),
            ("wave", "3"),
        ])
        .unwrap_err();
        assert!(!e.message.contains("default"), "{e}");
        // A number where a count belongs is told it must be a whole number, not "a number".
        let e = parse(&[("prompt", "x"), ("n", "-1")]).unwrap_err();
        assert!(e.message.contains("whole number"), "{e}");
        // `X` separates too, and the width alone is a size.
        assert_eq!(
            parse(&[("prompt", "x"), ("size", "64X64")]).unwrap().width,
            64
        );
        assert_eq!(parse(&[("prompt", "x"), ("size", "64")]).unwrap().width, 64);
        // The height is kept for the check against the image; a refine that agrees with a
        // wide `size` is no conflict.
        let r = parse(&[("prompt", "x"), ("size", "64x48")]).unwrap();
        assert_eq!(
            (r.size.as_deref(), r.size_height),
            (Some("64x48"), Some(48))
        );
        let r = parse(&[("prompt", "x"), ("size", "1024"), ("refine", "1024")]).unwrap();
        assert_eq!((r.strategy.refine, r.refine_field()), (Some(1024), "size"));
        let mut no_image = raw(&[("prompt", "x")]);
        no_image.image = None;
        let e = EditRequest::from_raw(&no_image, &StrategyConfig::default(), &Limits::default())
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("image"));
    }

    #[test]
    fn a_budget_sizes_the_seed_count() {
        let r = parse(&[("prompt", "x"), ("budget_nfe", "124")]).unwrap();
        assert!(r.strategy.planned_nfe() <= 124);
        assert!(r.strategy.seeds >= 1);
    }

    #[test]
    fn json_bodies_carry_base64_images_and_typed_values() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8, 8, 9]);
        let body = serde_json::json!({
            "prompt": "x", "n": 1, "live_previews": true,
            "image": format!("data:image/png;base64,{b64}")
        });
        let raw = RawRequest::from_json(body.to_string().as_bytes(), &Limits::default()).unwrap();
        assert_eq!(raw.image.as_deref(), Some(&[7u8, 8, 9][..]));
        assert_eq!(raw.fields["n"], "1");
        let r =
            EditRequest::from_raw(&raw, &StrategyConfig::default(), &Limits::default()).unwrap();
        assert!(r.live_previews);
    }
}
