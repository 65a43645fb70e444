"""Inference overhead of an edit that lives in modules rather than weights, at --n edits: the same
editor with its edits acting vs `disabled()` (the unedited model), interleaved in one process
(forward of 64 evaluation prompts, cached generation of 8 x 10 tokens; `comeba_consecutive.overhead`).

    python benchmarks/adaptor_overhead.py [--methods grace] [--n 100] [--batch 10] [--set grace.n_iter=1]

The editors come from the shipped configs; `--set method.key=value` overrides one setting, e.g.
GRACE's value steps: the overhead depends on the codebook's size, not on its trained values, so a
100-entry codebook can be built cheaply with one step per edit (say so when you report it). The same
holds for LoRA's `steps` (the unmerged adaptor's shape) and MELO's `num_iter` (the router's database
and the blocks exist whatever their training): `--set lora.steps=1 melo.num_iter=1`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from _common import editor_from_config
from comeba_consecutive import overhead
from editing.data import load_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="*", default=["grace"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], help="method.key=value overrides of the configs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/adaptor_overhead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = load_benchmark(kind="counterfactual").requests[: args.n]
    report = {"args": vars(args), "overhead": {}}
    for method in args.methods:
        over = {k.split(".", 1)[1]: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)
                if k.startswith(method + ".")}
        ed, _ = editor_from_config(method, **over)
        for s in range(0, len(requests), args.batch):
            ed.edit(requests[s:s + args.batch])
        report["overhead"][method] = {"overrides": over, **overhead(ed, requests, args.reps)}
        print(method, json.dumps(report["overhead"][method]), flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
