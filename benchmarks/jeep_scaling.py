"""JEEP's scaling curve (the paper's Fig. 3/4) and its ablation table (Table 4) on SmolLM2-135M.

Scaling: edit counts m_i = round(exp(ln(N)·i/16)) for i = 0..16 (deduplicated; `--every k` keeps
every k-th i, i = 16 always), and for each m one batch edit of the first m counterfactual requests of
the shipped ParaRel set, applied to the unedited model (each editor undoes its previous batch, which
restores the weights exactly). Methods: JEEP (configs/jeep.yaml), MEMIT (configs/memit.yaml), PMET
(configs/pmet.yaml). Metrics over the m edited requests: efficacy / generalization / locality =
rewrite / paraphrase / neighbourhood probability wins (the COUNTERFACT metrics JEEP reports) and
Score = their harmonic mean (`editing.metrics`); 95 % confidence intervals by a percentile bootstrap
over edits (the requests are resampled, each with all of its prompts; Score recomputed per resample).

Ablation (`--ablation M`): JEEP and the paper's Table 4 rows at m = M (the options of
`editing.editors.JEEP`): only low (w/o δ* & Step 3), only high (w/o δ′ & Step 2), joint δ with only
one region updated (w/o Step 2 / w/o Step 3), separate optimisation, even spread in Step 2, the
code-compatible mode, and the core's early stop (loss < 0.05, as MEMIT/PMET) instead of the code's
mean target probability >= 0.9; MEMIT and PMET at the same m for reference.

`--variants M` runs JEEP with other low/high layer sets at m = M (the small sweep behind
configs/jeep.yaml), e.g. `--variants 15 --highs 22,23 23,24 25,26 --lows 3,4,5,6,7`.

`--sweep M --settings S ...` runs JEEP at m = M once per setting S, a comma-separated list of JEEP
options (`high_clamp_norm_factor=0.1,high_mom2_update_weight=10000`, `high_layers=[24]`; "" = the
defaults), and MEMIT on the same edits, with each setting's difference to MEMIT (paired bootstrap):
the γ*/λ*/high-layer sweep of docs/jeep.md.

    python benchmarks/jeep_scaling.py [--max-n 200] [--every 1] [--methods jeep memit pmet]
        [--ablation 0] [--variants 0 --lows ... --highs ...] [--sweep 0 --settings ...] [--threads 1]
        [--autocast bfloat16]
        [--stats-samples 1000] [--out benchmarks/results/jeep_scaling] [--from-json]

Writes <out>.json (every point with per-edit values), <out>.md (tables; for the scaling curve also
JEEP minus MEMIT / PMET on the same edits with paired bootstrap intervals) and <out>.png (the
curves); `--from-json` rewrites the .md and .png from an existing <out>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
import yaml

from editing.data import load_benchmark
from editing.data.records import EvalCase
from editing.editors import JEEP, MEMIT, PMET
from editing.metrics import EditMetrics, harmonic_mean

LOW = [3, 4, 5, 6, 7]        # configs/jeep.yaml (= configs/memit.yaml, configs/pmet.yaml layers)
HIGH = [23, 24]              # configs/jeep.yaml (from the probe and the --variants sweep)
LAMBDA = 1000.0              # SmolLM2's λ (configs/memit.yaml); JEEP uses it for λ′ and λ*
KEYS = ("efficacy", "generalization", "locality")
SOURCE = {"efficacy": "rewrite", "generalization": "paraphrase", "locality": "neighborhood"}

ABLATIONS = {  # name -> JEEP options (Table 4 of the paper)
    "JEEP": {},
    "w/o δ* & Step 3 (only low)": dict(optimise="low", update_regions="low"),
    "w/o δ′ & Step 2 (only high)": dict(optimise="high", update_regions="high"),
    "w/o Step 2 (joint δ, high update only)": dict(update_regions="high"),
    "w/o Step 3 (joint δ, low update only)": dict(update_regions="low"),
    "separate optimisation": dict(optimise="separate"),
    "even spread in Step 2": dict(low_spread="even"),
    "code-compatible mode": dict(mode="code"),
    "early stop at loss < 0.05 (MEMIT's rule)": dict(v_min_prob=None),  # not in Table 4
}


def sizes(n: int, every: int = 1) -> list[int]:
    """round(exp(ln n · i/16)) for i = 0..16 (every `every`-th i, always i = 16), deduplicated."""
    idx = [i for i in range(17) if i % every == 0]
    if 16 not in idx:
        idx.append(16)
    out = []
    for i in idx:
        m = max(1, round(math.exp(math.log(n) * i / 16)))
        if m not in out:
            out.append(m)
    return out


def make(method: str, args, low=None, high=None, **options):
    common = dict(stats_samples=args.stats_samples, v_autocast=args.autocast, mom2_update_weight=LAMBDA)
    if method == "jeep":
        return JEEP(**{"layers": low or LOW, "high_layers": high or HIGH, "high_mom2_update_weight": LAMBDA,
                       **common, **options})
    if method == "memit":
        return MEMIT(layers=LOW, **common)
    if method == "pmet":  # configs/pmet.yaml
        return PMET(layers=LOW, v_steps=30, v_lr=0.2, kl_factor=1.0, **common)
    raise ValueError(method)


def per_edit(editor, requests, style: str) -> tuple[dict, dict]:
    """The toolkit's metrics over the requests and per-edit values (0-100) of the three headline
    metrics (each edit's mean over its prompts of that kind)."""
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests)]
    metrics = EditMetrics(style)
    values = {k: torch.full((len(cases),), float("nan"), dtype=torch.float64) for k in KEYS}
    chunk = max(1, editor.hparams.forward_batch_size // 8)
    for s in range(0, len(cases), chunk):
        stats = editor.score_prompts(cases[s:s + chunk])
        metrics.update(stats)
        win = (stats.target_logprob > stats.contrast_logprob).double()
        for key in KEYS:
            rows = torch.tensor([i for i, k in enumerate(stats.kinds) if k == SOURCE[key]], dtype=torch.long)
            if rows.numel():
                g = stats.groups[rows]
                sums = torch.zeros(len(cases), dtype=torch.float64).index_add_(0, g, win[rows])
                counts = torch.zeros(len(cases), dtype=torch.float64).index_add_(0, g, torch.ones(len(rows), dtype=torch.float64))
                have = counts > 0
                values[key][have] = 100 * sums[have] / counts[have]
    return metrics.compute(), values


def bootstrap(values: dict, samples: int, seed: int) -> dict:
    """Percentile 95 % intervals of each mean and of the Score over resampled edits."""
    gen = torch.Generator().manual_seed(seed)
    n = len(values[KEYS[0]])
    idx = torch.randint(0, n, (samples, n), generator=gen)
    means = {}
    for k in KEYS:
        v = values[k][idx]                                   # [samples, n], NaN = no prompt of that kind
        means[k] = torch.nanmean(v, 1)
    score = torch.tensor([harmonic_mean([float(means[k][b]) for k in KEYS]) for b in range(samples)], dtype=torch.float64)
    out = {}
    for k, t in (*means.items(), ("score", score)):
        t = t[~torch.isnan(t)]
        lo, hi = (torch.quantile(t, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                  if t.numel() else (math.nan, math.nan))
        out[k] = [lo, hi]
    return out


def point(editor, requests, style: str, args) -> dict:
    t0 = time.perf_counter()
    info = editor.edit(requests)
    edit_s = time.perf_counter() - t0
    m, values = per_edit(editor, requests, style)
    editor.undo()
    row = {"edits": len(requests), "efficacy": m["rewrite_win"], "generalization": m["paraphrase_win"],
           "locality": m["neighborhood_win"], "score": m["score"], "rewrite_acc": m["rewrite_acc"],
           "edit_seconds": edit_s, "target_steps": info.get("target_steps"),
           "ci95": bootstrap(values, args.bootstrap, args.seed),
           "per_edit": {k: v.tolist() for k, v in values.items()}}
    ci = row["ci95"]
    print(f"    m={len(requests)}: eff {row['efficacy']:.1f} [{ci['efficacy'][0]:.0f},{ci['efficacy'][1]:.0f}] "
          f"gen {row['generalization']:.1f} loc {row['locality']:.1f} score {row['score']:.1f} "
          f"[{ci['score'][0]:.1f},{ci['score'][1]:.1f}] ({edit_s:.0f} s edit)", flush=True)
    return row


def fmt(row: dict, key: str) -> str:
    lo, hi = row["ci95"][key]
    return f"{row[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def table(rows: list[tuple[str, dict]], first: str) -> list[str]:
    lines = [f"| {first} | m | efficacy | generalization | locality | Score | edit s |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['edits']} | {fmt(r, 'efficacy')} | {fmt(r, 'generalization')} | "
                     f"{fmt(r, 'locality')} | {fmt(r, 'score')} | {r['edit_seconds']:.0f} |")
    return lines


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 4), sharex=True)
    for method, pts in curves.items():
        xs = [p["edits"] for p in pts]
        for ax, key in zip(axes, (*KEYS, "score")):
            ys = [p[key] for p in pts]
            lo = [p["ci95"][key][0] for p in pts]
            hi = [p["ci95"][key][1] for p in pts]
            ax.plot(xs, ys, "-o", ms=3, label=method)
            ax.fill_between(xs, lo, hi, alpha=0.15)
            ax.set_title(key if key != "score" else "Score (harmonic mean)")
            ax.set_xscale("log")
            ax.set_xlabel("edits in one batch")
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (95 % bootstrap CI)")
    axes[-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired(result: dict, samples: int, seed: int) -> list[str]:
    """JEEP minus each other method at every m >= 10 on the same edits: the Score and generalization
    differences with paired percentile-bootstrap 95 % intervals (one resample of edits shared by
    both methods)."""
    curves = result["curves"]
    if "jeep" not in curves or len(curves) < 2:
        return []
    lines = ["", "JEEP minus the other method on the same edits (paired bootstrap, 95 % CI):", "",
             "| m | vs | Score diff | efficacy diff | generalization diff | locality diff |", "|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(seed)
    for i, m in enumerate(result["sizes"]):
        if m < 10:
            continue
        idx = torch.randint(0, m, (samples, m), generator=gen)
        for other in curves:
            if other != "jeep":
                cells = diff_cells(curves["jeep"][i], curves[other][i], idx)
                lines.append(f"| {m} | {other} | " + " | ".join(cells) + " |")
    return lines


def diff_cells(a: dict, b: dict, idx: torch.Tensor) -> list[str]:
    """a minus b (two points on the same edits) for Score and each metric, with the paired percentile
    95 % interval over the resamples `idx` [samples, m] of edits."""
    def resampled(row):
        means = {k: torch.nanmean(torch.tensor(row["per_edit"][k], dtype=torch.float64)[idx], 1) for k in KEYS}
        score = torch.tensor([harmonic_mean([float(means[k][s]) for k in KEYS]) for s in range(len(idx))],
                             dtype=torch.float64)
        return {**means, "score": score}
    ra, rb, q = resampled(a), resampled(b), torch.tensor([0.025, 0.975], dtype=torch.float64)
    cells = []
    for k in ("score", *KEYS):
        lo, hi = torch.quantile(ra[k] - rb[k], q).tolist()
        cells.append(f"{a[k] - b[k]:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    return cells


def sweep_report(result: dict, samples: int, seed: int) -> list[str]:
    rows, memit = result["sweep"], result["sweep_memit"]
    m = memit["edits"]
    md = ["", f"JEEP settings at m = {m} (the first m counterfactual edits), and MEMIT on the same edits:", ""]
    md += table([(r["name"], r) for r in rows] + [("MEMIT", memit)], "setting")
    md += ["", "Each setting minus MEMIT (paired bootstrap, 95 % CI):", "",
           "| setting | Score diff | efficacy diff | generalization diff | locality diff |", "|---|---|---|---|---|"]
    idx = torch.randint(0, m, (samples, m), generator=torch.Generator().manual_seed(seed))
    md += [f"| {r['name']} | " + " | ".join(diff_cells(r, memit, idx)) + " |" for r in rows]
    return md


def report(result: dict, args) -> list[str]:
    md = []
    if result["curves"]:
        md += [f"Scaling: one batch of the first m counterfactual edits (shipped ParaRel set), SmolLM2-135M, "
               f"m = {result['sizes']}; value [95 % bootstrap CI over edits].", ""]
        md += table([(meth, p) for meth, pts in result["curves"].items() for p in pts], "method")
        md += paired(result, args.bootstrap, args.seed)
    if result["ablation"]:
        m = result["ablation"][0]["edits"]
        md += ["", f"Ablations (paper Table 4) at m = {m}:", ""]
        md += table([(r["name"], r) for r in result["ablation"]], "variant")
    if result.get("sweep"):
        md += sweep_report(result, args.bootstrap, args.seed)
    if result["variants"]:
        m = result["variants"][0]["edits"]
        md += ["", f"JEEP layer sets at m = {m}:", ""] + table([(r["name"], r) for r in result["variants"]], "layers")
    md += ["", f"({result['seconds'] / 60:.1f} min on {result.get('threads', args.threads)} thread(s), autocast "
           f"{result['autocast']}, stats samples {result['stats_samples']})"]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-n", type=int, default=200, help="N: the largest edit count")
    ap.add_argument("--every", type=int, default=1, help="take every k-th i of 0..16")
    ap.add_argument("--methods", nargs="*", default=["jeep", "memit", "pmet"])
    ap.add_argument("--ablation", type=int, default=0, help="m for the Table 4 ablations (0: skip)")
    ap.add_argument("--variants", type=int, default=0, help="m for the JEEP layer-set sweep (0: skip)")
    ap.add_argument("--lows", nargs="*", default=[], help="low sets for --variants, e.g. 3,4,5,6,7")
    ap.add_argument("--highs", nargs="*", default=[], help="high sets for --variants, e.g. 23,24")
    ap.add_argument("--sweep", type=int, default=0, help="m for the JEEP settings sweep (0: skip)")
    ap.add_argument("--settings", nargs="*", default=[""], help="JEEP options per sweep row, k=v,k=v")
    ap.add_argument("--sweep-reference", default=None,
                    help="an earlier scaling run's JSON (same settings) whose JEEP and MEMIT points at m "
                         "stand in for running the defaults and MEMIT again (the edits are deterministic)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats-samples", type=int, default=None)
    ap.add_argument("--autocast", default=None, help="e.g. bfloat16 for the target optimisation")
    ap.add_argument("--from-json", action="store_true", help="rewrite <out>.md/.png from <out>.json, no editing")
    ap.add_argument("--out", default="benchmarks/results/jeep_scaling")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        result = json.loads(out.with_suffix(".json").read_text())
    else:
        result = run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = report(result, args)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if result["curves"]:
        plot(result["curves"], out.with_suffix(".png"),
             "JEEP vs MEMIT vs PMET on SmolLM2-135M (counterfactual, one batch of m edits)")
    print(f"wrote {out}.md" + ("" if args.from_json else ", .json") + (", .png" if result["curves"] else ""))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    bench = load_benchmark(kind="counterfactual")
    result = {"max_n": args.max_n, "every": args.every, "autocast": args.autocast, "threads": args.threads,
              "stats_samples": args.stats_samples, "low": LOW, "high": HIGH, "lambda": LAMBDA,
              "curves": {}, "ablation": [], "variants": []}
    started = time.perf_counter()
    if args.max_n > 0 and args.methods:
        ms = sizes(args.max_n, args.every)
        result["sizes"] = ms
        print(f"edit counts: {ms}", flush=True)
        for method in args.methods:
            print(f"  {method}", flush=True)
            editor = make(method, args)
            result["curves"][method] = [point(editor, bench.requests[:m], bench.style, args) for m in ms]
            del editor
    if args.ablation:
        reqs = bench.requests[: args.ablation]
        print(f"ablation at m = {args.ablation}", flush=True)
        for name, opts in ABLATIONS.items():
            print(f"  {name}", flush=True)
            result["ablation"].append({"name": name, **point(make("jeep", args, **opts), reqs, bench.style, args)})
        for method in ("memit", "pmet"):
            print(f"  {method}", flush=True)
            result["ablation"].append({"name": method.upper(), **point(make(method, args), reqs, bench.style, args)})
    if args.variants:
        reqs = bench.requests[: args.variants]
        lows = [[int(x) for x in s.split(",")] for s in (args.lows or [",".join(map(str, LOW))])]
        highs = [[int(x) for x in s.split(",")] for s in (args.highs or [",".join(map(str, HIGH))])]
        print(f"layer variants at m = {args.variants}", flush=True)
        for low in lows:
            for high in highs:
                name = f"low {low[0]}..{low[-1]}, high {','.join(map(str, high))}"
                print(f"  {name}", flush=True)
                result["variants"].append({"name": name, **point(make("jeep", args, low=low, high=high), reqs,
                                                                  bench.style, args)})
    if args.sweep:
        reqs = bench.requests[: args.sweep]
        print(f"settings sweep at m = {args.sweep}", flush=True)
        partial = Path(args.out).with_suffix(".partial.json")  # an interrupted sweep resumes
        result["sweep"] = json.loads(partial.read_text())["sweep"] if partial.exists() else []
        done = {r["name"] for r in result["sweep"]}
        for setting in args.settings:
            if (setting or "defaults") in done:
                continue
            parts = re.split(r",(?![^\[]*\])", setting)   # commas inside [..] belong to a list
            opts = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in parts if kv)}
            high = opts.pop("high_layers", None)
            print(f"  {setting or 'defaults'}", flush=True)
            result["sweep"].append({"name": setting or "defaults", "options": opts, "high_layers": high or HIGH,
                                    **point(make("jeep", args, high=high, **opts), reqs, bench.style, args)})
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(result, indent=1))
        if args.sweep_reference:
            ref = json.loads(Path(args.sweep_reference).read_text())
            at = ref["sizes"].index(args.sweep)
            result["sweep"] = [r for r in result["sweep"] if r["name"] != "defaults (reference run)"]
            result["sweep"].insert(0, {"name": "defaults (reference run)", **ref["curves"]["jeep"][at]})
            result["sweep_memit"] = ref["curves"]["memit"][at]
        else:
            print("  memit", flush=True)
            result["sweep_memit"] = point(make("memit", args), reqs, bench.style, args)
    result["seconds"] = time.perf_counter() - started
    return result


if __name__ == "__main__":
    main()
