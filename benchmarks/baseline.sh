#!/usr/bin/env bash
# The baseline table of the foundation: NoEdit and FT-M on N edits (default 50) of the shipped ParaRel
# counterfactual benchmark, SmolLM2-135M, sequential editing. Prints the merged table and the wall
# time of each run; writes benchmarks/results/baseline.md and baseline.png.
#   bash benchmarks/baseline.sh [N]
source "$(dirname "$0")/common.sh"
N=${1:-50}
run_dir baseline
timed noedit python cli.py test --config configs/noedit.yaml --data.num_edits "$N" --trainer.default_root_dir "$RUNS/noedit"
timed ft python cli.py fit --config configs/ft.yaml --data.num_edits "$N" --trainer.default_root_dir "$RUNS/ft" --test_after_fit true
python -m editing.report "$RUNS/noedit" "$RUNS/ft" --out "$OUT/baseline.md" --plot "$OUT/baseline.png" \
  --columns reliability,generality,locality,score,score_mean,rewrite_acc,paraphrase_acc,neighborhood_acc,locality_acc,locality_unchanged,neighborhood_unchanged
echo "wall time (each including model loading):"; cat "$RUNS/times.txt"
