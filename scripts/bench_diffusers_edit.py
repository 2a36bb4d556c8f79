#!/usr/bin/env python3
"""Times one plain ICEdit edit through diffusers' FluxFillPipeline with random weights: the
reference beside the acceptance run's early-filter edit (scripts/gpu-acceptance.sh, step
`edit`). A [source | source] diptych of 2W x H with the right half masked, --steps Euler
steps (28), distilled guidance --guidance (50, ICEdit's: ../shared/DESIGN.md; the value
does not change the time), VAE encode and decode included, one image out (PIL).

Text: the random-weight model of `icedit-scale edit --random-weights` runs no text
encoders (its prompt states are random), so the pipeline is given random prompt_embeds
[1, --t5-tokens, 4096] and pooled_prompt_embeds [1, 768] and built without tokenizers or
text encoders: nothing needs downloading. T5-v1.1-XXL's encoder and CLIP-L's text model
(FLUX.1 Fill's text_encoder_2 / text_encoder configurations, random weights) are timed
apart on random token ids (--t5-tokens and 77), the cost both sides leave out.

Every model is allocated and initialised on the device in --dtype (`build_on`), so the
4.7B-parameter T5 and the 12B transformer start in seconds; init times are reported apart.
The edit runs --runs times (default 2: the first cold, with cuBLAS / cuDNN set-up, the
second warm); the transformer's forwards are counted by a hook (the NFE, 28).

Usage (GPU machine; --size small --device cpu --dtype f32 proves it on the CPU):
    python3 scripts/bench_diffusers_edit.py --size full --device cuda --dtype bf16 \\
        --width 512 --image SQUARE.jpg --steps 28 --out out/diffusers-edit.json
"""
import argparse
import json
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from bench_diffusers_flux import FULL, SMALL, VAE_FULL, VAE_SMALL, build_on

# FLUX.1 Fill [dev]'s text_encoder_2/config.json: T5-v1.1-XXL's encoder (google/t5-v1_1-xxl).
T5_FULL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
               is_encoder_decoder=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
# The `small` stand-in: d_model = the small transformer's joint_attention_dim (256).
T5_SMALL = dict(T5_FULL, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4)
# FLUX.1 Fill [dev]'s text_encoder/config.json: CLIP ViT-L/14's text model.
CLIP_FULL = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# The `small` stand-in: hidden = the small transformer's pooled_projection_dim (128).
CLIP_SMALL = dict(CLIP_FULL, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=128)
# FLUX.1 Fill [dev]'s scheduler/scheduler_config.json.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def timed(sync, f, iters=1):
    """Seconds per call of f after one warm-up call, synchronised."""
    with torch.inference_mode():
        f()
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            f()
        sync()
    return (time.perf_counter() - start) / iters


def text_encoders(a, dtype, dev, sync):
    """T5-XXL and CLIP-L with random weights: init and one encode each."""
    out = {}
    for name, cls, cfg_cls, cfg, tokens in (
        ("t5", T5EncoderModel, T5Config, T5_FULL if a.size == "full" else T5_SMALL, a.t5_tokens),
        ("clip", CLIPTextModel, CLIPTextConfig, CLIP_FULL if a.size == "full" else CLIP_SMALL, 77),
    ):
        torch.manual_seed(0)
        start = time.perf_counter()
        model = build_on(dev, dtype, lambda: cls(cfg_cls(**cfg)))
        sync()
        init_s = time.perf_counter() - start
        ids = torch.randint(3, cfg["vocab_size"], (1, tokens), device=dev)
        encode_s = timed(sync, lambda: model(ids, output_hidden_states=False))
        params = sum(t.numel() for t in model.parameters())
        print(f"{name}: {params / 1e9:.2f}B parameters, init {init_s:.2f} s, encode {encode_s:.4f} s", flush=True)
        out[name] = {"parameters": params, "tokens": tokens, "init_s": init_s, "encode_s": encode_s}
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def panel_height(a):
    """--height, or the source's height at --width as `icedit-scale edit` sizes its panel
    (src/edit/diptych.rs `panel_size`: scaled by the aspect ratio, rounded down to a
    multiple of 16), or --width without a source."""
    if a.height:
        return a.height
    if not a.image:
        return a.width
    w, h = Image.open(a.image).size
    return h * a.width // w // 16 * 16


def diptych(a):
    """ICEdit's input: the source panel twice side by side, the right half masked (white)."""
    if a.image:
        panel = Image.open(a.image).convert("RGB").resize((a.width, a.height), Image.BICUBIC)
    else:
        y, x = np.mgrid[0:a.height, 0:a.width]
        panel = Image.fromarray(np.stack([x * 255 // a.width, y * 255 // a.height, (x + y) % 256], -1).astype(np.uint8))
    image = Image.new("RGB", (2 * a.width, a.height))
    image.paste(panel, (0, 0))
    image.paste(panel, (a.width, 0))
    mask = np.zeros((a.height, 2 * a.width), dtype=np.uint8)
    mask[:, a.width:] = 255
    return image, Image.fromarray(mask, "L")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["full", "small"], default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    p.add_argument("--width", type=int, default=512, help="panel width (the diptych is twice as wide)")
    p.add_argument("--height", type=int, default=None,
                   help="panel height (default: the source's at --width, as our edit sizes it)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=50.0)
    p.add_argument("--t5-tokens", type=int, default=512)
    p.add_argument("--image", default=None, help="source image (default: a gradient); resized to the panel")
    p.add_argument("--runs", type=int, default=2, help="edits timed one after another (the first is cold)")
    p.add_argument("--no-text-encoders", action="store_true", help="skip timing T5 and CLIP")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    dev = torch.device(a.device)
    a.height = panel_height(a)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    result = {"size": a.size, "dtype": a.dtype, "device": a.device, "panel": [a.width, a.height],
              "diptych": [2 * a.width, a.height], "steps": a.steps, "guidance": a.guidance,
              "t5_tokens": a.t5_tokens, "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__,
              "transformers": __import__("transformers").__version__,
              "text": "random prompt_embeds / pooled_prompt_embeds (no tokenizers or text encoders in the pipeline)"}
    if not a.no_text_encoders:
        result["text_encoders"] = text_encoders(a, dtype, dev, sync)

    cfg = FULL if a.size == "full" else SMALL
    torch.manual_seed(0)
    start = time.perf_counter()
    transformer = build_on(dev, dtype, lambda: FluxTransformer2DModel(**cfg))
    vae = build_on(dev, dtype, lambda: AutoencoderKL(**(VAE_FULL if a.size == "full" else VAE_SMALL)))
    pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    sync()
    result["init_s"] = time.perf_counter() - start
    result["transformer_parameters"] = sum(t.numel() for t in transformer.parameters())

    forwards = [0]
    transformer.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    image, mask = diptych(a)
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt_embeds = torch.randn(1, a.t5_tokens, cfg["joint_attention_dim"], generator=gen).to(dev, dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=gen).to(dev, dtype)
    runs = []
    for i in range(a.runs):
        forwards[0] = 0
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, image=image, mask_image=mask,
                       height=a.height, width=2 * a.width, num_inference_steps=a.steps, guidance_scale=a.guidance,
                       generator=torch.Generator(device="cpu").manual_seed(i), output_type="pil")
        sync()
        edit_s = time.perf_counter() - start
        size = out.images[0].size
        print(f"diffusers FluxFillPipeline edit {i + 1} ({'cold' if i == 0 else 'warm'}): {edit_s:.3f} s, "
              f"{forwards[0]} transformer forwards, image {size[0]}x{size[1]}", flush=True)
        runs.append({"edit_s": edit_s, "nfe": forwards[0], "image": list(size)})
    result["runs"] = runs
    # The figure compared: the last (warm) run.
    result["edit_s"] = runs[-1]["edit_s"]
    result["nfe"] = runs[-1]["nfe"]
    result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
