#!/usr/bin/env bash
# Print the per-tier timing table of the current `make test` run (rows written by scripts/timed.sh).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TIMES=${CSI_THIN_TIMES:-$(dirname "$HERE")/.stamps/times.tsv}
[ -f "$TIMES" ] || { echo "timing: no rows in $TIMES"; exit 0; }
echo
echo "== make test: time per tier"
awk -F'\t' '
  { printf "%-14s %9.1f s  %s\n", $1, $2, $3; total += $2 }
  END { printf "%-14s %9.1f s  (%.1f min)\n", "total", total, total / 60 }
' "$TIMES"
