//! Step caching for a diffusion transformer, decided per candidate: late in a trajectory
//! the model's output changes slowly, so most of a forward can be reused or predicted.
//!
//! Two rules, with the semantics of diffusers 0.42.1's hooks (the file:line citations are
//! into its `hooks/` folder):
//!
//! - **First-Block-Cache** (`first_block_cache.py`): the first block always runs; when the
//!   relative mean absolute change of its residual against the residual of the last fully
//!   computed step is at most the threshold, the other blocks are skipped and the residual
//!   they added then is added again.
//! - **TaylorSeer** (`taylorseer_cache.py`): full forwards during a warm-up and then every
//!   `interval` steps; in between, chosen module outputs are predicted by a Taylor
//!   expansion of order n built from divided differences of the full steps.
//!
//! diffusers decides once per batch; here each candidate (one batch row) has its own
//! [`CandidateCache`], so a batch may mix full and cached rows. This module holds what is
//! model-agnostic: the configuration ([`StepCache`], written `none`, `fbc:0.12`,
//! `taylorseer:interval=4,order=1`), each candidate's memory and both decision rules.
//! Which tensors a model caches and which blocks it skips is the model's part
//! ([`crate::models::flux::step_cache`]).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// diffusers' `FirstBlockCacheConfig.threshold` default (`first_block_cache.py:48`).
pub const DEFAULT_THRESHOLD: f64 = 0.05;
/// diffusers' `TaylorSeerCacheConfig` defaults (`taylorseer_cache.py:82-89`).
const DEFAULT_INTERVAL: usize = 5;
const DEFAULT_ORDER: usize = 1;
const DEFAULT_WARMUP: usize = 3;
/// Highest Taylor order accepted: every order holds one more copy of each cached output.
pub const MAX_ORDER: usize = 4;

/// Which step cache a candidate's forwards use. Written (flags, manifests, reports) as
/// `none`, `fbc[:<threshold>]` or `taylorseer[:key=value,...]` (see [`StepCache::from_str`]);
/// serialized as that string.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StepCache {
    /// Every forward runs in full.
    #[default]
    None,
    /// First-Block-Cache (diffusers `FirstBlockCacheConfig`).
    FirstBlock {
        /// Largest relative change of the first block's residual that still reuses the
        /// cache (the comparison is `change > threshold` -> compute, as diffusers').
        threshold: f64,
    },
    /// TaylorSeer (diffusers `TaylorSeerCacheConfig`).
    TaylorSeer(TaylorSeer),
}

/// TaylorSeer's parameters, named after diffusers' `TaylorSeerCacheConfig` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaylorSeer {
    /// Steps between full forwards after the warm-up (`cache_interval`, default 5).
    pub interval: usize,
    /// Highest Taylor order (`max_order`, default 1).
    pub order: usize,
    /// Steps `0..warmup` run in full (`disable_cache_before_step`, default 3); at least 1,
    /// since the first step has nothing to predict from.
    pub warmup: usize,
    /// Steps from this one on run in full (`disable_cache_after_step`, default none).
    pub until: Option<usize>,
    /// The dtype the factors are held in (`taylor_factors_dtype`, default bf16).
    pub factors: FactorDtype,
    /// Predict the model output itself instead of every attention output
    /// (`use_lite_mode`): a predicted step then runs no block at all.
    pub lite: bool,
}

impl Default for TaylorSeer {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            order: DEFAULT_ORDER,
            warmup: DEFAULT_WARMUP,
            until: None,
            factors: FactorDtype::Bf16,
            lite: false,
        }
    }
}

impl TaylorSeer {
    /// Whether step `step` (0-based, counted from the cache's first forward) runs in full:
    /// warm-up, every `interval` steps after it, or cool-down (`taylorseer_cache.py:228-236`;
    /// Python's `%` is never negative, hence `rem_euclid`).
    pub fn is_full_step(&self, step: usize) -> bool {
        let warmup = step < self.warmup;
        let on_interval =
            (step as i64 - self.warmup as i64 - 1).rem_euclid(self.interval as i64) == 0;
        let cooldown = self.until.is_some_and(|u| step >= u);
        warmup || on_interval || cooldown
    }
}

/// The dtype TaylorSeer's factors are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorDtype {
    /// bfloat16, diffusers' default: half the memory of f32.
    Bf16,
    /// float32.
    F32,
}

impl FactorDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F32 => DType::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        }
    }
}

const EXPECTED: &str =
    "expected none, fbc[:<threshold>] or taylorseer[:interval=<n>,order=<n>,warmup=<n>,until=<n>,factors=bf16|f32,lite]";

impl FromStr for StepCache {
    type Err = String;

    /// Parses `none`, `fbc`, `fbc:<threshold>`, `taylorseer` or
    /// `taylorseer:<key>=<value>,...` with keys `interval`, `order`, `warmup`, `until`,
    /// `factors` (`bf16` or `f32`) and the bare flag `lite`; omitted keys take diffusers'
    /// defaults. Errors quote the whole value and name the part that is wrong.
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        Self::parse_as(text, "step cache")
    }
}

impl StepCache {
    /// Parses `text` as [`StepCache::from_str`] does, its errors starting with `name`, the
    /// field as the value's source writes it (`cache` in a manifest line, `` `cache` `` in a
    /// request).
    pub fn parse_as(text: &str, name: &str) -> std::result::Result<Self, String> {
        let fail = |why: String| format!("{name} {text:?}: {why}");
        let (kind, args) = match text.split_once(':') {
            Some((kind, args)) => (kind.trim(), Some(args.trim())),
            None => (text.trim(), None),
        };
        let cache = match kind {
            "none" => match args {
                None => Self::None,
                Some(a) => return Err(fail(format!("`none` takes no parameters, got {a:?}"))),
            },
            "fbc" => {
                let threshold = match args {
                    None => DEFAULT_THRESHOLD,
                    Some(a) => {
                        let value = a.strip_prefix("threshold=").unwrap_or(a);
                        value
                            .parse::<f64>()
                            .map_err(|_| fail(format!("threshold {value:?} is not a number")))?
                    }
                };
                Self::FirstBlock { threshold }
            }
            "taylorseer" => {
                let mut t = TaylorSeer::default();
                for part in args.into_iter().flat_map(|a| a.split(',')) {
                    let part = part.trim();
                    if part.is_empty() {
                        continue;
                    }
                    if part == "lite" {
                        t.lite = true;
                        continue;
                    }
                    let Some((key, value)) = part.split_once('=') else {
                        return Err(fail(format!(
                            "{part:?} is not key=value (keys: interval, order, warmup, until, factors; flag: lite)"
                        )));
                    };
                    let (key, value) = (key.trim(), value.trim());
                    let count = || {
                        value
                            .parse::<usize>()
                            .map_err(|_| fail(format!("{key} {value:?} is not a whole number")))
                    };
                    match key {
                        "interval" => t.interval = count()?,
                        "order" => t.order = count()?,
                        "warmup" => t.warmup = count()?,
                        "until" => t.until = Some(count()?),
                        "factors" => {
                            t.factors = match value {
                                "bf16" => FactorDtype::Bf16,
                                "f32" => FactorDtype::F32,
                                other => {
                                    return Err(fail(format!(
                                        "factors {other:?}: expected bf16 or f32"
                                    )))
                                }
                            }
                        }
                        other => {
                            return Err(fail(format!(
                                "unknown key {other:?} (keys: interval, order, warmup, until, factors; flag: lite)"
                            )))
                        }
                    }
                }
                Self::TaylorSeer(t)
            }
            other => return Err(fail(format!("unknown kind {other:?}; {EXPECTED}"))),
        };
        cache.check().map_err(fail)?;
        Ok(cache)
    }

    /// Parses a comma-separated list of settings (`none,fbc:0.12,taylorseer:interval=4,order=1`):
    /// a comma starts a new setting only where a kind (`none`, `fbc`, `taylorseer`) follows,
    /// so TaylorSeer's own commas stay inside its setting.
    pub fn parse_list(text: &str) -> std::result::Result<Vec<Self>, String> {
        let mut settings: Vec<String> = Vec::new();
        for part in text.split(',') {
            let kind = part.split(':').next().unwrap_or_default().trim();
            match settings.last_mut() {
                Some(last) if !matches!(kind, "none" | "fbc" | "taylorseer") => {
                    last.push(',');
                    last.push_str(part);
                }
                _ => settings.push(part.to_string()),
            }
        }
        settings.iter().map(|s| s.trim().parse()).collect()
    }
}

impl StepCache {
    /// Checks the values' bounds; the message names the parameter.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self {
            Self::None => Ok(()),
            Self::FirstBlock { threshold } => {
                if threshold.is_finite() && *threshold >= 0.0 {
                    Ok(())
                } else {
                    Err(format!(
                        "threshold {threshold} must be a finite number >= 0"
                    ))
                }
            }
            Self::TaylorSeer(t) => {
                if t.interval == 0 {
                    return Err("interval must be at least 1".into());
                }
                if t.order > MAX_ORDER {
                    return Err(format!(
                        "order {} is above {MAX_ORDER} (each order holds another copy of every cached output)",
                        t.order
                    ));
                }
                if t.warmup == 0 {
                    return Err(
                        "warmup must be at least 1: the first step has nothing to predict from"
                            .into(),
                    );
                }
                Ok(())
            }
        }
    }

    /// Whether forwards may be served from a cache at all.
    pub fn is_on(&self) -> bool {
        !matches!(self, Self::None)
    }
}

impl fmt::Display for StepCache {
    /// The canonical spelling, which [`StepCache::from_str`] reads back (every TaylorSeer
    /// parameter written out).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::FirstBlock { threshold } => write!(f, "fbc:{threshold}"),
            Self::TaylorSeer(t) => {
                write!(
                    f,
                    "taylorseer:interval={},order={},warmup={},factors={}",
                    t.interval,
                    t.order,
                    t.warmup,
                    t.factors.name()
                )?;
                if let Some(u) = t.until {
                    write!(f, ",until={u}")?;
                }
                if t.lite {
                    write!(f, ",lite")?;
                }
                Ok(())
            }
        }
    }
}

impl TryFrom<String> for StepCache {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<StepCache> for String {
    fn from(c: StepCache) -> String {
        c.to_string()
    }
}

/// One candidate's step cache: its rule and what it remembers of earlier forwards. It
/// travels with the candidate's sampling state; a forward works on a copy and the copy is
/// kept only if the forward succeeds, so a retried step sees the cache as it was.
#[derive(Debug, Clone)]
pub struct CandidateCache {
    /// Whether a forward may be served from the cache. When false every forward runs in
    /// full (exact), and the cache still learns from it.
    pub may_skip: bool,
    /// The rule and its memory.
    pub memory: CacheMemory,
}

impl Default for CandidateCache {
    fn default() -> Self {
        Self::new(StepCache::None)
    }
}

/// A rule with its memory.
#[derive(Debug, Clone)]
pub enum CacheMemory {
    /// No caching: every forward runs in full.
    Off,
    /// First-Block-Cache.
    FirstBlock(FirstBlockMemory),
    /// TaylorSeer.
    TaylorSeer(TaylorMemory),
}

impl CandidateCache {
    /// An empty cache following `config` (skipping allowed).
    pub fn new(config: StepCache) -> Self {
        let memory = match config {
            StepCache::None => CacheMemory::Off,
            StepCache::FirstBlock { threshold } => CacheMemory::FirstBlock(FirstBlockMemory {
                threshold,
                head_residual: None,
                tail_residual: None,
                last_change: None,
            }),
            StepCache::TaylorSeer(config) => CacheMemory::TaylorSeer(TaylorMemory {
                config,
                calls: 0,
                last_update: None,
                slots: Vec::new(),
            }),
        };
        Self {
            may_skip: true,
            memory,
        }
    }

    /// The rule this cache follows.
    pub fn config(&self) -> StepCache {
        match &self.memory {
            CacheMemory::Off => StepCache::None,
            CacheMemory::FirstBlock(m) => StepCache::FirstBlock {
                threshold: m.threshold,
            },
            CacheMemory::TaylorSeer(m) => StepCache::TaylorSeer(m.config),
        }
    }

    /// Whether a cache is on (a rule other than none).
    pub fn is_on(&self) -> bool {
        !matches!(self.memory, CacheMemory::Off)
    }

    /// Bytes of the tensors the cache holds now.
    pub fn bytes(&self) -> usize {
        match &self.memory {
            CacheMemory::Off => 0,
            CacheMemory::FirstBlock(m) => [&m.head_residual, &m.tail_residual]
                .into_iter()
                .flatten()
                .map(tensor_bytes)
                .sum(),
            CacheMemory::TaylorSeer(m) => m
                .slots
                .iter()
                .flat_map(|s| &s.factors)
                .map(tensor_bytes)
                .sum(),
        }
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// What First-Block-Cache remembers of one candidate: from its last fully computed step,
/// the first block's residual (output minus input of the image stream) and the residual
/// all later blocks added to the image stream (`first_block_cache.py:117-125, 169-180`).
/// The text stream's tail residual is not kept: only the image stream reaches the output.
#[derive(Debug, Clone)]
pub struct FirstBlockMemory {
    threshold: f64,
    head_residual: Option<Tensor>,
    tail_residual: Option<Tensor>,
    /// The change measured at the latest forward (`None` at the first, or before any).
    last_change: Option<f64>,
}

impl FirstBlockMemory {
    /// The threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The relative change measured at the latest forward, for logs and tests.
    pub fn last_change(&self) -> Option<f64> {
        self.last_change
    }

    /// [`Self::relative_change`], remembered as [`Self::last_change`].
    pub fn observe(&mut self, residual: &Tensor) -> Result<Option<f64>> {
        self.last_change = self.relative_change(residual)?;
        Ok(self.last_change)
    }

    /// `mean|r - r_prev| / mean|r_prev|` over all of this candidate's elements, where
    /// `r_prev` is the first block's residual at the last fully computed step
    /// (`first_block_cache.py:134-141`); `None` before any full step. The difference is
    /// taken in the model dtype, as diffusers does, and summed in f64.
    pub fn relative_change(&self, residual: &Tensor) -> Result<Option<f64>> {
        let Some(previous) = &self.head_residual else {
            return Ok(None);
        };
        let mean_abs = |t: &Tensor| -> Result<f64> {
            t.abs()?
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()
        };
        let change = mean_abs(&(residual - previous)?)?;
        Ok(Some(change / mean_abs(previous)?))
    }

    /// Whether a forward whose first-block residual changed by `change` reuses the cache:
    /// only with a remembered tail residual and `change <= threshold` (diffusers computes
    /// when `change > threshold`, `first_block_cache.py:142`).
    pub fn reuses(&self, change: Option<f64>) -> bool {
        self.tail_residual.is_some() && change.is_some_and(|c| c <= self.threshold)
    }

    /// The image stream after every block, rebuilt from the first block's output:
    /// `tail residual + head output` (`first_block_cache.py:97-101`).
    pub fn reuse(&self, head_output: &Tensor) -> Result<Tensor> {
        let tail = self
            .tail_residual
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("no tail residual to reuse".into()))?;
        tail + head_output
    }

    /// Remembers a fully computed step's residuals.
    pub fn remember(&mut self, head_residual: Tensor, tail_residual: Tensor) {
        self.head_residual = Some(head_residual);
        self.tail_residual = Some(tail_residual);
    }
}

/// What TaylorSeer remembers of one candidate: its forward count, the step of its last
/// full forward and, per cached output (a "slot", numbered by the model), the Taylor
/// factors of orders `0..=order` (`taylorseer_cache.py:105-197`).
#[derive(Debug, Clone)]
pub struct TaylorMemory {
    config: TaylorSeer,
    /// Forwards so far; the next forward is step `calls`.
    calls: usize,
    last_update: Option<usize>,
    slots: Vec<TaylorSlot>,
}

#[derive(Debug, Clone)]
struct TaylorSlot {
    /// The dtype the output had (predictions are returned in it).
    dtype: DType,
    /// Factor of order j at index j, held in the factor dtype.
    factors: Vec<Tensor>,
}

/// The decision for one forward of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaylorStep {
    /// The step index (forwards since the cache was made).
    pub step: usize,
    /// Whether it runs in full (and updates the factors) or is predicted.
    pub full: bool,
}

impl TaylorMemory {
    /// The configuration.
    pub fn config(&self) -> &TaylorSeer {
        &self.config
    }

    /// Counts a forward and decides it (`taylorseer_cache.py:228-236`): full by the
    /// schedule, when skipping is not allowed, or when nothing was computed yet.
    pub fn begin_step(&mut self, may_skip: bool) -> TaylorStep {
        let step = self.calls;
        self.calls += 1;
        let full = !may_skip || self.last_update.is_none() || self.config.is_full_step(step);
        TaylorStep { step, full }
    }

    /// Updates every slot from a full step's outputs (`outputs[slot]`, this candidate's
    /// rows only): factor 0 is the output, factor j+1 the divided difference
    /// `(new_j - old_j) / (step - last_step)` while an old factor of order j of the same
    /// shape exists; then every factor is held in the factor dtype
    /// (`taylorseer_cache.py:130-162`).
    pub fn update(&mut self, step: usize, outputs: Vec<Tensor>) -> Result<()> {
        let delta = match self.last_update {
            Some(last) if step > last => Some((step - last) as f64),
            Some(_) => {
                return Err(candle_core::Error::Msg(
                    "TaylorSeer update at a step not after the last one".into(),
                ))
            }
            None => None,
        };
        let held = self.config.factors.dtype();
        let mut slots = Vec::with_capacity(outputs.len());
        for (i, output) in outputs.into_iter().enumerate() {
            let dtype = output.dtype();
            let mut new = vec![output];
            if let (Some(delta), Some(old)) = (delta, self.slots.get(i)) {
                for j in 0..self.config.order {
                    let Some(previous) = old.factors.get(j) else {
                        break;
                    };
                    if previous.dims() != new[j].dims() {
                        break;
                    }
                    let next = ((&new[j] - previous.to_dtype(dtype)?)? / delta)?;
                    new.push(next);
                }
            }
            let factors = new
                .into_iter()
                .map(|f| f.to_dtype(held))
                .collect::<Result<Vec<_>>>()?;
            slots.push(TaylorSlot { dtype, factors });
        }
        self.slots = slots;
        self.last_update = Some(step);
        Ok(())
    }

    /// The prediction of slot `slot` at step `step`:
    /// `sum_j factor_j * (step - last_step)^j / j!`, accumulated from order 0 up in the
    /// output's dtype (`taylorseer_cache.py:165-197`).
    pub fn predict(&self, slot: usize, step: usize) -> Result<Tensor> {
        let (Some(last), Some(s)) = (self.last_update, self.slots.get(slot)) else {
            return Err(candle_core::Error::Msg(format!(
                "TaylorSeer: nothing computed yet for output {slot}"
            )));
        };
        let offset = step.checked_sub(last).ok_or_else(|| {
            candle_core::Error::Msg("TaylorSeer prediction before its last update".into())
        })? as f64;
        let mut out = s.factors[0].zeros_like()?.to_dtype(s.dtype)?;
        let mut factorial = 1.0;
        for (order, factor) in s.factors.iter().enumerate() {
            if order > 0 {
                factorial *= order as f64;
            }
            let coefficient = offset.powi(order as i32) / factorial;
            out = (out + (factor.to_dtype(s.dtype)? * coefficient)?)?;
        }
        Ok(out)
    }
}

/// What one batch row's forward ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RowWork {
    /// Served (in part) from the row's step cache instead of a full forward.
    pub cached: bool,
    /// Model FLOPs the row's forward ran (multiply-adds count 2; 0 where not counted).
    pub flops: u64,
    /// FLOPs a full forward of the row runs (0 where not counted).
    pub full_flops: u64,
}

impl RowWork {
    /// A full forward of `flops` FLOPs.
    pub fn full(flops: u64) -> Self {
        Self {
            cached: false,
            flops,
            full_flops: flops,
        }
    }

    /// A forward served (in part) from the cache: `flops` of the `full_flops` a full one runs.
    pub fn cached(flops: u64, full_flops: u64) -> Self {
        Self {
            cached: true,
            flops,
            full_flops,
        }
    }
}

/// Row `j` of a batch tensor `t` as `[1, ..]` with storage of its own, for a cache to keep:
/// a view would keep the whole batch's storage alive as long as the cache keeps the row
/// (with rows deciding differently, every candidate could hold a different batch). A
/// batch of one is its own row already.
pub fn own_row(t: &Tensor, j: usize) -> Result<Tensor> {
    let row = t.narrow(0, j, 1)?;
    if t.dim(0)? == 1 {
        Ok(row)
    } else {
        // `copy` would clone the whole storage under the view; this copies the row alone.
        row.force_contiguous()
    }
}

/// The rows of `t` (batch dimension first) at `rows`, in that order; `t` itself when they
/// are all of its `0..n` rows in order.
pub fn select_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let n = t.dim(0)?;
    if rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(t.clone());
    }
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    t.index_select(&Tensor::new(ids.as_slice(), t.device())?, 0)
}

/// Reassembles a batch of `n` rows from parts: `(rows, tensor)` where the tensor's j-th
/// row is batch row `rows[j]`. Every row must be covered once.
pub fn merge_rows(parts: Vec<(Vec<usize>, Tensor)>, n: usize) -> Result<Tensor> {
    if let [(rows, t)] = parts.as_slice() {
        if rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(t.clone());
        }
    }
    let mut by_row: Vec<Option<Tensor>> = vec![None; n];
    for (rows, t) in &parts {
        for (j, &r) in rows.iter().enumerate() {
            by_row[r] = Some(t.narrow(0, j, 1)?);
        }
    }
    let rows = by_row
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| candle_core::Error::Msg(format!("batch row {i} missing"))))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parses_every_form_and_writes_it_back() {
        let cases = [
            ("none", StepCache::None),
            (
                "fbc",
                StepCache::FirstBlock {
                    threshold: DEFAULT_THRESHOLD,
                },
            ),
            ("fbc:0.12", StepCache::FirstBlock { threshold: 0.12 }),
            (
                "fbc:threshold=0.2",
                StepCache::FirstBlock { threshold: 0.2 },
            ),
            ("taylorseer", StepCache::TaylorSeer(TaylorSeer::default())),
            (
                "taylorseer:interval=4,order=1",
                StepCache::TaylorSeer(TaylorSeer {
                    interval: 4,
                    order: 1,
                    ..TaylorSeer::default()
                }),
            ),
            (
                "taylorseer:interval=3, order=2,warmup=4,until=24,factors=f32,lite",
                StepCache::TaylorSeer(TaylorSeer {
                    interval: 3,
                    order: 2,
                    warmup: 4,
                    until: Some(24),
                    factors: FactorDtype::F32,
                    lite: true,
                }),
            ),
        ];
        for (text, expected) in cases {
            let parsed: StepCache = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed, expected, "{text}");
            let again: StepCache = parsed.to_string().parse().unwrap();
            assert_eq!(again, parsed, "{text} -> {parsed}");
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(json, format!("\"{parsed}\""));
            assert_eq!(serde_json::from_str::<StepCache>(&json).unwrap(), parsed);
        }
        assert_eq!(
            "taylorseer:interval=4,order=1"
                .parse::<StepCache>()
                .unwrap()
                .to_string(),
            "taylorseer:interval=4,order=1,warmup=3,factors=bf16"
        );
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("fbx:0.1", "unknown kind \"fbx\""),
            ("fbc:abc", "threshold \"abc\" is not a number"),
            ("fbc:-0.1", "threshold -0.1 must be"),
            ("fbc:NaN", "threshold NaN must be"),
            ("none:1", "`none` takes no parameters"),
            ("taylorseer:interval=0", "interval must be at least 1"),
            (
                "taylorseer:interval=x",
                "interval \"x\" is not a whole number",
            ),
            ("taylorseer:order=-1", "order \"-1\" is not a whole number"),
            ("taylorseer:order=9", "order 9 is above 4"),
            ("taylorseer:warmup=0", "warmup must be at least 1"),
            (
                "taylorseer:factors=f16",
                "factors \"f16\": expected bf16 or f32",
            ),
            ("taylorseer:speed=2", "unknown key \"speed\""),
            ("taylorseer:fast", "\"fast\" is not key=value"),
        ];
        for (text, needle) in cases {
            let err = text.parse::<StepCache>().unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains(&format!("{text:?}")), "{text}: {err}");
        }
        let err = serde_json::from_str::<StepCache>("\"fbc:x\"").unwrap_err();
        assert!(err.to_string().contains("threshold \"x\""), "{err}");
        let err = StepCache::parse_as("fbc:x", "cache").unwrap_err();
        assert!(err.starts_with("cache \"fbc:x\": threshold"), "{err}");
    }

    #[test]
    fn a_list_splits_only_where_a_setting_starts() {
        let list =
            StepCache::parse_list("none, fbc:0.12,taylorseer:interval=4,order=1,lite,fbc").unwrap();
        let spelled: Vec<String> = list.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            spelled,
            [
                "none",
                "fbc:0.12",
                "taylorseer:interval=4,order=1,warmup=3,factors=bf16,lite",
                "fbc:0.05"
            ]
        );
        let err = StepCache::parse_list("fbc:0.1,taylorseer:speed=2").unwrap_err();
        assert!(err.contains("unknown key \"speed\""), "{err}");
        assert!(StepCache::parse_list("interval=4").is_err());
    }

    #[test]
    fn taylorseer_schedule_matches_diffusers() {
        // diffusers' defaults (before=3, interval=5): full at 0, 1, 2, 4, 9, 14, ...; step 3
        // is predicted because (3 - 3 - 1) % 5 == 4 in Python.
        let t = TaylorSeer::default();
        let full: Vec<usize> = (0..20).filter(|&s| t.is_full_step(s)).collect();
        assert_eq!(full, vec![0, 1, 2, 4, 9, 14, 19]);
        let t = TaylorSeer {
            interval: 3,
            warmup: 4,
            until: Some(10),
            ..TaylorSeer::default()
        };
        let full: Vec<usize> = (0..13).filter(|&s| t.is_full_step(s)).collect();
        assert_eq!(full, vec![0, 1, 2, 3, 5, 8, 10, 11, 12]);
    }

    #[test]
    fn taylor_factors_are_divided_differences_and_predict_a_polynomial() {
        let dev = Device::Cpu;
        // f(s) = 1 + 2 s + 0.5 s^2, updated at steps 0, 1, 3: order 2 recovers it exactly.
        let f = |s: f64| Tensor::new(&[[1.0 + 2.0 * s + 0.5 * s * s]], &dev).unwrap();
        let config = TaylorSeer {
            order: 2,
            factors: FactorDtype::F32,
            ..TaylorSeer::default()
        };
        let mut m = match CandidateCache::new(StepCache::TaylorSeer(config)).memory {
            CacheMemory::TaylorSeer(m) => m,
            _ => unreachable!(),
        };
        for s in [0usize, 1, 3] {
            m.update(s, vec![f(s as f64).to_dtype(DType::F32).unwrap()])
                .unwrap();
        }
        // f0 = 1, f1 = 3.5, f3 = 11.5. Divided differences at step 3: first
        // (f3 - f1) / 2 = 4, second (4 - (f1 - f0) / 1) / 2 = 0.75 (a backward expansion
        // with diffusers' recursion, not the exact derivatives).
        let p = m.predict(0, 5).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let expected = 11.5 + 4.0 * 2.0 + 0.75 * 4.0 / 2.0;
        assert!((p - expected as f32).abs() < 1e-5, "{p} vs {expected}");
        // Order 0 only on the first update; prediction is then the last output.
        let mut fresh = match CandidateCache::new(StepCache::TaylorSeer(config)).memory {
            CacheMemory::TaylorSeer(m) => m,
            _ => unreachable!(),
        };
        fresh.update(0, vec![f(0.0)]).unwrap();
        assert_eq!(
            fresh.predict(0, 2).unwrap().to_vec2::<f64>().unwrap(),
            [[1.0]]
        );
        assert!(fresh.update(0, vec![f(0.0)]).is_err(), "same step twice");
    }

    #[test]
    fn first_block_change_is_relative_to_the_last_full_step() {
        let dev = Device::Cpu;
        let mut m = FirstBlockMemory {
            threshold: 0.25,
            head_residual: None,
            tail_residual: None,
            last_change: None,
        };
        let r0 = Tensor::new(&[[1f32, -2.0, 3.0, -4.0]], &dev).unwrap();
        assert_eq!(m.relative_change(&r0).unwrap(), None);
        assert!(!m.reuses(None));
        m.remember(r0.clone(), Tensor::ones((1, 4), DType::F32, &dev).unwrap());
        let r1 = (&r0 * 1.2).unwrap(); // change 0.2 * 2.5 / 2.5 = 0.2
        let change = m.relative_change(&r1).unwrap().unwrap();
        assert!((change - 0.2).abs() < 1e-6, "{change}");
        assert!(m.reuses(Some(change)));
        assert!(m.reuses(Some(0.25)), "equal to the threshold reuses");
        assert!(!m.reuses(Some(0.2500001)));
        let rebuilt = m.reuse(&r1).unwrap().to_vec2::<f32>().unwrap();
        for (got, want) in rebuilt[0].iter().zip([2.2f32, -1.4, 4.6, -3.8]) {
            assert!((got - want).abs() < 1e-6, "{rebuilt:?}");
        }
    }

    #[test]
    fn rows_select_and_merge_back() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((4, 2))
            .unwrap();
        let a = select_rows(&t, &[0, 2]).unwrap();
        let b = select_rows(&t, &[1, 3]).unwrap();
        let merged = merge_rows(vec![(vec![1, 3], b), (vec![0, 2], a)], 4).unwrap();
        assert_eq!(
            merged.to_vec2::<f32>().unwrap(),
            t.to_vec2::<f32>().unwrap()
        );
        assert!(merge_rows(vec![(vec![0], t.narrow(0, 0, 1).unwrap())], 2).is_err());
    }

    #[test]
    fn an_owned_row_holds_only_its_own_elements() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let row = own_row(&t, 1).unwrap();
        assert_eq!(row.to_vec2::<f32>().unwrap(), [[4.0, 5.0, 6.0, 7.0]]);
        let (storage, layout) = row.storage_and_layout();
        let held = match &*storage {
            candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().unwrap().len(),
            _ => unreachable!(),
        };
        assert_eq!((held, layout.start_offset()), (4, 0));
    }
}
