#!/usr/bin/env bash
# What one device-tool call would send, against its 64 MiB limit (docs/benchmarks.md, "The
# next GPU run"): tracked files, untracked files that git does not ignore, and the carried
# paths given as arguments (default: .gpu .whl). Prints each part in bytes and exits 1 when
# the sum is over 67,108,864 bytes (64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -gt 0 ]] || set -- .gpu .whl
sum() { xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
tracked=$(git ls-files -z | sum)
untracked=$(git ls-files -z --others --exclude-standard | sum)
carried=0
for p in "$@"; do
  if [[ -e $p ]]; then
    bytes=$(find "$p" -type f -print0 | sum)
    echo "carried $p: $bytes bytes"
    find "$p" -type f -printf '  %s\t%p\n'
    carried=$((carried + bytes))
  else
    echo "carried $p: absent"
  fi
done
total=$((tracked + untracked + carried))
limit=$((64 * 1024 * 1024))
echo "tracked: $tracked bytes; untracked, not ignored: $untracked; carried: $carried"
echo "total: $total of $limit bytes ($((total * 100 / limit))%)"
if ((total > limit)); then
  echo "over the device tool's 64 MiB: carry less (one binary; xz -9e instead of gzip)" >&2
  exit 1
fi
