//! The memory plan: before anything is loaded, what an edit will hold on its device at its
//! peak (weights of each model, working memory of each phase), compared with what the
//! device has free. A plan that does not fit is refused with the biggest parts named and
//! the options that would fit, instead of dying with an out-of-memory error after minutes
//! of loading.
//!
//! The phases of one edit, in the order the generator runs them (see `generate::flux`):
//! encode the prompt (T5 and CLIP resident, then dropped), encode the diptych with the VAE,
//! denoise (transformer forwards while the judge screens previews), decode, and with
//! `--refine` the refine's forwards and its VAE passes. The judge loads on its first call,
//! after the text encoders were dropped; in a batch the next item's prompt is encoded while
//! the judge is resident, so there both count together.
//!
//! Each part of the plan says which phases it is held in ([`PlanPart::held_in`]), and a
//! phase's total is the sum of those parts: the peak's parts, which a refusal names, are
//! exactly what is resident there.

pub mod available;
pub mod footprint;
pub mod measured;
pub mod peek;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use serde::Serialize;

use crate::models::flux::step_cache::cache_bytes;
use crate::models::flux::vae::VaeConfig;
use crate::models::flux::vae_tiling::VaeTiling;
use crate::models::flux::FluxConfig;
use crate::models::step_cache::StepCache;
use footprint::{
    tiled_vae_activation_bytes, transformer_activation_bytes, transformer_weight_bytes,
    vae_activation_bytes, vae_parameters, WeightFormat,
};

/// T5-XXL encoder parameters (FLUX.1's `text_encoder_2`: 9.52 GB in bf16).
pub const T5_XXL_PARAMETERS: usize = 4_762_310_656;
/// CLIP ViT-L/14 text model parameters (FLUX.1's `text_encoder`).
pub const CLIP_L_PARAMETERS: usize = 123_060_480;

/// Where a model's memory lives relative to the generator's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// On the generator's device (counted).
    Device,
    /// Elsewhere (another GPU, the CPU while the generator is on a GPU, or a remote API).
    Elsewhere,
}

/// A local judge's size, as far as the plan knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeFootprint {
    /// The preset's name or model.
    pub name: String,
    /// Parameters of its checkpoint.
    pub parameters: usize,
    /// Bytes per parameter in its dtype.
    pub bytes_per_parameter: usize,
    /// Working memory of one screening batch.
    pub working_bytes: usize,
    /// Where it runs.
    pub placement: Placement,
}

/// Everything the plan depends on.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Transformer hyper-parameters.
    pub transformer: FluxConfig,
    /// Autoencoder hyper-parameters.
    pub vae: VaeConfig,
    /// How VAE passes larger than a tile are tiled (`--vae-tiling`); `None`: never.
    pub vae_tiling: Option<VaeTiling>,
    /// How the transformer's linear weights are held.
    pub format: WeightFormat,
    /// Compute dtype of the transformer and VAE.
    pub dtype: DType,
    /// Whether the generator runs on a CUDA device (its convolutions unfold their input).
    pub cuda: bool,
    /// Candidates per forward.
    pub batch: usize,
    /// Source panel `(width, height)`; the diptych is twice as wide.
    pub panel: (usize, usize),
    /// T5 tokens.
    pub t5_tokens: usize,
    /// T5 and CLIP parameters, and where they run (they run in f32 on a CPU).
    pub text_parameters: usize,
    /// Where the text encoders run.
    pub text_placement: Placement,
    /// The text encoders run on the CPU beside a generator on a GPU (`--text-device cpu`):
    /// their share is held in host memory, in f32 ([`Self::host_text_bytes`]).
    pub text_on_host: bool,
    /// Host memory available to text encoders on the CPU (`--host-memory-budget`, else
    /// MemAvailable; `None`: unknown): `--text-device cpu` is advised only where they fit.
    pub host_available: Option<usize>,
    /// Bytes of a quantized T5 file (`--t5` GGUF), held as stored instead of
    /// `text_parameters` in the compute dtype (CLIP's share is then counted dense).
    pub t5_file_bytes: Option<usize>,
    /// Bytes of the LoRA file (its side branches or experts stay beside the weights).
    pub lora_bytes: usize,
    /// The local judge, if any.
    pub judge: Option<JudgeFootprint>,
    /// A batch encodes later items' prompts while the judge is resident.
    pub text_with_judge: bool,
    /// The transformer loads after the first prompt is encoded (T5 on its device), so the
    /// first prompt phase holds T5 without it.
    pub transformer_after_prompt: bool,
    /// T5 and CLIP stay loaded for the whole run (`--keep-text-encoders`), not only while a
    /// prompt is encoded.
    pub text_kept: bool,
    /// The transformer's weights are stored dense, so `--quantize` can pick any format (a
    /// GGUF or fp8 file is held as stored).
    pub requantizable: bool,
    /// The hi-res refine's panel `(width, height)`, when the pick is refined (`--refine`):
    /// one candidate's forwards and a VAE pass at that size.
    pub refine_panel: Option<(usize, usize)>,
    /// The flag that sets the refine, for the advice: `--refine` (edit, batch, eval) or
    /// `--max-refine` (serve, where 0 turns refines off).
    pub refine_flag: &'static str,
    /// The step cache of completions (`--cache`; none: no part).
    pub step_cache: StepCache,
    /// Candidates holding a step cache at once (those completed together, M).
    pub cached_candidates: usize,
}

/// A phase of one edit, in the order the generator runs them (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// T5 and CLIP encode the prompt.
    EncodePrompt,
    /// The VAE encodes the diptych.
    EncodeDiptych,
    /// Transformer forwards, the judge screening previews.
    Denoise,
    /// The VAE decodes a candidate (the judge scoring it).
    Decode,
    /// The refine's forwards, one candidate at the refine size (`--refine`).
    RefineDenoise,
    /// The refine's VAE passes at the refine size (`--refine`).
    Refine,
}

impl Phase {
    /// The phase as the plan prints it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::EncodePrompt => "encode prompt",
            Phase::EncodeDiptych => "encode diptych",
            Phase::Denoise => "denoise",
            Phase::Decode => "decode",
            Phase::RefineDenoise => "refine denoise",
            Phase::Refine => "refine",
        }
    }
}

/// One line of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanPart {
    /// What it is.
    pub name: String,
    /// Bytes on the generator's device.
    pub bytes: usize,
    /// When it is resident, in words.
    pub when: String,
    /// The phases it is held in: each phase's total is the sum of the parts held in it.
    pub held_in: Vec<Phase>,
    /// Whether it is held in the peak's phase (what a refusal names as the biggest parts).
    #[serde(skip)]
    pub at_peak: bool,
}

impl PlanPart {
    /// A part of `bytes` held in `phases` (`at_peak` is set once the peak is known).
    fn held(
        name: impl Into<String>,
        bytes: usize,
        when: impl Into<String>,
        phases: &[Phase],
    ) -> Self {
        Self {
            name: name.into(),
            bytes,
            when: when.into(),
            held_in: phases.to_vec(),
            at_peak: false,
        }
    }
}

/// The plan: the parts and the peak.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    /// Every part, weights first.
    pub parts: Vec<PlanPart>,
    /// The largest sum of parts resident at once.
    pub peak_bytes: usize,
    /// The phase at which the peak falls.
    pub peak_phase: String,
    /// Each phase the edit runs, in order, with the bytes of the parts held in it.
    pub phases: Vec<(Phase, usize)>,
    /// Host memory of T5 and CLIP encoding on the CPU beside a GPU generator (0 when they
    /// do not): not on the device, so not in its peak; checked by [`check_host`].
    pub host_text_bytes: usize,
}

/// Fixed costs: on CUDA the cuBLAS workspaces and the allocator's slack beside the context
/// (the context itself is made before free memory is read); on the CPU the process itself,
/// and in a GPU build the CUDA libraries it has loaded ([`GPU_BUILD_LIBRARIES_ON_HOST`]).
/// The CPU figure was fitted with the activation constants of [`footprint`].
pub fn overhead_bytes(cuda: bool) -> usize {
    if cuda {
        600 << 20
    } else {
        (56 << 20) + GPU_BUILD_LIBRARIES_ON_HOST
    }
}

/// Host memory a GPU build holds beyond the CPU build's from the start (cuBLAS, cuBLASLt,
/// NVRTC, cuRAND and the CUDA runtime are linked and loaded; cuDNN too with `cudnn`), which
/// a run of that build on the CPU carries. Measured on a machine without a GPU (CUDA 13.0
/// and cuDNN 9 wheels, 2026-12-07) as the peak resident memory of tests/plan.rs' first
/// point (a small `bench flux`): 154-172 MiB in the CPU build, 329 MiB in the release
/// `cuda` build, 357 MiB in the release `cudnn` build; with these figures the `cudnn`
/// build's tests/plan.rs holds every point within its 15% (-4% to +11%). 0 in a CPU build.
pub const GPU_BUILD_LIBRARIES_ON_HOST: usize = if cfg!(feature = "cudnn") {
    185 << 20
} else if cfg!(feature = "cuda") {
    157 << 20
} else {
    0
};

impl PlanRequest {
    /// Image tokens of the diptych.
    pub fn image_tokens(&self) -> usize {
        self.tokens_of(self.panel)
    }

    /// Packed image tokens of the diptych of a `(width, height)` panel.
    fn tokens_of(&self, panel: (usize, usize)) -> usize {
        let f = self.vae.downscale() * self.transformer.patch_size.max(1) * 2;
        (2 * panel.0 / f) * (panel.1 / f)
    }

    /// Working memory of a VAE pass over the diptych of a `(width, height)` panel, and
    /// whether it is tiled (when tiling is on and the diptych exceeds the tile).
    pub fn vae_pass(&self, panel: (usize, usize)) -> (usize, bool) {
        let (height, width) = (panel.1, 2 * panel.0);
        match &self.vae_tiling {
            Some(t) if t.applies(height, width) => (
                tiled_vae_activation_bytes(&self.vae, self.dtype, (height, width), self.cuda, t),
                true,
            ),
            _ => (
                vae_activation_bytes(&self.vae, self.dtype, height * width, self.cuda),
                false,
            ),
        }
    }

    /// Bytes of the step caches held at once during completions: `cached_candidates` times
    /// one candidate's cache (0 when the cache is off).
    pub fn step_cache_bytes(&self) -> usize {
        self.cached_candidates
            * cache_bytes(
                &self.transformer,
                &self.step_cache,
                self.image_tokens(),
                self.t5_tokens,
                self.dtype,
            )
    }

    /// Bytes of T5 and CLIP (weights and working memory) on the CPU, f32 as they run there
    /// (a `--t5` GGUF file as stored), whether or not they run there now.
    fn text_bytes_on_cpu(&self) -> usize {
        let weights = match self.t5_file_bytes {
            Some(t5) => t5 + CLIP_L_PARAMETERS * 4,
            None => self.text_parameters * 4,
        };
        weights + self.t5_tokens * 10240 * 4 * 4
    }

    /// Bytes of host memory T5 and CLIP hold when they encode on the CPU beside a GPU
    /// generator (0 otherwise: on the generator's device they are part of its plan).
    pub fn host_text_bytes(&self) -> usize {
        if self.text_on_host {
            self.text_bytes_on_cpu()
        } else {
            0
        }
    }

    /// The phases this request runs, in order: a refine's two only with `--refine`.
    pub fn phases(&self) -> Vec<Phase> {
        let mut phases = vec![
            Phase::EncodePrompt,
            Phase::EncodeDiptych,
            Phase::Denoise,
            Phase::Decode,
        ];
        if self.refine_panel.is_some() {
            phases.extend([Phase::RefineDenoise, Phase::Refine]);
        }
        phases
    }

    /// The plan: every part with the phases it is held in, and each phase's total the sum
    /// of the parts held in it (so the parts a refusal names at the peak are exactly those
    /// resident there).
    pub fn plan(&self) -> MemoryPlan {
        use Phase::*;
        let e = self.dtype.size_in_bytes();
        let on = |p: Placement, bytes: usize| if p == Placement::Device { bytes } else { 0 };
        let phases = self.phases();
        let every: Vec<Phase> = phases.clone();
        let after_prompt: Vec<Phase> = phases
            .iter()
            .copied()
            .filter(|&p| p != EncodePrompt)
            .collect();
        // The transformer (and the LoRA beside it) is read after the first prompt is encoded
        // when T5 shares its device; a batch's later prompts find it loaded.
        let with_transformer = if self.transformer_after_prompt && !self.text_with_judge {
            after_prompt.clone()
        } else {
            every.clone()
        };
        let transformer = transformer_weight_bytes(&self.transformer, self.format, self.dtype);
        let vae = vae_parameters(&self.vae) * e;
        // Text encoders run in f32 on a CPU, in the compute dtype on a GPU.
        let text_e = if self.cuda { e } else { 4 };
        let text = on(
            self.text_placement,
            match self.t5_file_bytes {
                Some(t5) => t5 + CLIP_L_PARAMETERS * text_e,
                None => self.text_parameters * text_e,
            },
        );
        // T5's working memory: a few [tokens, 4096 x 2.5] activations, small beside it.
        let text_work = on(self.text_placement, self.t5_tokens * 10240 * 4 * text_e);
        let forward = transformer_activation_bytes(
            &self.transformer,
            self.format,
            self.dtype,
            self.batch,
            self.image_tokens(),
            self.t5_tokens,
            self.cuda,
        );
        // Completions hold their candidates' step caches beside each forward.
        let caches = self.step_cache_bytes();
        let (vae_pass, vae_tiled) = self.vae_pass(self.panel);
        let overhead = overhead_bytes(self.cuda);

        let mut parts = vec![PlanPart::held(
            format!("transformer weights ({})", self.format.name()),
            transformer,
            if with_transformer.contains(&EncodePrompt) {
                "always"
            } else {
                "once the first prompt is encoded"
            },
            &with_transformer,
        )];
        parts.push(PlanPart::held("VAE weights", vae, "always", &every));
        if self.lora_bytes > 0 {
            parts.push(PlanPart::held(
                "LoRA",
                self.lora_bytes,
                if with_transformer.contains(&EncodePrompt) {
                    "always"
                } else {
                    "with the transformer"
                },
                &with_transformer,
            ));
        }
        // T5 and CLIP kept loaded sit beside every later phase too.
        let text_phases = if self.text_kept {
            every.clone()
        } else {
            vec![EncodePrompt]
        };
        parts.push(PlanPart::held(
            "T5 + CLIP weights",
            text,
            if text == 0 {
                "not on this device"
            } else if self.text_kept {
                "always (--keep-text-encoders)"
            } else {
                "while encoding the prompt"
            },
            &text_phases,
        ));
        parts.push(PlanPart::held(
            "T5 + CLIP working memory",
            text_work,
            if text_work == 0 {
                "not on this device"
            } else {
                "while encoding the prompt"
            },
            &[EncodePrompt],
        ));
        if let Some(j) = &self.judge {
            let judge = on(j.placement, j.parameters * j.bytes_per_parameter);
            // It loads on its first call (a preview screened while denoising); a batch
            // encodes its later prompts, and prepares their diptychs, with it loaded.
            let judge_phases: Vec<Phase> = if self.text_with_judge {
                every.clone()
            } else {
                phases
                    .iter()
                    .copied()
                    .filter(|p| !matches!(p, EncodePrompt | EncodeDiptych))
                    .collect()
            };
            parts.push(PlanPart::held(
                format!("judge weights ({})", j.name),
                judge,
                if judge == 0 {
                    "not on this device"
                } else {
                    "from the first judge call"
                },
                &judge_phases,
            ));
            parts.push(PlanPart::held(
                "judge working memory",
                on(j.placement, j.working_bytes),
                "while screening and scoring",
                &[Denoise, Decode],
            ));
        }
        parts.push(PlanPart::held(
            format!("transformer forward (batch {})", self.batch),
            forward,
            "each denoising step",
            &[Denoise],
        ));
        if caches > 0 {
            parts.push(PlanPart::held(
                format!(
                    "step caches ({}, {} candidate{})",
                    self.step_cache,
                    self.cached_candidates,
                    if self.cached_candidates == 1 { "" } else { "s" }
                ),
                caches,
                "completions",
                &[Denoise],
            ));
        }
        let tiled = |on: bool| if on { " (tiled)" } else { "" };
        let tiles = |on: bool, when: &str| match (&self.vae_tiling, on) {
            (Some(t), true) => format!("{when}, in {} px tiles", t.tile),
            _ => when.to_string(),
        };
        parts.push(PlanPart::held(
            format!(
                "VAE pass ({}x{} diptych){}",
                2 * self.panel.0,
                self.panel.1,
                tiled(vae_tiled)
            ),
            vae_pass,
            tiles(vae_tiled, "encoding the diptych, decoding a candidate"),
            &[EncodeDiptych, Decode],
        ));
        // The refine: one candidate at the refine size, its diptych encoded and decoded
        // there, after the edit (the judge still loaded).
        if let Some(panel) = self.refine_panel {
            let forward = transformer_activation_bytes(
                &self.transformer,
                self.format,
                self.dtype,
                1,
                self.tokens_of(panel),
                self.t5_tokens,
                self.cuda,
            );
            let (vae_pass, refine_tiled) = self.vae_pass(panel);
            parts.push(PlanPart::held(
                format!(
                    "refine forward ({}x{} diptych, batch 1)",
                    2 * panel.0,
                    panel.1
                ),
                forward,
                "each refine step",
                &[RefineDenoise],
            ));
            parts.push(PlanPart::held(
                format!(
                    "refine VAE pass ({}x{} diptych){}",
                    2 * panel.0,
                    panel.1,
                    tiled(refine_tiled)
                ),
                vae_pass,
                tiles(refine_tiled, "encoding and decoding the refine"),
                &[Refine],
            ));
        }
        parts.push(PlanPart::held(
            "runtime overhead",
            overhead,
            "always",
            &every,
        ));

        let phase_bytes: Vec<(Phase, usize)> = phases
            .iter()
            .map(|&phase| {
                let held = parts.iter().filter(|p| p.held_in.contains(&phase));
                (phase, held.map(|p| p.bytes).sum())
            })
            .collect();
        // The last of equal totals, as the phases run (a refine's VAE pass over its forward).
        let (peak, peak_bytes) = *phase_bytes
            .iter()
            .max_by_key(|(_, bytes)| *bytes)
            .expect("an edit has phases");
        for part in &mut parts {
            part.at_peak = part.held_in.contains(&peak);
        }
        MemoryPlan {
            parts,
            peak_bytes,
            peak_phase: peak.name().to_string(),
            phases: phase_bytes,
            host_text_bytes: self.host_text_bytes(),
        }
    }

    /// Changes a user could make that bring the peak under `available` bytes, as flags:
    /// each single change that fits on its own (quantizing dense weights, a smaller batch,
    /// T5 on the CPU, the judge elsewhere); when none does, the first combination that fits,
    /// adding them in that order (most memory for least speed first).
    pub fn fixes(&self, available: usize) -> Vec<String> {
        let fits = |r: &PlanRequest| r.plan().peak_bytes <= available;
        let steps = self.fix_steps();
        // Each single change that fits, the first (the gentlest) of each kind only: a
        // 512 px tile that fits makes a 256 px one needless advice.
        let mut singles: Vec<String> = Vec::new();
        for (flag, apply) in &steps {
            let kind = flag.split(' ').next().unwrap_or_default();
            let known = singles.iter().any(|s| s.split(' ').next() == Some(kind));
            if !(known && kind.starts_with("--")) && fits(&apply(self.clone())) {
                singles.push(flag.clone());
            }
        }
        if !singles.is_empty() {
            return singles;
        }
        // The first prefix of the steps that fits, each step replacing an earlier one of
        // its kind (a later quantization, batch size or tile supersedes the earlier).
        let kind = |i: usize| steps[i].0.split(' ').next().unwrap_or_default().to_string();
        let apply_all =
            |chosen: &[usize]| chosen.iter().fold(self.clone(), |r, &i| (steps[i].1)(r));
        let mut chosen: Vec<usize> = Vec::new();
        for i in 0..steps.len() {
            let k = kind(i);
            chosen.retain(|&j| !(k.starts_with("--") && kind(j) == k));
            chosen.push(i);
            if fits(&apply_all(&chosen)) {
                // Then without the steps it does not need, so that no flag is advised that
                // changes nothing (T5 on the CPU when the peak is the decode).
                let mut j = 0;
                while j < chosen.len() {
                    let mut fewer = chosen.clone();
                    fewer.remove(j);
                    if fits(&apply_all(&fewer)) {
                        chosen = fewer;
                    } else {
                        j += 1;
                    }
                }
                let flags: Vec<&str> = chosen.iter().map(|&i| steps[i].0.as_str()).collect();
                return vec![flags.join(" ")];
            }
        }
        Vec::new()
    }

    /// The changes [`Self::fixes`] tries, each with how it changes a request. Batch sizes
    /// halve down to the largest that fits alone, or 1.
    #[allow(clippy::type_complexity)]
    fn fix_steps(&self) -> Vec<(String, Box<dyn Fn(PlanRequest) -> PlanRequest>)> {
        let mut steps: Vec<(String, Box<dyn Fn(PlanRequest) -> PlanRequest>)> = Vec::new();
        // T5 on the CPU, where the host has room for it in f32.
        let host_room = self
            .host_available
            .is_none_or(|host| self.text_bytes_on_cpu() <= host);
        if self.cuda && self.text_placement == Placement::Device && host_room {
            steps.push((
                "--text-device cpu".into(),
                Box::new(|r| PlanRequest {
                    text_placement: Placement::Elsewhere,
                    text_on_host: true,
                    ..r
                }),
            ));
        }
        if self.text_kept && self.text_placement == Placement::Device {
            steps.push((
                "without --keep-text-encoders".into(),
                Box::new(|r| PlanRequest {
                    text_kept: false,
                    ..r
                }),
            ));
        }
        // Lighter formats than the one asked for; a GGUF or fp8 file is held as stored.
        let lighter: &[(&str, GgmlDType)] = match self.format {
            _ if !self.requantizable => &[],
            WeightFormat::Dense => &[("q8_0", GgmlDType::Q8_0), ("q4_k", GgmlDType::Q4K)],
            WeightFormat::Fp8 | WeightFormat::Quantized(GgmlDType::Q8_0) => {
                &[("q4_k", GgmlDType::Q4K)]
            }
            WeightFormat::Quantized(_) => &[],
        };
        for &(flag, t) in lighter {
            steps.push((
                format!("--quantize {flag}"),
                Box::new(move |r| PlanRequest {
                    format: WeightFormat::Quantized(t),
                    ..r
                }),
            ));
        }
        let mut batch = self.batch / 2;
        while batch >= 1 {
            steps.push((
                format!("--batch-size {batch}"),
                Box::new(move |r| PlanRequest { batch, ..r }),
            ));
            batch /= 2;
        }
        // Tiled VAE passes, and smaller tiles (halving down to the smallest that tiles),
        // where that lowers the peak: the VAE pass of a large diptych is often it.
        let untiled = self.vae_tiling.is_none();
        let mut tilings = Vec::new();
        let mut tiling = match &self.vae_tiling {
            None => Some(VaeTiling::of_config(&self.vae)),
            Some(t) => Some(VaeTiling {
                tile: t.tile / 2,
                ..*t
            }),
        };
        while let Some(t) = tiling.filter(|t| t.check(self.vae.downscale()).is_ok()) {
            let flag = match (untiled, tilings.is_empty()) {
                (true, true) => "--vae-tiling on".to_string(),
                (true, false) => format!("--vae-tiling on --vae-tile {}", t.tile),
                (false, _) => format!("--vae-tile {}", t.tile),
            };
            tilings.push((flag, t));
            tiling = Some(VaeTiling {
                tile: t.tile / 2,
                ..t
            });
        }
        let mut lowest = self.plan().peak_bytes;
        for (flag, tiling) in tilings {
            let tiled = PlanRequest {
                vae_tiling: Some(tiling),
                ..self.clone()
            };
            let peak = tiled.plan().peak_bytes;
            if peak < lowest {
                lowest = peak;
                steps.push((
                    flag,
                    Box::new(move |r| PlanRequest {
                        vae_tiling: Some(tiling),
                        ..r
                    }),
                ));
            }
        }
        if let Some((w, h)) = self.refine_panel {
            // A smaller refine (down to none): the refine phase is often the peak.
            for smaller in [1024, 768] {
                if smaller < w && smaller > self.panel.0 {
                    let height = h * smaller / w / 16 * 16;
                    let flag = self.refine_flag;
                    steps.push((
                        format!("{flag} {smaller}"),
                        Box::new(move |r| PlanRequest {
                            refine_panel: Some((smaller, height)),
                            ..r
                        }),
                    ));
                }
            }
            steps.push((
                if self.refine_flag == "--refine" {
                    "without --refine".into()
                } else {
                    format!("{} 0", self.refine_flag)
                },
                Box::new(|r| PlanRequest {
                    refine_panel: None,
                    ..r
                }),
            ));
        }
        if self.step_cache_bytes() > 0 {
            steps.push((
                "--cache none".into(),
                Box::new(|r| PlanRequest {
                    step_cache: StepCache::None,
                    ..r
                }),
            ));
        }
        if let Some(j) = self
            .judge
            .as_ref()
            .filter(|j| j.placement == Placement::Device)
        {
            steps.push((
                format!("with the judge ({}) on another device or remote", j.name),
                Box::new(|mut r: PlanRequest| {
                    if let Some(j) = r.judge.as_mut() {
                        j.placement = Placement::Elsewhere;
                    }
                    r
                }),
            ));
        }
        steps
    }
}

/// Gigabytes, as the plan prints them.
pub fn gb(bytes: usize) -> f64 {
    bytes as f64 / 1e9
}

impl MemoryPlan {
    /// The plan as a markdown table, with the verdict against `available` bytes if known.
    pub fn table(&self, available: Option<usize>) -> String {
        let mut md = String::from("| part | GB | resident |\n|---|---|---|\n");
        for p in &self.parts {
            md.push_str(&format!(
                "| {} | {:.2} | {} |\n",
                p.name,
                gb(p.bytes),
                p.when
            ));
        }
        md.push_str(&format!(
            "| **peak** | **{:.2}** | {} |\n",
            gb(self.peak_bytes),
            self.peak_phase
        ));
        if self.host_text_bytes > 0 {
            md.push_str(&format!(
                "| T5 + CLIP on the host (f32, --text-device cpu) | {:.2} | host memory, while encoding the prompt; not in the device's peak |\n",
                gb(self.host_text_bytes)
            ));
        }
        if let Some(free) = available {
            let verdict = if self.peak_bytes <= free {
                "fits"
            } else {
                "does not fit"
            };
            md.push_str(&format!("\n{:.2} GB available: {verdict}.\n", gb(free)));
        }
        md
    }

    /// The largest parts held at the peak, biggest first, as `name ~X GB`.
    pub fn biggest_parts(&self, n: usize) -> Vec<String> {
        let mut parts: Vec<_> = self
            .parts
            .iter()
            .filter(|p| p.bytes > 0 && p.at_peak)
            .collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.bytes));
        parts
            .iter()
            .take(n)
            .map(|p| format!("{} ~{:.1} GB", p.name, gb(p.bytes)))
            .collect()
    }
}

/// Refuses T5 and CLIP on the CPU (`--text-device cpu` beside a GPU generator) when their
/// f32 share exceeds the host's `available` bytes, naming the lighter choices, before
/// anything loads (they were not checked, and the host swapped or killed the run while
/// loading them).
pub fn check_host(request: &PlanRequest, available: usize, source: &str) -> Result<(), String> {
    let needed = request.host_text_bytes();
    if needed <= available {
        return Ok(());
    }
    let gguf = if request.t5_file_bytes.is_some() {
        ""
    } else {
        "a GGUF T5 encoder with --t5 FILE.gguf (held as stored: a Q8_0 T5-XXL is ~5 GB), or "
    };
    Err(format!(
        "memory plan: T5 + CLIP on the CPU (--text-device cpu) need ~{:.1} GB of host memory in f32, {:.1} GB {source}: try {gguf}T5 + CLIP on the GPU (drop --text-device cpu). Nothing was loaded.",
        gb(needed),
        gb(available)
    ))
}

/// Refuses a plan whose peak exceeds `available` bytes, with the biggest parts and the
/// fixes in the message.
pub fn check(request: &PlanRequest, available: usize, source: &str) -> Result<MemoryPlan, String> {
    let plan = request.plan();
    if plan.peak_bytes <= available {
        return Ok(plan);
    }
    let fixes = request.fixes(available);
    let advice = if fixes.is_empty() {
        "no single option fits; combine them (icedit-scale plan shows the parts)".to_string()
    } else {
        format!("try {}", fixes.join(", or "))
    };
    Err(format!(
        "memory plan: needs ~{:.1} GB at its peak ({}), {:.1} GB {source}: {advice}. Biggest parts at the peak: {}. Nothing was loaded.",
        gb(plan.peak_bytes),
        plan.peak_phase,
        gb(available),
        plan.biggest_parts(3).join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// A 512 edit of FLUX.1 Fill on a GPU, T5 on the same device, no judge.
    fn full_size_edit() -> PlanRequest {
        PlanRequest {
            transformer: FluxConfig::fill_dev(),
            vae: VaeConfig::flux(),
            vae_tiling: None,
            format: WeightFormat::Dense,
            dtype: DType::BF16,
            cuda: true,
            batch: 1,
            panel: (512, 512),
            t5_tokens: 512,
            text_parameters: T5_XXL_PARAMETERS + CLIP_L_PARAMETERS,
            text_placement: Placement::Device,
            text_on_host: false,
            host_available: None,
            t5_file_bytes: None,
            lora_bytes: 0,
            judge: None,
            text_with_judge: false,
            transformer_after_prompt: true,
            text_kept: false,
            requantizable: true,
            refine_flag: "--refine",
            refine_panel: None,
            step_cache: StepCache::None,
            cached_candidates: 0,
        }
    }

    /// The parts marked as held at the peak are exactly what the peak adds up: at an
    /// "encode prompt" peak with the transformer read after the prompt, its weights are
    /// not among them (they were, and a refusal named them as the biggest part there).
    #[test]
    fn the_parts_held_at_the_peak_add_up_to_the_peak() {
        let tiled_q4 = PlanRequest {
            format: WeightFormat::Quantized(GgmlDType::Q4K),
            vae_tiling: Some(VaeTiling::new(512)),
            ..full_size_edit()
        };
        let plan = tiled_q4.plan();
        assert_eq!(plan.peak_phase, "encode prompt");
        let at_peak: usize = plan
            .parts
            .iter()
            .filter(|p| p.at_peak)
            .map(|p| p.bytes)
            .sum();
        assert_eq!(at_peak, plan.peak_bytes);
        let transformer = plan
            .parts
            .iter()
            .find(|p| p.name.starts_with("transformer weights"))
            .unwrap();
        assert!(!transformer.at_peak);
        assert!(!plan.biggest_parts(3).join(", ").contains("transformer"));
        // Every other arrangement too: each phase is the sum of the parts held in it.
        for request in [
            full_size_edit(),
            PlanRequest {
                text_with_judge: true,
                ..tiled_q4.clone()
            },
            PlanRequest {
                text_kept: true,
                transformer_after_prompt: false,
                ..full_size_edit()
            },
            PlanRequest {
                refine_panel: Some((1024, 1024)),
                ..full_size_edit()
            },
        ] {
            let plan = request.plan();
            let at_peak: usize = plan
                .parts
                .iter()
                .filter(|p| p.at_peak)
                .map(|p| p.bytes)
                .sum();
            assert_eq!(at_peak, plan.peak_bytes, "{}", plan.table(None));
        }
    }
}
