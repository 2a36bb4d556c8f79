#!/usr/bin/env python3
"""Times transformers' Qwen2-VL prefill with random weights, the reference side of
`icedit-scale bench judge`: the same configuration (Qwen2-VL-2B/7B, or the `small`
stand-in), the same screening-shaped prompt (text, two square images, text; the image
pixels already patchified as the processor emits them), one prefill keeping only the last
position's logits, mean of --iters after a warm-up, torch's default attention (SDPA).

Usage (this machine's CPU, as docs/benchmarks.md's judge speed table was measured):
    python3 scripts/bench_transformers_judge.py --model qwen2-vl-2b --device cpu \
        --dtype f32 --threads 2 --image-side 448 --text-tokens 150 --out out/tf-judge.json

Side by side, both models loaded and timed in alternating rounds (the verdict
docs/benchmarks.md quotes; see `icedit-scale bench judge --help`):
    icedit-scale bench judge --model qwen2-vl-2b --image-side 448 --batch 1 --iters 1 \
        --versus "python3 scripts/bench_transformers_judge.py --serve --model qwen2-vl-2b \
        --device cpu --dtype f32 --threads 2 --image-side 448 --text-tokens 150"

Writes a JSON object: the configuration, tokens per prompt, prefill seconds, seconds in
the vision tower alone, the vision tower's seconds per stage (one extra profiled run), the
text decoder's seconds (whole and per stage, inside one more profiled prefill; the stages
named as `bench judge` names its own), and the versions used. Nothing is downloaded.
"""
import argparse
import json
import time
from collections import defaultdict

import torch
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

# Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct config.json (the fields that
# shape compute); `small` is `builtin_config("small")` in src/models/qwen_vl/bench.rs.
MODELS = {
    "qwen2-vl-2b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
        vision=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536),
        mrope=[16, 24, 24],
    ),
    "qwen2-vl-7b": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
        vision=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=3584),
        mrope=[16, 24, 24],
    ),
    # Qwen/Qwen2.5-VL-7B-Instruct config.json: the same decoder as Qwen2-VL-7B, a vision tower
    # with a SwiGLU MLP, RMS norms and window attention (full in blocks 7, 15, 23, 31).
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl",
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        mrope=[16, 24, 24],
    ),
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        vision=dict(depth=4, embed_dim=128, mlp_ratio=4, num_heads=4, hidden_size=256),
        mrope=[8, 12, 12],
    ),
}
IMAGE, VSTART, VEND = 151655, 151652, 151653
SMALL_IDS = (4093, 4094, 4095)


def families():
    """Config and model classes per model family."""
    return {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
    }


def modeling(config):
    """The transformers module that holds the family's rotary functions."""
    if config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as module
    else:
        from transformers.models.qwen2_vl import modeling_qwen2_vl as module
    return module


def build(name, dtype, device):
    m = MODELS[name]
    image, vstart, vend = SMALL_IDS if name == "small" else (IMAGE, VSTART, VEND)
    text = dict(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": m["mrope"]},
        tie_word_embeddings=m["tie_word_embeddings"],
    )
    config_class, model_class = families()[m.get("family", "qwen2_vl")]
    config = config_class(
        text_config=text, vision_config=m["vision"], image_token_id=image,
        vision_start_token_id=vstart, vision_end_token_id=vend, **text,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_class(config)
    # Random values without the cost of each layer's init scheme.
    model = model.to_empty(device=device)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    # `to_empty` leaves buffers (the rotary inverse frequencies) uninitialised: give them
    # the usual 1 / theta^(2i/d) ladder so no garbage (NaN, denormals) reaches the timing.
    for name, b in model.named_buffers():
        if name.endswith("inv_freq"):
            n = b.numel()
            b.copy_(1.0 / (10000.0 ** (torch.arange(n, device=b.device, dtype=torch.float32) / n)))
    return model.to(dtype).eval(), config, (image, vstart, vend)


def prompt(config, ids, side, text_tokens, device, dtype):
    """Text, two images, text: the same shape as the Rust bench's prompt."""
    image, vstart, vend = ids
    v = config.vision_config
    unit = v.patch_size * v.spatial_merge_size
    grid = max(side // unit, 1) * v.spatial_merge_size
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    per_image = grid * grid // v.spatial_merge_size**2
    vocab = config.text_config.vocab_size if hasattr(config, "text_config") else config.vocab_size
    plain = min(vocab - 16, 100_000)
    head = [(i * 7919 + 1) % plain for i in range(text_tokens // 4)]
    tail = [(i * 7919 + 2) % plain for i in range(text_tokens - text_tokens // 4)]
    seq = head + ([vstart] + [image] * per_image + [vend]) * 2 + tail
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2 * grid * grid, patch_dim, generator=g) * 2 - 1
    return dict(
        input_ids=torch.tensor([seq], device=device),
        # What the processor adds since transformers 5: 1 marks image tokens (M-RoPE).
        mm_token_type_ids=torch.tensor([[int(t == image) for t in seq]], device=device),
        attention_mask=torch.ones(1, len(seq), dtype=torch.long, device=device),
        pixel_values=pixels.to(device=device, dtype=dtype),
        image_grid_thw=torch.tensor([[1, grid, grid]] * 2, device=device),
    )


def sync(device):
    """Waits for queued GPU work (a no-op on the CPU) so a clock reading covers it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, iters, device):
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


class StageTimer:
    """Charges module forwards (through forward hooks) and module-level functions (through
    a wrapper) to named stages; `close` removes every hook and wrapper."""

    def __init__(self, device):
        self.device = device
        self.totals, self.starts, self.handles, self.wrapped = defaultdict(float), {}, [], []

    def sync(self):
        sync(self.device)

    def watch(self, module, stage):
        def before(mod, args):
            self.sync()
            self.starts[id(mod)] = time.perf_counter()

        def after(mod, args, out):
            self.sync()
            self.totals[stage] += time.perf_counter() - self.starts.pop(id(mod))

        self.handles.append(module.register_forward_pre_hook(before))
        self.handles.append(module.register_forward_hook(after))

    def wrap(self, namespace, name, stage):
        original = getattr(namespace, name)

        def timed_call(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            self.totals[stage] += time.perf_counter() - start
            return out

        setattr(namespace, name, timed_call)
        self.wrapped.append((namespace, name, original))

    def close(self):
        for h in self.handles:
            h.remove()
        for namespace, name, original in self.wrapped:
            setattr(namespace, name, original)


def split_attention(totals, whole, order):
    """The attention stage is the attention module minus its projections and rotary;
    `other` is the whole minus every stage."""
    module = totals.pop("attention module")
    totals["attention"] = module - totals["qkv"] - totals["proj"] - totals["rotary"]
    totals["other"] = whole - sum(totals.values())
    return {stage: totals[stage] for stage in order}


def vision_parts(visual, inputs, device, config):
    """Seconds per stage of one vision tower forward: patch embed, norms, qkv, rotary,
    attention (the rest of each attention module: head layout, SDPA, concatenation), proj,
    mlp, merger, and other (the whole minus those: position tables, residual adds)."""
    qwen2_vl = modeling(config)

    timer = StageTimer(device)
    timer.watch(visual.patch_embed, "patch embed")
    for block in visual.blocks:
        timer.watch(block.norm1, "norms")
        timer.watch(block.norm2, "norms")
        timer.watch(block.attn.qkv, "qkv")
        timer.watch(block.attn.proj, "proj")
        timer.watch(block.attn, "attention module")
        timer.watch(block.mlp, "mlp")
    timer.watch(visual.merger, "merger")
    timer.wrap(qwen2_vl, "apply_rotary_pos_emb_vision", "rotary")
    try:
        timer.sync()
        start = time.perf_counter()
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        timer.sync()
        whole = time.perf_counter() - start
    finally:
        timer.close()
    order = ["patch embed", "norms", "qkv", "rotary", "attention", "proj", "mlp", "merger", "other"]
    return split_attention(timer.totals, whole, order)


def decoder_parts(model, inputs, device, config):
    """Seconds per stage of the text decoder inside one whole prefill: norms, qkv, rotary,
    attention (the rest of each attention module: head layout, cache, SDPA), proj, mlp, and
    other (the decoder's whole minus those: rotary tables, mask, residual adds). Also the
    decoder's whole, under "decoder"."""
    qwen2_vl = modeling(config)

    language = model.model.language_model
    timer = StageTimer(device)
    timer.watch(language, "decoder")
    for layer in language.layers:
        timer.watch(layer.input_layernorm, "norms")
        timer.watch(layer.post_attention_layernorm, "norms")
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            timer.watch(proj, "qkv")
        timer.watch(layer.self_attn.o_proj, "proj")
        timer.watch(layer.self_attn, "attention module")
        timer.watch(layer.mlp, "mlp")
    timer.watch(language.norm, "norms")
    timer.wrap(qwen2_vl, "apply_rotary_pos_emb", "rotary")
    try:
        model(**inputs, logits_to_keep=1, use_cache=True)
    finally:
        timer.close()
    whole = timer.totals.pop("decoder")
    order = ["norms", "qkv", "rotary", "attention", "proj", "mlp", "other"]
    return whole, split_attention(timer.totals, whole, order)


def serve(model, inputs, a, config):
    """The reference side of `bench judge --versus`: warm up, print a ready line naming the
    prompt, then run one prefill per `prefill` line on stdin and print its seconds, until
    stdin ends (the protocol is described in src/models/qwen_vl/side_by_side.rs)."""
    import sys

    def prefill():
        model(**inputs, logits_to_keep=1, use_cache=True)

    with torch.inference_mode():
        timed(prefill, 1, a.device)
        ready = dict(
            ready=True, prompt_tokens=inputs["input_ids"].shape[1], image_side=a.image_side,
            dtype=a.dtype, transformers=transformers.__version__,
            attention=config._attn_implementation, torch=torch.__version__,
        )
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            if line.strip() != "prefill":
                continue
            sync(a.device)
            start = time.perf_counter()
            prefill()
            sync(a.device)
            print(json.dumps(dict(prefill_s=time.perf_counter() - start)), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), default="qwen2-vl-2b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="f32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--text-tokens", type=int, default=150)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--out", help="where to write the timing JSON (not with --serve)")
    p.add_argument("--serve", action="store_true",
                   help="serve prefills to `icedit-scale bench judge --versus` instead")
    a = p.parse_args()
    if not a.serve and not a.out:
        p.error("--out is required (or --serve)")
    torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    model, config, ids = build(a.model, dtype, a.device)
    inputs = prompt(config, ids, a.image_side, a.text_tokens, a.device, dtype)
    if a.serve:
        return serve(model, inputs, a, config)
    with torch.inference_mode():
        prefill_s = timed(lambda: model(**inputs, logits_to_keep=1, use_cache=True), a.iters, a.device)
        visual = model.model.visual
        vision_s = timed(
            lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]),
            a.iters, a.device,
        )
        parts = vision_parts(visual, inputs, a.device, config)
        text_s, decoder = decoder_parts(model, inputs, a.device, config)
    result = dict(
        model=a.model, device=a.device, dtype=a.dtype, threads=a.threads,
        image_side=a.image_side, prompt_tokens=inputs["input_ids"].shape[1],
        prefill_s=prefill_s, vision_s=vision_s, text_s=text_s,
        vision_parts=parts, decoder_parts=decoder,
        iters=a.iters, attention=config._attn_implementation,
        torch=torch.__version__, transformers=transformers.__version__,
    )
    print(json.dumps(result, indent=2))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
