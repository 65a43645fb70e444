"""MEMIT with many edits in one step: time and peak memory for each number of edits, and the share of
the time spent in target vectors, keys, the closed-form solves (with the weight writes), statistics
and evaluation (other: the step checks, tokenisation, the weight rebuilds outside the solves). Each size runs in its own process (so that its peak resident memory is its own),
from configs/memit.yaml with bf16 target optimisation and `--stats-samples` corpus texts.

    python benchmarks/scale.py [--sizes 10 100 1000] [--stats-samples 1000] [--threads 2]
        [--out benchmarks/results/scale]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from _common import report

PARTS = ("statistics", "targets", "keys", "solve", "evaluation")


def timed(obj, name: str, totals: dict, part: str) -> None:
    """Replace obj.name by a wrapper adding its wall time to totals[part]."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[part] += time.perf_counter() - t0
    setattr(obj, name, wrapper)


def consistent(requests: list, n: int) -> list:
    """The first n requests that no earlier chosen one contradicts (same prompt and subject, another
    target): the shipped set has three such pairs in its first 1,000, and a step refuses them."""
    chosen, by_fact = [], {}
    for r in requests:
        target = by_fact.setdefault((r.prompt, r.subject), r.target_new.strip())
        if target == r.target_new.strip():
            chosen.append(r)
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"the shipped counterfactual set has fewer than {n} requests that agree with each other")


def one(n: int, stats_samples: int | None, threads: int) -> dict:
    from _common import editor_from_config
    from editing.data import EvalCase, load_benchmark
    from editing.editors.locate import spread
    from editing.evaluation import evaluate

    if threads:
        torch.set_num_threads(threads)
    requests = consistent(load_benchmark(kind="counterfactual").requests, n)
    ed, _ = editor_from_config("memit", stats_samples, "bfloat16", gen_eval=False, drift=False)
    totals = dict.fromkeys(PARTS, 0.0)
    timed(ed, "covariance", totals, "statistics")
    timed(ed, "targets", totals, "targets")
    timed(ed, "keys", totals, "keys")
    timed(spread, "closed_form", totals, "solve")
    timed(ed, "write_layer", totals, "solve")
    t0 = time.perf_counter()
    for layer in ed.layers:   # statistics first (cached on disk after the first size)
        ed.covariance(layer)
    ed.edit(requests)
    edit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = evaluate(ed, [EvalCase.from_request(r, i) for i, r in enumerate(requests)])
    totals["evaluation"] = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux
    return dict(n=n, edit_s=edit_s, total_s=edit_s + totals["evaluation"], peak_gb=peak_gb, seconds=totals,
                reliability=values["reliability"], generality=values["generality"], locality=values["locality"],
                score=values["score"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--stats-samples", default="1000", help="corpus texts for E[kkᵀ] ('all': every text)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    samples = None if args.stats_samples == "all" else int(args.stats_samples)
    if args.one is not None:
        print(json.dumps(one(args.one, samples, args.threads)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--stats-samples", args.stats_samples,
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"MEMIT (configs/memit.yaml, bf16 targets, statistics from {args.stats_samples} texts) with n "
             f"counterfactual edits in one step, smollm2-135m, {args.threads or torch.get_num_threads()} thread(s)", "",
             "| n | edit s | s/edit | evaluation s | peak GB | " + " | ".join(f"{p} %" for p in PARTS) +
             " | other % | reliability | generality | locality | Score |",
             "|---:|---:|---:|---:|---:|" + "---:|" * len(PARTS) + "---:|---:|---:|---:|---:|"]
    for r in rows:
        total = r["total_s"]
        lines.append(f"| {r['n']} | {r['edit_s']:.0f} | {r['edit_s'] / r['n']:.2f} | {r['seconds']['evaluation']:.0f} | "
                     f"{r['peak_gb']:.2f} | " + " | ".join(f"{100 * r['seconds'][p] / total:.0f}" for p in PARTS) +
                     f" | {100 * (1 - sum(r['seconds'].values()) / total):.0f}"
                     f" | {r['reliability']:.1f} | {r['generality']:.1f} | {r['locality']:.1f} | {r['score']:.1f} |")
    report(lines, args.out, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
