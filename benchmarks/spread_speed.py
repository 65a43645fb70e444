"""The layer loop's weight rebuilds: one MEMIT step over 5 layers that rebuilds only the layer it just
wrote (`LocateEditor.write_layer`, the core since the refactor) against the same step rebuilding
every edited layer after each layer (the pre-refactor `refresh_weights()`, L² dense float64
rebuilds), same process, rounds interleaved, targets computed once and reused so that only the loop
is timed.

    python benchmarks/spread_speed.py [--n 10] [--rounds 3] [--layers 3 4 5 6 7] [--stats-samples 200]

Prints seconds per step for each, the ratio, the rebuild counts, and whether both give the same
weights (they must: the loop writes the same values either way).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from editing.data import load_benchmark
from editing.editors import MEMIT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    ap.add_argument("--stats-samples", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    editor = MEMIT(base_model=args.model, layers=args.layers, v_steps=5, stats_samples=args.stats_samples)
    requests = load_benchmark(kind="counterfactual").requests[: args.n]
    targets = editor.targets(requests, editor.templates())
    editor.targets = lambda reqs, templates, cfg=None: targets   # time the layer loop only
    for l in editor.layers:
        editor.covariance(l)
    real_write, rebuilds = editor.write_layer, {"n": 0}
    real_weight = editor.write_weight

    def counting(layer):
        rebuilds["n"] += 1
        real_weight(layer)
    editor.write_weight = counting

    def all_layers(layer, factors, K):            # the pre-refactor loop: rebuild every edited layer
        editor.history.steps[-1][layer] = editor.fused(layer, factors)
        editor.refresh_weights()

    times = {"one layer": [], "all layers": []}
    counts, weights = {}, {}
    for _ in range(args.rounds):
        for name, write in (("one layer", real_write), ("all layers", all_layers)):
            editor.write_layer = write
            rebuilds["n"] = 0
            t = time.perf_counter()
            editor.edit(requests)
            times[name].append(time.perf_counter() - t)
            counts[name] = rebuilds["n"]
            weights[name] = {l: editor._weight(l).detach().clone() for l in editor.layers}
            editor.undo()
    one, full = statistics.median(times["one layer"]), statistics.median(times["all layers"])
    same = all(torch.equal(weights["one layer"][l], weights["all layers"][l]) for l in editor.layers)
    print(f"one-layer rebuild: {one:.2f} s/step ({counts['one layer']} rebuilds)")
    print(f"all-layer rebuild: {full:.2f} s/step ({counts['all layers']} rebuilds)")
    print(f"speed-up {full / one:.2f}x; identical weights: {same}")


if __name__ == "__main__":
    main()
