"""Lifelong editing curves on SmolLM2-135M: many counterfactual edits applied one step after another
(no rollback), every method evaluated on all the edits made so far at fixed points.

Two protocols (one command per table):

    python benchmarks/lifelong.py --protocol batch        # 1,000 edits in batches of 100, a point every 100
    python benchmarks/lifelong.py --protocol sequential   # 200 edits one at a time, a point every 20

At every point and for every method: reliability / generality / locality (rewrite_acc, paraphrase_acc,
neighborhood_unchanged, as COMEBA-HK and AlphaEdit report them) over the edits so far, the same three
over the earliest `--retain` edits (retention), the probability wins, and the general-ability drift:
perplexity of the edited model on `--drift-texts` held-out texts of the offline corpus divided by the
unedited model's (`editing.corpus.held_out`: the corpus's last texts, never among the `--stats-samples`
the statistics use).

Methods are the shipped SmolLM2 configs (`configs/<method>.yaml`, model part) with the statistics from
`--stats-samples` texts and the target optimisation under `--autocast` (the same for every method).
AlphaEdit is MEMIT with the null-space projection (`MEMIT(projection="null_space")` is the same editor,
tests/test_alphaedit.py), so it is one row.

The run is resumable: after every point the method's edit file goes to `--state` and the point is
appended to `<out>.json`; a rerun of the same command loads each method's edit file and goes on from
its last point. The methods advance together, point by point, so a partial run compares them at the
same number of edits. An ETA is printed after every point.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import editor_from_config
from editing.corpus import held_out
from editing.data import load_benchmark
from editing.evaluation import perplexity
from editing.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"batch": dict(n=1000, batch=100, every=100), "sequential": dict(n=200, batch=1, every=20)}
DEFAULT_METHODS = {"batch": ["memit", "alphaedit", "emmet", "comeba_hk", "adaple", "pmet"],
                   "sequential": ["rome", "r_rome", "memit", "alphaedit", "emmet", "grace"]}
COLUMNS = ("reliability", "generality", "locality")


def make_editor(method: str, args):
    # teacher-forced scores and this script's own drift (200 texts) at every point, as the run began
    return editor_from_config(method, args.stats_samples, args.autocast, args.base_model, gen_eval=False,
                              drift=False)[0]


def headline(m: dict) -> dict:
    return {"reliability": m["rewrite_acc"], "generality": m["paraphrase_acc"],
            "locality": m["neighborhood_unchanged"],
            **{k: m[k] for k in ("rewrite_win", "paraphrase_win", "neighborhood_win", "score") if k in m}}


def evaluate(ed, requests, done: int, args, style: str, base_ppl: float) -> dict:
    point = {"edits": done, **headline(ed.evaluate(requests[:done], style=style))}
    if done > args.retain:
        point["retention"] = headline(ed.evaluate(requests[:args.retain], style=style))
    point["ppl_ratio"] = perplexity(ed, args.drift) / base_ppl
    return point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="batch")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--n", type=int, default=None, help="edits in all (protocol default)")
    ap.add_argument("--batch", type=int, default=None, help="requests per edit step (protocol default)")
    ap.add_argument("--every", type=int, default=None, help="edits between points (protocol default)")
    ap.add_argument("--retain", type=int, default=None, help="the earliest edits tracked for retention (= --every)")
    ap.add_argument("--stats-samples", type=int, default=2000)
    ap.add_argument("--autocast", default="bfloat16", help="target optimisation dtype ('none': float32)")
    ap.add_argument("--drift-texts", type=int, default=200)
    ap.add_argument("--base-model", default=None, help="another model (a smoke test: layer 1 for every method)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stop-after", type=float, default=None, help="stop (resumably) after this many minutes")
    ap.add_argument("--out", default=None, help="default benchmarks/results/lifelong_<protocol>")
    ap.add_argument("--report-only", action="store_true", help="rebuild <out>.md and .png from <out>.json, run nothing")
    ap.add_argument("--state", default=None, help="edit files, default runs/lifelong_<protocol>")
    args = ap.parse_args()
    for k, v in PROTOCOLS[args.protocol].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.retain = args.retain or args.every
    args.autocast = None if args.autocast == "none" else args.autocast
    methods = args.methods or DEFAULT_METHODS[args.protocol]
    if args.every % args.batch:
        raise SystemExit(f"--every {args.every} must be a multiple of --batch {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"lifelong_{args.protocol}")
    state = Path(args.state or ROOT / "runs" / f"lifelong_{args.protocol}")
    state.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("protocol", "n", "batch", "every", "retain", "stats_samples",
                                              "autocast", "drift_texts")}
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    if args.report_only:
        return write_outputs(report, out)
    if report and report["settings"] != settings:
        raise SystemExit(f"{out}.json was made with other settings {report['settings']}; pass another --out")
    report.setdefault("settings", settings)
    report.setdefault("curves", {})
    report.setdefault("edit_seconds", {})
    bench = load_benchmark(kind="counterfactual")
    requests = bench.requests[:args.n]
    args.drift = held_out(n=args.drift_texts)

    editors, done = {}, {}
    for m in methods:
        ed = make_editor(m, args)
        curve = report["curves"].setdefault(m, [])
        report["edit_seconds"].setdefault(m, 0.0)
        if curve and not (state / f"{m}.edit").exists():   # results from another machine, no edit state
            print(f"{m}: no edit state at {state / (m + '.edit')}; its {len(curve)} point(s) are redone from scratch")
            curve.clear()
            report["edit_seconds"][m] = 0.0
        if curve:
            ed.load_edit(state / f"{m}.edit")
        done[m] = curve[-1]["edits"] if curve else 0
        editors[m] = ed
    if "base_ppl" not in report:
        with editors[methods[0]].disabled():
            report["base_ppl"] = perplexity(editors[methods[0]], args.drift)
    t_start = time.perf_counter()
    while any(done[m] < len(requests) for m in methods):
        target = min(done.values()) + args.every
        for m in methods:
            ed = editors[m]
            if done[m] >= min(target, len(requests)):
                continue
            t = time.perf_counter()
            while done[m] < min(target, len(requests)):
                ed.edit(requests[done[m]:done[m] + args.batch])
                done[m] = min(done[m] + args.batch, len(requests))
            report["edit_seconds"][m] += time.perf_counter() - t
            point = evaluate(ed, requests, done[m], args, bench.style, report["base_ppl"])
            ed.save_edit(state / f"{m}.edit")
            report["curves"][m].append(point)
            write_json_atomic(report, out.with_suffix(".json"))
            per_edit = report["edit_seconds"][m] / done[m]
            left = sum(len(requests) - done[k] for k in methods) * per_edit
            print(f"{m:10s} {done[m]:5d} edits: " + " ".join(f"{k} {point[k]:.1f}" for k in COLUMNS)
                  + f" ppl x{point['ppl_ratio']:.3f} | {per_edit:.1f} s/edit, ETA {left / 3600:.1f} h", flush=True)
            if args.stop_after and time.perf_counter() - t_start > 60 * args.stop_after:
                write_outputs(report, out)
                print(f"stopped after {args.stop_after} min; the same command continues")
                return
    write_outputs(report, out)


def write_outputs(report: dict, out: Path) -> None:
    s = report["settings"]
    cmd = f"python benchmarks/lifelong.py --protocol {s['protocol']} --methods {' '.join(report['curves'])}"
    lines = [f"Lifelong editing, SmolLM2-135M, shipped counterfactual set: {s['n']} edits in steps of {s['batch']}, "
             f"a point every {s['every']} (statistics from {s['stats_samples']} texts, target optimisation "
             f"{s['autocast'] or 'float32'}). Reliability / generality / locality over all edits so far; "
             f"retention: the same over the earliest {s['retain']}; ppl x: perplexity on {s['drift_texts']} "
             f"held-out texts over the unedited model's ({report['base_ppl']:.2f}).", "",
             f"Made (and continued, it resumes) by `{cmd}`.", ""]
    methods = list(report["curves"])
    points = sorted({p["edits"] for c in report["curves"].values() for p in c})
    lines += ["| edits | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for e in points:
        cells = []
        for m in methods:
            p = next((p for p in report["curves"][m] if p["edits"] == e), None)
            cells.append("" if p is None else " / ".join(f"{p[k]:.0f}" for k in COLUMNS) + f"; ppl x{p['ppl_ratio']:.2f}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    if any("retention" in p for c in report["curves"].values() for p in c):
        lines += ["", f"Retention of the earliest {s['retain']} edits (reliability / generality / locality):", "",
                  "| edits | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for e in points:
            cells = []
            for m in methods:
                p = next((p for p in report["curves"][m] if p["edits"] == e and "retention" in p), None)
                cells.append("" if p is None else " / ".join(f"{p['retention'][k]:.0f}" for k in COLUMNS))
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "Edit seconds per edit: " + ", ".join(
        f"{m} {report['edit_seconds'][m] / max(1, report['curves'][m][-1]['edits'] if report['curves'][m] else 1):.1f}"
        for m in methods)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
        keys = [("reliability", None), ("generality", None), ("locality", None), ("reliability", "retention"),
                ("ppl_ratio", None)]
        for ax, (key, sub) in zip(axes, keys):
            for m, curve in report["curves"].items():
                pts = [p for p in curve if sub is None or sub in p]
                ax.plot([p["edits"] for p in pts], [(p[sub] if sub else p)[key] for p in pts], marker="o", label=m)
            ax.set_title(f"{key} ({sub} of the earliest {s['retain']})" if sub else key)
            ax.set_xlabel("edits")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as e:  # the table is the result; the plot is a convenience
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
