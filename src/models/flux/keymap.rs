//! Black Forest Labs checkpoint names for the diffusers names the model code asks for.
//!
//! The model is written against diffusers names. A BFL file (`flux1-fill-dev.safetensors`,
//! `ae.safetensors`) stores some tensors fused (q, k, v and the single-block MLP input share
//! one matrix) or reordered (the final modulation is `(shift, scale)`), so a diffusers name
//! maps to a BFL key plus a way to cut it.

/// How to cut a diffusers tensor out of its BFL tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The whole tensor.
    All,
    /// Rows `start..start + len` of dimension 0 (a slice of a fused projection).
    Rows(usize, usize),
    /// The two halves of dimension 0 swapped.
    SwapHalves,
    /// A 1x1 convolution kernel `[o, i, 1, 1]` used as a linear weight `[o, i]`.
    Squeeze,
}

/// The BFL key and cut of a diffusers transformer tensor name, or `None` if it has none.
/// `hidden` is the stream width, `mlp` the single-block MLP width.
pub fn transformer_key(name: &str, hidden: usize, mlp: usize) -> Option<(String, Cut)> {
    let (module, kind) = name.rsplit_once('.')?;
    let whole = |m: &str| Some((format!("{m}.{kind}"), Cut::All));
    let rows = |m: &str, i: usize| Some((format!("{m}.{kind}"), Cut::Rows(i * hidden, hidden)));
    let simple = [
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        (
            "time_text_embed.timestep_embedder.linear_1",
            "time_in.in_layer",
        ),
        (
            "time_text_embed.timestep_embedder.linear_2",
            "time_in.out_layer",
        ),
        (
            "time_text_embed.text_embedder.linear_1",
            "vector_in.in_layer",
        ),
        (
            "time_text_embed.text_embedder.linear_2",
            "vector_in.out_layer",
        ),
        (
            "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.in_layer",
        ),
        (
            "time_text_embed.guidance_embedder.linear_2",
            "guidance_in.out_layer",
        ),
        ("proj_out", "final_layer.linear"),
    ];
    if let Some((_, b)) = simple.iter().find(|(d, _)| *d == module) {
        return whole(b);
    }
    if module == "norm_out.linear" {
        return Some((
            format!("final_layer.adaLN_modulation.1.{kind}"),
            Cut::SwapHalves,
        ));
    }
    if let Some(rest) = module.strip_prefix("transformer_blocks.") {
        let (i, part) = rest.split_once('.')?;
        let d = format!("double_blocks.{i}");
        let norm = |m: &str| Some((format!("{d}.{m}.scale"), Cut::All));
        return match part {
            "norm1.linear" => whole(&format!("{d}.img_mod.lin")),
            "norm1_context.linear" => whole(&format!("{d}.txt_mod.lin")),
            "attn.to_q" => rows(&format!("{d}.img_attn.qkv"), 0),
            "attn.to_k" => rows(&format!("{d}.img_attn.qkv"), 1),
            "attn.to_v" => rows(&format!("{d}.img_attn.qkv"), 2),
            "attn.add_q_proj" => rows(&format!("{d}.txt_attn.qkv"), 0),
            "attn.add_k_proj" => rows(&format!("{d}.txt_attn.qkv"), 1),
            "attn.add_v_proj" => rows(&format!("{d}.txt_attn.qkv"), 2),
            "attn.norm_q" => norm("img_attn.norm.query_norm"),
            "attn.norm_k" => norm("img_attn.norm.key_norm"),
            "attn.norm_added_q" => norm("txt_attn.norm.query_norm"),
            "attn.norm_added_k" => norm("txt_attn.norm.key_norm"),
            "attn.to_out.0" => whole(&format!("{d}.img_attn.proj")),
            "attn.to_add_out" => whole(&format!("{d}.txt_attn.proj")),
            "ff.net.0.proj" => whole(&format!("{d}.img_mlp.0")),
            "ff.net.2" => whole(&format!("{d}.img_mlp.2")),
            "ff_context.net.0.proj" => whole(&format!("{d}.txt_mlp.0")),
            "ff_context.net.2" => whole(&format!("{d}.txt_mlp.2")),
            _ => None,
        };
    }
    if let Some(rest) = module.strip_prefix("single_transformer_blocks.") {
        let (i, part) = rest.split_once('.')?;
        let d = format!("single_blocks.{i}");
        return match part {
            "norm.linear" => whole(&format!("{d}.modulation.lin")),
            "attn.to_q" => rows(&format!("{d}.linear1"), 0),
            "attn.to_k" => rows(&format!("{d}.linear1"), 1),
            "attn.to_v" => rows(&format!("{d}.linear1"), 2),
            "proj_mlp" => Some((format!("{d}.linear1.{kind}"), Cut::Rows(3 * hidden, mlp))),
            "attn.norm_q" => Some((format!("{d}.norm.query_norm.scale"), Cut::All)),
            "attn.norm_k" => Some((format!("{d}.norm.key_norm.scale"), Cut::All)),
            "proj_out" => whole(&format!("{d}.linear2")),
            _ => None,
        };
    }
    None
}

/// The BFL `ae.safetensors` key and cut of a diffusers `AutoencoderKL` tensor name.
/// `levels` is the number of resolution levels (4 for the FLUX AE).
pub fn vae_key(name: &str, levels: usize) -> (String, Cut) {
    let mut k = name.to_string();
    for part in ["encoder", "decoder"] {
        k = k.replace(
            &format!("{part}.conv_norm_out"),
            &format!("{part}.norm_out"),
        );
        k = k.replace(
            &format!("{part}.mid_block.resnets.0"),
            &format!("{part}.mid.block_1"),
        );
        k = k.replace(
            &format!("{part}.mid_block.resnets.1"),
            &format!("{part}.mid.block_2"),
        );
        for (a, b) in [
            ("group_norm", "norm"),
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
            ("query", "q"),
            ("key", "k"),
            ("value", "v"),
            ("proj_attn", "proj_out"),
        ] {
            k = k.replace(
                &format!("{part}.mid_block.attentions.0.{a}."),
                &format!("{part}.mid.attn_1.{b}."),
            );
        }
    }
    for i in 0..levels {
        // BFL numbers decoder levels from the lowest resolution up; diffusers the reverse.
        let up = levels - 1 - i;
        k = k.replace(
            &format!("encoder.down_blocks.{i}.resnets."),
            &format!("encoder.down.{i}.block."),
        );
        k = k.replace(
            &format!("decoder.up_blocks.{i}.resnets."),
            &format!("decoder.up.{up}.block."),
        );
        k = k.replace(
            &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
            &format!("encoder.down.{i}.downsample.conv"),
        );
        k = k.replace(
            &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
            &format!("decoder.up.{up}.upsample.conv"),
        );
    }
    k = k.replace("conv_shortcut", "nin_shortcut");
    let cut = if k.contains(".mid.attn_1.") && k.ends_with(".weight") && !k.contains(".norm.") {
        Cut::Squeeze
    } else {
        Cut::All
    };
    (k, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projections_are_cut_by_rows() {
        assert_eq!(
            transformer_key("transformer_blocks.3.attn.to_k.weight", 3072, 12288),
            Some((
                "double_blocks.3.img_attn.qkv.weight".into(),
                Cut::Rows(3072, 3072)
            ))
        );
        assert_eq!(
            transformer_key("single_transformer_blocks.0.proj_mlp.bias", 3072, 12288),
            Some((
                "single_blocks.0.linear1.bias".into(),
                Cut::Rows(9216, 12288)
            ))
        );
        assert_eq!(
            transformer_key("norm_out.linear.weight", 3072, 12288),
            Some((
                "final_layer.adaLN_modulation.1.weight".into(),
                Cut::SwapHalves
            ))
        );
        assert_eq!(transformer_key("nonsense.weight", 1, 1), None);
    }

    #[test]
    fn vae_levels_reverse_in_the_decoder() {
        assert_eq!(
            vae_key("decoder.up_blocks.0.resnets.1.conv1.weight", 4).0,
            "decoder.up.3.block.1.conv1.weight"
        );
        assert_eq!(
            vae_key("encoder.mid_block.attentions.0.to_q.weight", 4),
            ("encoder.mid.attn_1.q.weight".into(), Cut::Squeeze)
        );
        assert_eq!(
            vae_key("encoder.down_blocks.1.resnets.0.conv_shortcut.bias", 4).0,
            "encoder.down.1.block.0.nin_shortcut.bias"
        );
    }
}
