//! FLUX steps replayed from a CUDA graph (issue 31, item 4): the candidates of one edit
//! share every shape of a step, so the forward is captured once per run of steps and
//! replayed for the rest (see [`crate::models::cuda::graph`] for what capture needs).
//!
//! [`StepGraphs`] keeps at most one graph: the one for the current batch shape and edit
//! (its text conditioning and rotary tables are read by address, so another edit, or a
//! batch of another size, captures anew and drops the old one). It is captured on the
//! second consecutive step of one shape and edit (the first runs eagerly), so steps of
//! edits that alternate run eagerly instead of capturing at every step. Between replays it writes
//! the step's latents, sigma and guidance into the buffers the graph reads, and hands the
//! caller a copy of the output. Step caches (First-Block-Cache, TaylorSeer) decide per
//! candidate on the host, so steps with a cache on run eagerly.
//!
//! Opt-in until measured on a device: `ICEDIT_CUDA_GRAPH=on` ([`ENV`]). A graph's memory
//! holds one forward's activations for as long as the graph lives, where an eager forward
//! holds them only while it runs: the memory plan's one forward in the denoising phase
//! stands for either (the old graph is dropped before a new shape runs), and `bench flux
//! --graph` measures the graph's memory beside the eager forward's. Because it stays
//! reserved between steps, callers drop the graph ([`StepGraphs::release`]) before the
//! other phases need the memory (decoding, encoding, a new edit).

use candle_core::{DType, Result, Tensor, TensorId};

use super::transformer::{step_scalars, FluxTransformer, StepInputs};
use crate::models::cuda::graph::{CapturedForward, GraphNodes};
use crate::models::step_cache::{CandidateCache, RowWork};

/// The environment variable that turns graphs on: `on` / `1`, or `off` / `0` (the default).
pub const ENV: &str = "ICEDIT_CUDA_GRAPH";

/// Whether [`ENV`] turns graphs on, or the error naming it and its value.
pub fn enabled_from_env() -> std::result::Result<bool, String> {
    match std::env::var(ENV) {
        Ok(text) => parse_switch(&text),
        Err(std::env::VarError::NotPresent) => Ok(false),
        Err(e) => Err(format!("{ENV}: {e}")),
    }
}

fn parse_switch(text: &str) -> std::result::Result<bool, String> {
    match text.trim() {
        "on" | "1" => Ok(true),
        "" | "off" | "0" => Ok(false),
        other => Err(format!("{ENV}={other}: expected on or off")),
    }
}

/// What a graph was captured for: a forward reads these by address and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GraphKey {
    img_shape: Vec<usize>,
    dtype: DType,
    text: (TensorId, TensorId),
    rope: (TensorId, TensorId),
}

impl GraphKey {
    fn new(step: &StepInputs) -> Self {
        Self {
            img_shape: step.img.dims().to_vec(),
            dtype: step.img.dtype(),
            text: (step.text.t5.id(), step.text.pooled.id()),
            rope: (step.rope.0.id(), step.rope.1.id()),
        }
    }
}

/// A captured forward and the input buffers it reads.
struct Slot {
    key: GraphKey,
    img: Tensor,
    sigma: Tensor,
    guidance: Tensor,
    graph: CapturedForward,
}

/// Counts of what the graphs did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured.
    pub captures: usize,
    /// Steps served by replaying one.
    pub replays: usize,
    /// Steps run eagerly with graphs on (the first of a run of one shape, a cache on, a
    /// failed capture).
    pub eager: usize,
}

/// The FLUX forward through a CUDA graph per batch shape, or eagerly where graphs are off.
#[derive(Default)]
pub struct StepGraphs {
    on: bool,
    slot: Option<Slot>,
    /// A key whose capture failed, and why: it runs eagerly without retrying.
    refused: Option<(GraphKey, String)>,
    /// The key of the last eager step: a graph is captured when the next step has it too,
    /// so steps of edits that alternate (pipelined batches) never capture one per step.
    pending: Option<GraphKey>,
    stats: GraphStats,
}

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraphs")
            .field("on", &self.on)
            .field("captured", &self.slot.as_ref().map(|s| &s.key.img_shape))
            .field("stats", &self.stats)
            .finish()
    }
}

impl StepGraphs {
    /// Graphs on or off (off: every call is the transformer's own forward).
    pub fn new(on: bool) -> Self {
        Self {
            on,
            ..Self::default()
        }
    }

    /// As [`ENV`] says.
    pub fn from_env() -> std::result::Result<Self, String> {
        Ok(Self::new(enabled_from_env()?))
    }

    /// Whether graphs are asked for.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// What the graphs did so far.
    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// The nodes of the graph held now, if any.
    pub fn nodes(&self) -> Option<GraphNodes> {
        self.slot.as_ref().map(|s| s.graph.nodes())
    }

    /// Why the last capture failed, if it did.
    pub fn refusal(&self) -> Option<&str> {
        self.refused.as_ref().map(|(_, why)| why.as_str())
    }

    /// Drops the graph held (and its memory).
    pub fn release(&mut self) {
        self.slot = None;
        self.pending = None;
    }

    /// [`FluxTransformer::forward_cached`] with the full forwards through a graph: with
    /// every candidate's cache off (and graphs on, on CUDA) the step replays the graph,
    /// otherwise the transformer decides per candidate as it always does.
    pub fn forward_cached(
        &mut self,
        transformer: &FluxTransformer,
        step: &StepInputs,
        caches: &mut [CandidateCache],
    ) -> Result<(Tensor, Vec<RowWork>)> {
        if self.on && caches.iter().any(|c| c.config().is_on()) {
            self.stats.eager += 1;
        }
        transformer.forward_cached_with(step, caches, &mut || self.forward(transformer, step))
    }

    /// [`FluxTransformer::forward`], replayed from a graph when graphs are on and the
    /// device is CUDA. The result is the caller's own tensor (a copy of the graph's
    /// output), equal to the eager forward's.
    pub fn forward(&mut self, transformer: &FluxTransformer, step: &StepInputs) -> Result<Tensor> {
        let StepInputs {
            img,
            text,
            sigma,
            guidance,
            rope,
        } = *step;
        if !self.on || !img.device().is_cuda() {
            return transformer.forward(step);
        }
        let key = GraphKey::new(step);
        if self.refused.as_ref().is_some_and(|(k, _)| *k == key) {
            self.stats.eager += 1;
            return transformer.forward(step);
        }
        if let Some(slot) = self.slot.as_ref().filter(|s| s.key == key) {
            slot.img.slice_set(&img.contiguous()?, 0, 0)?;
            let (s, g) = step_scalars(img, sigma, guidance)?;
            slot.sigma.slice_set(&s, 0, 0)?;
            slot.guidance.slice_set(&g, 0, 0)?;
            slot.graph.launch()?;
            self.stats.replays += 1;
            // The next replay rewrites the output: the caller gets its own copy.
            return slot.graph.output().copy();
        }
        // A new shape or edit: the old graph goes first, so its memory is free for this one.
        self.slot = None;
        if self.pending.as_ref() != Some(&key) {
            // Seen once: run eagerly; capture if the next step repeats it.
            self.pending = Some(key);
            self.stats.eager += 1;
            return transformer.forward(step);
        }
        self.pending = None;
        let inputs = img.contiguous()?.copy()?;
        let (sigma_in, guidance_in) = step_scalars(img, sigma, guidance)?;
        let captured = CapturedForward::capture(img.device(), || {
            transformer.forward_at(&inputs, text, &sigma_in, &guidance_in, rope)
        });
        match captured {
            Ok((first, graph)) => {
                tracing::info!(
                    shape = ?key.img_shape,
                    launches = graph.nodes().launches(),
                    "FLUX step captured as a CUDA graph"
                );
                self.stats.captures += 1;
                self.slot = Some(Slot {
                    key,
                    img: inputs,
                    sigma: sigma_in,
                    guidance: guidance_in,
                    graph,
                });
                Ok(first)
            }
            Err(e) => {
                tracing::warn!(
                    shape = ?key.img_shape,
                    error = %e,
                    "CUDA graph capture failed; this shape runs eagerly"
                );
                self.refused = Some((key, e.to_string()));
                self.stats.eager += 1;
                transformer.forward(step)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bench::RandomWeights;
    use crate::models::flux::embeddings::rope_tables;
    use crate::models::flux::latents::joint_ids;
    use crate::models::flux::linear::Linears;
    use crate::models::flux::transformer::TextConditioning;
    use crate::models::flux::FluxConfig;
    use crate::models::kernel_check::max_abs_diff;
    use crate::models::step_cache::StepCache;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b).unwrap()
    }

    /// Off CUDA (and with a step cache on, anywhere) the graphs step aside: the results are
    /// the transformer's own, bit for bit, with the same work counted.
    #[test]
    fn off_cuda_and_with_caches_the_forward_is_the_transformers_own() {
        let config = FluxConfig {
            num_layers: 1,
            num_single_layers: 2,
            attention_head_dim: 32,
            num_attention_heads: 2,
            joint_attention_dim: 48,
            pooled_projection_dim: 24,
            axes_dims_rope: vec![4, 14, 14],
            ..FluxConfig::fill_dev()
        };
        let dev = Device::Cpu;
        let vb =
            VarBuilder::from_backend(Box::new(RandomWeights::default()), DType::F32, dev.clone());
        let transformer = FluxTransformer::new(vb, &config, &Linears::default()).unwrap();
        let (t5_tokens, rows, cols) = (8, 2, 4);
        let rope = rope_tables(
            &joint_ids(t5_tokens, rows, cols),
            &config.axes_dims_rope,
            10000.0,
            &dev,
        )
        .unwrap();
        let text = TextConditioning {
            t5: Tensor::randn(0f32, 1.0, (1, t5_tokens, config.joint_attention_dim), &dev).unwrap(),
            pooled: Tensor::randn(0f32, 1.0, (1, config.pooled_projection_dim), &dev).unwrap(),
        };
        let img = Tensor::randn(0f32, 1.0, (2, rows * cols, config.in_channels), &dev).unwrap();
        let step = |sigma| StepInputs {
            img: &img,
            text: &text,
            sigma,
            guidance: 30.0,
            rope: &rope,
        };
        let mut graphs = StepGraphs::new(true);

        let mut off = vec![CandidateCache::default(); 2];
        let (v, work) = graphs
            .forward_cached(&transformer, &step(0.6), &mut off)
            .unwrap();
        let eager = transformer.forward(&step(0.6)).unwrap();
        assert_eq!(max_diff(&v, &eager), 0.0);
        assert_eq!(work.len(), 2);
        assert!(work
            .iter()
            .all(|w| !w.cached && w.flops == w.full_flops && w.flops > 0));
        assert_eq!(graphs.stats(), GraphStats::default(), "no graph off CUDA");
        assert!(graphs.nodes().is_none());

        // A step cache on: the transformer's per-candidate path, counted as eager.
        let fbc = StepCache::FirstBlock { threshold: 0.5 };
        let mut ours = vec![CandidateCache::new(fbc); 2];
        let mut theirs = vec![CandidateCache::new(fbc); 2];
        for sigma in [0.9, 0.8] {
            let (a, wa) = graphs
                .forward_cached(&transformer, &step(sigma), &mut ours)
                .unwrap();
            let (b, wb) = transformer
                .forward_cached(&step(sigma), &mut theirs)
                .unwrap();
            assert_eq!(max_diff(&a, &b), 0.0);
            assert_eq!(format!("{wa:?}"), format!("{wb:?}"));
        }
        assert_eq!(graphs.stats().eager, 2);
    }

    #[test]
    fn the_switch_reads_on_and_off_and_names_itself_when_wrong() {
        assert_eq!(parse_switch("on"), Ok(true));
        assert_eq!(parse_switch(" 1 "), Ok(true));
        assert_eq!(parse_switch("off"), Ok(false));
        assert_eq!(parse_switch(""), Ok(false));
        let err = parse_switch("yes").unwrap_err();
        assert!(err.contains(ENV) && err.contains("yes"), "{err}");
    }
}
