# Sourced by the benchmark shell scripts: `run_dir NAME` empties runs/NAME (as $RUNS) and makes
# benchmarks/results ($OUT); `timed LABEL cmd...` runs a command and appends its wall time to
# $RUNS/times.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=benchmarks/results
run_dir() { RUNS="runs/$1"; rm -rf "$RUNS"; mkdir -p "$RUNS" "$OUT"; }
timed() { local name=$1; shift; local s; s=$(date +%s); "$@"; echo "$name: $(( $(date +%s) - s )) s" >> "$RUNS/times.txt"; }
