"""Trained editors (MEND, MALMEN, SERAC) beside MEMIT, FT-M and the unedited model on SmolLM2-135M, on the
held-out relations of a shipped benchmark (relations no trained editor saw; `editing.data.meta`).

    python benchmarks/trained_editors.py --protocol batch --trained mend=<edit file> malmen=<f> serac=<f>
    python benchmarks/trained_editors.py --protocol sequential --trained ...

`batch`: the --n requests in one edit step; `sequential`: one request per step, no rollback. A step
that fails its checks (docs/reliability.md) is rolled back and counted as refused; its case is then
evaluated unedited. Teacher-forced headline metrics of the evaluation (reliability, generality,
locality, score; generation and drift off for speed), 95 % BCa intervals over cases, edit seconds per
edit. Writes <out>.json after every method (a rerun skips the methods it holds) and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _common import editor_from_config
from editing.data import meta
from editing.data.records import EvalCase
from editing.data.readers import load_benchmark
from editing.editors.base import EditError
from editing.evaluation import Evaluation, intervals

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("reliability", "generality", "locality", "score")


def run(method: str, requests, args, trained: dict[str, str]) -> dict:
    ed, _ = editor_from_config(method, args.stats_samples, args.autocast, args.base_model, gen_eval=False, drift=False)
    if method in trained:
        ed.load_edit(trained[method])
    step = len(requests) if args.protocol == "batch" else 1
    refused, t = [], time.perf_counter()
    if method != "noedit":
        for s in range(0, len(requests), step):
            try:
                ed.edit(requests[s:s + step])
            except EditError as e:
                refused.append(str(e.__cause__))
    edit_s = time.perf_counter() - t
    ev = Evaluation(ed, "counterfact" if args.kind == "counterfactual" else "zsre")
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests)]
    for s in range(0, len(cases), 8):
        ev.update(cases[s:s + 8])
    values = ev.compute()
    return {"method": method, "edits": len(requests), "edit_s_per_edit": edit_s / len(requests),
            "refused_steps": len(refused), "refusals": refused[:5], "metrics": values,
            "intervals": intervals(ev.cases, ev.metrics.headline_sources)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=["batch", "sequential"], default="batch")
    ap.add_argument("--kind", choices=["counterfactual", "factual"], default="counterfactual")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--methods", nargs="*", default=["noedit", "memit", "ft", "mend", "malmen", "serac"])
    ap.add_argument("--trained", nargs="*", default=[], help="method=edit file of a trained editor")
    ap.add_argument("--stats-samples", type=int, default=2000)
    ap.add_argument("--autocast", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--base-model", default=None, help="another model (a smoke test)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/trained_<kind>_<protocol>")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.autocast = None if args.autocast == "none" else args.autocast
    trained = dict(t.split("=", 1) for t in args.trained)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"trained_{args.kind}_{args.protocol}")
    requests = meta.select(load_benchmark(kind=args.kind).requests, "test")[: args.n]
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    report.setdefault("args", {k: v for k, v in vars(args).items() if k not in ("out", "trained")})
    report.setdefault("trained", {})
    report.setdefault("runs", {})
    for method in args.methods:
        if method in report["runs"]:
            continue
        if method in ("mend", "malmen", "serac") and method not in trained:
            print(f"{method}: skipped (no --trained {method}=<edit file>)")
            continue
        torch.manual_seed(0)
        report["runs"][method] = run(method, requests, args, trained)
        report["trained"].update({k: v for k, v in trained.items() if k == method})
        m = report["runs"][method]
        print(method, " ".join(f"{h} {m['metrics'].get(h, float('nan')):.1f}" for h in HEADS),
              f"refused {m['refused_steps']}, {m['edit_s_per_edit']:.2f} s/edit", flush=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_table(report, out)
    if report["trained"]:
        plot_training(report["trained"], out.parent / "trained_training.png")


def plot_training(trained: dict[str, str], path: Path) -> None:
    """Validation curves (val/edit_success, val/locality against the optimiser step) of each trained
    editor, read from the metrics.csv of the run that wrote its edit file."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, edit_file in sorted(trained.items()):
        metrics = Path(edit_file).resolve().parent.parent / "metrics.csv"
        if not metrics.is_file():
            continue
        rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/edit_success")]
        for ax, key in zip(axes, ("val/edit_success", "val/locality")):
            ax.plot([int(r["step"]) for r in rows], [100 * float(r[key]) for r in rows], marker="o", label=method)
    for ax, title in zip(axes, ("validation edit success (%)", "validation locality (%)")):
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"curves: {path}")


def write_table(report: dict, out: Path) -> None:
    a = report["args"]
    how = "in one step" if a["protocol"] == "batch" else "sequentially (one per step, no rollback)"
    lines = [f"SmolLM2-135M, shipped {a['kind']} set, held-out relations (never seen in training): {a['n']} edits "
             f"{how}. Teacher-forced headline metrics (%), [95 % BCa intervals over cases]; refused = steps rolled "
             "back by the step checks (their cases evaluated unedited); s/edit = edit time per edit.", "",
             f"`python benchmarks/trained_editors.py --protocol {a['protocol']} --kind {a['kind']} --n {a['n']} "
             "--trained mend=... malmen=... serac=...`", "",
             "| method | " + " | ".join(HEADS) + " | refused | s/edit |", "|---" * (len(HEADS) + 3) + "|"]
    for method, run in report["runs"].items():
        cells = []
        for h in HEADS:
            v, ci = run["metrics"].get(h), run["intervals"].get(h)
            cells.append("–" if v is None else f"{v:.1f}" + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {run['refused_steps']} | {run['edit_s_per_edit']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
