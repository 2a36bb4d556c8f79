#!/usr/bin/env bash
# The device side of the one GPU acceptance call (docs/benchmarks.md, "The next GPU run"):
# run from the repository root on the GPU machine, with the device tool's $OUT set and the
# carried `.gpu` (the binary, xz- or gzip-compressed or plain) and `.whl` (the diffusers
# wheel). It
#   1. fixes an absolute DEADLINE from its own start (LEASE_SECONDS [540]), so the
#      preparation below counts and a whole-command timeout (timeout_s) still finds a report;
#   2. installs the wheel into /tmp/site (PYTHONPATH), unpacks the binary;
#   3. puts the CUDA libraries the binary needs on LD_LIBRARY_PATH: torch's own
#      site-packages/nvidia/*/lib first, then a bounded search (20 s) of the usual folders
#      for each library `ldd` still reports missing, the driver's libcuda.so.1 included;
#      every choice and anything still missing is printed (lease.log, and the report's
#      preflight section, which then skips the binary's steps instead of failing each);
#   4. runs scripts/gpu-acceptance.sh with OUT=/tmp/acc, REPORT=$OUT/gpu-acceptance.md and
#      LOGS_TAR=$OUT/gpu-acceptance-logs.tar.gz (both rewritten after every step).
# Everything else (BATCHES, PROFILE, SKIP, EXTRAS, LIMIT_*, TOTAL_LIMIT...) passes through the
# environment to the acceptance script.
set -uo pipefail
lease_start=$(date +%s)
: "${OUT:?set by the device tool: the folder whose files come back}"
export DEADLINE=${DEADLINE:-$((lease_start + ${LEASE_SECONDS:-540}))}
ACC=${ACC:-/tmp/acc}
mkdir -p "$ACC"
exec > >(tee -a "$ACC/lease.log") 2>&1
echo "lease: start $(date -u +%H:%M:%S) UTC, deadline in $((DEADLINE - lease_start)) s"

# 2. The wheel and the binary.
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ||
    echo "lease: the wheel did not install: the diffusers steps will be skipped"
fi
for f in .gpu/*.xz; do
  [[ -e $f ]] || continue
  if command -v xz >/dev/null 2>&1; then
    xz -df "$f"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$f" && rm -f "$f"
  fi
done
for f in .gpu/*.gz; do
  [[ -e $f ]] && gunzip -f "$f"
done
chmod +x .gpu/icedit-scale* 2>/dev/null
BIN=${BIN:-.gpu/icedit-scale}
echo "lease: binary $(ls -l "$BIN" 2>&1)"

# 3. Libraries. torch's wheels carry the CUDA 13 libraries the binary was linked against
# (docs/results/gpu-2026-12-04.md ran with them).
add_dir() {
  [[ -n $1 && -d $1 ]] || return
  case ":${LD_LIBRARY_PATH:-}:" in *":$1:"*) return ;; esac
  export LD_LIBRARY_PATH=$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "lease: LD_LIBRARY_PATH += $1"
}
site_dirs=$(timeout 20 python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
for d in $site_dirs; do
  for lib in "$d"/nvidia/*/lib "$d"/nvidia/*/*/lib; do
    [[ -d $lib ]] && compgen -G "$lib/lib*.so*" >/dev/null && add_dir "$lib"
  done
done
missing() { ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}'; }
for name in $(missing); do
  found=$(timeout 20 find $site_dirs /usr/local/nvidia /usr/local/cuda /usr/local/cuda-* /usr/lib/x86_64-linux-gnu \
    /usr/lib64 /opt -maxdepth 6 -name "$name" 2>/dev/null | head -n 1)
  if [[ -n $found ]]; then
    add_dir "$(dirname "$found")"
  else
    echo "lease: MISSING $name: not under site-packages, /usr/local/nvidia, /usr/local/cuda*, /usr/lib*, /opt"
  fi
done
echo "lease: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
still=$(missing | tr '\n' ' ')
[[ -n $still ]] && echo "lease: still missing after the search: $still(the binary's steps will be skipped)"
echo "lease: prepared in $(($(date +%s) - lease_start)) s"

# 4. The run; its report and log tarball come back under $OUT.
export BIN
export REPORT=${REPORT:-$OUT/gpu-acceptance.md}
export LOGS_TAR=${LOGS_TAR:-$OUT/gpu-acceptance-logs.tar.gz}
export OUT=$ACC
exec scripts/gpu-acceptance.sh
