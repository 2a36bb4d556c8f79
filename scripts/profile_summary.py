#!/usr/bin/env python3
"""Buckets the GPU kernels of one FLUX forward by kind, for the acceptance run's profile
table (scripts/gpu-acceptance.sh, PROFILE=1): attention, GEMMs, norms / modulation,
copies, other; milliseconds and launches per forward, side by side.

Usage:
    python3 scripts/profile_summary.py \\
        --side "icedit-scale (Nsight Compute)" out/profile-ours.csv repeat \\
        --side "diffusers (torch profiler)" out/profile-diffusers.json 1 \\
        --out out/profile.md

Each --side takes a label, a file and how the file holds the forward:
  1       the file is one forward (torch's profiler around one forward call);
  repeat  the file holds a whole run in which the forward ran twice back to back (`bench
          flux --warmup 1 --iters 1`): the forward is the sequence of kernel launches
          that occurs twice in a row without itself being a repetition of a shorter one
          and holds the most attention launches (the VAE passes, warmed up too, repeat
          as well, with one attention each); the second copy (warm) is summarised. Everything before and
          after it (random weight init, the fused-kernel check, the VAE) is left out, so
          no VAE launch is counted. Where the kernels just before the first copy repeat the
          forward's last ones (or those just after the second its first ones), the same
          length repeats at shifted starts too; the leftmost is taken, whose second copy
          holds forward launches only. When no such repeat of at least --min-forward
          launches (MIN_FORWARD) exists the whole file is summarised, with a note saying so.

Files read (the format is told from the content):
  - Nsight Compute CSV: `ncu --metrics gpu__time_duration.sum --csv` (the details page,
    one row per kernel and metric, or `--page raw`, one column per metric with a units
    row); kernels in launch order (ID);
  - Nsight Systems CSV: `nsys stats --report cuda_gpu_trace --format csv` (Duration (ns),
    Name); memcpy / memset rows ("[CUDA memcpy ...]") are not kernel launches and are left
    out;
  - a Chrome trace from torch's profiler (`prof.export_chrome_trace`): events of category
    `kernel`, in time order, durations in microseconds; gpu_memcpy / gpu_memset events are
    left out of the table and counted in a note.

Name rules, tried in this order on the kernel name (case-insensitive regular expressions;
the first that matches wins): see RULES. numpy is the only dependency outside the
standard library.
"""
import argparse
import collections
import csv
import io
import json
import re
import sys

import numpy as np

# (category, pattern): the first pattern found in a kernel's name decides its category.
RULES = [
    # Our flash_attention_d128_w8_bf16 and scaled_softmax_* (the older fused softmax),
    # candle's softmax_*, torch's flash (pytorch_flash::flash_fwd_kernel), memory-efficient
    # (fmha_cutlassF_*) and cuDNN (cudnn_generated_fort_native_sdpa_*) attention kernels.
    ("attention", r"flash_attention|flash_attn|flash_fwd|fmha|sdpa|softmax|attention"),
    # cuBLAS / cuBLASLt (nvjet_*, sm90_xmma_gemm_*, cublasLt::*), CUTLASS, candle's
    # quantized matmuls (mul_mat_*).
    ("GEMMs", r"nvjet|gemm|cublas|cutlass|xmma|mul_mat|matmul"),
    # Our modulated_layer_norm_*, gated_residual_*, qk_norm_rope_*; candle's layernorm_* /
    # rmsnorm_*; torch's vectorized_layer_norm_kernel, RowwiseMoments, rsqrt (RMSNorm).
    ("norms / modulation", r"layer_?norm|rms_?norm|modulat|gated_residual|qk_norm|rowwisemoments|group_?norm|rsqrt"),
    # candle's ucopy_* / copy2d_* / cast_*, torch's direct_copy_kernel_cuda (to(), contiguous
    # copies) and CatArrayBatchedCopy (cat).
    ("copies", r"copy|cast_|transpose|catarraybatched|contiguous"),
]
CATEGORIES = [c for c, _ in RULES] + ["other"]
COMPILED = [(c, re.compile(p, re.IGNORECASE)) for c, p in RULES]
# A forward of FLUX (19 + 38 blocks) launches thousands of kernels; a repeat shorter than
# this is a block or a weight-init pattern, not a forward.
MIN_FORWARD = 100
UNITS_NS = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6,
            "s": 1e9, "second": 1e9}


def category(name):
    """The bucket of a kernel name (RULES, first match; else `other`)."""
    for cat, pattern in COMPILED:
        if pattern.search(name):
            return cat
    return "other"


def number(text):
    """A profiler's number: thousands separators dropped."""
    return float(text.replace(",", "").strip())


def read_ncu(lines, path):
    """Nsight Compute CSV, details page (long) or raw page (wide)."""
    start = next((i for i, l in enumerate(lines) if '"Kernel Name"' in l or l.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no Nsight Compute CSV header (a line naming \"Kernel Name\")")
    rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    if "Kernel Name" not in col:
        raise ValueError(f"{path}: the CSV header has no \"Kernel Name\" column")
    kernels = []
    if "Metric Name" in col:
        for r in body:
            if len(r) < len(header) or r[col["Metric Name"]] != "gpu__time_duration.sum":
                continue
            unit = r[col["Metric Unit"]].strip() if "Metric Unit" in col else "ns"
            if unit not in UNITS_NS:
                raise ValueError(f"{path}: unknown time unit {unit!r} of gpu__time_duration.sum")
            kid = int(number(r[col["ID"]])) if "ID" in col else len(kernels)
            kernels.append((kid, r[col["Kernel Name"]], number(r[col["Metric Value"]]) * UNITS_NS[unit]))
    elif "gpu__time_duration.sum" in col:
        j = col["gpu__time_duration.sum"]
        unit = body[0][j].strip() if body and not body[0][col["Kernel Name"]] else "ns"
        if unit not in UNITS_NS:
            raise ValueError(f"{path}: unknown time unit {unit!r} of gpu__time_duration.sum")
        for r in body:
            if len(r) < len(header) or not r[col["Kernel Name"]]:
                continue  # the units row
            kid = int(number(r[col["ID"]])) if "ID" in col else len(kernels)
            kernels.append((kid, r[col["Kernel Name"]], number(r[j]) * UNITS_NS[unit]))
    else:
        raise ValueError(f"{path}: no gpu__time_duration.sum in the CSV (run ncu with --metrics gpu__time_duration.sum)")
    kernels.sort(key=lambda k: k[0])
    return [(name, ns) for _, name, ns in kernels], []


def read_nsys(lines, path):
    """Nsight Systems `cuda_gpu_trace` CSV."""
    start = next(i for i, l in enumerate(lines) if "Duration (ns)" in l)
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    col = {name: i for i, name in enumerate(header)}
    if "Name" not in col:
        raise ValueError(f"{path}: the cuda_gpu_trace CSV has no Name column")
    kernels, skipped = [], 0
    for r in rows[1:]:
        if len(r) < len(header):
            continue
        name = r[col["Name"]]
        if name.startswith("[CUDA mem"):
            skipped += 1
            continue
        kernels.append((name, number(r[col["Duration (ns)"]])))
    notes = [f"{skipped} memcpy / memset operations left out (not kernel launches)"] if skipped else []
    return kernels, notes


def read_trace(text, path):
    """A Chrome trace from torch's profiler."""
    events = json.loads(text)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"),
                     key=lambda e: e["ts"])
    memory = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    notes = []
    if memory:
        notes.append(f"{len(memory)} memcpy / memset operations ({sum(e.get('dur', 0) for e in memory) / 1e3:.3f} ms) "
                     "left out (not kernel launches)")
    if not kernels:
        ops = sum(1 for e in events if e.get("cat") == "cpu_op")
        notes.append(f"no GPU kernels in the trace ({ops} CPU operations): a run without CUDA")
    return [(e["name"], float(e["dur"]) * 1e3) for e in kernels], notes


def read_kernels(path):
    """Kernels in launch order as (name, nanoseconds), the format's name, notes."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith(("{", "[")):
        kernels, notes = read_trace(text, path)
        return kernels, "torch profiler trace", notes
    lines = text.splitlines()
    if any('"Kernel Name"' in l for l in lines):
        kernels, notes = read_ncu(lines, path)
        return kernels, "Nsight Compute CSV", notes
    if any("Duration (ns)" in l for l in lines):
        kernels, notes = read_nsys(lines, path)
        return kernels, "Nsight Systems CSV", notes
    raise ValueError(f"{path}: neither a torch profiler trace nor an Nsight Compute / Systems CSV")


def runs_clear(eq, length):
    """For every start s with s + length <= len(eq): whether eq[s : s + length] is all True."""
    c = np.concatenate(([0], np.cumsum(~eq)))
    return c[length:] - c[:-length] == 0


def prime_factors(n):
    out, d = [], 2
    while d * d <= n:
        if n % d == 0:
            out.append(d)
            while n % d == 0:
                n //= d
        d += 1
    if n > 1:
        out.append(n)
    return out


def find_forward(names, min_length=MIN_FORWARD):
    """The forward in a launch sequence that ran it twice back to back: (start of the
    second copy, length), or None. Candidates are the blocks p with a[s:s+p] ==
    a[s+p:s+2p] that are primitive (no period d < p dividing p), so a run of identical
    weight-init launches (AB AB AB ...) is not taken for one; of those (a VAE pass warmed
    up and timed repeats too, one block of the forward repeats inside it) the one with the
    most attention launches wins (a FLUX forward has one per block, 57; a VAE pass one),
    the longer on a tie; at its length the leftmost start."""
    ids = {}
    a = np.array([ids.setdefault(n, len(ids)) for n in names], dtype=np.int64)
    attention = np.array([category(n) == "attention" for n in ids], dtype=np.int64)[a] if len(a) else a
    att_before = np.concatenate(([0], np.cumsum(attention)))
    n = len(a)
    best = None
    for p in range(n // 2, min_length - 1, -1):
        # tandem[s]: a[s:s+p] == a[s+p:s+2p], for s in 0..=n-2p.
        tandem = runs_clear(a[:n - p] == a[p:], p)[: n - 2 * p + 1]
        starts = np.nonzero(tandem)[0]
        if starts.size == 0:
            continue
        primitive = np.ones(starts.size, dtype=bool)
        for r in prime_factors(p):
            d = p // r
            # Period d over the block: a[s:s+p-d] == a[s+d:s+p].
            periodic = runs_clear(a[:n - d] == a[d:], p - d)
            primitive &= ~periodic[starts]
        if primitive.any():
            s = int(starts[np.argmax(primitive)])
            score = (int(att_before[s + p] - att_before[s]), p)
            if best is None or score > best[0]:
                best = (score, s + p, p)
    return None if best is None else (best[1], best[2])


def summarise(path, forwards, min_forward=MIN_FORWARD):
    """One side: per category (ms, launches), the kernels summarised, notes."""
    kernels, fmt, notes = read_kernels(path)
    notes = [f"{fmt}, {len(kernels)} kernel launches in the file"] + notes
    if forwards == "repeat" and kernels:
        found = find_forward([k for k, _ in kernels], min_forward)
        if found:
            start, length = found
            notes.append(f"the forward: launches {start}..{start + length - 1}, the second of two identical "
                         f"back-to-back runs of {length} launches (the first began at {start - length}); "
                         f"{len(kernels) - length} launches outside it left out")
            kernels = kernels[start:start + length]
        else:
            notes.append(f"no forward found (no sequence of at least {min_forward} launches ran twice back to back): "
                         "the whole file is summarised, weight init and VAE included")
    elif forwards != "1":
        raise ValueError(f"--side {path}: forwards must be 1 or repeat, not {forwards!r}")
    per = {c: [0.0, 0] for c in CATEGORIES}
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, ns in kernels:
        cat = category(name)
        per[cat][0] += ns / 1e6
        per[cat][1] += 1
        by_name[name][0] += ns / 1e6
        by_name[name][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"categories": {c: {"ms": v[0], "launches": v[1]} for c, v in per.items()},
            "total_ms": sum(v[0] for v in per.values()), "launches": len(kernels),
            "top": [{"name": k, "category": category(k), "ms": v[0], "launches": v[1]} for k, v in top[:10]],
            "notes": notes}


def short(name, width=90):
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[: width - 3] + "..."


def markdown(sides):
    """The profile table (both sides) and each side's costliest kernels."""
    labels = list(sides)
    head = "| per forward | " + " | ".join(f"{l}: ms | launches | share" for l in labels) + " |"
    md = [head, "|---|" + "---|---|---|" * len(labels)]
    for cat in CATEGORIES + ["total"]:
        cells = [f"**{cat}**" if cat == "total" else cat]
        for l in labels:
            s = sides[l]
            if cat == "total":
                cells += [f"**{s['total_ms']:.2f}**", f"**{s['launches']}**", "100%"]
            else:
                v = s["categories"][cat]
                share = 100 * v["ms"] / s["total_ms"] if s["total_ms"] else 0.0
                cells += [f"{v['ms']:.2f}", str(v["launches"]), f"{share:.0f}%"]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Launches per step = the total's launches (one forward is one step at batch 1). "
           "Sums of kernel durations (the GPU busy time of the forward, not its wall time)."]
    for l in labels:
        md += ["", f"{l}: " + "; ".join(sides[l]["notes"]) + "."]
        if sides[l]["top"]:
            md += ["", "| costliest kernels | category | ms | launches |", "|---|---|---|---|"]
            md += [f"| `{short(t['name'])}` | {t['category']} | {t['ms']:.3f} | {t['launches']} |"
                   for t in sides[l]["top"]]
    md += ["", "Name rules (first match wins, case-insensitive): "
           + "; ".join(f"{c}: `{p}`" for c, p in RULES) + "; everything else: other."]
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", nargs=3, action="append", required=True, metavar=("LABEL", "FILE", "FORWARDS"))
    p.add_argument("--min-forward", type=int, default=MIN_FORWARD,
                   help="with `repeat`: the fewest launches a forward has (default %(default)s)")
    p.add_argument("--out", help="write the markdown here (default: stdout)")
    p.add_argument("--json", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    sides, failed = {}, []
    for label, path, forwards in a.side:
        try:
            sides[label] = summarise(path, forwards, a.min_forward)
        except (OSError, ValueError) as e:
            failed.append(f"{label}: not summarised ({e})")
    md = markdown(sides) if sides else ""
    md += "".join(f"\n{f}\n" for f in failed)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(sides, f, indent=2)
    return 0 if sides else 1


if __name__ == "__main__":
    sys.exit(main())
