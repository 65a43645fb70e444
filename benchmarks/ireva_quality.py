"""iReVa quality on SmolLM2 (issue 4): ES / PS / NS, Score (harmonic and arithmetic), unchanged-prediction
locality, withdrawal RS / Con and wall time, for iReVa and iReVa+L beside NoEdit and FT, on the shipped
ParaRel benchmarks (factual = iReVa's PARAREL setting, counterfactual = COUNTERFACT-style).

    python benchmarks/ireva_quality.py --n 100 --kinds factual counterfactual \
        --methods noedit ft ireva ireva_l --out benchmarks/results/ireva_quality

`--sweep` instead evaluates iReVa (no retrofitting) over a grid of layer / α / θ on a held-out slice
(`--offset`) of the factual set, the sweep recorded in configs/ireva.yaml:

    python benchmarks/ireva_quality.py --sweep --n 30 --offset 1000 --layers 21 25 28 --alphas 0.05 0.2 1 \
        --thetas 0.65 0.75

`--compare-parallel` edits the same requests with the exact sequential retrofitting order and with
the parallel option (all requests in one step) and reports both rows. `ireva_l_cal` (or
`ireva_l_cal@<margin>`) is iReVa+L with calibrated margins (docs/ireva.md):

    python benchmarks/ireva_quality.py --n 20 --kinds factual --methods ireva_l ireva_l_cal ireva_l_cal@0.05 \
        --out benchmarks/results/ireva_calibrated

Edits are applied one request per step (sequential editing, as in the paper). The CPU is shared, so
torch runs on `--threads` threads (1 is much faster than 2 on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import yaml

from editing.data import EvalCase, load_benchmark, meta
from editing.data.batch import EditBatch
from editing.editors import FT, IReVa, NoEdit
from editing.editors.ireva import ireva_scores
from editing.evaluation import Evaluation, intervals
from editing.metrics import harmonic_mean

INTERVALS = {"ES": "rewrite_acc", "PS": "paraphrase_acc", "NS": "locality_acc",
             "locality_unchanged": "locality_unchanged"}  # 95 % BCa intervals over cases in the table
SMOLLM2 = dict(layers=[27], alpha=1.0, theta=0.85)  # configs/ireva.yaml; overridden by the command line


def build(method: str, args) -> object:
    """`method`, optionally followed by `:key=value,...` IReVa overrides (e.g.
    `ireva_l:calibration=template,calibration_margin=0.02`, `ireva_l:theta=0.95`)."""
    method, _, over = method.partition(":")
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in over.split(",") if kv)}
    common = dict(layers=[args.layer], alpha=args.alpha, theta=args.theta)
    common.update({k: extra.pop(k) for k in ("theta", "alpha") if k in extra})
    if "layer" in extra:
        common["layers"] = [extra.pop("layer")]
    common.update(extra)
    if method == "noedit":
        return NoEdit()
    if method == "ft":
        return FT(layers=[21], lr=5e-4, steps=args.ft_steps)
    if method == "ireva":
        return IReVa(retrofit=False, **common)
    if method == "ireva_l":
        return IReVa(retrofit=True, lr=args.lr, steps=args.steps, **common)
    if method.startswith("ireva_l_cal"):   # ireva_l_cal or ireva_l_cal@<margin>: calibrated margins
        margin = float(method.partition("@")[2] or 0.0)
        return IReVa(retrofit=True, lr=args.lr, steps=args.steps, calibration="corpus",
                     calibration_margin=margin, **common)
    if method == "ireva_l_par":
        return IReVa(retrofit=True, lr=args.lr, steps=args.steps, parallel=True, **common)
    raise ValueError(method)


def run_one(method: str, kind: str, args) -> dict:
    bench = load_benchmark(kind=kind)
    requests = bench.requests if args.split == "all" else meta.select(bench.requests, args.split)
    requests = requests[args.offset:args.offset + args.n]
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests)]
    editor = build(method, args)
    start = time.perf_counter()
    step = len(requests) if method == "ireva_l_par" else 1
    for s in range(0, len(requests), step):  # --pool: the CLI's out-of-scope pool (the edited requests)
        editor.edit(EditBatch(requests[s:s + step], bench.style, requests if args.pool else []))
    edit_s = time.perf_counter() - start
    start = time.perf_counter()
    ev = Evaluation(editor, bench.style)
    for s in range(0, len(cases), 8):
        ev.update(cases[s:s + 8])
    values = ev.compute()
    values.update(editor.derived_scores(values) if isinstance(editor, IReVa) else ireva_scores(values))
    eval_s = time.perf_counter() - start
    row = {"method": method, "kind": kind, "n": len(requests), "edit_s": edit_s, "eval_s": eval_s, **values,
           "intervals": intervals(ev.cases, INTERVALS)}
    if isinstance(editor, IReVa):
        row["neurons"] = editor.num_neurons
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


COLUMNS = ["method", "kind", "n", "ES", "PS", "NS", "score_harmonic", "score_mean", "NS_capped",
           "score_harmonic_capped", "locality_unchanged",
           "neighborhood_unchanged", "rewrite_win", "paraphrase_win", "neighborhood_win", "retrieve_success",
           "consistency", "neurons", "edit_s", "eval_s"]


def cap_ns(rows: list[dict]) -> list[dict]:
    """iReVa-v2 caps NS at the unedited model's NS (docs/specification.md §7: report raw and capped). Adds
    `NS_capped` and the harmonic Score with it to every row whose kind has a NoEdit row."""
    base = {r["kind"]: r["NS"] for r in rows if r["method"] == "noedit" and "NS" in r}
    for r in rows:
        if r["kind"] in base and "NS" in r:
            r["NS_capped"] = min(r["NS"], base[r["kind"]])
            r["score_harmonic_capped"] = harmonic_mean([r["ES"], r["PS"], r["NS_capped"]])
    return rows


def table(rows: list[dict]) -> str:
    rows = cap_ns(rows)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v, ci = r.get(c, ""), r.get("intervals", {}).get(c) if c in INTERVALS else None
            if c in ("alpha", "theta"):  # hyperparameters: as given (0.65 must not print as 0.7)
                cells.append(f"{v:g}")
            else:
                cells.append((f"{v:.1f}" if isinstance(v, float) else str(v)) + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="edits per benchmark kind (the issue asks for 100)")
    p.add_argument("--offset", type=int, default=0, help="first record of the slice")
    p.add_argument("--kinds", nargs="+", default=["factual", "counterfactual"])
    p.add_argument("--split", choices=["all", "test"], default="all",
                   help="test: only the held-out relations of editing.data.meta")
    p.add_argument("--pool", action="store_true", help="edit steps carry the edited requests as their pool (as the CLI)")
    p.add_argument("--methods", nargs="+", default=["noedit", "ft", "ireva", "ireva_l"])
    p.add_argument("--layer", type=int, default=SMOLLM2["layers"][0])
    p.add_argument("--alpha", type=float, default=SMOLLM2["alpha"])
    p.add_argument("--theta", type=float, default=SMOLLM2["theta"])
    p.add_argument("--lr", type=float, default=5e-2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ft-steps", type=int, default=25)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--layers", type=int, nargs="+", default=[21, 25, 28])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    p.add_argument("--thetas", type=float, nargs="+", default=[0.65, 0.75])
    p.add_argument("--compare-parallel", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--from-json", default=None, help="rebuild the table of an earlier run's JSON, run nothing")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        if any("layer" in r for r in saved["rows"]):  # a --sweep run
            COLUMNS[1:1] = ["layer", "alpha", "theta"]
        print(table(saved["rows"]))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    if args.sweep:
        for layer in args.layers:
            for alpha in args.alphas:
                for theta in args.thetas:
                    args.layer, args.alpha, args.theta = layer, alpha, theta
                    row = run_one("ireva", "factual", args)
                    row.update(layer=layer, alpha=alpha, theta=theta)
                    rows.append(row)
        COLUMNS[1:1] = ["layer", "alpha", "theta"]
    elif args.compare_parallel:
        for kind in args.kinds:
            seq = run_one("ireva_l", kind, args)
            par = run_one("ireva_l_par", kind, args)
            rows += [seq, par]
    else:
        for kind in args.kinds:
            for method in args.methods:
                rows.append(run_one(method, kind, args))
                save(rows, args)  # partial results survive an interrupted run
    save(rows, args)
    print(table(rows))


def save(rows: list[dict], args) -> None:
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(f"`{' '.join(sys.argv)}`\n\n{table(rows)}\n")


if __name__ == "__main__":
    main()
