"""Score against the number of corpus texts behind the key statistics E[kkᵀ], for the closed-form
editors' shipped configs: which `stats_samples` is enough on SmolLM2.

For each method the target vectors are computed once (they do not depend on the statistics) and
every statistics size edits the same requests in one step from the unedited model, then the edited
model is scored teacher-forced (reliability, generality, locality and their harmonic mean, the
Score; `--model.gen_eval false --model.drift false`). Statistics are computed once per size and
layer and cached on disk as in every run (a rerun reads them); the table gives the seconds each size
took to compute.

    python benchmarks/stats_sweep.py [--methods memit adaple] [--n 50] [--sizes 250 500 1000 2000 5000 all]
        [--threads 2] [--autocast bfloat16] [--out benchmarks/results/stats_sweep]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _common import editor_from_config, report
from editing.data import EvalCase, load_benchmark
from editing.evaluation import evaluate

HEADS = ("reliability", "generality", "locality")   # the headlines (docs/evaluation.md)


def share_targets(editor, method: str, store: dict) -> None:
    """The first editor of a method computes its targets and keeps them in `store`; later ones reuse
    them (the same requests on the same unedited model)."""
    if method in store:
        editor.targets = lambda *args, **kwargs: store[method]
        return
    compute = editor.targets

    def remember(*args, **kwargs):
        store[method] = compute(*args, **kwargs)
        return store[method]
    editor.targets = remember


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["memit", "adaple"])
    ap.add_argument("--n", type=int, default=50, help="edits (the first shipped counterfactual requests), one step")
    ap.add_argument("--sizes", nargs="+", default=["250", "500", "1000", "2000", "5000", "all"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--autocast", default="bfloat16", help="target optimisation precision ('none': float32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = None if args.autocast == "none" else args.autocast
    requests = load_benchmark(kind="counterfactual").requests[: args.n]
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests)]
    rows, store = [], {}
    for method in args.methods:
        for size in args.sizes:
            samples = None if size == "all" else int(size)
            ed, _ = editor_from_config(method, samples, autocast, gen_eval=False, drift=False)
            t0 = time.perf_counter()
            for layer in ed.layers:
                ed.covariance(layer)
            stats_s = time.perf_counter() - t0
            share_targets(ed, method, store)
            t0 = time.perf_counter()
            ed.edit(requests)
            edit_s = time.perf_counter() - t0
            values = evaluate(ed, cases)
            row = dict(method=method, size=size, stats_s=stats_s, edit_s=edit_s,
                       **{k: values[k] for k in HEADS}, score=values["score"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ed
    by = {(r["method"], r["size"]): r for r in rows}
    lines = [f"Score against statistics texts, smollm2-135m, {args.n} counterfactual edits in one step "
             f"(teacher-forced probability wins, %), {torch.get_num_threads()} thread(s)", "",
             "| method | texts | stats s | reliability | generality | locality | Score | Score − all |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = by.get((r["method"], "all"))
        diff = "" if ref is None else f"{r['score'] - ref['score']:+.1f}"
        lines.append(f"| {r['method']} | {r['size']} | {r['stats_s']:.0f} | {r['reliability']:.1f} | "
                     f"{r['generality']:.1f} | {r['locality']:.1f} | {r['score']:.1f} | {diff} |")
    report(lines, args.out, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
