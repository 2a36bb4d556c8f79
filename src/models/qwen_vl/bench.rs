//! `bench judge`: times the local judge's prefill of screening prompts (two images + text)
//! one prompt at a time against one batched prefill, with random weights at a real
//! checkpoint's configuration, so the batching gain can be measured on a GPU without
//! downloading anything. Random weights cost the same time as trained ones.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::config::Qwen2VlConfig;
use super::image::PreparedImage;
use super::model::{EncodedPrompt, KeyLayout, Qwen2Vl};
use super::side_by_side::{prompt_mismatch, run_rounds, ReferenceProcess, SideBySide};
use crate::models::bench::{timed, RandomWeights};
use crate::models::cuda::attention as flash;
use crate::models::cuda::switch::{self, Kernel};
use crate::models::kernel_check::{self, tolerance_rel, KernelCheckRow};

/// Built-in configurations, as on the Hub (`small` is a CPU-sized stand-in).
pub const MODELS: [&str; 5] = [
    "small",
    "qwen2-vl-2b",
    "qwen2-vl-7b",
    "qwen2.5-vl-7b",
    "qwen3-vl-8b",
];

/// The `config.json` of a built-in model name.
pub fn builtin_config(name: &str) -> Option<Qwen2VlConfig> {
    let ids = json!({"image_token_id": 151655, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "eos_token_id": 151645});
    let qwen2_text = |hidden: usize, inter: usize, heads: usize, kv: usize, vocab: usize| {
        json!({"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": 28, "num_attention_heads": heads, "num_key_value_heads": kv,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})
    };
    let mut config = match name {
        "small" => json!({"model_type": "qwen2_vl", "vocab_size": 4096, "hidden_size": 256,
            "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [8, 12, 12]},
            "vision_config": {"depth": 4, "embed_dim": 128, "mlp_ratio": 4, "num_heads": 4,
                "hidden_size": 256},
            "image_token_id": 4093, "vision_start_token_id": 4094, "vision_end_token_id": 4095}),
        "qwen2-vl-2b" => {
            let mut c = qwen2_text(1536, 8960, 12, 2, 151936);
            c["model_type"] = "qwen2_vl".into();
            c["tie_word_embeddings"] = true.into();
            c["vision_config"] = json!({"depth": 32, "embed_dim": 1280, "mlp_ratio": 4,
                "num_heads": 16, "hidden_size": 1536});
            c
        }
        "qwen2-vl-7b" => {
            let mut c = qwen2_text(3584, 18944, 28, 4, 152064);
            c["model_type"] = "qwen2_vl".into();
            c["vision_config"] = json!({"depth": 32, "embed_dim": 1280, "mlp_ratio": 4,
                "num_heads": 16, "hidden_size": 3584});
            c
        }
        "qwen2.5-vl-7b" => {
            let mut c = qwen2_text(3584, 18944, 28, 4, 152064);
            c["model_type"] = "qwen2_5_vl".into();
            c["vision_config"] = json!({"depth": 32, "hidden_size": 1280,
                "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]});
            c
        }
        "qwen3-vl-8b" => json!({"model_type": "qwen3_vl", "text_config": {
                "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 5e6,
                "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20]}},
            "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                "num_heads": 16, "out_hidden_size": 4096, "patch_size": 16,
                "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}}),
        _ => return None,
    };
    for (k, v) in ids.as_object().unwrap() {
        if config.get(k).is_none() {
            config[k] = v.clone();
        }
    }
    Some(Qwen2VlConfig::from_json(&config).expect("built-in configs are valid"))
}

/// What to time.
#[derive(Debug, Clone)]
pub struct JudgeBench {
    /// Model configuration.
    pub config: Qwen2VlConfig,
    /// Preview side in pixels (both images of a screening prompt, square).
    pub image_side: usize,
    /// Text tokens around the images (the screening prompt is ~150).
    pub text_tokens: usize,
    /// Prompts per batched prefill to time.
    pub batches: Vec<usize>,
    /// Timed repetitions after one warm-up.
    pub iters: usize,
    /// Weight dtype.
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// A reference command speaking the side-by-side protocol
    /// ([`super::side_by_side`]), timed against ours in alternating rounds.
    pub versus: Option<String>,
    /// Side-by-side rounds.
    pub rounds: usize,
}

impl JudgeBench {
    /// (tokens per prompt, image side, dtype as torch names it): what a reference timing
    /// must have timed to be compared with this run.
    pub fn timed_prompt(&self) -> (usize, usize, &'static str) {
        let tokens = prompt(&self.config, self.image_side, self.text_tokens, 0)
            .ids
            .len();
        (tokens, self.image_side, self.dtype.as_str())
    }
}

/// One batch size's timing.
#[derive(Debug, Clone, Serialize)]
pub struct BatchTiming {
    /// Prompts.
    pub batch: usize,
    /// Seconds to prefill them one at a time (the baseline).
    pub sequential_s: f64,
    /// Seconds for one batched prefill of all of them.
    pub batched_s: f64,
    /// `sequential_s / batched_s`.
    pub speedup: f64,
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeBenchResult {
    /// The judge's flash attention checked against the unfused path, before the timings.
    pub attention_check: AttentionCheck,
    /// Model parameters.
    pub parameters: usize,
    /// Tokens per prompt (text + both images).
    pub prompt_tokens: usize,
    /// Seconds to build the random weights.
    pub load_s: f64,
    /// Per batch size.
    pub batches: Vec<BatchTiming>,
    /// Seconds per answer token read after the prefill (one KV-cache step).
    pub step_s: f64,
    /// Seconds for one prompt's prefill.
    pub prefill_s: f64,
    /// Seconds in the vision tower and merger (both images), timed on their own.
    pub vision_s: f64,
    /// Seconds in the text decoder over every token, measured inside one profiled prefill
    /// (the sum of `decoder_parts`).
    pub text_s: f64,
    /// One more vision tower run, profiled: seconds per stage (patch embed, norms, qkv,
    /// rotary, attention, proj, mlp, merger, other), summed over blocks.
    pub vision_parts: Vec<StageTime>,
    /// The text decoder inside one more prefill, profiled: seconds per stage (norms, qkv,
    /// rotary, attention, proj, mlp, other), summed over layers.
    pub decoder_parts: Vec<StageTime>,
    /// The same prefill timed by transformers, when `--reference` named its timing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceTiming>,
    /// Alternating rounds against a reference process, when `--versus` named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side_by_side: Option<SideBySide>,
}

/// One stage of a profile (vision tower or text decoder).
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// Stage name, as the reference script names it too.
    pub stage: String,
    /// Seconds in that stage over the whole tower.
    pub seconds: f64,
}

/// transformers' timing of the same prefill, as `scripts/bench_transformers_judge.py`
/// writes it (the fields read here; the file has more).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceTiming {
    /// Tokens per prompt; must equal ours.
    pub prompt_tokens: usize,
    /// Square image side, pixels; must equal ours.
    pub image_side: usize,
    /// Weight dtype as torch names it (`f32`, `bf16`).
    pub dtype: String,
    /// Seconds per prefill.
    pub prefill_s: f64,
    /// Seconds in the vision tower.
    pub vision_s: f64,
    /// Seconds in the text decoder (in files from older scripts: the prefill minus the
    /// vision tower).
    pub text_s: f64,
    /// transformers' version.
    pub transformers: String,
    /// The attention implementation (`sdpa`).
    pub attention: String,
    /// Seconds per vision stage, named as ours are (absent in files from older scripts).
    #[serde(default)]
    pub vision_parts: std::collections::BTreeMap<String, f64>,
    /// Seconds per text decoder stage, named as ours are (absent in files from older
    /// scripts).
    #[serde(default)]
    pub decoder_parts: std::collections::BTreeMap<String, f64>,
}

impl ReferenceTiming {
    /// Reads a reference timing and checks it timed the prompt `bench` will time.
    pub fn read(path: &std::path::Path, bench: &JudgeBench) -> Result<Self, String> {
        let name = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
        let reference: Self = serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
        let theirs = (
            reference.prompt_tokens,
            reference.image_side,
            reference.dtype.as_str(),
        );
        match prompt_mismatch(theirs, bench.timed_prompt()) {
            Some(why) => Err(format!("{name}: {why}")),
            None => Ok(reference),
        }
    }
}

impl JudgeBenchResult {
    /// The result as a markdown table; `model` and `device` as the user named them.
    pub fn markdown(&self, bench: &JudgeBench, model: &str, device: &str) -> String {
        let mut md = format!(
            "Local judge `{model}` ({:.2}B parameters), {:?} on {device}; screening prompts of {} tokens (two {}px images); random weights built in {:.1} s\n\n| prompts | one at a time (s) | one batched prefill (s) | speed-up |\n|---|---|---|---|\n",
            self.parameters as f64 / 1e9,
            bench.dtype,
            self.prompt_tokens,
            bench.image_side,
            self.load_s
        );
        for b in &self.batches {
            md.push_str(&format!(
                "| {} | {:.3} | {:.3} | {:.2}x |\n",
                b.batch, b.sequential_s, b.batched_s, b.speedup
            ));
        }
        md.push_str(&format!(
            "\nOne prompt's prefill: {:.3} s in the vision tower (both images, timed alone), {:.3} s in the text decoder over all tokens (inside a profiled prefill). One answer token after the prefill (KV cache): {:.4} s.\n",
            self.vision_s, self.text_s, self.step_s
        ));
        md.push_str(&self.attention_check.markdown());
        if let Some(r) = &self.reference {
            md.push_str(&format!(
                "\n| one prompt's prefill | ours (s) | transformers {} ({}) (s) | ours / transformers |\n|---|---|---|---|\n| whole | {:.3} | {:.3} | {:.2}x |\n| vision tower | {:.3} | {:.3} | {:.2}x |\n| text decoder | {:.3} | {:.3} | {:.2}x |\n",
                r.transformers,
                r.attention,
                self.prefill_s,
                r.prefill_s,
                self.prefill_s / r.prefill_s,
                self.vision_s,
                r.vision_s,
                self.vision_s / r.vision_s,
                self.text_s,
                r.text_s,
                self.text_s / r.text_s,
            ));
        }
        let reference = self.reference.as_ref();
        md.push_str(&parts_markdown(
            "One vision tower run, profiled by stage (seconds, all blocks)",
            &self.vision_parts,
            reference.map(|r| &r.vision_parts),
        ));
        md.push_str(&parts_markdown(
            "The text decoder inside one prefill, profiled by stage (seconds, all layers)",
            &self.decoder_parts,
            reference.map(|r| &r.decoder_parts),
        ));
        if let Some(side_by_side) = &self.side_by_side {
            md.push_str(&side_by_side.markdown());
        }
        md
    }
}

/// A profile as a table, beside transformers' where the reference has one (each side from
/// its own single profiled run, so stage sums differ from the timed runs).
fn parts_markdown(
    title: &str,
    ours: &[StageTime],
    theirs: Option<&std::collections::BTreeMap<String, f64>>,
) -> String {
    let theirs = theirs.filter(|t| !t.is_empty());
    let mut md = format!("\n{title}:\n\n");
    md.push_str(match theirs {
        Some(_) => {
            "| stage | ours (s) | transformers (s) | ours / transformers |\n|---|---|---|---|\n"
        }
        None => "| stage | ours (s) |\n|---|---|\n",
    });
    for part in ours {
        let (stage, seconds) = (&part.stage, part.seconds);
        md.push_str(&match theirs.map(|t| t.get(stage)) {
            Some(Some(&their)) => format!(
                "| {stage} | {seconds:.3} | {their:.3} | {:.2}x |\n",
                seconds / their
            ),
            Some(None) => format!("| {stage} | {seconds:.3} | - | - |\n"),
            None => format!("| {stage} | {seconds:.3} |\n"),
        });
    }
    md
}

/// The judge's flash attention against candle's unfused attention at this run's shapes
/// ([`attention_check`]), run before anything is timed.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionCheck {
    /// One row per shape.
    pub rows: Vec<KernelCheckRow>,
    /// Shapes not checked because the kernel is not built for their head dim (they take the
    /// plain path), e.g. `vision: head dim 32`.
    pub not_built: Vec<String>,
    /// Whether a row failed and the kernel was turned off for the timings.
    pub disabled: bool,
    /// Whether the model's forwards use the kernel in this run (CUDA, bf16 / f16, on in
    /// `ICEDIT_CUDA_FUSED` and passing).
    pub in_use: bool,
}

impl AttentionCheck {
    /// The check as a markdown section.
    pub fn markdown(&self) -> String {
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
        let mut md = String::from(
            "\nJudge flash attention against candle's unfused attention on the same random inputs (pass: max |diff| <= tolerance = relative bound x max |unfused|; a failing kernel is turned off before anything is timed):\n\n| attention | inputs | max abs diff | tolerance | pass | kernel (ms) | unfused (ms) | unfused / kernel |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let ratio = match (r.fused_ms, r.unfused_ms) {
                (Some(k), Some(u)) => format!("{:.2}x", u / k),
                _ => "-".into(),
            };
            md.push_str(&format!(
                "| {} | {} | {:.3e} | {:.3e} | {} | {} | {} | {ratio} |\n",
                r.name,
                r.shape,
                r.max_abs_diff,
                r.tolerance,
                if r.pass { "pass" } else { "FAIL" },
                ms(r.fused_ms),
                ms(r.unfused_ms),
            ));
        }
        for n in &self.not_built {
            md.push_str(&format!(
                "\nNot built for {n}: that attention takes the plain path.\n"
            ));
        }
        md.push_str(match (self.disabled, self.in_use) {
            (true, _) => "\nA check failed: the kernel is off for this run's timings.\n",
            (false, true) => "\nThis run's timings use the kernel.\n",
            (false, false) => "\nThis run's timings do not use the kernel (not CUDA bf16/f16, or off in ICEDIT_CUDA_FUSED).\n",
        });
        md
    }
}

/// Checks the judge's flash attention against candle's unfused attention at the bench's
/// shapes: the vision tower (its heads and head dim, the two images of a screening prompt
/// as frames, and as 64-patch windows with a ragged tail; v read inside a qkv-shaped
/// tensor as the tower passes it) and the decoder (its query and key/value heads, a causal
/// prefill of the prompt's tokens, at least 1200 on a GPU, and the last quarter of them
/// after the rest are cached). Off CUDA the kernel side is its CPU reference; an f32 bench
/// checks in bf16. On CUDA each passing shape is timed (1 warm-up + 5 calls) and a failure
/// turns the kernel off for the rest of the run.
pub fn attention_check(bench: &JudgeBench) -> candle_core::Result<AttentionCheck> {
    let (dev, c) = (&bench.device, &bench.config);
    let dtype = match bench.dtype {
        DType::F16 => DType::F16,
        _ => DType::BF16,
    };
    let randn =
        |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype);
    let mut rows = Vec::new();
    let mut not_built = Vec::new();
    let mut check = |name: &str,
                     shape: String,
                     q: &Tensor,
                     k: &Tensor,
                     v: &Tensor,
                     visibility: flash::Visibility|
     -> candle_core::Result<()> {
        rows.push(kernel_check::check(
            dev,
            name,
            tolerance_rel(dtype),
            shape,
            &|| flash::judge_attention(q, k, v, visibility),
            &|| flash::judge_unfused(q, k, v, visibility),
        )?);
        Ok(())
    };

    // The vision tower: two images' patches, as the screening prompt has them.
    let v = &c.vision;
    let (heads, hd) = (v.num_heads, v.head_dim());
    if flash::judge_supports(hd, dtype) {
        let unit = v.patch_size * v.spatial_merge_size;
        let side = (bench.image_side / unit).max(1) * v.spatial_merge_size;
        let frame = side * side;
        let n = 2 * frame;
        let qkv = randn((n, 3, heads, hd))?;
        let part = |i: usize| {
            qkv.narrow(1, i, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .unsqueeze(0)
        };
        // q and k packed (the rotary's output), v a view inside qkv.
        let (q, k, vv) = (part(0)?.contiguous()?, part(1)?.contiguous()?, part(2)?);
        let frames = [0, frame, n];
        let mut windows = vec![0];
        for f in 0..2 {
            let end = (f + 1) * frame;
            while *windows.last().unwrap() < end {
                let next = (windows.last().unwrap() + 64).min(end);
                windows.push(next);
            }
        }
        for (name, segments) in [
            ("vision frames", &frames[..]),
            ("vision windows", &windows[..]),
        ] {
            let shape = format!(
                "[1, {heads}, {n}, {hd}], {} segments (longest {}), {dtype:?}",
                segments.len() - 1,
                segments.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
            );
            let visibility = flash::Visibility {
                segments: Some(segments),
                causal: false,
            };
            check(name, shape, &q, &k, &vv, visibility)?;
        }
    } else {
        not_built.push(format!("the vision tower's head dim {hd}"));
    }

    // The decoder: a causal prefill with grouped heads, and one after a cached prefix.
    let t = &c.text;
    let (heads, kv_heads, hd) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim());
    if flash::judge_supports(hd, dtype) {
        let tokens = prompt(c, bench.image_side, bench.text_tokens, 0).ids.len();
        let len = if dev.is_cuda() {
            tokens.max(1200)
        } else {
            tokens
        };
        let (k, vv) = (
            randn((1, kv_heads, len, hd))?,
            randn((1, kv_heads, len, hd))?,
        );
        let q = randn((1, heads, len, hd))?;
        let causal = flash::Visibility {
            segments: None,
            causal: true,
        };
        let shape = format!(
            "q [1, {heads}, {len}, {hd}], k/v [1, {kv_heads}, {len}, {hd}], causal, {dtype:?}"
        );
        check("decoder prefill", shape, &q, &k, &vv, causal)?;
        let new = (len / 4).max(1);
        let q = q.narrow(2, len - new, new)?.contiguous()?;
        let shape = format!(
            "q [1, {heads}, {new}, {hd}] after {} cached, k/v [1, {kv_heads}, {len}, {hd}], causal, {dtype:?}",
            len - new
        );
        check("decoder prefill after a cache", shape, &q, &k, &vv, causal)?;
    } else {
        not_built.push(format!("the decoder's head dim {hd}"));
    }

    let disabled = rows.iter().any(|r| !r.pass);
    if disabled {
        switch::disable(Kernel::JudgeAttention);
    }
    let probe = Tensor::zeros(1, bench.dtype, dev)?;
    let in_use = !rows.is_empty() && switch::use_kernel(Kernel::JudgeAttention, &probe);
    Ok(AttentionCheck {
        rows,
        not_built,
        disabled,
        in_use,
    })
}

/// A screening-shaped prompt: text, two images (source and preview), text.
fn prompt(config: &Qwen2VlConfig, side: usize, text_tokens: usize, seed: u32) -> EncodedPrompt {
    let v = &config.vision;
    let unit = v.patch_size * v.spatial_merge_size;
    let grid = (side / unit).max(1) * v.spatial_merge_size;
    let image = |k: u32| PreparedImage {
        pixel_values: (0..grid * grid * v.patch_dim())
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761) ^ (seed + k)) % 2000) as f32 / 1000.0 - 1.0
            })
            .collect(),
        grid_thw: [1, grid, grid],
    };
    let images = vec![image(0), image(1)];
    let text = |n: usize, salt: u32| -> Vec<u32> {
        // Plain tokens: the special ids sit at the top of the vocabulary.
        let plain = (config.text.vocab_size as u32 - 16).min(100_000);
        (0..n as u32)
            .map(|i| (i * 7919 + salt + seed) % plain)
            .collect()
    };
    let mut ids = text(text_tokens / 4, 1);
    for image in &images {
        ids.push(config.vision_start_token_id);
        ids.extend(std::iter::repeat_n(
            config.image_token_id,
            image.token_count(v.spatial_merge_size),
        ));
        ids.push(config.vision_end_token_id);
    }
    ids.extend(text(text_tokens - text_tokens / 4, 2));
    EncodedPrompt { ids, images }
}

/// Runs the benchmark; `reference` is carried into the result for the comparison table.
pub fn run(
    bench: &JudgeBench,
    reference: Option<ReferenceTiming>,
) -> candle_core::Result<JudgeBenchResult> {
    // The reference loads its model while we build ours; it idles until asked.
    let mut versus = bench
        .versus
        .as_deref()
        .map(ReferenceProcess::spawn)
        .transpose()?;
    // Before anything is timed: a failing kernel is turned off for the timings.
    let attention_check = attention_check(bench)?;
    let start = Instant::now();
    let random = RandomWeights::default();
    let counter = random.elements.clone();
    let vb = VarBuilder::from_backend(Box::new(random), bench.dtype, bench.device.clone());
    let model = Qwen2Vl::new(&bench.config, KeyLayout::Classic, vb)?;
    bench.device.synchronize()?;
    let load_s = start.elapsed().as_secs_f64();
    let parameters = counter.load(std::sync::atomic::Ordering::Relaxed);

    let max = bench.batches.iter().copied().max().unwrap_or(1);
    // Equal lengths (same text length, same image size), different content.
    let prompts: Vec<EncodedPrompt> = (0..max as u32)
        .map(|s| prompt(&bench.config, bench.image_side, bench.text_tokens, s))
        .collect();
    let one = &prompts[0];
    let versus_info = match versus.as_mut() {
        Some(process) => {
            let (tokens, side, dtype) = bench.timed_prompt();
            Some(process.ready(tokens, side, dtype)?)
        }
        None => None,
    };
    let mut prefill_s = None;
    let mut batches = Vec::new();
    for &batch in &bench.batches {
        let group = &prompts[..batch];
        let sequential_s = timed(&bench.device, bench.iters, || {
            for p in group {
                model.prefill(std::slice::from_ref(p))?;
            }
            Ok(())
        })?;
        // A batch of one is one prompt's prefill: the same call, timed once.
        let batched_s = if batch == 1 {
            sequential_s
        } else {
            timed(&bench.device, bench.iters, || {
                model.prefill(group).map(|_| ())
            })?
        };
        if batch == 1 {
            prefill_s = Some(sequential_s);
        }
        tracing::info!(batch, sequential_s, batched_s, "judge prefill");
        batches.push(BatchTiming {
            batch,
            sequential_s,
            batched_s,
            speedup: sequential_s / batched_s,
        });
    }
    let prefill_s = match prefill_s {
        Some(s) => s,
        None => timed(&bench.device, bench.iters, || {
            model.prefill(std::slice::from_ref(one)).map(|_| ())
        })?,
    };
    let vision_s = timed(&bench.device, bench.iters, || {
        model.vision_tokens(one).map(|_| ())
    })?;
    let stages = |parts: Vec<(&str, f64)>| -> Vec<StageTime> {
        parts
            .into_iter()
            .map(|(stage, seconds)| StageTime {
                stage: stage.to_string(),
                seconds,
            })
            .collect()
    };
    let vision_parts = stages(model.vision_profile(one)?);
    let decoder_parts = stages(model.decoder_profile(one)?);
    let text_s = decoder_parts.iter().map(|p| p.seconds).sum();
    let (_, mut sessions) = model.prefill(&prompts[..1])?;
    let session = sessions.remove(0);
    let step_s = timed(&bench.device, bench.iters, || {
        model.extend(&mut session.clone(), &[15]).map(|_| ())
    })?;
    let side_by_side = match (versus.as_mut(), versus_info) {
        // No warm-up per round: the model ran above, as the reference warmed up before
        // its ready line.
        (Some(process), Some(info)) => Some(run_rounds(bench.rounds, process, info, || {
            bench.device.synchronize()?;
            let start = Instant::now();
            model.prefill(std::slice::from_ref(one))?;
            bench.device.synchronize()?;
            Ok(start.elapsed().as_secs_f64())
        })?),
        _ => None,
    };
    Ok(JudgeBenchResult {
        attention_check,
        parameters,
        prompt_tokens: prompts[0].ids.len(),
        load_s,
        batches,
        step_s,
        vision_s,
        prefill_s,
        text_s,
        vision_parts,
        decoder_parts,
        reference,
        side_by_side,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_configs_are_valid_and_small_runs() {
        for name in MODELS {
            assert!(builtin_config(name).is_some(), "{name}");
        }
        let seven = builtin_config("qwen2-vl-7b").unwrap();
        assert_eq!(seven.text.head_dim(), 128);
        let bench = JudgeBench {
            config: builtin_config("small").unwrap(),
            image_side: 56,
            text_tokens: 20,
            batches: vec![1, 2],
            iters: 1,
            dtype: DType::F32,
            device: Device::Cpu,
            versus: None,
            rounds: 0,
        };
        let result = run(&bench, None).unwrap();
        // 20 text + 2 x (2 markers + 4 image tokens).
        assert_eq!(result.prompt_tokens, 32);
        assert_eq!(result.batches.len(), 2);
        assert!(result
            .batches
            .iter()
            .all(|b| b.batched_s > 0.0 && b.speedup > 0.0));
        assert!(result.parameters > 1_000_000);
        // The small config's vision heads (32 wide) are not built; its decoder's (64) are.
        let check = &result.attention_check;
        assert_eq!(check.not_built, ["the vision tower's head dim 32"]);
        assert_eq!(check.rows.len(), 2);
        assert!(check.rows.iter().all(|r| r.pass), "{check:?}");
        assert!(!check.disabled && !check.in_use);
        assert!(result.vision_s > 0.0 && result.vision_s.is_finite());
        // The profile names the stages the reference script names, each timed.
        let stages: Vec<&str> = result
            .vision_parts
            .iter()
            .map(|p| p.stage.as_str())
            .collect();
        assert_eq!(
            stages,
            [
                "patch embed",
                "other",
                "norms",
                "qkv",
                "rotary",
                "attention",
                "proj",
                "mlp",
                "merger"
            ]
        );
        assert!(result.vision_parts.iter().all(|p| p.seconds >= 0.0));
    }

    #[test]
    fn a_reference_timing_must_match_the_prompt_and_is_compared() {
        let bench = JudgeBench {
            config: builtin_config("small").unwrap(),
            image_side: 56,
            text_tokens: 20,
            batches: vec![1],
            iters: 1,
            dtype: DType::F32,
            device: Device::Cpu,
            versus: None,
            rounds: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tf.json");
        let write = |tokens: usize, dtype: &str| {
            let body = json!({
                "model": "small", "prompt_tokens": tokens, "image_side": 56, "dtype": dtype,
                "prefill_s": 2.0, "vision_s": 1.5, "text_s": 0.5,
                "transformers": "5.25.0", "attention": "sdpa",
                "vision_parts": {"mlp": 0.5, "patch embed": 0.01}
            });
            std::fs::write(&path, body.to_string()).unwrap();
        };
        write(33, "f32");
        let err = ReferenceTiming::read(&path, &bench).unwrap_err();
        assert!(
            err.contains("tf.json") && err.contains("33 tokens"),
            "{err}"
        );
        write(32, "bf16");
        let err = ReferenceTiming::read(&path, &bench).unwrap_err();
        assert!(err.contains("dtype bf16"), "{err}");
        write(32, "f32");
        let reference = ReferenceTiming::read(&path, &bench).unwrap();
        let result = run(&bench, Some(reference)).unwrap();
        let md = result.markdown(&bench, "small", "cpu");
        let whole = format!(
            "| whole | {:.3} | 2.000 | {:.2}x |",
            result.prefill_s,
            result.prefill_s / 2.0
        );
        assert!(
            md.contains("transformers 5.25.0 (sdpa)") && md.contains(&whole),
            "{md}"
        );
        let mlp = result
            .vision_parts
            .iter()
            .find(|p| p.stage == "mlp")
            .unwrap();
        let row = format!(
            "| mlp | {:.3} | 0.500 | {:.2}x |",
            mlp.seconds,
            mlp.seconds / 0.5
        );
        assert!(md.contains(&row), "{md}");
        // A stage the reference did not time is shown without a ratio.
        assert!(md.contains("| qkv | ") && md.contains(" | - | - |"), "{md}");
    }

    /// A Qwen2.5-VL of the 7B's head dims (vision 80 with windows, decoder 128 with grouped
    /// heads), small in every other way.
    fn head_dims_of_the_7b() -> Qwen2VlConfig {
        let config = json!({"model_type": "qwen2_5_vl", "vocab_size": 4096, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rope_scaling": {"mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 2, "hidden_size": 160, "intermediate_size": 256,
                "num_heads": 2, "out_hidden_size": 256, "window_size": 112,
                "fullatt_block_indexes": [1]},
            "image_token_id": 4093, "vision_start_token_id": 4094, "vision_end_token_id": 4095});
        Qwen2VlConfig::from_json(&config).unwrap()
    }

    #[test]
    fn the_attention_check_covers_the_7b_head_dims_on_the_cpu_reference() {
        let bench = JudgeBench {
            config: head_dims_of_the_7b(),
            image_side: 224,
            text_tokens: 20,
            batches: vec![1],
            iters: 1,
            dtype: DType::BF16,
            device: Device::Cpu,
            versus: None,
            rounds: 0,
        };
        let check = attention_check(&bench).unwrap();
        let names: Vec<&str> = check.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "vision frames",
                "vision windows",
                "decoder prefill",
                "decoder prefill after a cache"
            ]
        );
        assert!(
            check.rows.iter().all(|r| r.pass && r.fused_ms.is_none()),
            "{check:?}"
        );
        assert!(check.not_built.is_empty() && !check.disabled);
        // Two 224 px images: 256 patches each, as 64-patch windows.
        assert!(check.rows[1]
            .shape
            .contains("[1, 2, 512, 80], 8 segments (longest 64)"));
        let md = check.markdown();
        assert!(
            md.contains("| vision windows |") && md.contains("| pass |"),
            "{md}"
        );
    }

    #[test]
    fn the_model_with_the_judge_kernel_matches_the_plain_path() {
        // bf16 on the CPU: the kernel's CPU reference through the model's wiring (the
        // tower's v read inside qkv, windows and frames; the decoder's causal prefill, also
        // after a cached prompt) against the tensor path.
        let config = head_dims_of_the_7b();
        let vb =
            VarBuilder::from_backend(Box::new(RandomWeights::default()), DType::BF16, Device::Cpu);
        let model = Qwen2Vl::new(&config, KeyLayout::Classic, vb).unwrap();
        let p = prompt(&config, 224, 20, 0);
        let run = |kernels: switch::Kernels| {
            // Forced on this thread: the forward enters rayon's pool, so start there.
            rayon::scope(|_| {
                switch::forced(kernels, || {
                    let (logits, mut sessions) = model.prefill(std::slice::from_ref(&p))?;
                    let after = model.extend(&mut sessions[0], &[5, 6, 7])?;
                    Ok::<_, candle_core::Error>((logits, after))
                })
            })
            .unwrap()
        };
        let on = run(switch::Kernels::parse("judge_attention").unwrap());
        let off = run(switch::Kernels::NONE);
        for (a, b) in [(&on.0, &off.0), (&on.1, &off.1)] {
            let scale = b
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            eprintln!("judge kernel vs plain: max diff {diff}, max |logit| {scale}");
            // The paths round differently (the plain one rounds its scores to bf16): a zero
            // difference would mean the kernel was never reached.
            assert!(diff > 0.0 && diff <= scale / 32.0, "{diff} vs {scale}");
        }
    }
}
