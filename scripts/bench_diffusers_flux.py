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

With --cache SPEC[,SPEC...] (the `--cache` spellings of icedit-scale: none, fbc:<threshold>,
taylorseer:interval=<n>,order=<n>[,warmup=<n>][,until=<n>][,factors=bf16|f32][,lite]) it also
times the completion part of an edit as `icedit-scale bench flux --cache` does: --keep
candidates run --probe-steps exact Euler steps of a --steps schedule (untimed), then each
setting completes them, batched, with diffusers' own hook (FirstBlockCacheConfig,
TaylorSeerCacheConfig) enabled on the transformer and every call inside
`transformer.cache_context("cond")` (the hooks refuse to run without a context; see the
notes in tests/fixtures/flux/make_cache_fixtures.py). `none` runs first. diffusers decides
for the whole batch, so its cached forwards come in multiples of --keep. The decisions are
counted by wrapping the hooks' decision methods from here (diffusers is not changed).

With --vae it times diffusers' AutoencoderKL instead of the transformer (no transformer is
built): FLUX.1 Fill's VAE configuration (`VAE_FULL`; `VAE_SMALL` is small_configs()' VAE),
random weights in --dtype, the encode of the [1, 3, H, 2W] diptych (the latent
distribution's mean, as `bench flux` times `encode_mean`) and the decode of [1, 16, H/8,
2W/8] latents, a warm-up then the mean of --iters, synchronised; the JSON gets `vae`.

With --profile PATH it runs torch's profiler over one more forward at the first --batch
(after the timed ones, so it is warm) and writes the Chrome trace there, the diffusers side
of the acceptance run's profile table (scripts/profile_summary.py reads it).
"""
import argparse
import json
import math
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
# FLUX.1 Fill [dev]'s vae/config.json (black-forest-labs/FLUX.1-Fill-dev; the same values as
# `VaeConfig::flux()` in src/models/flux/vae.rs). `force_upcast` is left at its default: it
# is read by pipelines that upcast the VAE to f32 (SDXL's), not by FLUX's.
VAE_FULL = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
# The VAE of `small_configs()` in src/models/flux/bench.rs.
VAE_SMALL = dict(VAE_FULL, block_out_channels=[32, 32, 64, 64], layers_per_block=1)


def build_on(dev, dtype, make):
    """Builds a module with its parameters allocated and initialised on `dev` in `dtype`
    (no CPU copy, no f32 detour): a 12B transformer or a 4.7B T5 starts in seconds on a GPU."""
    with torch.device(dev):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return make().eval()
        finally:
            torch.set_default_dtype(old)


def time_vae(a, dtype, dev, sync):
    """--vae: diffusers' AutoencoderKL, encode and decode of one diptych."""
    from diffusers import AutoencoderKL

    cfg = VAE_FULL if a.size == "full" else VAE_SMALL
    torch.manual_seed(0)
    start = time.perf_counter()
    vae = build_on(dev, dtype, lambda: AutoencoderKL(**cfg))
    sync()
    init_s = time.perf_counter() - start
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    h, w = a.height, 2 * a.width
    image = (0.5 * torch.randn(1, 3, h, w, device=dev)).to(dtype)
    z = torch.randn(1, cfg["latent_channels"], h // down, w // down, device=dev).to(dtype)

    def timed(f):
        with torch.inference_mode():
            f()
            sync()
            start = time.perf_counter()
            for _ in range(a.iters):
                f()
            sync()
        return (time.perf_counter() - start) / a.iters

    encode_s = timed(lambda: vae.encode(image).latent_dist.mode())
    decode_s = timed(lambda: vae.decode(z).sample)
    print(f"diffusers VAE {a.size}: encode {encode_s:.4f} s, decode {decode_s:.4f} s", flush=True)
    return {
        "config": cfg,
        "parameters": sum(t.numel() for t in vae.parameters()),
        "image": [1, 3, h, w],
        "latents": list(z.shape),
        "init_s": init_s,
        "encode_s": encode_s,
        "decode_s": decode_s,
        "iters": a.iters,
    }


def parse_caches(text):
    """`none,fbc:0.12,taylorseer:interval=4,order=1` -> a list of specs: a comma starts a
    new setting only where a kind follows (as StepCache::parse_list does)."""
    settings = []
    for part in text.split(","):
        kind = part.split(":")[0].strip()
        if settings and kind not in ("none", "fbc", "taylorseer"):
            settings[-1] += "," + part
        else:
            settings.append(part.strip())
    return settings


def cache_hooks():
    """diffusers' cache configs (0.42: `diffusers.hooks`), imported only by the cache steps,
    so that a diffusers without them fails those steps alone, not the transformer, VAE,
    edit and profile steps that import this module too."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
    return FirstBlockCacheConfig, TaylorSeerCacheConfig


def cache_config(spec):
    """A `--cache` spelling as diffusers' config (defaults as diffusers' own)."""
    kind, _, args = spec.partition(":")
    if kind == "none":
        return None
    FirstBlockCacheConfig, TaylorSeerCacheConfig = cache_hooks()
    if kind == "fbc":
        value = args.removeprefix("threshold=")
        return FirstBlockCacheConfig(threshold=float(value)) if value else FirstBlockCacheConfig()
    if kind == "taylorseer":
        fields = {}
        names = {"interval": "cache_interval", "order": "max_order",
                 "warmup": "disable_cache_before_step", "until": "disable_cache_after_step"}
        for part in filter(None, (p.strip() for p in args.split(","))):
            if part == "lite":
                fields["use_lite_mode"] = True
            elif part.startswith("factors="):
                fields["taylor_factors_dtype"] = {"bf16": torch.bfloat16, "f32": torch.float32}[part[8:]]
            else:
                key, value = part.split("=")
                fields[names[key]] = int(value)
        return TaylorSeerCacheConfig(**fields)
    raise SystemExit(f"--cache {spec!r}: unknown kind {kind!r}")


def canonical(config):
    """The setting as icedit-scale writes it back (StepCache's Display), so rows of both
    sides match by name."""
    if config is None:
        return "none"
    FirstBlockCacheConfig, _ = cache_hooks()
    if isinstance(config, FirstBlockCacheConfig):
        return f"fbc:{config.threshold}"
    factors = {torch.float32: "f32", torch.bfloat16: "bf16"}[config.taylor_factors_dtype]
    spec = (f"taylorseer:interval={config.cache_interval},order={config.max_order},"
            f"warmup={config.disable_cache_before_step},factors={factors}")
    if config.disable_cache_after_step is not None:
        spec += f",until={config.disable_cache_after_step}"
    if config.use_lite_mode:
        spec += ",lite"
    return spec


def decision_counter(model, config):
    """Wraps the enabled hook's decision method; returns a list that gets one bool (ran in
    full) per forward."""
    FirstBlockCacheConfig, _ = cache_hooks()
    decisions = []
    hooks = []
    for _, m in model.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in ("fbc_leader_block_hook", "taylorseer_cache"):
            if name in registry.hooks:
                hooks.append(registry.hooks[name])
    if isinstance(config, FirstBlockCacheConfig):
        (head,) = hooks
        decide = head._should_compute_remaining_blocks

        def spy(residual):
            full = decide(residual)
            decisions.append(bool(full))
            return full

        head._should_compute_remaining_blocks = spy
    else:
        # Every hooked module decides alike at each step; the first one speaks for all.
        measure = hooks[0]._measure_should_compute

        def spy():
            full, state = measure()
            decisions.append(bool(full))
            return full, state

        hooks[0]._measure_should_compute = spy
    return decisions


def shifted_sigmas(steps, image_tokens):
    """FLUX's schedule (FlowMatchEulerDiscreteScheduler with the dynamic shift of
    FLUX.1's scheduler_config.json: mu linear from 0.5 at 256 tokens to 1.15 at 4096)."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_tokens - 256)
    n = steps
    sigmas = []
    for i in range(steps):
        linear = 1.0 if steps == 1 else 1.0 + (1.0 / n - 1.0) * i / (n - 1)
        sigmas.append(math.exp(mu) / (math.exp(mu) + (1.0 / linear - 1.0)))
    return sigmas + [0.0]


def completions(model, a, cfg, dtype, dev, tokens, img_ids, txt_ids, sync):
    """The completion part of an edit per cache setting, `none` first."""
    specs = ["none"] + [s for s in parse_caches(a.cache) if s != "none"]
    configs = [cache_config(s) for s in specs]
    if a.probe_steps >= a.steps:
        raise SystemExit(f"--probe-steps {a.probe_steps} must be below --steps {a.steps}")
    sigmas = shifted_sigmas(a.steps, tokens)
    out_ch = 64
    m = a.keep
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(m, tokens, out_ch, generator=gen).to(dev)
    cond = torch.randn(m, tokens, cfg["in_channels"] - out_ch, generator=gen).to(dev, dtype)
    t5 = torch.randn(m, a.t5_tokens, cfg["joint_attention_dim"], generator=gen).to(dev, dtype)
    pooled = torch.randn(m, cfg["pooled_projection_dim"], generator=gen).to(dev, dtype)
    g = torch.full((m,), 50.0, device=dev, dtype=dtype)

    def step(x, i):
        with torch.inference_mode():
            v = model(
                hidden_states=torch.cat([x.to(dtype), cond], dim=-1),
                encoder_hidden_states=t5,
                pooled_projections=pooled,
                timestep=torch.full((m,), sigmas[i], device=dev, dtype=dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=g,
                return_dict=False,
            )[0]
        # The scheduler's Euler step, in float32.
        return x + (sigmas[i + 1] - sigmas[i]) * v.float()

    for i in range(a.probe_steps):
        x = step(x, i)
    probed = x
    rows, baseline = [], None
    for spec, config in zip(specs, configs):
        decisions = []
        if config is not None:
            model.enable_cache(config)
            decisions = decision_counter(model, config)
        x = probed.clone()
        sync()
        start = time.perf_counter()
        if config is None:
            for i in range(a.probe_steps, a.steps):
                x = step(x, i)
        else:
            with model.cache_context("cond"):
                for i in range(a.probe_steps, a.steps):
                    x = step(x, i)
        sync()
        wall_s = time.perf_counter() - start
        if config is not None:
            model.disable_cache()
        n = a.steps - a.probe_steps
        full = sum(decisions) if config is not None else n
        diff = 0.0 if baseline is None else (x - baseline).abs().max().item()
        baseline = x if baseline is None else baseline
        print(f"diffusers completion {spec}: {wall_s:.3f} s, {full * m} full + {(n - full) * m} cached forwards", flush=True)
        rows.append({"cache": canonical(config), "given": spec, "wall_s": wall_s, "full_forwards": full * m,
                     "cached_forwards": (n - full) * m, "max_abs_diff_vs_none": diff})
    return rows


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
    p.add_argument("--cache", default=None, help="step caches to time completions with, beside none")
    p.add_argument("--keep", type=int, default=2, help="with --cache: candidates completed together")
    p.add_argument("--probe-steps", type=int, default=4, help="with --cache: exact steps before the completion")
    p.add_argument("--steps", type=int, default=28, help="with --cache: steps of the schedule")
    p.add_argument("--vae", action="store_true", help="time the VAE instead of the transformer")
    p.add_argument("--profile", default=None, help="write a torch profiler trace of one forward here")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    versions = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__}
    if a.vae:
        out = dict(size=a.size, dtype=a.dtype, device=a.device, vae=time_vae(a, dtype, dev, sync), **versions,
                   peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
        return
    cfg = FULL if a.size == "full" else SMALL
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_on(dev, dtype, lambda: FluxTransformer2DModel(**cfg))
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

    def forward_at(b):
        """One forward at batch `b` on fresh random inputs, as a callable."""
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

        return step

    batches = [int(x) for x in a.batch.split(",")]
    results = []
    for b in batches:
        step = forward_at(b)
        step()
        sync()
        start = time.perf_counter()
        for _ in range(a.iters):
            step()
        sync()
        step_s = (time.perf_counter() - start) / a.iters
        print(f"diffusers {a.size} batch {b}: {step_s:.4f} s/step", flush=True)
        results.append({"batch": b, "step_s": step_s, "per_candidate_s": step_s / b})
    if a.profile:
        # One more forward, warm (the timed ones ran first), traced with its GPU kernels.
        from torch.profiler import ProfilerActivity, profile

        step = forward_at(batches[0])
        step()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            sync()
        prof.export_chrome_trace(a.profile)
        print(f"diffusers profile of one batch-{batches[0]} forward: {a.profile}", flush=True)
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
        **versions,
        "attention": "torch scaled_dot_product_attention (diffusers default)",
    }
    if a.cache:
        out["completions"] = completions(model, a, cfg, dtype, dev, tokens, img_ids, txt_ids, sync)
        out["completion"] = {"keep": a.keep, "probe_steps": a.probe_steps, "steps": a.steps}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
