//! Qwen2-VL / Qwen2.5-VL / Qwen3-VL for conditional generation: the vision tower's tokens spliced into
//! the language model at the `<|image_pad|>` positions, with 3-D position ids.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::Qwen2VlConfig;
use super::image::PreparedImage;
use super::text::{last_position, Deepstack, KvCache, Positions, TextModel};
use super::vision::VisionTower;
use crate::models::bench::StageClock;
use crate::models::weight_use::KnownUnused;

/// Tensors a Qwen-VL checkpoint of `config` may hold that the model does not read, because
/// transformers' `*ForConditionalGeneration` does not either. Every other unread tensor is
/// refused (see [`crate::models::weight_use`]).
pub fn unused_tensors(config: &Qwen2VlConfig) -> Vec<KnownUnused> {
    let mut known = Vec::new();
    if config.text.tie_word_embeddings {
        known.push(KnownUnused::new(
            "lm_head.weight",
            "with tie_word_embeddings the head is the embedding: `_tied_weights_keys = \
             {\"lm_head.weight\": \"model.language_model.embed_tokens.weight\"}` in \
             transformers' Qwen2VL / Qwen2_5_VL / Qwen3VL ForConditionalGeneration, so a \
             stored head is replaced when the weights are tied",
        ));
    }
    known
}

/// One prompt ready for the model: token ids with every image's pads expanded, and the
/// images in the order their pads appear.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    /// Token ids; image `i` occupies `images[i].token_count()` consecutive image-pad ids.
    pub ids: Vec<u32>,
    /// The images.
    pub images: Vec<PreparedImage>,
}

/// A prompt's state after prefill: its KV cache and the position id of the next token.
#[derive(Debug, Clone)]
pub struct PromptState {
    cache: KvCache,
    next_position: i64,
}

impl PromptState {
    /// Tokens seen so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// How generated tokens are drawn: temperature, then top-k, then top-p (nucleus), as
/// transformers' logits warpers apply them; seeded, so a reply is reproducible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits; 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the most likely tokens up to this probability mass.
    pub top_p: f32,
    /// Seed of the draws.
    pub seed: u64,
}

impl Sampling {
    /// Draws one token id from `logits` (`[vocab]`).
    pub fn pick(&self, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let top = logits[order[0]] / self.temperature;
        let mut weights: Vec<f32> = order
            .iter()
            .map(|&i| (logits[i] / self.temperature - top).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
        let mut kept = 0;
        let mut mass = 0.0;
        while kept < weights.len() {
            mass += weights[kept] / total;
            kept += 1;
            if mass >= self.top_p {
                break;
            }
        }
        weights.truncate(kept);
        let total: f32 = weights.iter().sum();
        let mut draw = rng.random::<f32>() * total;
        for (w, &i) in weights.iter().zip(&order) {
            if draw < *w {
                return i as u32;
            }
            draw -= w;
        }
        order[kept - 1] as u32
    }
}

/// How tokens are numbered for the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionMode {
    /// The model's own: 3-D (time, row, column) ids over image tokens (M-RoPE).
    Multimodal,
    /// 0..n for every token, image tokens included (how EditReward's heads were trained).
    Sequential,
}

/// Where the weights of one checkpoint live: transformers 4 writes `model.*` + `visual.*`,
/// transformers 5 `model.language_model.*` + `model.visual.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// `model.embed_tokens`, `visual.blocks`, `lm_head`.
    Classic,
    /// `model.language_model.embed_tokens`, `model.visual.blocks`, `lm_head`.
    Nested,
}

impl KeyLayout {
    /// Reads the layout off the key names.
    pub fn detect<'a>(mut keys: impl Iterator<Item = &'a str>) -> Option<Self> {
        keys.find_map(|k| {
            if k.starts_with("model.language_model.") || k.starts_with("model.visual.") {
                Some(Self::Nested)
            } else if k.starts_with("model.embed_tokens") || k.starts_with("visual.") {
                Some(Self::Classic)
            } else {
                None
            }
        })
    }
}

/// The whole model.
pub struct Qwen2Vl {
    config: Qwen2VlConfig,
    vision: VisionTower,
    text: TextModel,
    device: Device,
    dtype: DType,
}

impl Qwen2Vl {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint's top level.
    pub fn new(config: &Qwen2VlConfig, layout: KeyLayout, vb: VarBuilder) -> Result<Self> {
        let (text_vb, vision_vb) = match layout {
            KeyLayout::Classic => (vb.pp("model"), vb.pp("visual")),
            KeyLayout::Nested => (vb.pp("model.language_model"), vb.pp("model.visual")),
        };
        Ok(Self {
            vision: VisionTower::new(&config.vision, config.family, vision_vb)?,
            text: TextModel::new(&config.text, text_vb, vb.pp("lm_head"))?,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Qwen2VlConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// 3-D position ids of a prompt and the position of the token after it.
    pub fn positions(&self, prompt: &EncodedPrompt) -> Result<(Vec<[i64; 3]>, i64)> {
        rope_positions(&self.config, prompt)
    }

    /// Runs a batch of prompts of equal length and returns every position's logits
    /// `[batch, seq, vocab]` (f32). Used by the reference tests.
    pub fn forward_all(&self, batch: &[EncodedPrompt]) -> Result<Tensor> {
        let (hidden, _) = self.prefill_hidden(batch)?;
        self.text.logits(&hidden)
    }

    /// Runs a batch of prompts of equal length: the next-token logits `[batch, vocab]` (f32)
    /// and one [`PromptState`] per prompt to continue from.
    pub fn prefill(&self, batch: &[EncodedPrompt]) -> Result<(Tensor, Vec<PromptState>)> {
        let (hidden, sessions) = self.prefill_hidden(batch)?;
        let logits = self.text.logits(&last_position(&hidden)?)?;
        Ok((logits, sessions))
    }

    /// Feeds more text tokens to a session; returns the logits after the last one `[vocab]`.
    pub fn extend(&self, session: &mut PromptState, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            candle_core::bail!("extend needs at least one token");
        }
        let positions: Positions = vec![(0..ids.len() as i64)
            .map(|i| [session.next_position + i; 3])
            .collect()];
        let ids_t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let embeds = self.text.embed(&ids_t)?;
        let hidden = self
            .text
            .forward_embeds(&embeds, &positions, &mut session.cache, None)?;
        session.next_position += ids.len() as i64;
        self.text.logits(&last_position(&hidden)?)?.squeeze(0)
    }

    /// Greedy decoding from a session whose next-token logits are `logits` `[vocab]`: takes
    /// the most likely token until one of the config's end-of-turn ids or `max_new_tokens`.
    /// Returns the new tokens without the end-of-turn id.
    pub fn greedy(
        &self,
        session: &mut PromptState,
        logits: Tensor,
        max_new_tokens: usize,
    ) -> Result<Vec<u32>> {
        self.generate(session, logits, max_new_tokens, None)
    }

    /// Generates up to `max_new_tokens` tokens after `session` (whose next-token logits are
    /// `logits`, `[vocab]`), greedily or by `sampling`, stopping before an end-of-turn id.
    pub fn generate(
        &self,
        session: &mut PromptState,
        logits: Tensor,
        max_new_tokens: usize,
        sampling: Option<&Sampling>,
    ) -> Result<Vec<u32>> {
        let eos = &self.config.eos_token_ids;
        let mut out = Vec::new();
        let mut logits = logits;
        let mut rng = sampling.map(|s| ChaCha8Rng::seed_from_u64(s.seed));
        while out.len() < max_new_tokens {
            let next = match (sampling, rng.as_mut()) {
                (Some(s), Some(rng)) if s.temperature > 0.0 => {
                    s.pick(&logits.to_dtype(DType::F32)?.to_vec1::<f32>()?, rng)
                }
                _ => logits.argmax(0)?.to_scalar::<u32>()?,
            };
            if eos.contains(&next) {
                break;
            }
            out.push(next);
            if out.len() < max_new_tokens {
                logits = self.extend(session, &[next])?;
            }
        }
        Ok(out)
    }

    /// Runs only the vision tower (and merger) over a prompt's images, returning their
    /// tokens `[image tokens, hidden]`: what a prefill spends on images, for profiling.
    pub fn vision_tokens(&self, prompt: &EncodedPrompt) -> Result<Tensor> {
        let (pixels, grids) = self.vision_input(prompt)?;
        Ok(self.vision.forward(&pixels, &grids)?.tokens)
    }

    /// Seconds per stage of one vision tower run over `prompt`'s images (`bench judge`'s
    /// profile; see [`VisionTower::forward_timed`] for the stages).
    pub fn vision_profile(&self, prompt: &EncodedPrompt) -> Result<Vec<(&'static str, f64)>> {
        let (pixels, grids) = self.vision_input(prompt)?;
        let mut clock = StageClock::start(&self.device)?;
        self.vision
            .forward_timed(&pixels, &grids, Some(&mut clock))?;
        Ok(clock.stages().to_vec())
    }

    /// The text decoder's seconds per stage inside one prompt's prefill (see
    /// [`TextModel::forward_embeds_timed`]); the embedding (vision tower included) runs
    /// first, untimed. `bench judge` reports the stages' sum as the decoder's time, measured
    /// inside a prefill rather than as the prefill minus a separate vision run.
    pub fn decoder_profile(&self, prompt: &EncodedPrompt) -> Result<Vec<(&'static str, f64)>> {
        let positions = vec![rope_positions(&self.config, prompt)?.0];
        let (embeds, deepstack) = self.embed_with_images(std::slice::from_ref(prompt))?;
        let mut clock = StageClock::start(&self.device)?;
        self.text.forward_embeds_timed(
            &embeds,
            &positions,
            &mut KvCache::default(),
            deepstack.as_ref(),
            Some(&mut clock),
        )?;
        Ok(clock.stages().to_vec())
    }

    /// `[patches, patch_dim]` pixels of all the prompt's images and their grids.
    fn vision_input(&self, prompt: &EncodedPrompt) -> Result<(Tensor, Vec<[usize; 3]>)> {
        let grids: Vec<[usize; 3]> = prompt.images.iter().map(|i| i.grid_thw).collect();
        let patch_dim = self.config.vision.patch_dim();
        let pixels: Vec<f32> = prompt
            .images
            .iter()
            .flat_map(|i| i.pixel_values.iter().copied())
            .collect();
        let rows = pixels.len() / patch_dim.max(1);
        let pixels = Tensor::from_vec(pixels, (rows, patch_dim), &self.device)?;
        Ok((pixels, grids))
    }

    /// The final-norm hidden states `[seq, hidden]` of one prompt, its tokens numbered by
    /// `mode`.
    pub fn final_hidden(&self, prompt: &EncodedPrompt, mode: PositionMode) -> Result<Tensor> {
        let positions: Positions = match mode {
            PositionMode::Multimodal => vec![rope_positions(&self.config, prompt)?.0],
            PositionMode::Sequential => {
                vec![(0..prompt.ids.len() as i64).map(|p| [p; 3]).collect()]
            }
        };
        let (embeds, deepstack) = self.embed_with_images(std::slice::from_ref(prompt))?;
        let mut cache = KvCache::default();
        self.text
            .forward_embeds(&embeds, &positions, &mut cache, deepstack.as_ref())?
            .squeeze(0)
    }

    fn prefill_hidden(&self, batch: &[EncodedPrompt]) -> Result<(Tensor, Vec<PromptState>)> {
        let Some(first) = batch.first() else {
            candle_core::bail!("empty batch");
        };
        let seq = first.ids.len();
        if batch.iter().any(|p| p.ids.len() != seq) {
            candle_core::bail!("a prefill batch needs prompts of equal length");
        }
        let mut positions = Vec::with_capacity(batch.len());
        let mut next = Vec::with_capacity(batch.len());
        for prompt in batch {
            let (pos, n) = rope_positions(&self.config, prompt)?;
            positions.push(pos);
            next.push(n);
        }
        let (embeds, deepstack) = self.embed_with_images(batch)?;
        let mut cache = KvCache::default();
        let hidden =
            self.text
                .forward_embeds(&embeds, &positions, &mut cache, deepstack.as_ref())?;
        let sessions = next
            .into_iter()
            .enumerate()
            .map(|(i, next_position)| {
                Ok(PromptState {
                    cache: if batch.len() == 1 {
                        cache.clone()
                    } else {
                        cache.select(i)?
                    },
                    next_position,
                })
            })
            .collect::<Result<_>>()?;
        Ok((hidden, sessions))
    }

    /// Token embeddings `[batch, seq, hidden]` with the image-pad rows replaced by the
    /// vision tower's tokens, and the DeepStack features for those rows (Qwen3-VL).
    fn embed_with_images(&self, batch: &[EncodedPrompt]) -> Result<(Tensor, Option<Deepstack>)> {
        let (b, s) = (batch.len(), batch[0].ids.len());
        let ids: Vec<u32> = batch.iter().flat_map(|p| p.ids.iter().copied()).collect();
        let text = self
            .text
            .embed(&Tensor::from_vec(ids.clone(), (b, s), &self.device)?)?;
        let hidden = text.dim(2)?;
        let images: Vec<&PreparedImage> = batch.iter().flat_map(|p| p.images.iter()).collect();
        if images.is_empty() {
            return Ok((text, None));
        }
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let patch_dim = self.config.vision.patch_dim();
        let rows: usize = images.iter().map(|i| i.patch_count()).sum();
        let mut pixels = Vec::with_capacity(rows * patch_dim);
        for image in &images {
            if image.row_len() != patch_dim {
                candle_core::bail!(
                    "image patches have {} values, the vision tower expects {patch_dim}",
                    image.row_len()
                );
            }
            pixels.extend_from_slice(&image.pixel_values);
        }
        let pixels = Tensor::from_vec(pixels, (rows, patch_dim), &self.device)?;
        let vision = self.vision.forward(&pixels, &grids)?;
        let visual = vision.tokens.to_dtype(text.dtype())?;
        let n_visual = visual.dim(0)?;
        let pads = ids
            .iter()
            .filter(|&&t| t == self.config.image_token_id)
            .count();
        if pads != n_visual {
            candle_core::bail!(
                "the prompts have {pads} image-pad tokens but the images give {n_visual}"
            );
        }
        // Gather from [text rows; visual rows]: pad k takes visual row k.
        let mut next_visual = 0u32;
        let index: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.config.image_token_id {
                    next_visual += 1;
                    (b * s) as u32 + next_visual - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let table = Tensor::cat(&[&text.reshape((b * s, hidden))?, &visual], 0)?;
        let embeds = table
            .index_select(&Tensor::new(index.as_slice(), &self.device)?, 0)?
            .reshape((b, s, hidden))?;
        let deepstack = if vision.deepstack.is_empty() {
            None
        } else {
            let rows: Vec<u32> = ids
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == self.config.image_token_id)
                .map(|(i, _)| i as u32)
                .collect();
            Some(Deepstack {
                rows: Tensor::new(rows.as_slice(), &self.device)?,
                layers: vision.deepstack,
            })
        };
        Ok((embeds, deepstack))
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// transformers' `get_rope_index` for images: text tokens count up on all three axes; an
/// image's tokens share a start and add (t, row, column) of their merged grid; the text after
/// an image resumes one past the image's largest id.
pub fn rope_positions(
    config: &Qwen2VlConfig,
    prompt: &EncodedPrompt,
) -> Result<(Vec<[i64; 3]>, i64)> {
    let merge = config.vision.spatial_merge_size;
    let mut positions = Vec::with_capacity(prompt.ids.len());
    let mut next: i64 = 0;
    let mut images = prompt.images.iter();
    let mut i = 0;
    while i < prompt.ids.len() {
        if prompt.ids[i] != config.image_token_id {
            positions.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let Some(image) = images.next() else {
            candle_core::bail!("more image-pad runs than images in the prompt");
        };
        let [t, h, w] = image.grid_thw;
        let (lh, lw) = (h / merge, w / merge);
        let count = t * lh * lw;
        if prompt.ids[i..].len() < count
            || prompt.ids[i..i + count]
                .iter()
                .any(|&id| id != config.image_token_id)
        {
            candle_core::bail!("image {t}x{h}x{w} needs {count} consecutive image-pad tokens");
        }
        for ft in 0..t {
            // Qwen2.5-VL scales t by seconds per frame for video; an image has t = 1.
            let tt = ft as i64;
            for y in 0..lh {
                for x in 0..lw {
                    positions.push([next + tt, next + y as i64, next + x as i64]);
                }
            }
        }
        next += t.max(lh).max(lw) as i64;
        i += count;
    }
    if images.next().is_some() {
        candle_core::bail!("more images than image-pad runs in the prompt");
    }
    Ok((positions, next))
}

#[cfg(test)]
mod sampling_tests {
    use super::*;

    #[test]
    fn sampling_keeps_to_top_k_and_top_p_and_is_seeded() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 1.0];
        let draws = |s: Sampling| {
            let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
            (0..400)
                .map(|_| s.pick(&logits, &mut rng))
                .collect::<Vec<u32>>()
        };
        let base = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
        };
        let all = draws(base);
        assert_eq!(all, draws(base), "same seed, same draws");
        assert_ne!(all, draws(Sampling { seed: 8, ..base }));
        for t in [0u32, 1, 2, 3, 4] {
            assert!(all.contains(&t), "token {t} never drawn");
        }
        let two = draws(Sampling { top_k: 2, ..base });
        assert!(two.iter().all(|t| [1, 2].contains(t)) && two.contains(&1) && two.contains(&2));
        // Token 1 holds 0.47 of the mass: top_p 0.4 keeps it alone.
        let nucleus = draws(Sampling { top_p: 0.4, ..base });
        assert!(nucleus.iter().all(|&t| t == 1));
        // A low temperature sharpens towards the argmax.
        let cold = draws(Sampling {
            temperature: 0.01,
            ..base
        });
        assert!(cold.iter().filter(|&&t| t == 1).count() > 390);
    }
}
