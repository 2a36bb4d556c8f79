//! Generators: the image-producing role of an edit.
//!
//! A backend implements [`Generator`]: it prepares an edit's shared conditioning once
//! (and chooses the schedule's shift for it), predicts the flow-matching velocity for a
//! batch of candidate latents, and decodes latents to the right panel. Everything that must
//! be identical across backends, the schedule, the seeded noise, the Euler sampler, the x0
//! preview and the resumable [`CandidateState`], lives here and is written once. A
//! candidate's step cache ([`step_cache`]) travels in its state; the sampler hands each
//! batch's caches to [`Generator::velocity_cached`] and keeps them only if it succeeds.
//!
//! The backends are adapters over model code in [`crate::models`]: [`flux`] makes FLUX.1
//! Fill a generator, [`testbed`] the testbed's mixture flow.

pub mod flux;
pub mod noise;
pub mod schedule;
pub mod step_cache;
pub mod testbed;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::edit::EditContext;
use crate::error::GenerateError;
pub use noise::seeded_noise;
pub use schedule::Schedule;
pub use step_cache::{CandidateCache, ForwardTally, RowWork, StepCache};

/// What a generator is, for logs and reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratorInfo {
    /// Backend name, e.g. `flux-fill` or `testbed`.
    pub name: String,
    /// Human-readable details (weights, LoRA, dtype, device).
    pub detail: String,
    /// Largest number of candidates pushed through one forward.
    pub max_batch: usize,
    /// The settings that shape its images beyond the strategy (FLUX: guidance, LoRA scale,
    /// T5 tokens, dtype, weight formats; the testbed: difficulty and contrast), recorded in
    /// `report.json` so two edits' folders tell how they were made. Null when there are none.
    pub settings: serde_json::Value,
}

/// A prepared edit: the generator holds its shared conditioning (text embeddings,
/// masked-image latents, ...) under `key` until [`Generator::release`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedEdit {
    /// The generator's handle for the shared conditioning.
    pub key: u64,
    /// Packed image tokens of the diptych.
    pub image_tokens: usize,
    /// Shape of one candidate's latent state, without a batch dimension.
    pub latent_shape: Vec<usize>,
    /// The time shift of this edit's schedules, chosen by the generator (FLUX: from the
    /// image-token count), so the engine holds no model constant.
    pub mu: f64,
}

impl PreparedEdit {
    /// This edit's schedule of `steps` steps.
    pub fn schedule(&self, steps: usize) -> Schedule {
        Schedule::shifted(steps, self.mu)
    }
}

/// What a backend keeps between [`Generator::prepare`] and [`Generator::release`]: each
/// prepared edit's conditioning under the key its [`PreparedEdit`] carries.
#[derive(Debug)]
pub struct PreparedSet<T> {
    edits: HashMap<u64, T>,
    next_key: u64,
}

impl<T> Default for PreparedSet<T> {
    fn default() -> Self {
        Self {
            edits: HashMap::new(),
            next_key: 0,
        }
    }
}

impl<T> PreparedSet<T> {
    /// Keeps `conditioning` and returns its key.
    pub fn insert(&mut self, conditioning: T) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.edits.insert(key, conditioning);
        key
    }

    /// The conditioning of `edit`; an error if it was never prepared or already released.
    pub fn get(&self, edit: &PreparedEdit) -> Result<&T, GenerateError> {
        self.edits
            .get(&edit.key)
            .ok_or_else(|| GenerateError::Input(format!("edit {} is not prepared", edit.key)))
    }

    /// Drops the conditioning of `edit`.
    pub fn remove(&mut self, edit: &PreparedEdit) {
        self.edits.remove(&edit.key);
    }
}

/// How a decode will be used: previews may take a cheaper path than finals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodePurpose {
    /// A predicted-x0 preview shown to the screening judge.
    Preview,
    /// The finished edit.
    Final,
    /// A per-step preview for a person watching (the server's live page), never shown to
    /// a judge: a generator may decode it with a cheaper, rougher decoder (FLUX: TAEF1).
    Live,
}

/// A model backend. Blocking; it lives on the generator worker thread and owns its device.
pub trait Generator: Send {
    /// Name and details for reports.
    fn info(&self) -> GeneratorInfo;

    /// The device latents live on.
    fn device(&self) -> Device {
        Device::Cpu
    }

    /// Encodes the edit's shared conditioning once (prompt, masked diptych).
    fn prepare(&mut self, edit: &EditContext) -> Result<PreparedEdit, GenerateError>;

    /// The velocity `v(x_t, t = sigma)` for a batch of latents `[B, ..latent_shape]` (f32).
    /// Returns the same shape. One call is one NFE per batch row.
    fn velocity(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError>;

    /// [`Self::velocity`] for rows that carry step caches (`caches[i]` is row i's): a row
    /// whose cache allows it may be served from the cache instead of a full forward, and a
    /// row's cache learns from its full forwards. Returns the velocity and what each row
    /// ran. The caches are changed in place; callers keep them only when this succeeds.
    ///
    /// The default is a generator without step caching: every row runs in full through
    /// [`Self::velocity`], the caches are left as they are, and no FLOPs are counted.
    fn velocity_cached(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
        caches: &mut [CandidateCache],
    ) -> Result<(Tensor, Vec<RowWork>), GenerateError> {
        let velocity = self.velocity(edit, latents, sigma)?;
        Ok((velocity, vec![RowWork::full(0); caches.len()]))
    }

    /// Decodes one candidate's latents `[..latent_shape]` to the edited right panel.
    fn decode(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError>;

    /// The packed latents `[..latent_shape]` (f32) of the edit's diptych with `init` as its
    /// right panel, `[source | init]`, at the edit's panel size: the image an
    /// image-to-image run (a hi-res refine) noises to its first sigma. Generators that
    /// cannot encode an image say so.
    fn encode_start(
        &mut self,
        _edit: &PreparedEdit,
        _init: &RgbImage,
    ) -> Result<Tensor, GenerateError> {
        Err(GenerateError::Input(format!(
            "{} cannot start from an image (no refine)",
            self.info().name
        )))
    }

    /// What one candidate's forward at `image_tokens` costs relative to one at
    /// `base_tokens` (a refine's forwards are reported in the edit's step equivalents).
    /// The default is the token ratio; FLUX counts its FLOPs, attention included.
    fn relative_step_cost(&self, image_tokens: usize, base_tokens: usize) -> f64 {
        image_tokens as f64 / base_tokens.max(1) as f64
    }

    /// Drops the edit's shared conditioning.
    fn release(&mut self, edit: &PreparedEdit);
    /// Lowers the candidates per forward after an out-of-memory error, for the rest of the
    /// generator's life; [`GeneratorInfo::max_batch`] reports the new limit. Generators that
    /// never run out of memory may ignore it.
    fn limit_batch(&mut self, _max_batch: usize) {}
}

/// A forward that ran out of device memory and was retried with half the candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHalved {
    /// The step being taken (0-based).
    pub step: usize,
    /// Candidates in the forward that failed.
    pub from: usize,
    /// Candidates per forward from then on.
    pub to: usize,
}

impl std::fmt::Display for BatchHalved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: out of device memory at a batch of {} candidates; retried at {} (later forwards too)",
            self.step + 1,
            self.from,
            self.to
        )
    }
}

/// One candidate's resumable sampling state.
///
/// `last_velocity` is the velocity of the most recent step. Because an Euler step is
/// `x_{i+1} = x_i + (s_{i+1} - s_i) v_i`, the x0 prediction `x_{i+1} - s_{i+1} v_i`
/// equals `x_i - s_i v_i`: the preview costs no extra forward.
#[derive(Debug, Clone)]
pub struct CandidateState {
    /// The seed the initial noise came from.
    pub seed: u64,
    /// Steps of the schedule already applied.
    pub step: usize,
    /// Current latents `[..latent_shape]`, f32 on the generator's device.
    pub latents: Tensor,
    /// Velocity from the latest step, if any step ran.
    pub last_velocity: Option<Tensor>,
    /// The candidate's step cache (off unless the engine switches it on, which it does
    /// for completions only: probe steps stay exact).
    pub cache: CandidateCache,
    /// The forwards it took so far, full and cached.
    pub forwards: ForwardTally,
}

impl CandidateState {
    /// A fresh candidate from seeded noise.
    pub fn from_seed(
        generator: &dyn Generator,
        edit: &PreparedEdit,
        seed: u64,
    ) -> Result<Self, GenerateError> {
        let latents = seeded_noise(seed, &edit.latent_shape, &generator.device())?;
        Ok(Self::from_latents(seed, latents))
    }

    /// A fresh candidate from given initial latents (to reproduce another run exactly).
    pub fn from_given(
        generator: &dyn Generator,
        edit: &PreparedEdit,
        seed: u64,
        latents: &Tensor,
    ) -> Result<Self, GenerateError> {
        if latents.dims() != edit.latent_shape.as_slice() {
            return Err(GenerateError::Input(format!(
                "initial latents have shape {:?}, this edit needs {:?}",
                latents.dims(),
                edit.latent_shape
            )));
        }
        let latents = latents
            .to_dtype(candle_core::DType::F32)?
            .to_device(&generator.device())?;
        Ok(Self::from_latents(seed, latents))
    }

    /// An image-to-image start: `start` (the packed latents of the image to refine, from
    /// [`Generator::encode_start`]) noised with the seed's noise to the sigma of
    /// `start_step`, where the state then stands.
    pub fn from_image(
        generator: &dyn Generator,
        edit: &PreparedEdit,
        schedule: &Schedule,
        seed: u64,
        start: &Tensor,
        start_step: usize,
    ) -> Result<Self, GenerateError> {
        let noise = seeded_noise(seed, &edit.latent_shape, &generator.device())?;
        Self::from_image_and_noise(edit, schedule, seed, start, &noise, start_step)
    }

    /// [`Self::from_image`] with the noise given (to reproduce another run exactly).
    pub fn from_image_and_noise(
        edit: &PreparedEdit,
        schedule: &Schedule,
        seed: u64,
        start: &Tensor,
        noise: &Tensor,
        start_step: usize,
    ) -> Result<Self, GenerateError> {
        for (what, t) in [("start latents", start), ("noise", noise)] {
            if t.dims() != edit.latent_shape.as_slice() {
                return Err(GenerateError::Input(format!(
                    "{what} have shape {:?}, this edit needs {:?}",
                    t.dims(),
                    edit.latent_shape
                )));
            }
        }
        if start_step >= schedule.steps {
            return Err(GenerateError::Input(format!(
                "an image-to-image start at step {start_step} of {} runs no step",
                schedule.steps
            )));
        }
        let f32 = candle_core::DType::F32;
        let noise = noise.to_dtype(f32)?;
        let start = start.to_dtype(f32)?.to_device(noise.device())?;
        let latents = schedule::noised(&start, &noise, schedule.sigma(start_step))?;
        let mut state = Self::from_latents(seed, latents);
        state.step = start_step;
        Ok(state)
    }

    fn from_latents(seed: u64, latents: Tensor) -> Self {
        Self {
            seed,
            step: 0,
            latents,
            last_velocity: None,
            cache: CandidateCache::default(),
            forwards: ForwardTally::default(),
        }
    }

    /// The predicted clean latents `x0 = x_t - sigma_t * v` (the latents themselves once
    /// the schedule is finished, or before any step when no velocity is known).
    pub fn predicted_clean(&self, schedule: &Schedule) -> Result<Tensor, GenerateError> {
        match &self.last_velocity {
            Some(v) if self.step < schedule.steps => {
                let sigma = schedule.sigma(self.step);
                Ok((&self.latents - (v * sigma)?)?)
            }
            _ => Ok(self.latents.clone()),
        }
    }
}

/// Advances every state by one Euler step of `schedule`, batching up to the generator's
/// `max_batch` candidates per forward. All states must be at the same step. Each state's
/// step cache goes with its row ([`Generator::velocity_cached`]) and each row's forward is
/// counted in its state's [`CandidateState::forwards`].
///
/// A forward that runs out of device memory is retried with half as many candidates (the
/// states, their step caches included, change only after a forward succeeds, so nothing
/// is lost or run twice) and the generator is told to keep the smaller batch; the
/// halvings are returned. Only a forward of one candidate that runs out of memory is an
/// error.
pub fn advance_one_step(
    generator: &mut dyn Generator,
    edit: &PreparedEdit,
    schedule: &Schedule,
    states: &mut [CandidateState],
) -> Result<Vec<BatchHalved>, GenerateError> {
    let Some(first) = states.first() else {
        return Ok(Vec::new());
    };
    let step = first.step;
    if states.iter().any(|s| s.step != step) {
        return Err(GenerateError::Input(
            "candidates in one batch must be at the same step".into(),
        ));
    }
    if step >= schedule.steps {
        return Err(GenerateError::Input(format!(
            "cannot advance past the last step ({step} of {})",
            schedule.steps
        )));
    }
    let (sigma, sigma_next) = (schedule.sigma(step), schedule.sigma(step + 1));
    let mut max_batch = generator.info().max_batch.max(1);
    let mut halvings = Vec::new();
    let mut start = 0;
    while start < states.len() {
        let end = (start + max_batch).min(states.len());
        let chunk = &mut states[start..end];
        let batch = Tensor::stack(
            &chunk.iter().map(|s| s.latents.clone()).collect::<Vec<_>>(),
            0,
        )?;
        // The forward works on copies of the caches (their tensors are shared, not copied).
        let mut caches: Vec<CandidateCache> = chunk.iter().map(|s| s.cache.clone()).collect();
        let (velocity, work) = match generator.velocity_cached(edit, &batch, sigma, &mut caches)
        {
            Ok(v) => v,
            Err(GenerateError::OutOfMemory(detail)) if chunk.len() > 1 => {
                let halved = BatchHalved {
                    step,
                    from: chunk.len(),
                    to: chunk.len() / 2,
                };
                tracing::warn!(%detail, "{halved}");
                max_batch = halved.to;
                generator.limit_batch(max_batch);
                halvings.push(halved);
                continue;
            }
            Err(GenerateError::OutOfMemory(detail)) => {
                return Err(GenerateError::OutOfMemory(format!(
                    "{detail} (at a batch of 1 candidate: the model and one forward do not fit; see `icedit-scale plan`)"
                )))
            }
            Err(e) => return Err(e),
        };
        if velocity.dims() != batch.dims() {
            return Err(GenerateError::Input(format!(
                "generator returned velocity of shape {:?} for latents {:?}",
                velocity.dims(),
                batch.dims()
            )));
        }
        if work.len() != chunk.len() {
            return Err(GenerateError::Input(format!(
                "generator reported {} rows of work for a batch of {}",
                work.len(),
                chunk.len()
            )));
        }
        let next = (&batch + (&velocity * (sigma_next - sigma))?)?;
        for (i, (state, cache)) in chunk.iter_mut().zip(caches).enumerate() {
            state.latents = next.get(i)?;
            state.last_velocity = Some(velocity.get(i)?);
            state.step = step + 1;
            state.cache = cache;
            state.forwards.add(&work[i]);
        }
        start += chunk.len();
    }
    Ok(halvings)
}

/// Advances states step by step until they reach `to_step`, calling `on_step` after each;
/// returns the batch halvings out-of-memory errors caused on the way.
pub fn advance_to(
    generator: &mut dyn Generator,
    edit: &PreparedEdit,
    schedule: &Schedule,
    states: &mut [CandidateState],
    to_step: usize,
    mut on_step: impl FnMut(usize),
) -> Result<Vec<BatchHalved>, GenerateError> {
    let mut halvings = Vec::new();
    while states.first().is_some_and(|s| s.step < to_step) {
        halvings.extend(advance_one_step(generator, edit, schedule, states)?);
        on_step(states[0].step);
    }
    Ok(halvings)
}

/// Refuses to decode latents holding NaN or infinity: they decode to a blank (black) image,
/// which a judge would score and a strategy could pick. The edit stops, naming the
/// candidate; the check reads the latents back once per decode, which the decode's own cost
/// dwarfs.
fn check_finite(latents: &Tensor, state: &CandidateState) -> Result<(), GenerateError> {
    let (bad, total) = non_finite_count(latents)?;
    if bad == 0 {
        return Ok(());
    }
    Err(GenerateError::NonFinite(format!(
        "candidate (seed {}) at step {}: {bad} of {total} latent values are NaN or infinite; the model produced them (weights holding NaN, or an f16 overflow: try --dtype bf16 on a GPU, or f32)",
        state.seed, state.step,
    )))
}

/// How many of `latents`' values are NaN or infinite, and how many values it holds (read
/// back to the host).
pub fn non_finite_count(latents: &Tensor) -> candle_core::Result<(usize, usize)> {
    let values = latents
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    Ok((bad, values.len()))
}

/// Decodes the x0 preview of a state.
pub fn preview(
    generator: &mut dyn Generator,
    edit: &PreparedEdit,
    schedule: &Schedule,
    state: &CandidateState,
) -> Result<RgbImage, GenerateError> {
    let x0 = state.predicted_clean(schedule)?;
    check_finite(&x0, state)?;
    generator.decode(edit, &x0, DecodePurpose::Preview)
}

/// Decodes the x0 prediction of a state for a person watching ([`DecodePurpose::Live`]).
pub fn live_preview(
    generator: &mut dyn Generator,
    edit: &PreparedEdit,
    schedule: &Schedule,
    state: &CandidateState,
) -> Result<RgbImage, GenerateError> {
    let x0 = state.predicted_clean(schedule)?;
    generator.decode(edit, &x0, DecodePurpose::Live)
}

/// Decodes a finished state.
pub fn finish(
    generator: &mut dyn Generator,
    edit: &PreparedEdit,
    schedule: &Schedule,
    state: &CandidateState,
) -> Result<RgbImage, GenerateError> {
    if state.step != schedule.steps {
        return Err(GenerateError::Input(format!(
            "candidate (seed {}) is at step {} of {}: not finished",
            state.seed, state.step, schedule.steps
        )));
    }
    check_finite(&state.latents, state)?;
    generator.decode(edit, &state.latents, DecodePurpose::Final)
}
