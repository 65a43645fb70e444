"""Knowledge attenuation in sequential editing (AdaPLE paper, §3 and Fig. 2/5/6/7) on SmolLM2-135M.

Sequential editing: the first N counterfactual edits of the shipped ParaRel set in batches of B,
applied one after another without rollback; after every k steps all edits so far are evaluated
(efficacy, generalization, specificity = probability wins; "retention"). Methods: AdaPLE, PMET, MEMIT,
ROME, each with and without drop-and-rescale (DR) fusion; optionally the drop-rate sweep and the
pairwise cosine similarity of successive edits' Δ before and after DR (the paper's Fig. 3).

    python benchmarks/adaple_attenuation.py [--n 200] [--batch 10] [--every 1]
        [--methods adaple pmet memit rome] [--sweep 0 0.5 0.7 0.8 0.9] [--cosine 10]
        [--autocast bfloat16] [--out benchmarks/results/adaple]

Writes <out>.json (all curves), <out>.md (final table) and <out>.png (retention curves).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from _common import sequence_parser
from editing.data import load_benchmark
from editing.editors import MEMIT, PMET, ROME, AdaPLE

LAYERS = [3, 4, 5, 6, 7]     # configs/memit.yaml, configs/pmet.yaml, configs/adaple.yaml
ROME_LAYER = [5]             # configs/rome.yaml


def make(method: str, fusion: str, p: float, args) -> torch.nn.Module:
    common = dict(stats_samples=args.stats_samples, v_autocast=args.autocast, fusion=fusion, drop_rate=p)
    if method == "rome":
        return ROME(layers=ROME_LAYER, **common)
    cls = {"adaple": AdaPLE, "pmet": PMET, "memit": MEMIT}[method]
    extra = dict(v_steps=30, v_lr=0.2, kl_factor=1.0) if method in ("adaple", "pmet") else {}
    return cls(layers=LAYERS, mom2_update_weight=1000.0, **common, **extra)


def run(method: str, fusion: str, p: float, requests, style: str, args) -> dict:
    editor = make(method, fusion, p, args)
    curve, seconds = [], 0.0
    steps = [requests[i:i + args.batch] for i in range(0, len(requests), args.batch)]
    for s, batch in enumerate(steps, 1):
        t0 = time.perf_counter()
        editor.edit(batch)   # ROME: sequential rank-one updates inside the step
        seconds += time.perf_counter() - t0
        if s % args.every == 0 or s == len(steps):
            so_far = requests[: s * args.batch]
            m = editor.evaluate(so_far, style=style)
            point = {"edits": len(so_far), "efficacy": m["rewrite_win"], "generalization": m["paraphrase_win"],
                     "specificity": m["neighborhood_win"], "score": m["score"]}
            curve.append(point)
            print(f"  {method}/{fusion}{'' if fusion == 'add' else f' p={p}'} after {len(so_far)} edits: "
                  f"eff {point['efficacy']:.1f} gen {point['generalization']:.1f} "
                  f"spec {point['specificity']:.1f} ({seconds:.0f} s editing)", flush=True)
    return {"method": method, "fusion": fusion, "p": p, "curve": curve, "edit_seconds": seconds}


def cosine_study(requests, args) -> dict:
    """MEMIT, one edit per step, the flattened Δ of each step (all layers), before and after DR."""
    from editing.editors.locate import EditHistory

    editor = make("memit", "dr", 0.8, args)
    for r in requests[: args.cosine]:
        editor.edit([r])
    plain, dropped = [], []
    for step in editor.history.steps:
        a, b = [], []
        for layer, entry in sorted(step.items()):
            shape = (entry[0].shape[0], entry[1].shape[0])
            a.append(EditHistory.dense(entry[:2], shape, "cpu").flatten())
            b.append(EditHistory.dense(entry, shape, "cpu").flatten())
        plain.append(torch.cat(a))
        dropped.append(torch.cat(b))

    def pairwise(vs):
        V = torch.nn.functional.normalize(torch.stack(vs), dim=1)
        S = V @ V.T
        off = S[~torch.eye(len(vs), dtype=torch.bool)]
        return {"mean": float(off.mean()), "max": float(off.max()), "matrix": S.tolist()}
    return {"before_dr": pairwise(plain), "after_dr": pairwise(dropped)}


def main() -> None:
    ap = sequence_parser(n=200, batch=10)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=["adaple", "pmet", "memit", "rome"])
    ap.add_argument("--no-dr-variants", action="store_true", help="only each method's default fusion")
    ap.add_argument("--sweep", type=float, nargs="*", default=[], help="AdaPLE drop rates to sweep")
    ap.add_argument("--cosine", type=int, default=0, help="edits for the cosine-similarity study (0: skip)")
    ap.add_argument("--p", type=float, default=0.8)
    ap.add_argument("--stats-samples", type=int, default=None)
    ap.add_argument("--autocast", default=None, help="e.g. bfloat16 for the target optimisation")
    ap.add_argument("--out", default="benchmarks/results/adaple")
    args = ap.parse_args()
    bench = load_benchmark(kind="counterfactual")
    requests = bench.requests[: args.n]
    runs = []
    result = {"n": args.n, "batch": args.batch, "every": args.every, "autocast": args.autocast, "runs": runs}
    for method in args.methods:
        variants = [("dr", args.p), ("add", 0.0)]
        if args.no_dr_variants:
            variants = [("dr", args.p)] if method == "adaple" else [("add", 0.0)]
        for fusion, p in variants:
            runs.append(run(method, fusion, p, requests, bench.style, args))
            save(result, args, final=False)  # an interrupted run keeps what it finished
    for p in args.sweep:
        r = run("adaple", "dr" if p > 0 else "add", p, requests, bench.style, args)
        r["sweep"] = True
        runs.append(r)
        save(result, args, final=False)
    if args.cosine:
        result["cosine"] = cosine_study(requests, args)
        print(f"cosine of successive MEMIT edits' Δ: before DR mean {result['cosine']['before_dr']['mean']:.3f}, "
              f"after DR mean {result['cosine']['after_dr']['mean']:.3f}")
    save(result, args, final=True)


def save(result: dict, args, final: bool) -> None:
    """<out>.json (all curves), <out>.md (the final point of every run), <out>.png (the curves)."""
    runs = result["runs"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Sequential editing, {args.n} counterfactual edits in batches of {args.batch} (SmolLM2-135M); "
             "metrics over all edits so far after the last step.", "",
             f"`python benchmarks/adaple_attenuation.py {' '.join(sys.argv[1:])}`", "",
             "| method | fusion | p | efficacy | generalization | specificity | score | edit s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["curve"][-1]
        lines.append(f"| {r['method']}{' (sweep)' if r.get('sweep') else ''} | {r['fusion']} | {r['p']} | "
                     f"{f['efficacy']:.1f} | {f['generalization']:.1f} | {f['specificity']:.1f} | "
                     f"{f['score']:.1f} | {r['edit_seconds']:.0f} |")
    if "cosine" in result:
        c = result["cosine"]
        lines += ["", f"Pairwise cosine of {args.cosine} successive MEMIT edits' Δ (batch 1): mean "
                  f"{c['before_dr']['mean']:.3f} before DR, {c['after_dr']['mean']:.3f} after DR (p = 0.8)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not final:
        return
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharex=True)
    for r in runs:
        xs = [p["edits"] for p in r["curve"]]
        label = f"{r['method']} {r['fusion']}{'' if r['fusion'] == 'add' else ' p=' + str(r['p'])}"
        style = "-" if r["fusion"] != "add" else "--"
        for ax, key in zip(axes, ("efficacy", "generalization", "specificity")):
            ax.plot(xs, [p[key] for p in r["curve"]], style, marker="o", label=label)
            ax.set_title(key)
            ax.set_xlabel("edits so far")
    axes[0].set_ylabel("% (all edits so far)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}.json/.md/.png")


if __name__ == "__main__":
    main()
