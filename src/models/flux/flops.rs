//! FLOPs of a FLUX transformer forward, by part, for one candidate: what a cached forward
//! saves is counted from these. Matrix products only (a multiply-add is 2 FLOPs); norms,
//! activations, RoPE and residual adds are left out (well under 1% at FLUX.1 size).

use super::config::FluxConfig;

/// FLOPs of each part of one candidate's forward at given token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardFlops {
    /// `x_embedder`, `context_embedder` and the time/guidance/text MLPs.
    pub embed: u64,
    /// One double-stream block, whole.
    pub double_block: u64,
    /// The attention of one double-stream block: q/k/v of both streams, the score and
    /// value products over the joint sequence, and the two output projections.
    pub double_attention: u64,
    /// One single-stream block, whole.
    pub single_block: u64,
    /// The attention of one single-stream block: q/k/v and the score and value products.
    pub single_attention: u64,
    /// `norm_out`'s modulation and `proj_out`.
    pub final_layer: u64,
    /// Double-stream blocks in the model.
    pub doubles: u64,
    /// Single-stream blocks in the model.
    pub singles: u64,
}

/// `2 * rows * input * output`: one linear layer over `rows` tokens.
fn linear(rows: usize, input: usize, output: usize) -> u64 {
    2 * (rows * input * output) as u64
}

impl ForwardFlops {
    /// The parts for `image_tokens` packed image tokens and `text_tokens` T5 tokens.
    pub fn new(config: &FluxConfig, image_tokens: usize, text_tokens: usize) -> Self {
        let (h, mlp) = (config.hidden(), config.mlp_hidden());
        let (si, st) = (image_tokens, text_tokens);
        let joint = si + st;
        // Scores (q k^T) and values (weights v) over every head: 2 * 2 * S^2 * hidden.
        let scores = 4 * (joint * joint * h) as u64;
        // The timestep (and guidance) features are 256 wide (embeddings::timestep_features).
        let conditioning = 1 + usize::from(config.guidance_embeds);
        let embed = linear(si, config.in_channels, h)
            + linear(st, config.joint_attention_dim, h)
            + conditioning as u64 * (linear(1, 256, h) + linear(1, h, h))
            + linear(1, config.pooled_projection_dim, h)
            + linear(1, h, h);
        let stream_attention = |s: usize| 3 * linear(s, h, h) + linear(s, h, h);
        let double_attention = stream_attention(si) + stream_attention(st) + scores;
        let double_block = 2 * linear(1, h, 6 * h)
            + double_attention
            + linear(si, h, mlp)
            + linear(si, mlp, h)
            + linear(st, h, mlp)
            + linear(st, mlp, h);
        let single_attention = 3 * linear(joint, h, h) + scores;
        let single_block = linear(1, h, 3 * h)
            + single_attention
            + linear(joint, h, mlp)
            + linear(joint, h + mlp, h);
        let final_layer = linear(1, h, 2 * h) + linear(si, h, config.out_channels());
        Self {
            embed,
            double_block,
            double_attention,
            single_block,
            single_attention,
            final_layer,
            doubles: config.num_layers as u64,
            singles: config.num_single_layers as u64,
        }
    }

    /// A full forward.
    pub fn full(&self) -> u64 {
        self.embed
            + self.doubles * self.double_block
            + self.singles * self.single_block
            + self.final_layer
    }

    /// A First-Block-Cache hit: the embeddings, the first block and the final layer.
    pub fn first_block_only(&self) -> u64 {
        self.embed + self.double_block + self.final_layer
    }

    /// A TaylorSeer predicted step (default mode): everything but the attentions.
    pub fn without_attention(&self) -> u64 {
        self.full() - self.doubles * self.double_attention - self.singles * self.single_attention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_forward_at_flux_size_counts_each_block_weight_once_per_token() {
        // FLUX.1 Fill at a 512 x 512 panel: a 1024 x 512 diptych is 2048 image tokens, plus
        // 512 T5 tokens. Every token meets 12 hidden^2 weights in each of the 19 + 38
        // blocks (a double block's two streams each 12, a single block 3 + 4 + 5); every
        // block attends over all 2560 tokens.
        let c = FluxConfig::fill_dev();
        let f = ForwardFlops::new(&c, 2048, 512);
        let h = c.hidden() as f64;
        let expected = 2.0 * 57.0 * 12.0 * h * h * 2560.0 + 57.0 * 4.0 * 2560f64.powi(2) * h;
        let ratio = f.full() as f64 / expected;
        assert!((1.0..1.01).contains(&ratio), "{ratio}: {f:?}");
        // A cache hit of First-Block-Cache runs one block of 57 (and the ends).
        let hit = f.first_block_only() as f64 / f.full() as f64;
        assert!(hit < 0.03, "{hit}");
        let predicted = f.without_attention() as f64 / f.full() as f64;
        assert!((0.5..0.8).contains(&predicted), "{predicted}");
    }

    /// The refine's cost the README and docs/commands.md quote: a 1024 refine forward
    /// (2048x1024 diptych, 8192 image tokens) is 4.39 edit forwards at 512, a 768 one 2.24.
    #[test]
    fn a_refine_forward_costs_what_the_docs_say_in_edit_steps() {
        let c = FluxConfig::fill_dev();
        let edit = ForwardFlops::new(&c, 2048, 512).full() as f64;
        let at_1024 = ForwardFlops::new(&c, 8192, 512).full() as f64 / edit;
        let at_768 = ForwardFlops::new(&c, 4608, 512).full() as f64 / edit;
        assert!((at_1024 - 4.39).abs() < 0.005, "{at_1024}");
        assert!((at_768 - 2.24).abs() < 0.005, "{at_768}");
    }
}
