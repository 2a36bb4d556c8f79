//! The remote judge: any OpenAI-compatible chat-completions endpoint with vision (OpenAI,
//! vLLM, Ollama, ...).
//!
//! Requests and responses use async-openai's chat types; the transport is reqwest, because
//! async-openai's client drops the response headers this judge needs to honour
//! `Retry-After`. Images go as base64 PNG data URLs. Every call goes through the reply
//! cache (a reply is stored once it reads), retries 408/429/5xx/timeouts and 200 bodies that
//! are not a whole chat completion with exponential backoff (or the server's
//! `Retry-After`), and records tokens and attempts; the API key is redacted from every
//! error, a quoted reply's included. With `logprobs = true` the score
//! tokens' distributions give expected scores (finer ranking, fewer ties).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestMessageContentPartImage,
    ChatCompletionRequestMessageContentPartText, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart,
    CreateChatCompletionRequest, CreateChatCompletionResponse, ImageUrl,
};
use async_trait::async_trait;
use base64::Engine as _;
use image::RgbImage;
use rand::Rng;
use serde::Deserialize;

use super::cache::{CachedReply, ReplyCache};
use super::parse;
use super::preset::{FieldCheck, MAX_CONCURRENCY};
use super::prompts::PromptSet;
use super::score_logprobs::{expectation, score_distributions};
use super::{
    CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, ScreenVerdict, SubScores,
};
use crate::edit::EditContext;

/// An API key that never shows in Debug output, logs or errors.
#[derive(Clone, Default)]
pub struct ApiKey(Option<String>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ApiKey(***)"
        } else {
            "ApiKey(none)"
        })
    }
}

impl ApiKey {
    /// Replaces the key wherever it appears in `text` (e.g. an echoing error body).
    fn redact(&self, text: &str) -> String {
        match &self.0 {
            Some(k) if !k.is_empty() => text.replace(k.as_str(), "***"),
            _ => text.to_string(),
        }
    }

    /// `error` with the key replaced in every text it carries (a reply that quotes the key
    /// is stored in reports as it failed).
    fn redact_error(&self, error: JudgeError) -> JudgeError {
        match error {
            JudgeError::Parse {
                reason,
                reply,
                usage,
            } => JudgeError::Parse {
                reason: self.redact(&reason),
                reply: self.redact(&reply),
                usage,
            },
            JudgeError::Http { status, body } => JudgeError::Http {
                status,
                body: self.redact(&body),
            },
            JudgeError::Config(m) => JudgeError::Config(self.redact(&m)),
            JudgeError::Timeout(m) => JudgeError::Timeout(self.redact(&m)),
            JudgeError::Transport(m) => JudgeError::Transport(self.redact(&m)),
            JudgeError::Failed(m) => JudgeError::Failed(self.redact(&m)),
        }
    }
}

fn default_api_base() -> String {
    "https://api.openai.com/v1".into()
}

/// A preset file (`judges/*.toml`) for this backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Display name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// Calls in flight at once (read by the engine).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// Model name as the endpoint knows it.
    pub model: String,
    /// Base URL up to `/v1`.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Name of the environment variable holding the API key (none for keyless servers).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Timeout of one HTTP attempt, seconds.
    #[serde(default = "defaults::timeout_s")]
    pub timeout_s: f64,
    /// Attempts per call (1 = no retry).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First backoff delay, seconds (doubles per attempt, with jitter).
    #[serde(default = "defaults::backoff_s")]
    pub backoff_s: f64,
    /// Longest wait between attempts, seconds (also caps Retry-After).
    #[serde(default = "defaults::max_backoff_s")]
    pub max_backoff_s: f64,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: f32,
    /// Completion token limit.
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: u32,
    /// Ask for logprobs and turn score-token distributions into expected scores.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token when `logprobs` is on.
    #[serde(default = "defaults::top_logprobs")]
    pub top_logprobs: u8,
    /// Folder overriding the embedded prompts.
    #[serde(default)]
    pub prompts_dir: Option<PathBuf>,
    /// Reply cache folder (default `.icedit-cache/judge`); `""` disables the cache.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

mod defaults {
    pub fn timeout_s() -> f64 {
        120.0
    }
    pub fn max_attempts() -> u32 {
        6
    }
    pub fn backoff_s() -> f64 {
        1.0
    }
    pub fn max_backoff_s() -> f64 {
        60.0
    }
    pub fn max_tokens() -> u32 {
        400
    }
    pub fn top_logprobs() -> u8 {
        10
    }
}

impl OpenAiConfig {
    /// The preset as read from the file at `path`, its relative folders resolved against
    /// the file's folder and its fields checked.
    pub fn resolve(self, path: &Path) -> Result<Self, JudgeError> {
        // Relative folders in a preset are relative to the preset file.
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = self;
        if let Some(dir) = &config.prompts_dir {
            if dir.is_relative() {
                config.prompts_dir = Some(base.join(dir));
            }
        }
        config.check(path)?;
        Ok(config)
    }

    /// Refuses values that cannot work, naming the field and the bound.
    pub fn check(&self, path: &Path) -> Result<(), JudgeError> {
        let c = FieldCheck::new(path);
        c.within_opt(
            "max_concurrency",
            self.max_concurrency,
            1,
            MAX_CONCURRENCY,
            "calls in flight; 0 would never call",
        )?;
        match reqwest::Url::parse(&self.api_base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            Ok(url) => {
                return Err(c.refuse(
                    "api_base",
                    format!("{:?}", self.api_base),
                    &format!("is not an http(s) URL (scheme {:?})", url.scheme()),
                ))
            }
            Err(e) => {
                return Err(c.refuse(
                    "api_base",
                    format!("{:?}", self.api_base),
                    &format!("is not a URL ({e}); e.g. https://api.openai.com/v1"),
                ))
            }
        }
        c.within(
            "timeout_s",
            self.timeout_s,
            0.1,
            3600.0,
            "seconds per HTTP attempt; 0 times out every call",
        )?;
        c.within(
            "max_attempts",
            self.max_attempts,
            1,
            20,
            "tries per call, the first included",
        )?;
        c.within(
            "backoff_s",
            self.backoff_s,
            0.0,
            600.0,
            "first retry delay, seconds",
        )?;
        c.within(
            "max_backoff_s",
            self.max_backoff_s,
            self.backoff_s.max(0.0),
            3600.0,
            "longest retry delay, seconds, at least backoff_s",
        )?;
        c.within(
            "temperature",
            self.temperature,
            0.0,
            2.0,
            "the range OpenAI's chat API accepts",
        )?;
        c.within(
            "max_tokens",
            self.max_tokens,
            1,
            128_000,
            "reply tokens; the reply is a short JSON object",
        )?;
        c.within(
            "top_logprobs",
            self.top_logprobs,
            0,
            20,
            "the range OpenAI's chat API accepts",
        )
    }
}

/// One answered call: the reply, what it cost, and where it is cached once it is read.
struct Answer<'a> {
    reply: CachedReply,
    usage: CallUsage,
    /// The cache and key to store the reply under when it reads (not for cache hits).
    store: Option<(&'a ReplyCache, String)>,
    key: &'a ApiKey,
}

impl Answer<'_> {
    /// Reads the reply with `read`. A reply that cannot be read (empty, or not the answer
    /// asked for) still carries the call's cost, so the run's token totals stay exact, has
    /// the API key redacted, and is not cached (a rerun asks again); one that reads is.
    fn read<T>(
        self,
        read: impl FnOnce(&CachedReply, CallUsage) -> Result<T, JudgeError>,
    ) -> Result<T, JudgeError> {
        let spent = self.usage.clone();
        let read = if self.reply.text.trim().is_empty() {
            Err(JudgeError::parse(
                match &self.reply.refusal {
                    Some(r) if !r.trim().is_empty() => format!("empty reply; refusal: {r}"),
                    _ => "empty reply".to_string(),
                },
                "",
            ))
        } else {
            read(&self.reply, self.usage)
        };
        match read {
            Ok(answer) => {
                if let Some((cache, key)) = self.store {
                    cache.put(&key, &self.reply);
                }
                Ok(answer)
            }
            Err(e) => Err(self.key.redact_error(e.with_usage(spent))),
        }
    }
}

/// The remote OpenAI-compatible judge.
pub struct OpenAiJudge {
    config: OpenAiConfig,
    key: ApiKey,
    http: reqwest::Client,
    prompts: PromptSet,
    cache: Option<ReplyCache>,
}

impl std::fmt::Debug for OpenAiJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiJudge")
            .field("model", &self.config.model)
            .field("api_base", &self.config.api_base)
            .field("key", &self.key)
            .finish()
    }
}

impl OpenAiJudge {
    /// A judge from a configuration; reads the key from the named environment variable.
    pub fn new(config: OpenAiConfig) -> Result<Self, JudgeError> {
        let key = match &config.api_key_env {
            Some(var) => ApiKey(Some(std::env::var(var).map_err(|_| {
                JudgeError::Config(format!(
                    "the judge's API key variable {var} is not set (export {var}=...)"
                ))
            })?)),
            None => ApiKey(None),
        };
        let http = crate::http::client_builder()
            .timeout(Duration::from_secs_f64(config.timeout_s))
            .build()
            .map_err(|e| JudgeError::Config(format!("HTTP client: {e}")))?;
        let prompts = PromptSet::load(config.prompts_dir.as_deref())?;
        let cache = match &config.cache_dir {
            Some(d) if d.as_os_str().is_empty() => None,
            Some(d) => Some(ReplyCache::new(d)),
            None => Some(ReplyCache::new(".icedit-cache/judge")),
        };
        Ok(Self {
            config,
            key,
            http,
            prompts,
            cache,
        })
    }

    fn sampling_params(&self) -> String {
        format!(
            "t={} max={} lp={}:{}",
            self.config.temperature,
            self.config.max_tokens,
            self.config.logprobs,
            self.config.top_logprobs
        )
    }

    fn request(&self, prompt: &str, pngs: &[Vec<u8>]) -> CreateChatCompletionRequest {
        let mut parts: Vec<ChatCompletionRequestUserMessageContentPart> = pngs
            .iter()
            .map(|png| {
                let url = format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                );
                ChatCompletionRequestUserMessageContentPart::ImageUrl(
                    ChatCompletionRequestMessageContentPartImage {
                        image_url: ImageUrl { url, detail: None },
                        prompt_cache_breakpoint: None,
                    },
                )
            })
            .collect();
        parts.push(ChatCompletionRequestUserMessageContentPart::Text(
            ChatCompletionRequestMessageContentPartText {
                text: prompt.to_string(),
                prompt_cache_breakpoint: None,
            },
        ));
        CreateChatCompletionRequest {
            model: self.config.model.clone(),
            messages: vec![ChatCompletionRequestMessage::User(
                ChatCompletionRequestUserMessage {
                    content: ChatCompletionRequestUserMessageContent::Array(parts),
                    name: None,
                },
            )],
            temperature: Some(self.config.temperature),
            max_completion_tokens: Some(self.config.max_tokens),
            logprobs: self.config.logprobs.then_some(true),
            top_logprobs: self.config.logprobs.then_some(self.config.top_logprobs),
            ..Default::default()
        }
    }

    /// Sends one call (through the cache), retrying as configured.
    async fn ask(&self, prompt: &str, images: &[&RgbImage]) -> Result<Answer<'_>, JudgeError> {
        let started = Instant::now();
        let pngs: Vec<Vec<u8>> = images.iter().map(|i| png_bytes(i)).collect();
        let refs: Vec<&[u8]> = pngs.iter().map(|p| p.as_slice()).collect();
        let key = ReplyCache::key(&self.config.model, &self.sampling_params(), prompt, &refs);
        if let Some(reply) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            return Ok(Answer {
                reply,
                usage: CallUsage {
                    cached: true,
                    latency_ms: started.elapsed().as_millis() as u64,
                    ..CallUsage::default()
                },
                store: None,
                key: &self.key,
            });
        }
        let body = self.request(prompt, &pngs);
        let url = format!(
            "{}/chat/completions",
            self.config.api_base.trim_end_matches('/')
        );
        let mut last_error = JudgeError::Transport("no attempt made".into());
        let mut retry_wait_s = 0.0f64;
        for attempt in 1..=self.config.max_attempts.max(1) {
            let mut req = self.http.post(&url).json(&body);
            if let Some(k) = &self.key.0 {
                req = req.bearer_auth(k);
            }
            let wait = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    // A body cut short or garbled on the way (a proxy, a dropped
                    // connection) is retried like a 5xx; a completion that arrived whole is
                    // an answer, readable or not.
                    match self.completion(resp).await {
                        Ok(reply) => {
                            return Ok(Answer {
                                usage: CallUsage {
                                    prompt_tokens: reply.prompt_tokens,
                                    completion_tokens: reply.completion_tokens,
                                    cached: false,
                                    attempts: attempt,
                                    latency_ms: started.elapsed().as_millis() as u64,
                                    retry_wait_ms: (retry_wait_s * 1000.0).round() as u64,
                                },
                                reply,
                                store: self.cache.as_ref().map(|c| (c, key.clone())),
                                key: &self.key,
                            });
                        }
                        Err(e) => {
                            last_error = e;
                            None
                        }
                    }
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok());
                    let body = resp.text().await.unwrap_or_default();
                    last_error = JudgeError::Http {
                        status: status.as_u16(),
                        body: self.key.redact(&body.chars().take(300).collect::<String>()),
                    };
                    if !JudgeError::transient_status(status.as_u16()) {
                        return Err(last_error);
                    }
                    retry_after
                }
                Err(e) if e.is_timeout() => {
                    last_error = JudgeError::Timeout(format!(
                        "no reply within {}s from {}",
                        self.config.timeout_s, self.config.api_base
                    ));
                    None
                }
                Err(e) => {
                    last_error = JudgeError::Transport(self.key.redact(&e.to_string()));
                    None
                }
            };
            if attempt == self.config.max_attempts.max(1) {
                break;
            }
            let backoff = self.config.backoff_s * 2f64.powi(attempt as i32 - 1);
            let jitter = rand::rng().random_range(0.8..1.2);
            let delay = wait
                .unwrap_or(backoff * jitter)
                .min(self.config.max_backoff_s)
                .max(0.0);
            tracing::warn!(
                "judge {}: attempt {attempt} failed ({last_error}); retrying in {delay:.1}s",
                self.config.name.as_deref().unwrap_or(&self.config.model)
            );
            retry_wait_s += delay;
            tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        }
        Err(last_error)
    }
}

impl OpenAiJudge {
    /// A 200 reply's body as a chat completion, or why it is not one (key redacted).
    async fn completion(&self, resp: reqwest::Response) -> Result<CachedReply, JudgeError> {
        let text = resp.text().await.map_err(|e| {
            JudgeError::Transport(self.key.redact(&format!("reading the reply: {e}")))
        })?;
        let parsed: CreateChatCompletionResponse = serde_json::from_str(&text).map_err(|e| {
            JudgeError::parse(
                format!("not a chat completion: {e}"),
                self.key.redact(&text.chars().take(400).collect::<String>()),
            )
        })?;
        to_reply(parsed)
    }
}

fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("PNG encoding into memory cannot fail");
    bytes
}

fn to_reply(response: CreateChatCompletionResponse) -> Result<CachedReply, JudgeError> {
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| JudgeError::parse("reply has no choices", ""))?;
    // An empty reply is still billed: it is refused when read, with its usage.
    let text = choice.message.content.unwrap_or_default();
    let refusal = choice.message.refusal;
    let logprobs = choice
        .logprobs
        .and_then(|l| l.content)
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            let top = t
                .top_logprobs
                .into_iter()
                .map(|a| (a.token, a.logprob))
                .collect();
            (t.token, top)
        })
        .collect();
    let usage = response.usage.unwrap_or_default();
    Ok(CachedReply {
        text,
        logprobs,
        prompt_tokens: usage.prompt_tokens as u64,
        completion_tokens: usage.completion_tokens as u64,
        refusal,
    })
}

#[async_trait]
impl Judge for OpenAiJudge {
    fn name(&self) -> String {
        let model = &self.config.model;
        match &self.config.name {
            Some(n) => format!("{n} ({model} via {})", self.config.api_base),
            None => format!("{model} via {}", self.config.api_base),
        }
    }

    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        let prompt = self.prompts.screen_for(&edit.instruction, stage);
        let answer = self.ask(&prompt, &[&edit.source, preview]).await?;
        answer.read(|reply, usage| {
            let text = &reply.text;
            let map = parse::reply_object(text)?;
            let mut score = parse::scores(&map, 1, text)?[0];
            if let [Some(d)] = &score_distributions(&reply.logprobs, "score", &[score], 0..=10)[..]
            {
                score = expectation(d);
            }
            Ok(ScreenVerdict {
                pass: parse::verdict(&map, "pass", text)?,
                score,
                reasoning: parse::reasoning(&map),
                usage,
            })
        })
    }

    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        let prompt = self.prompts.compare_for(&edit.instruction);
        let answer = self.ask(&prompt, &[first, second, &edit.source]).await?;
        answer.read(|reply, usage| {
            let text = &reply.text;
            let map = parse::reply_object(text)?;
            let preferred = parse::preference(&map, text)?;
            let written = match preferred {
                Preference::First => 1.0,
                Preference::Second => 2.0,
                Preference::Tie => 0.0,
            };
            let p_first = score_distributions(&reply.logprobs, "better", &[written], 0..=2)
                .pop()
                .flatten()
                .and_then(|d| {
                    let p = |v| d.iter().find(|x| x.0 == v).map_or(0.0, |x| x.1);
                    let (p1, p2) = (p(1), p(2));
                    (p1 + p2 > 0.0).then(|| p1 / (p1 + p2))
                });
            Ok(Comparison {
                preferred,
                p_first,
                reasoning: parse::reasoning(&map),
                usage,
            })
        })
    }

    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        let prompt = self.prompts.vie_sc_for(&edit.instruction);
        let answer = self.ask(&prompt, &[&edit.source, edited]).await?;
        answer.read(sub_scores)
    }

    async fn perceptual_quality(
        &self,
        _edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        let answer = self.ask(&self.prompts.vie_pq, &[edited]).await?;
        answer.read(sub_scores)
    }
}

fn sub_scores(reply: &CachedReply, usage: CallUsage) -> Result<SubScores, JudgeError> {
    let text = &reply.text;
    let map = parse::reply_object(text)?;
    let parsed = parse::scores(&map, 2, text)?;
    // Each score its expectation where its tokens give a distribution, else as written.
    let distributions = score_distributions(&reply.logprobs, "score", &parsed, 0..=10);
    let score = |k: usize| distributions[k].as_deref().map_or(parsed[k], expectation);
    let scores = [score(0), score(1)];
    Ok(SubScores {
        scores,
        passes: Vec::new(),
        reasoning: parse::reasoning(&map),
        usage,
    })
}
