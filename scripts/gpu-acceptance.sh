#!/usr/bin/env bash
# One-shot acceptance run for a machine with a GPU (see ../shared/GPU.md in the project
# notes, and "GPU acceptance run" in docs/benchmarks.md; on the device tool, through
# scripts/gpu-lease.sh). Random weights everywhere (nothing is downloaded).
#
# The steps, in priority order: first those the "Must show" lists of issues 31, 32, 35 and 36
# need, then (EXTRAS=1) the A/B measurements no Must-show needs, so that a short lease cuts
# the extras, not the verdicts.
#
#  Must-show steps
#   kernel-check   `bench flux` checks each fused FLUX kernel against candle's unfused
#                  operations at full size before it times anything (one batch-1 step); if the
#                  process dies, every later step runs with ICEDIT_CUDA_FUSED=none  [31, 32]
#   flux-dense     `bench flux` dense (DTYPE), BATCHES, 512 panel (1024x512 diptych), 512 T5
#                  tokens, with the VAE's encode / decode                             [31, 32]
#   diffusers      diffusers' FluxTransformer2DModel, same configuration, shapes, dtype (SDPA)
#                  (scripts/bench_diffusers_flux.py)                                  [31, 32]
#   flux-fp8, flux-q8_0, flux-q4_k   the weight formats of issue 32, same shapes          [32]
#   edit           one early-filter edit on the device (dense DTYPE or EDIT_QUANTIZE, batch 8,
#                  8 seeds, 4 probe steps, keep 2, EDIT_STEPS, the tiny fixture judge)  [31, 32]
#   diffusers-edit diffusers' FluxFillPipeline, one plain edit of the same size, cold then warm
#                  (scripts/bench_diffusers_edit.py)                                      [31]
#   (plans)        `plan` with exactly the flags of `edit` and of `refine` (the scenarios the
#                  plan models), and per format at batch 1 and 8; not steps: 20 s each at most [32]
#   refine         one plain q8_0 edit refined to REFINE_WIDTH [1024]: the refine pass's time [36]
#   flux-cache, diffusers-cache   the completion part of an edit per cache setting (CACHES)
#                  beside `none`, ours (`bench flux --cache`) and diffusers' same hook       [35]
#   judge-vs-transformers-<model>   the Qwen2-VL-7B and Qwen2.5-VL-7B prefill against
#                  transformers, JUDGE_ROUNDS [5] alternating rounds (`bench judge --versus`),
#                  each after the judge flash attention's device check                     [31]
#   diffusers-vae  diffusers' AutoencoderKL on the same diptych (beside flux-dense's VAE)  [31]
#   profile-ours, profile-diffusers, profile-ours-before   (PROFILE=1; the last one with
#                  PROFILE_BEFORE=1, the fused kernels off): one forward per side. Ours is
#                  `ICEDIT_PROFILE_FORWARD=1 bench flux` under `ncu --profile-from-start off`
#                  (or `nsys --capture-range=cudaProfilerApi`): the binary brackets one warm
#                  forward with cuProfilerStart / cuProfilerStop, so only its launches are
#                  profiled; diffusers' under torch's profiler; scripts/profile_summary.py's
#                  table (attention / GEMMs / norms + modulation / copies / other, ms and
#                  launches per forward). A CSV without kernel rows is recorded as a failure. [31]
#  Extras (EXTRAS=1): flux-graph (CUDA graph replay), flux-dense-unfused, flux-dense-no-gemm,
#   flux-fp8-per-tensor, flux-fp8-upcast, judge (`bench judge` JUDGE at BATCHES),
#   judge-qwen3-vl-8b, edit-graph, vae-im2col / vae-cudnn / flux-dense-cudnn-attention (with
#   BIN_CUDNN), flux-q8_0-kernels, flux-q4_k-kernels.
#
# The report: REPORT, written by scripts/acceptance_report.py before and after every step and
# on exit (a trap, also on TERM / INT / HUP), atomically; so a run killed at any point leaves
# the latest report, which says which step was running. A step that fails, is stopped at its
# limit, or writes NaN (null) figures is a line in the report, never the end of it.
#
# Environment (defaults in brackets):
#   BIN      the icedit-scale binary [target/release/icedit-scale]; checked first (`ldd`,
#            `--version`): a binary that cannot start has its steps recorded as skipped
#   BIN_CUDNN  the same built with `--features cudnn` (extras only) [none: skipped]
#   PYTHON   a python with torch + diffusers + transformers [python3]; probed once (versions
#            and `diffusers.hooks` into python.txt); steps whose imports are missing are skipped
#   REPORT_PYTHON  the python that writes the report (standard library only) [python3]
#   SIZE     full | small [full]          DEVICE  cuda | cuda:N | cpu [cuda]
#   DTYPE    bf16 | f32 [bf16]            BATCHES [1,4,8]      ITERS [3]
#   GRAPH_BATCHES  the batches step flux-graph replays [1,4]
#   JUDGE    extra step judge's model [qwen2.5-vl-7b]   EDIT_STEPS [28]   EDIT_WIDTH [512]
#   TF_JUDGES  the models judged against transformers [qwen2-vl-7b qwen2.5-vl-7b; small at
#            SIZE=small]
#   EDIT_IMAGE  the edit's source [a 32x32 square fixture: a 512 panel is 512x512]
#   EDIT_QUANTIZE  the edit's weight format: empty = dense DTYPE [empty], or q8_0, q4_k, fp8
#   REFINE_WIDTH [1024]
#   CACHES   the cache settings [fbc:0.12,fbc:0.2,taylorseer:interval=4,order=1,
#            taylorseer:interval=4,order=1,lite]   KEEP [2]   CACHE_PROBE [4]
#   PROFILE  1 runs the profile steps [0]; PROFILE_BEFORE=1 adds the fused-off one [0]
#   EXTRAS   1 runs the extras after the Must-show steps [1]
#   OUT      working folder [out/gpu-acceptance]
#   REPORT   the markdown written [docs/results/gpu-<UTC date>.md]
#   LOGS_TAR a .tar.gz of OUT's logs and JSON (no PNG, no raw profiles) rewritten with each
#            report [none]; one over 15 MiB is split into .partNN files. On exit the raw
#            profiles go to a second tarball beside it (<name>-profile.tar.gz), same rule.
#   STEP_LIMIT  seconds any one step may run before it is stopped (exit 124 in the report; the
#            script goes on) [0 = no limit]. LIMIT_<step> overrides it for one step, the step's
#            name with every character outside [A-Za-z0-9_] as _: LIMIT_kernel_check,
#            LIMIT_flux_dense, LIMIT_diffusers, LIMIT_flux_fp8, LIMIT_flux_q8_0, LIMIT_flux_q4_k,
#            LIMIT_edit, LIMIT_diffusers_edit, LIMIT_refine, LIMIT_flux_cache,
#            LIMIT_diffusers_cache, LIMIT_judge_vs_transformers_qwen2_vl_7b,
#            LIMIT_judge_vs_transformers_qwen2_5_vl_7b, LIMIT_diffusers_vae, LIMIT_profile_ours,
#            LIMIT_profile_diffusers, LIMIT_profile_ours_before, and the extras' likewise.
#   SKIP     steps not to run, by name, comma-separated (recorded as skipped) [none]; not
#            kernel-check (a check that did not run turns the fused kernels off)
#   TOTAL_LIMIT  seconds for the whole script [0 = no limit]; DEADLINE  the same as an absolute
#            time (epoch seconds; scripts/gpu-lease.sh sets it from its own start, so the
#            wrapper's preparation counts too); the earlier of the two wins. Each step's limit
#            is cut to what is left less REPORT_RESERVE [15] seconds (the report, the tarball,
#            a stopped step's 5 s kill grace), and a step with under 5 s left is recorded as
#            skipped.
#
# To prove the script without a GPU: SIZE=small DEVICE=cpu DTYPE=f32 BIN=target/debug/icedit-scale
#   scripts/gpu-acceptance.sh (tests/gpu_acceptance.rs runs it with a stub binary instead).
set -uo pipefail

SCRIPTS=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-target/release/icedit-scale}
PYTHON=${PYTHON:-python3}
REPORT_PYTHON=${REPORT_PYTHON:-python3}
SIZE=${SIZE:-full}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
BATCHES=${BATCHES:-1,4,8}
GRAPH_BATCHES=${GRAPH_BATCHES:-1,4}
ITERS=${ITERS:-3}
JUDGE=${JUDGE:-qwen2.5-vl-7b}
CACHES=${CACHES:-fbc:0.12,fbc:0.2,taylorseer:interval=4,order=1,taylorseer:interval=4,order=1,lite}
KEEP=${KEEP:-2}
CACHE_PROBE=${CACHE_PROBE:-4}
EDIT_IMAGE=${EDIT_IMAGE:-tests/fixtures/judge_eval/imagenhub_text_guided_ie/sources/sample_100558_1.jpg}
EDIT_STEPS=${EDIT_STEPS:-28}
EDIT_WIDTH=${EDIT_WIDTH:-512}
REFINE_WIDTH=${REFINE_WIDTH:-1024}
export EDIT_QUANTIZE=${EDIT_QUANTIZE:-}
PROFILE=${PROFILE:-0}
PROFILE_BEFORE=${PROFILE_BEFORE:-0}
EXTRAS=${EXTRAS:-1}
OUT=${OUT:-out/gpu-acceptance}
REPORT=${REPORT:-docs/results/gpu-$(date -u +%Y-%m-%d).md}
LOGS_TAR=${LOGS_TAR:-}
STEP_LIMIT=${STEP_LIMIT:-0}
TOTAL_LIMIT=${TOTAL_LIMIT:-0}
REPORT_RESERVE=${REPORT_RESERVE:-15}
SKIP=${SKIP:-}
if [[ -z ${TF_JUDGES:-} ]]; then
  TF_JUDGES="qwen2-vl-7b qwen2.5-vl-7b"
  [[ $SIZE == small ]] && TF_JUDGES=small
fi

# What the report writer reads from the environment.
ACCEPTANCE_STARTED=$(date +%s)
if [[ $TOTAL_LIMIT != 0 ]]; then
  by_total=$((ACCEPTANCE_STARTED + TOTAL_LIMIT))
  if [[ -z ${DEADLINE:-} ]] || ((by_total < DEADLINE)); then DEADLINE=$by_total; fi
fi
DEADLINE=${DEADLINE:-}
export ACCEPTANCE_STARTED DEADLINE TF_JUDGES

mkdir -p "$OUT" "$(dirname "$REPORT")"
: >"$OUT/steps.tsv"
rm -f "$OUT/finished" "$OUT/running" "$OUT/fused-off" "$OUT/profile-failed" "$OUT/profile-skipped" \
  "$OUT/profile.md" "$OUT/profile.json"

# ------------------------------------------------------------------ report and logs

# The report, from whatever OUT holds now. If the writer itself fails (no python3, a bug), a
# plain table from steps.tsv, so there is always a report.
write_report() {
  if ! timeout 60 "$REPORT_PYTHON" "$SCRIPTS/acceptance_report.py" "$OUT" "$REPORT" "$SIZE" "$DEVICE" "$DTYPE" \
    >>"$OUT/report-writer.log" 2>&1; then
    {
      echo "# GPU acceptance run (fallback report: scripts/acceptance_report.py failed; its output below)"
      echo
      echo "| step | exit | seconds |"
      echo "|---|---|---|"
      while IFS=$'\t' read -r n rc s; do echo "| $n | $rc | $s |"; done <"$OUT/steps.tsv"
      echo
      echo '```'
      tail -n 30 "$OUT/report-writer.log"
      echo '```'
    } >"$REPORT.tmp" 2>/dev/null && mv -f "$REPORT.tmp" "$REPORT"
  fi
}

# $1 the tarball, then tar's arguments: writes it, and splits one over 15 MiB into 15 MiB
# parts (the device tool returns files of at most 16 MiB), removing stale parts first.
pack() {
  local tarball=$1
  shift
  rm -f "$tarball".part*
  tar czf "$tarball.tmp" "$@" 2>/dev/null || true
  [[ -f $tarball.tmp ]] || return 0
  mv -f "$tarball.tmp" "$tarball"
  if (($(stat -c %s "$tarball") > 15 * 1024 * 1024)); then
    split -b 15M -d "$tarball" "$tarball.part" && rm -f "$tarball"
  fi
}
# Raw profiles (the ncu CSVs, nsys reports, torch's trace): in the second tarball only.
RAW_PROFILES=(--exclude='profile-*.csv' --exclude='*.nsys-rep' --exclude='*.sqlite'
  --exclude='profile-diffusers.json' --exclude='*_cuda_gpu_trace.csv')
pack_logs() {
  [[ -n $LOGS_TAR ]] || return 0
  pack "$LOGS_TAR" --exclude='*.png' --exclude='*.tmp' "${RAW_PROFILES[@]}" -C "$OUT" .
}
pack_profiles() {
  [[ -n $LOGS_TAR ]] || return 0
  local files=()
  cd "$OUT" || return 0
  for f in profile-*.csv *.nsys-rep *_cuda_gpu_trace.csv profile-diffusers.json; do
    [[ -f $f ]] && files+=("$f")
  done
  cd - >/dev/null || return 0
  ((${#files[@]})) && pack "${LOGS_TAR%.tar.gz}-profile.tar.gz" -C "$OUT" "${files[@]}"
  return 0
}
snapshot() {
  write_report
  pack_logs
}

# Samples the GPU's used memory every 250 ms while a step runs (MiB, one number a line).
sampler_pid=""
start_sampler() {
  if command -v nvidia-smi >/dev/null 2>&1 && [[ "$DEVICE" == cuda* ]]; then
    local index=${DEVICE#cuda}
    index=${index#:}
    nvidia-smi --id="${index:-0}" --query-gpu=memory.used --format=csv,noheader,nounits \
      -lms 250 >"$OUT/$1.gpu-mem" 2>/dev/null &
    sampler_pid=$!
  fi
}
stop_sampler() {
  if [[ -n $sampler_pid ]]; then
    kill "$sampler_pid" 2>/dev/null
    wait "$sampler_pid" 2>/dev/null
    sampler_pid=""
  fi
}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$OUT/steps.tsv"; }

# Seconds left before the deadline, less the report's reserve; empty without a deadline.
time_left() {
  [[ -n $DEADLINE ]] && echo $((DEADLINE - $(date +%s) - REPORT_RESERVE))
}

# On a signal: stop the running step (its `timeout` passes the signal to the step's process
# group), record it, and exit; the EXIT trap writes the report.
step_pid=""
step_name=""
step_start=0
exit_reason=""
on_signal() {
  local sig=$1 code=$2
  trap - TERM INT HUP
  if [[ -n $step_pid ]]; then
    kill -TERM "$step_pid" 2>/dev/null
    sleep 1
    kill -KILL "$step_pid" 2>/dev/null
    record "$step_name" "stopped (SIG$sig)" "$(($(date +%s) - step_start))"
    step_pid=""
  fi
  exit_reason="stopped by SIG$sig"
  exit "$code"
}
on_exit() {
  local rc=$?
  stop_sampler
  rm -f "$OUT/running"
  echo "${exit_reason:-exit $rc}, $(($(date +%s) - ACCEPTANCE_STARTED)) s in all" >"$OUT/finished"
  write_report
  pack_logs
  pack_profiles
  echo "wrote $REPORT${LOGS_TAR:+ and $LOGS_TAR}"
}
trap on_exit EXIT
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP

# step NAME COMMAND...: runs it with its output in $OUT/NAME.log, records exit and seconds;
# stops it after LIMIT_<NAME> (or STEP_LIMIT) seconds, cut to the time left before DEADLINE.
# The command runs in the background under `timeout` (its own process group) and the script
# waits for it, so a signal reaches the trap at once.
step() {
  local name=$1
  shift
  local limit_var="LIMIT_${name//[^A-Za-z0-9_]/_}"
  local limit=${!limit_var:-$STEP_LIMIT}
  if [[ ",$SKIP," == *",$name,"* ]]; then
    echo "== $name: skipped (SKIP)"
    record "$name" "skipped (SKIP)" 0
    return
  fi
  local left
  left=$(time_left)
  if [[ -n $left ]]; then
    if ((left < 5)); then
      echo "== $name: skipped, the run's time is spent"
      record "$name" "skipped (time spent)" 0
      return
    fi
    if [[ $limit == 0 ]] || ((limit > left)); then limit=$left; fi
  fi
  echo "== $name (limit ${limit} s): $*"
  step_name=$name
  step_start=$(date +%s)
  printf '%s\t%s\n' "$name" "$step_start" >"$OUT/running"
  write_report
  start_sampler "$name"
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1 </dev/null &
  step_pid=$!
  wait "$step_pid"
  local rc=$?
  step_pid=""
  stop_sampler
  rm -f "$OUT/running"
  record "$name" "$rc" "$(($(date +%s) - step_start))"
  echo "   rc=$rc in $(($(date +%s) - step_start)) s"
  snapshot
}

# ------------------------------------------------------------------ preflight

# Can the binary start? `ldd` names missing libraries (a wrong LD_LIBRARY_PATH), `--version`
# says what it was built for. A binary that cannot start has its steps skipped, each saying
# so, instead of failing one by one; the Python baselines still run.
bin_ok=1
{
  echo "BIN: $BIN"
  echo "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-(unset)}"
  if [[ ! -x $BIN ]]; then
    echo "BIN is not an executable file"
  elif command -v ldd >/dev/null 2>&1; then
    echo "ldd (CUDA libraries and anything not found):"
    ldd "$BIN" 2>&1 | grep -Ei 'not found|cuda|cublas|curand|cudart|cudnn|nvrtc|not a dynamic' || echo "  (no CUDA library linked: a CPU build)"
  fi
} >"$OUT/preflight.txt" 2>&1
if [[ ! -x $BIN ]] || ldd "$BIN" 2>&1 | grep -q 'not found' || ! timeout 30 "$BIN" --version >/dev/null 2>&1; then
  bin_ok=0
  echo "BIN cannot start: its steps are skipped (see preflight.txt)" | tee -a "$OUT/preflight.txt"
  record preflight "failed: BIN cannot start (see the preflight section)" 0
fi
{
  echo "BIN: $(timeout 30 "$BIN" --version 2>&1 | head -1)"
  if [[ -n ${BIN_CUDNN:-} ]]; then
    echo "BIN_CUDNN: $(timeout 30 "$BIN_CUDNN" --version 2>&1 | head -1)"
  fi
} >"$OUT/binaries.txt"
if [[ $DEVICE == cuda* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/machine.txt" 2>&1
fi

# One probe of the Python side: versions, and whether diffusers' cache hooks import.
timeout 120 "$PYTHON" - >"$OUT/python.txt" 2>"$OUT/python-probe.log" <<'PY'
import importlib
for name in ("torch", "diffusers", "transformers"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name} missing ({type(e).__name__}: {e})".replace("\n", " ")[:300])
try:
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig  # noqa: F401
    print("hooks FirstBlockCacheConfig, TaylorSeerCacheConfig")
except Exception as e:
    print(f"hooks missing ({type(e).__name__}: {e})".replace("\n", " ")[:300])
PY
has_py() { grep -q "^$1 [^m]" "$OUT/python.txt" 2>/dev/null; }
py_diffusers=0
py_transformers=0
py_hooks=0
has_py torch && has_py diffusers && py_diffusers=1
has_py torch && has_py transformers && py_transformers=1
((py_diffusers)) && has_py hooks && py_hooks=1
snapshot

# bin_step NAME COMMAND...: a step of BIN (skipped when it cannot start).
bin_step() {
  if ((!bin_ok)); then
    record "$1" "skipped (BIN cannot start: preflight)" 0
    return
  fi
  step "$@"
}
# py_step NAME NEEDS COMMAND...: a Python step; NEEDS is diffusers, transformers, both or
# hooks (diffusers with diffusers.hooks).
py_step() {
  local name=$1 needs=$2
  shift 2
  local ok=1
  case $needs in
    diffusers) ((py_diffusers)) || ok=0 ;;
    transformers) ((py_transformers)) || ok=0 ;;
    both) ((py_diffusers && py_transformers)) || ok=0 ;;
    hooks) ((py_hooks)) || ok=0 ;;
  esac
  if ((!ok)); then
    echo "== $name: $PYTHON lacks what it imports ($needs); skipped"
    record "$name" "skipped ($PYTHON lacks $needs: see python.txt)" 0
    return
  fi
  step "$name" "$@"
}

# Every fused kernel but one (the A/B of that kernel alone): $1 the kernel left out. After a
# failed kernel check everything stays off.
all_but() {
  if [[ -f "$OUT/fused-off" ]]; then
    echo none
  else
    local all=attention,modulate,gated_residual,qk_norm_rope,judge_attention,gemm_epilogue,fp8_gemm,fp8_rows
    all=",$all,"
    all=${all/,$1,/,}
    all=${all#,}
    echo "${all%,}"
  fi
}

flux_args=(--size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --width 512 --height 512 --t5-tokens 512 --steps 28)

# ------------------------------------------------------------------ Must-show steps

# The fused kernels' check alone first (bench flux runs it before any timing): one batch-1
# step, no warm-up, no tiny decoder. A crash here turns the fused kernels off for the rest.
bin_step kernel-check "$BIN" bench flux "${flux_args[@]}" --formats dense --batch 1 --warmup 0 --iters 1 \
  --no-tiny --out "$OUT/kernel-check"
if [[ $(tail -n 1 "$OUT/steps.tsv" | cut -f2) != 0 ]]; then
  echo "   the kernel check failed to finish: ICEDIT_CUDA_FUSED=none from here on"
  export ICEDIT_CUDA_FUSED=none
  touch "$OUT/fused-off"
fi

bin_step flux-dense "$BIN" bench flux "${flux_args[@]}" --formats dense --batch "$BATCHES" --iters "$ITERS" \
  --out "$OUT/flux-dense"
py_step diffusers diffusers "$PYTHON" "$SCRIPTS/bench_diffusers_flux.py" --size "$SIZE" --device "$DEVICE" \
  --dtype "$DTYPE" --batch "$BATCHES" --width 512 --height 512 --t5-tokens 512 --iters "$ITERS" \
  --out "$OUT/diffusers-flux.json"
# fp8: cuBLASLt's fp8 GEMM on sm89+ (the kernel check compares it with the 16-bit GEMM
# first), per-row activation scales on sm90+; q8_0 / q4_k: dequantize-then-GEMM.
for format in fp8 q8_0 q4_k; do
  bin_step "flux-$format" "$BIN" bench flux "${flux_args[@]}" --formats "$format" --batch "$BATCHES" \
    --iters "$ITERS" --no-tiny --out "$OUT/flux-$format"
done

# Random weights at SIZE, dense DTYPE (EDIT_QUANTIZE for another format), a 512 panel of a
# square source (1024x512 diptych), the paper's early filter at batch 8; the tiny fixture
# judge keeps the judge's part short. Dense at batch 8 plans about 29 GB.
edit_quantize=()
[[ -n $EDIT_QUANTIZE ]] && edit_quantize=(--quantize "$EDIT_QUANTIZE")
edit_args=(--image "$EDIT_IMAGE" --instruction "make the sky night" --width "$EDIT_WIDTH" --random-weights "$SIZE"
  "${edit_quantize[@]}" --device "$DEVICE" --dtype "$DTYPE" --batch-size 8 --strategy early-filter --seeds 8
  --probe-steps 4 --keep 2 --steps "$EDIT_STEPS" --judge tests/fixtures/qwen2vl/judge-tiny.toml
  --memory-budget 1000000)
bin_step edit "$BIN" edit "${edit_args[@]}" --out "$OUT/edit"
py_step diffusers-edit both "$PYTHON" "$SCRIPTS/bench_diffusers_edit.py" --size "$SIZE" --device "$DEVICE" \
  --dtype "$DTYPE" --width "$EDIT_WIDTH" --image "$EDIT_IMAGE" --steps "$EDIT_STEPS" \
  --out "$OUT/diffusers-edit.json"

# Hi-res refine: one plain edit (random, no judge) refined to REFINE_WIDTH, q8_0.
refine_args=(--image tests/fixtures/flux/source.png --instruction "make the sky night" --width "$EDIT_WIDTH"
  --random-weights "$SIZE" --quantize q8_0 --device "$DEVICE" --dtype "$DTYPE" --strategy random --judge none
  --steps "$EDIT_STEPS" --refine "$REFINE_WIDTH" --memory-budget 1000000)

# The plans (instant, no weights): with the flags of `edit` and of `refine` exactly (what
# their nvidia-smi peaks are compared with), and per format at batch 1 and 8 (full size: no
# weights named = FLUX.1 Fill).
if ((bin_ok)); then
  timeout 20 "$BIN" plan "${edit_args[@]}" --out "$OUT/plan-edit-out" >"$OUT/plan-edit.md" 2>&1
  timeout 20 "$BIN" plan "${refine_args[@]}" --out "$OUT/plan-refine-out" >"$OUT/plan-refine.md" 2>&1
  for batch in 1 8; do
    for format in dense fp8 q8_0 q4_k; do
      quantize=()
      [[ $format != dense ]] && quantize=(--quantize "$format")
      timeout 20 "$BIN" plan --device "$DEVICE" --dtype "$DTYPE" --batch-size "$batch" --width 512 \
        --text-device cpu --memory-budget 1000000 "${quantize[@]}" >"$OUT/plan-$format-b$batch.md" 2>&1
    done
  done
fi

bin_step refine "$BIN" edit "${refine_args[@]}" --out "$OUT/refine"

# Step caching: the completion part of an edit per cache setting, ours and diffusers'.
bin_step flux-cache "$BIN" bench flux --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --formats dense --batch 1 --width 512 --height 512 --t5-tokens 512 --warmup 1 --iters 1 \
  --no-tiny --steps "$EDIT_STEPS" --probe-steps "$CACHE_PROBE" --keep "$KEEP" \
  --cache "$CACHES" --out "$OUT/flux-cache"
py_step diffusers-cache hooks "$PYTHON" "$SCRIPTS/bench_diffusers_flux.py" --size "$SIZE" \
  --device "$DEVICE" --dtype "$DTYPE" --batch 1 --width 512 --height 512 --t5-tokens 512 \
  --iters 1 --steps "$EDIT_STEPS" --probe-steps "$CACHE_PROBE" --keep "$KEEP" \
  --cache "$CACHES" --out "$OUT/diffusers-cache.json"

# One screening prompt (two 448 px images + 150 text tokens) through both implementations,
# in alternating rounds while both models stay loaded (the median of the per-round ratios).
for tf in $TF_JUDGES; do
  if ((!py_transformers)); then
    record "judge-vs-transformers-$tf" "skipped ($PYTHON lacks torch or transformers: see python.txt)" 0
    continue
  fi
  bin_step "judge-vs-transformers-$tf" "$BIN" bench judge --model "$tf" --device "$DEVICE" \
    --dtype "$DTYPE" --image-side 448 --text-tokens 150 --batch 1 --iters 1 \
    --rounds "${JUDGE_ROUNDS:-5}" --versus "$PYTHON $SCRIPTS/bench_transformers_judge.py --serve \
--model $tf --device $DEVICE --dtype $DTYPE --image-side 448 --text-tokens 150" \
    --out "$OUT/judge-vs-transformers-$tf"
done

# diffusers' VAE on the diptych `bench flux` encodes and decodes (ours: flux-dense's).
py_step diffusers-vae diffusers "$PYTHON" "$SCRIPTS/bench_diffusers_flux.py" --vae --size "$SIZE" \
  --device "$DEVICE" --dtype "$DTYPE" --width 512 --height 512 --iters "$ITERS" --out "$OUT/diffusers-vae.json"

# The profile of one forward per side (PROFILE=1).
profile_sides=()
summarise_profile() {
  ((${#profile_sides[@]})) || return 0
  local limit=60 left
  left=$(time_left)
  [[ -n $left ]] && ((left < limit)) && limit=$((left > 5 ? left : 5))
  timeout "$limit" "$PYTHON" "$SCRIPTS/profile_summary.py" "${profile_sides[@]}" --out "$OUT/profile.md" \
    --json "$OUT/profile.json" >"$OUT/profile-summary.log" 2>&1
  snapshot
}
# $1 the step, $2 ICEDIT_CUDA_FUSED for it, $3 its label in the table.
profile_ours() {
  local name=$1 fused=$2 label=$3
  local run=("$BIN" bench flux "${flux_args[@]}" --formats dense --batch 1 --warmup 1 --iters 1 --no-tiny
    --out "$OUT/$name")
  if [[ -n $ncu_bin ]]; then
    # The GPU's own clocks and caches as the previous kernel left them (ncu locks clocks to
    # base and flushes caches by default), as in a run without ncu and as torch's profiler
    # sees diffusers; nothing is profiled until the binary calls cuProfilerStart.
    bin_step "$name" env ICEDIT_PROFILE_FORWARD=1 ICEDIT_CUDA_FUSED="$fused" "$ncu_bin" --profile-from-start off \
      --metrics gpu__time_duration.sum --csv --clock-control none --cache-control none \
      --log-file "$OUT/$name.csv" "${run[@]}"
    if grep -q '"Kernel Name"' "$OUT/$name.csv" 2>/dev/null; then
      profile_sides+=(--side "$label (Nsight Compute)" "$OUT/$name.csv" 1)
    else
      echo "**$name: Nsight Compute wrote no kernel rows** (step exit $(tail -n 1 "$OUT/steps.tsv" | cut -f2); an empty CSV, or none: the profiler range never started, or the step was stopped before ncu wrote its page)." >>"$OUT/profile-failed"
      record "$name-csv" "failed: no kernel rows in $name.csv" 0
    fi
  elif [[ -n $nsys_bin ]]; then
    bin_step "$name" env ICEDIT_PROFILE_FORWARD=1 ICEDIT_CUDA_FUSED="$fused" "$nsys_bin" profile --trace cuda \
      --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite true -o "$OUT/$name" "${run[@]}"
    timeout 60 "$nsys_bin" stats --report cuda_gpu_trace --format csv --force-export true \
      --output "$OUT/$name" "$OUT/$name.nsys-rep" >"$OUT/$name-stats.log" 2>&1
    if [[ -s "$OUT/${name}_cuda_gpu_trace.csv" ]]; then
      profile_sides+=(--side "$label (Nsight Systems)" "$OUT/${name}_cuda_gpu_trace.csv" 1)
    else
      echo "**$name: Nsight Systems gave no kernel trace** (see $name-stats.log)." >>"$OUT/profile-failed"
      record "$name-csv" "failed: no kernel trace" 0
    fi
  else
    echo "neither Nsight Compute (ncu) nor Nsight Systems (nsys) was found on this machine" >"$OUT/profile-skipped"
    record "$name" "skipped (no ncu or nsys)" 0
  fi
}
if [[ $PROFILE == 1 ]]; then
  ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  nsys_bin=$(command -v nsys || true)
  profile_ours profile-ours "$(all_but none)" "icedit-scale"
  py_step profile-diffusers diffusers "$PYTHON" "$SCRIPTS/bench_diffusers_flux.py" --size "$SIZE" \
    --device "$DEVICE" --dtype "$DTYPE" --batch 1 --width 512 --height 512 --t5-tokens 512 --iters 1 \
    --profile "$OUT/profile-diffusers.json" --out "$OUT/profile-diffusers-flux.json"
  [[ -s "$OUT/profile-diffusers.json" ]] && profile_sides+=(--side "diffusers (torch profiler)" "$OUT/profile-diffusers.json" 1)
  summarise_profile
  # PROFILE_BEFORE=1: the same forward with every fused kernel off (the path before issue
  # 31's kernels), the table's "before" column.
  if [[ $PROFILE_BEFORE == 1 ]]; then
    profile_ours profile-ours-before none "icedit-scale, fused kernels off (before)"
    summarise_profile
  fi
fi

# ------------------------------------------------------------------ extras
if [[ $EXTRAS != 1 ]]; then
  echo "== extras: skipped (EXTRAS=$EXTRAS)"
  exit 0
fi

bin_step flux-graph "$BIN" bench flux "${flux_args[@]}" --formats dense --batch "$GRAPH_BATCHES" \
  --iters "$ITERS" --no-tiny --graph --out "$OUT/flux-graph"
bin_step flux-dense-unfused env ICEDIT_CUDA_FUSED=none "$BIN" bench flux "${flux_args[@]}" --formats dense \
  --batch "$BATCHES" --iters "$ITERS" --no-tiny --out "$OUT/flux-dense-unfused"
bin_step flux-dense-no-gemm env ICEDIT_CUDA_FUSED="$(all_but gemm_epilogue)" "$BIN" bench flux "${flux_args[@]}" \
  --formats dense --batch 1 --iters "$ITERS" --no-tiny --out "$OUT/flux-dense-no-gemm"
bin_step flux-fp8-per-tensor env ICEDIT_CUDA_FUSED="$(all_but fp8_rows)" "$BIN" bench flux "${flux_args[@]}" \
  --formats fp8 --batch 1 --iters "$ITERS" --no-tiny --out "$OUT/flux-fp8-per-tensor"
bin_step flux-fp8-upcast env ICEDIT_CUDA_FUSED="$(all_but fp8_gemm)" "$BIN" bench flux "${flux_args[@]}" \
  --formats fp8 --batch 1 --iters "$ITERS" --no-tiny --out "$OUT/flux-fp8-upcast"
bin_step judge "$BIN" bench judge --model "$JUDGE" --device "$DEVICE" --dtype "$DTYPE" \
  --batch "$BATCHES" --out "$OUT/judge"
if [[ $SIZE == full ]]; then
  bin_step judge-qwen3-vl-8b "$BIN" bench judge --model qwen3-vl-8b --device "$DEVICE" --dtype "$DTYPE" \
    --batch 1 --iters 1 --out "$OUT/judge-qwen3-vl-8b"
fi
bin_step edit-graph env ICEDIT_CUDA_GRAPH=on "$BIN" edit "${edit_args[@]}" --out "$OUT/edit-graph"
if [[ -n ${BIN_CUDNN:-} && -x ${BIN_CUDNN:-} ]]; then
  for build in im2col cudnn; do
    bin="$BIN"
    [[ $build == cudnn ]] && bin="$BIN_CUDNN"
    bin_step "vae-$build" "$bin" bench flux --vae-only --size "$SIZE" --device "$DEVICE" \
      --dtype "$DTYPE" --width 512 --height 512 --iters "$ITERS" --no-tiny --out "$OUT/vae-$build"
  done
  bin_step flux-dense-cudnn-attention env ICEDIT_CUDA_ATTENTION=cudnn "$BIN_CUDNN" bench flux "${flux_args[@]}" \
    --formats dense --batch "$BATCHES" --iters "$ITERS" --no-tiny --out "$OUT/flux-dense-cudnn-attention"
else
  record vae-cudnn "skipped (no BIN_CUDNN)" 0
  record flux-dense-cudnn-attention "skipped (no BIN_CUDNN)" 0
fi
for format in q8_0 q4_k; do
  bin_step "flux-$format-kernels" env ICEDIT_QUANTIZED_MATMUL=kernels "$BIN" bench flux "${flux_args[@]}" \
    --formats "$format" --batch "$BATCHES" --iters "$ITERS" --no-tiny --out "$OUT/flux-$format-kernels"
done
exit 0
