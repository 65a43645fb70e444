#!/usr/bin/env bash
# Quality of the locate-then-edit family on SmolLM2-135M: N counterfactual edits from the shipped
# ParaRel set (default 100): ROME (sequential), MEMIT and PMET (one batch) against NoEdit and FT.
# Prints the merged table and each run's wall time; writes benchmarks/results/locate_quality.{md,png}.
#   bash benchmarks/locate_quality.sh [N]
source "$(dirname "$0")/common.sh"
N=${1:-100}
run_dir locate_quality
timed noedit python cli.py test --config configs/noedit.yaml --data.num_edits "$N" --trainer.default_root_dir "$RUNS/noedit"
timed ft python cli.py fit --config configs/ft.yaml --data.num_edits "$N" --trainer.default_root_dir "$RUNS/ft" --test_after_fit true
for m in memit pmet rome; do
  timed "$m" python cli.py fit --config "configs/$m.yaml" --data.num_edits "$N" --trainer.default_root_dir "$RUNS/$m" --test_after_fit true
done
# MEMIT at 3..7 too: the window the JEEP / COMEBA-HK / AdaPLE comparisons use (configs/memit.yaml: 6..10)
timed memit_3_7 python cli.py fit --config configs/memit.yaml --model.init_args.layers '[3, 4, 5, 6, 7]' \
  --data.num_edits "$N" --trainer.default_root_dir "$RUNS/memit_3_7" --test_after_fit true
python -m editing.report "$RUNS"/noedit "$RUNS"/ft "$RUNS"/rome "$RUNS"/memit_3_7 "$RUNS"/memit "$RUNS"/pmet --out "$OUT/locate_quality.md" \
  --plot "$OUT/locate_quality.png" \
  --columns reliability,generality,locality,score,rewrite_acc,paraphrase_acc,neighborhood_unchanged,locality_unchanged
cat "$RUNS/times.txt"
