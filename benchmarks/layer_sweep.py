"""Choose SmolLM2's edit layers: MEMIT over windows of 5 consecutive layers (and ROME over single
layers), each on the same N counterfactual edits in one batch, scored by efficacy / paraphrase /
neighbourhood probability wins and Score. Prints a table; the chosen layers go into configs/.

    python benchmarks/layer_sweep.py [--n 20] [--starts 1 3 5 8 12] [--rome 3 5 8 12]
"""
from __future__ import annotations

import argparse
import time

from editing.data import load_benchmark
from editing.editors import MEMIT, ROME


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--starts", type=int, nargs="*", default=[1, 3, 5, 8, 12])
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--rome", type=int, nargs="*", default=[])
    ap.add_argument("--stats-samples", type=int, default=None)
    ap.add_argument("--lam", type=float, default=1000.0, help="MEMIT's lambda (SmolLM2: 1000, see configs/memit.yaml)")
    args = ap.parse_args()
    bench = load_benchmark(kind="counterfactual")
    requests = bench.requests[: args.n]
    rows = []
    runs = [("memit", list(range(s, s + args.window))) for s in args.starts]
    runs += [("rome", [l]) for l in args.rome]
    for method, layers in runs:
        cls = MEMIT if method == "memit" else ROME
        extra = {"mom2_update_weight": args.lam} if method == "memit" else {}
        editor = cls(layers=layers, stats_samples=args.stats_samples, **extra)
        t0 = time.perf_counter()
        if method == "memit":
            editor.edit(requests)
        else:
            for r in requests:
                editor.edit([r])
        seconds = time.perf_counter() - t0
        m = editor.evaluate(requests, style=bench.style)
        rows.append((method, layers, m, seconds))
        print(f"{method} {layers}: efficacy {m['rewrite_win']:.1f} paraphrase {m['paraphrase_win']:.1f} "
              f"neighbourhood {m['neighborhood_win']:.1f} score {m['score']:.1f} "
              f"rewrite_acc {m['rewrite_acc']:.1f} ({seconds:.0f} s)", flush=True)
    print("\n| method | layers | efficacy | paraphrase | neighbourhood | score | rewrite_acc | edit s |")
    print("|---|---|---|---|---|---|---|---|")
    for method, layers, m, seconds in rows:
        print(f"| {method} | {layers[0]}..{layers[-1]} | {m['rewrite_win']:.1f} | {m['paraphrase_win']:.1f} | "
              f"{m['neighborhood_win']:.1f} | {m['score']:.1f} | {m['rewrite_acc']:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
