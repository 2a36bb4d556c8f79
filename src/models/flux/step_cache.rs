//! FLUX's side of step caching ([`crate::models::step_cache`]): which tensors each rule
//! keeps and which blocks a cached forward skips, with diffusers 0.42.1's choices for
//! `FluxTransformer2DModel` (citations into its `hooks/` and
//! `models/transformers/transformer_flux.py`):
//!
//! - First-Block-Cache: the head is `transformer_blocks.0`, the tail the last single
//!   block (`first_block_cache.py:226-246`); the residual compared is the image stream's
//!   (`hidden_states`, `_helpers.py:247-261`). A hit runs the embeddings, the first block
//!   and the final layer.
//! - TaylorSeer: by default every block's attention module is predicted
//!   (`taylorseer_cache.py:14-20, 294`): a double block's `(img_attn, txt_attn)` after the
//!   output projections, a single block's joint attention before its `proj_out`; the
//!   modulations, MLPs and the final layer still run. In lite mode (`use_lite_mode`,
//!   l.296-301) the blocks return zeros and the final `proj_out` is predicted, so a
//!   predicted step is a prediction of the velocity and runs no block.
//!
//! Each batch row is a candidate with its own [`CandidateCache`]: rows that run in full go
//! through the model together (selected out of the batch when some rows are cached), the
//! others are rebuilt from their own caches, and the batch is put back in row order.

use candle_core::{DType, Result, Tensor};

use super::config::FluxConfig;
use super::flops::ForwardFlops;
use super::linear::LinearInput;
use super::transformer::{FluxTransformer, StepInputs, TextConditioning};
use crate::models::step_cache::{
    merge_rows, own_row, select_rows, CacheMemory, CandidateCache, FirstBlockMemory, RowWork,
    StepCache, TaylorMemory, TaylorStep,
};

fn error(message: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(message.into())
}

/// A row's First-Block-Cache memory; `None` for a row whose cache is off.
fn first_block(cache: &CandidateCache) -> Result<Option<&FirstBlockMemory>> {
    match &cache.memory {
        CacheMemory::FirstBlock(m) => Ok(Some(m)),
        CacheMemory::Off => Ok(None),
        CacheMemory::TaylorSeer(_) => Err(error("expected a First-Block-Cache")),
    }
}

fn first_block_mut(cache: &mut CandidateCache) -> Result<Option<&mut FirstBlockMemory>> {
    match &mut cache.memory {
        CacheMemory::FirstBlock(m) => Ok(Some(m)),
        CacheMemory::Off => Ok(None),
        CacheMemory::TaylorSeer(_) => Err(error("expected a First-Block-Cache")),
    }
}

fn taylor(cache: &CandidateCache) -> Result<&TaylorMemory> {
    match &cache.memory {
        CacheMemory::TaylorSeer(m) => Ok(m),
        _ => Err(error("expected a TaylorSeer cache")),
    }
}

/// A row's TaylorSeer memory; `None` for a row whose cache is off.
fn taylor_mut(cache: &mut CandidateCache) -> Result<Option<&mut TaylorMemory>> {
    match &mut cache.memory {
        CacheMemory::TaylorSeer(m) => Ok(Some(m)),
        CacheMemory::Off => Ok(None),
        CacheMemory::FirstBlock(_) => Err(error("expected a TaylorSeer cache")),
    }
}

/// The text conditioning of batch rows `rows` (shared conditioning stays shared).
fn text_rows(text: &TextConditioning, rows: &[usize], batch: usize) -> Result<TextConditioning> {
    let pick = |t: &Tensor| -> Result<Tensor> {
        if t.dim(0)? == batch {
            select_rows(t, rows)
        } else {
            Ok(t.clone())
        }
    };
    Ok(TextConditioning {
        t5: pick(&text.t5)?,
        pooled: pick(&text.pooled)?,
    })
}

/// TaylorSeer predictions of output `slot` for batch rows `rows`, stacked in that order.
fn predicted_rows(
    caches: &[CandidateCache],
    rows: &[usize],
    steps: &[Option<TaylorStep>],
    slot: usize,
) -> Result<Tensor> {
    let predictions = rows
        .iter()
        .map(|&i| {
            let step = steps[i]
                .as_ref()
                .ok_or_else(|| error("a row without a cache cannot be predicted"))?;
            taylor(&caches[i])?.predict(slot, step.step)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&predictions, 0)
}

/// Each row's TaylorSeer decision for this forward (the row's counter advances; `None`
/// for a row whose cache is off, which runs in full), and the rows that run in full and
/// those predicted.
type Decisions = (Vec<Option<TaylorStep>>, Vec<usize>, Vec<usize>);

fn taylor_steps(caches: &mut [CandidateCache]) -> Result<Decisions> {
    let mut steps = Vec::with_capacity(caches.len());
    for cache in caches.iter_mut() {
        let may_skip = cache.may_skip;
        steps.push(taylor_mut(cache)?.map(|m| m.begin_step(may_skip)));
    }
    let (full, predicted): (Vec<usize>, Vec<usize>) =
        (0..steps.len()).partition(|&i| steps[i].is_none_or(|s| s.full));
    for (row, s) in steps.iter().enumerate() {
        tracing::debug!(
            target: "icedit_scale::step_cache",
            row,
            step = s.map(|s| s.step),
            full = s.is_none_or(|s| s.full),
            "taylorseer"
        );
    }
    Ok((steps, full, predicted))
}

/// What each row of a TaylorSeer forward ran: a full forward where it ran in full (or has
/// no cache), `cached_flops` where it was predicted.
fn taylor_work(
    steps: &[Option<TaylorStep>],
    flops: &ForwardFlops,
    cached_flops: u64,
) -> Vec<RowWork> {
    steps
        .iter()
        .map(|s| match s {
            Some(s) if !s.full => RowWork::cached(cached_flops, flops.full()),
            _ => RowWork::full(flops.full()),
        })
        .collect()
}

/// Updates the caches of the rows that ran in full (`full[j]` is row `outputs[..]`'s
/// j-th row) from their outputs, one tensor per slot.
fn update_full_rows(
    caches: &mut [CandidateCache],
    steps: &[Option<TaylorStep>],
    full: &[usize],
    outputs: &[Tensor],
) -> Result<()> {
    for (j, &row) in full.iter().enumerate() {
        let (Some(step), Some(memory)) = (steps[row], taylor_mut(&mut caches[row])?) else {
            continue;
        };
        let rows = outputs
            .iter()
            .map(|t| own_row(t, j))
            .collect::<Result<Vec<_>>>()?;
        memory.update(step.step, rows)?;
    }
    Ok(())
}

impl FluxTransformer {
    /// [`Self::forward`] for a batch whose row `i` carries the step cache `caches[i]`: each
    /// row runs in full or is served from its cache as its own rule decides, and its cache
    /// learns from a full forward. Returns the velocity and what each row ran.
    ///
    /// The rows whose cache is on must follow one rule (a batch is one edit's candidates);
    /// rows whose cache is off run in full beside them. With every cache off this is
    /// [`Self::forward`] itself; with every row running in full the same operations run as
    /// in [`Self::forward`], so the output is the same bit for bit.
    pub fn forward_cached(
        &self,
        step: &StepInputs,
        caches: &mut [CandidateCache],
    ) -> Result<(Tensor, Vec<RowWork>)> {
        self.forward_cached_with(step, caches, &mut || self.forward(step))
    }

    /// [`Self::forward_cached`] with the forward of a batch whose caches are all off given
    /// by `full` (it must compute [`Self::forward`] of these inputs): a CUDA graph's replay
    /// ([`super::graph_step`]).
    pub fn forward_cached_with(
        &self,
        step: &StepInputs,
        caches: &mut [CandidateCache],
        full: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<RowWork>)> {
        let batch = step.img.dim(0)?;
        if caches.len() != batch {
            return Err(error(format!(
                "{} step caches for a batch of {batch}",
                caches.len()
            )));
        }
        let flops = ForwardFlops::new(self.config(), step.img.dim(1)?, step.text.t5.dim(1)?);
        let mut rules = caches
            .iter()
            .map(CandidateCache::config)
            .filter(StepCache::is_on);
        let rule = rules.next().unwrap_or_default();
        if let Some(other) = rules.find(|c| *c != rule) {
            return Err(error(format!(
                "the rows of one forward must share one step cache rule, got {rule} and {other}"
            )));
        }
        match rule {
            StepCache::None => Ok((full()?, vec![RowWork::full(flops.full()); batch])),
            StepCache::FirstBlock { .. } => self.first_block_cached(step, caches, &flops),
            StepCache::TaylorSeer(t) if t.lite => self.output_predicted(step, caches, &flops),
            StepCache::TaylorSeer(_) => self.attention_predicted(step, caches, &flops),
        }
    }

    /// First-Block-Cache (`first_block_cache.py:78-190`), decided per row.
    fn first_block_cached(
        &self,
        step: &StepInputs,
        caches: &mut [CandidateCache],
        flops: &ForwardFlops,
    ) -> Result<(Tensor, Vec<RowWork>)> {
        let batch = caches.len();
        let (img0, txt0, temb) = self.embed(step)?;
        let (head, rest) = self
            .double_blocks()
            .split_first()
            .ok_or_else(|| error("First-Block-Cache needs a double-stream block"))?;
        let (img1, txt1) = head.forward(&img0, &txt0, &temb, step.rope)?;
        // The head block's residual on the image stream, [B, S_img, hidden].
        let residual = (&img1 - &img0)?;
        let (mut full, mut reused) = (Vec::new(), Vec::new());
        for (row, cache) in caches.iter_mut().enumerate() {
            let may_skip = cache.may_skip;
            let Some(memory) = first_block_mut(cache)? else {
                full.push(row);
                continue;
            };
            let change = memory.observe(&residual.narrow(0, row, 1)?)?;
            let reuse = may_skip && memory.reuses(change);
            tracing::debug!(
                target: "icedit_scale::step_cache",
                row,
                ?change,
                threshold = memory.threshold(),
                full = !reuse,
                "first-block cache"
            );
            if reuse {
                reused.push(row);
            } else {
                full.push(row);
            }
        }
        let mut parts = Vec::with_capacity(2);
        if !full.is_empty() {
            let head_out = select_rows(&img1, &full)?;
            let out = self.run_blocks(
                rest,
                head_out.clone(),
                select_rows(&txt1, &full)?,
                &select_rows(&temb, &full)?,
                step.rope,
            )?;
            // What every block after the head added to the image stream.
            let tail = (&out - &head_out)?;
            for (j, &row) in full.iter().enumerate() {
                if let Some(memory) = first_block_mut(&mut caches[row])? {
                    memory.remember(own_row(&residual, row)?, own_row(&tail, j)?);
                }
            }
            parts.push((full, out));
        }
        if !reused.is_empty() {
            let rows = reused
                .iter()
                .map(|&row| {
                    first_block(&caches[row])?
                        .ok_or_else(|| error("a row without a cache cannot reuse one"))?
                        .reuse(&img1.narrow(0, row, 1)?)
                })
                .collect::<Result<Vec<_>>>()?;
            parts.push((reused.clone(), Tensor::cat(&rows, 0)?));
        }
        let img = merge_rows(parts, batch)?;
        let velocity = self.final_layer().forward(&img, &temb)?;
        let work = (0..batch)
            .map(|row| {
                if reused.contains(&row) {
                    RowWork::cached(flops.first_block_only(), flops.full())
                } else {
                    RowWork::full(flops.full())
                }
            })
            .collect();
        Ok((velocity, work))
    }

    /// TaylorSeer's default mode: every block's attention output computed (full rows) or
    /// predicted (the others); slots `2d`, `2d + 1` are double block d's image and text
    /// attention, slot `2 * doubles + s` single block s's.
    fn attention_predicted(
        &self,
        step: &StepInputs,
        caches: &mut [CandidateCache],
        flops: &ForwardFlops,
    ) -> Result<(Tensor, Vec<RowWork>)> {
        let batch = caches.len();
        let (steps, full, predicted) = taylor_steps(caches)?;
        let doubles = self.double_blocks().len();
        let known: &[CandidateCache] = caches;
        // Per slot, the attention outputs of the full rows (in `full` order).
        let mut computed: Vec<Tensor> = Vec::new();
        let (mut img, mut txt, temb) = self.embed(step)?;
        for (d, block) in self.double_blocks().iter().enumerate() {
            (img, txt) = block.forward_with(&img, &txt, &temb, |img_in, txt_in| {
                let (mut img_parts, mut txt_parts) = (Vec::new(), Vec::new());
                if !full.is_empty() {
                    // The selected rows' fp8 rows (if a layer takes them) are made anew:
                    // per-row quantization commutes with the selection.
                    let (a, t) = block.attention(
                        &LinearInput::new(select_rows(img_in.dense(), &full)?),
                        &LinearInput::new(select_rows(txt_in.dense(), &full)?),
                        step.rope,
                    )?;
                    computed.extend([a.clone(), t.clone()]);
                    img_parts.push((full.clone(), a));
                    txt_parts.push((full.clone(), t));
                }
                if !predicted.is_empty() {
                    let a = predicted_rows(known, &predicted, &steps, 2 * d)?;
                    let t = predicted_rows(known, &predicted, &steps, 2 * d + 1)?;
                    img_parts.push((predicted.clone(), a));
                    txt_parts.push((predicted.clone(), t));
                }
                Ok((merge_rows(img_parts, batch)?, merge_rows(txt_parts, batch)?))
            })?;
        }
        let n_txt = txt.dim(1)?;
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for (s, block) in self.single_blocks().iter().enumerate() {
            joint = block.forward_with(&joint, &temb, |normed| {
                let mut parts = Vec::new();
                if !full.is_empty() {
                    let selected = LinearInput::new(select_rows(normed.dense(), &full)?);
                    let a = block.attention(&selected, step.rope)?;
                    computed.push(a.clone());
                    parts.push((full.clone(), a));
                }
                if !predicted.is_empty() {
                    let slot = 2 * doubles + s;
                    parts.push((
                        predicted.clone(),
                        predicted_rows(known, &predicted, &steps, slot)?,
                    ));
                }
                merge_rows(parts, batch)
            })?;
        }
        let img = joint.narrow(1, n_txt, joint.dim(1)? - n_txt)?;
        let velocity = self.final_layer().forward(&img, &temb)?;
        update_full_rows(caches, &steps, &full, &computed)?;
        let work = taylor_work(&steps, flops, flops.without_attention());
        Ok((velocity, work))
    }

    /// TaylorSeer's lite mode: the full rows run the whole model, the others are the
    /// prediction of the model output (`proj_out`, slot 0).
    fn output_predicted(
        &self,
        step: &StepInputs,
        caches: &mut [CandidateCache],
        flops: &ForwardFlops,
    ) -> Result<(Tensor, Vec<RowWork>)> {
        let batch = caches.len();
        let (steps, full, predicted) = taylor_steps(caches)?;
        let mut parts = Vec::with_capacity(2);
        if !full.is_empty() {
            let (img, text) = (
                select_rows(step.img, &full)?,
                text_rows(step.text, &full, batch)?,
            );
            let velocity = self.forward(&StepInputs {
                img: &img,
                text: &text,
                ..*step
            })?;
            update_full_rows(caches, &steps, &full, std::slice::from_ref(&velocity))?;
            parts.push((full, velocity));
        }
        if !predicted.is_empty() {
            parts.push((
                predicted.clone(),
                predicted_rows(caches, &predicted, &steps, 0)?,
            ));
        }
        let work = taylor_work(&steps, flops, 0);
        Ok((merge_rows(parts, batch)?, work))
    }
}

/// Bytes one candidate's step cache holds between forwards (at most; TaylorSeer reaches
/// it after `order + 1` full steps) for `image_tokens` image and `text_tokens` text tokens
/// with the transformer in `dtype`. An update holds the old and the new factors together
/// for the length of one forward; that transient is the forward's working memory.
///
/// - First-Block-Cache: the head and tail residuals of the image stream, in `dtype`.
/// - TaylorSeer: `order + 1` factors, in the factor dtype, of every block's attention
///   output (`S_img + S_txt` tokens of `hidden` per block), or in lite mode of the model
///   output (`S_img x out_channels`).
pub fn cache_bytes(
    config: &FluxConfig,
    cache: &StepCache,
    image_tokens: usize,
    text_tokens: usize,
    dtype: DType,
) -> usize {
    match cache {
        StepCache::None => 0,
        StepCache::FirstBlock { .. } => 2 * image_tokens * config.hidden() * dtype.size_in_bytes(),
        StepCache::TaylorSeer(t) => {
            let per_order = if t.lite {
                image_tokens * config.out_channels()
            } else {
                (config.num_layers + config.num_single_layers)
                    * (image_tokens + text_tokens)
                    * config.hidden()
            };
            (t.order + 1) * per_order * t.factors.dtype().size_in_bytes()
        }
    }
}
