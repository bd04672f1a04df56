#!/usr/bin/env bash
# Every folder of tests/ must be a tier that `make test` runs: a new folder left out of HOST_TIERS
# would otherwise never run, and nobody would notice.
#   scripts/check-tiers.sh TIER...
set -euo pipefail
cd "$(dirname "$0")/../tests"
for d in */; do
  d=${d%/}
  [ "$d" = __pycache__ ] && continue
  case " $* " in *" $d "*) ;; *) echo "tests/$d is not a tier of 'make test' (add it to HOST_TIERS)" >&2; exit 1;; esac
done
