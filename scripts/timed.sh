#!/usr/bin/env bash
# Run one step of `make test` and record its wall time for the per-tier table
# (scripts/timing-table.sh). On failure the table so far is printed before the exit code is passed on,
# so a red run still shows where its time went.
#   scripts/timed.sh NAME command [args...]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TIMES=${CSI_THIN_TIMES:-$(dirname "$HERE")/.stamps/times.tsv}
name=$1; shift
mkdir -p "$(dirname "$TIMES")"
t0=$(date +%s%N)
"$@"
rc=$?
t1=$(date +%s%N)
ds=$(( (t1 - t0) / 100000000 ))  # tenths of a second
printf '%s\t%d.%d\t%s\n' "$name" $((ds / 10)) $((ds % 10)) "$([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)")" >> "$TIMES"
if [ $rc -ne 0 ]; then "$HERE/timing-table.sh"; fi
exit $rc
