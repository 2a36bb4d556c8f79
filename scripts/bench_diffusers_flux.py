#!/usr/bin/env python3
"""Times diffusers' FluxTransformer2DModel with random weights, the reference side of
`icedit-scale bench flux`: the same configuration (full FLUX.1 Fill, or the `small`
stand-in), the same shapes (a 2W x H diptych, 512 T5 tokens by default), one forward per
batch size, mean of --iters after a warm-up, torch's default attention (SDPA).

Usage (on the GPU machine, or the CPU to prove it):
    python3 scripts/bench_diffusers_flux.py --size full --device cuda --dtype bf16 \
        --batch 1,4,8 --width 512 --height 512 --out out/diffusers-flux.json

Writes a JSON object: config, per batch {batch, step_s}, peak GPU memory (CUDA) and the
versions used. Random weights time the same as trained ones; nothing is downloaded.
"""
import argparse
import json
import time

import torch
from diffusers import FluxTransformer2DModel

# FLUX.1 Fill [dev]'s transformer/config.json (black-forest-labs/FLUX.1-Fill-dev).
FULL = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
# `small_configs()` in src/models/flux/bench.rs.
SMALL = dict(
    FULL,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    axes_dims_rope=[8, 28, 28],
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["full", "small"], default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    p.add_argument("--batch", default="1,4,8")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--t5-tokens", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    dev = torch.device(a.device)
    cfg = FULL if a.size == "full" else SMALL
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(dev):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        model = FluxTransformer2DModel(**cfg).eval()
        torch.set_default_dtype(old)
    load_s = time.perf_counter() - start
    params = sum(t.numel() for t in model.parameters())
    # Packed latents: VAE /8, 2x2 patches -> (2W/16) x (H/16) image tokens.
    lh, lw = a.height // 16, 2 * a.width // 16
    tokens = lh * lw
    img_ids = torch.zeros(lh, lw, 3, device=dev)
    img_ids[..., 1] = torch.arange(lh, device=dev)[:, None]
    img_ids[..., 2] = torch.arange(lw, device=dev)[None, :]
    img_ids = img_ids.reshape(tokens, 3).to(dtype)
    txt_ids = torch.zeros(a.t5_tokens, 3, device=dev, dtype=dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    results = []
    for b in [int(x) for x in a.batch.split(",")]:
        x = torch.randn(b, tokens, cfg["in_channels"], device=dev, dtype=dtype)
        t5 = torch.randn(b, a.t5_tokens, cfg["joint_attention_dim"], device=dev, dtype=dtype)
        pooled = torch.randn(b, cfg["pooled_projection_dim"], device=dev, dtype=dtype)
        t = torch.full((b,), 0.5, device=dev, dtype=dtype)
        g = torch.full((b,), 50.0, device=dev, dtype=dtype)

        def step():
            with torch.inference_mode():
                return model(
                    hidden_states=x,
                    encoder_hidden_states=t5,
                    pooled_projections=pooled,
                    timestep=t,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    guidance=g,
                    return_dict=False,
                )[0]

        step()
        sync()
        start = time.perf_counter()
        for _ in range(a.iters):
            step()
        sync()
        step_s = (time.perf_counter() - start) / a.iters
        print(f"diffusers {a.size} batch {b}: {step_s:.4f} s/step", flush=True)
        results.append({"batch": b, "step_s": step_s, "per_candidate_s": step_s / b})
    out = {
        "size": a.size,
        "parameters": params,
        "dtype": a.dtype,
        "device": a.device,
        "image_tokens": tokens,
        "t5_tokens": a.t5_tokens,
        "load_s": load_s,
        "steps": results,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "attention": "torch scaled_dot_product_attention (diffusers default)",
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
