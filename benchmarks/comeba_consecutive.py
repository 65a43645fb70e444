"""Consecutive batch editing on SmolLM2-135M (COMEBA-HK, docs/specification.md §5.7): batches of
`--batch` counterfactual edits applied one after another without rollback, evaluated on every edit made
so far after every `--eval-every` edits. Methods: COMEBA-HK, MEMIT (consecutive batches, plain update
written into the weights), COMEBA without hooks (the consecutive update written into the weights), FT-M;
and the editors of shipped configs (`lora`, `grace`, `melo`, `ft_l`, `ft_m` = configs/ft.yaml), each
step being one batch of --batch requests (GRACE runs a step's requests as GRACE edits in order; MELO
trains one block per step).

Metrics as the paper defines them (EasyEdit): reliability = teacher-forced token accuracy of target_new
on the edit prompt (rewrite_acc), generality = the same on paraphrases (paraphrase_acc), locality =
share of teacher-forced argmax tokens unchanged against the unedited model on the neighbourhood
prompts (neighborhood_unchanged; the unrelated locality prompt is reported too), average = arithmetic
mean of the three. The COUNTERFACT probability wins are reported alongside.

Also: the maximum z-score of edited vs unrelated prompts at every hook layer after the last step (the
paper's §4.4), the share of prompts the final α swaps, and the inference overhead of the hooks (same
editor, hooks on vs `disabled()`, forward of the evaluation prompts and cached generation).

    python benchmarks/comeba_consecutive.py [--n 200] [--batch 10] [--eval-every 20]
        [--methods comeba_hk memit comeba_nohook ft comeba_hk@5000 ...] [--lam 1000] [--v-steps 25]
        [--templates 10 5] [--out benchmarks/results/comeba_consecutive]
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import yaml

from _common import editor_from_config, sequence_parser
from editing.data import EvalCase, load_benchmark
from editing.editors import COMEBA, FT, MEMIT
from editing.editors.base import EditError
from editing.editors.locate import fill

CONFIGS = {"lora": "lora", "grace": "grace", "melo": "melo", "ft_l": "ft_l", "ft_m": "ft"}  # method -> configs/<name>.yaml
COLUMNS = ("reliability", "generality", "locality", "average", "locality_prompt", "rewrite_win",
           "paraphrase_win", "neighborhood_win")


def make_editor(method: str, args):
    """`method`, optionally with "@<lambda>" (e.g. comeba_hk@5000) to override λ, or for a config's
    editor ":key=value,..." overrides (e.g. lora:lr=1e-4)."""
    method, _, over = method.partition(":")
    if method in CONFIGS:  # the shipped SmolLM2 config's editor (issue 18's adaptor baselines, FT-L)
        kw = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in over.split(",") if kv)}
        return editor_from_config(CONFIGS[method], args.stats_samples, args.autocast, **kw)[0]
    method, _, lam = method.partition("@")
    locate = dict(layers=args.layers, mom2_update_weight=float(lam or args.lam), stats_samples=args.stats_samples,
                  v_autocast=args.autocast, v_steps=args.v_steps, template_spec=[args.templates])
    if method == "comeba_hk":
        return COMEBA(**locate, alpha_z=args.alpha_z, short_prompts=args.short_prompts)
    if method == "comeba_nohook":
        return COMEBA(**locate, hook=False)
    if method == "comeba_hk_memit_update":
        return COMEBA(**locate, update_rule="memit", alpha_z=args.alpha_z)
    if method == "comeba_hk_fixed":   # the paper's fixed-α ablation uses α = 3
        return COMEBA(**locate, alpha_mode="fixed", alpha_z=3.0)
    if method == "comeba_hk_skip":
        return COMEBA(**locate, alpha_z=args.alpha_z, short_prompts="skip")
    if method.startswith("comeba_hk_last"):  # comeba_hk_last1, comeba_hk_last3
        return COMEBA(**locate, alpha_z=args.alpha_z, last_layers=int(method[len("comeba_hk_last"):]))
    if method == "memit":
        return MEMIT(**locate)
    if method == "ft":
        return FT(layers=[21], lr=5e-4, steps=25, objective="target_tokens", early_stop_loss=1e-2)
    raise ValueError(method)


def paper_metrics(m: dict) -> dict:
    row = {"reliability": m["rewrite_acc"], "generality": m["paraphrase_acc"],
           "locality": m["neighborhood_unchanged"], "locality_prompt": m.get("locality_unchanged", math.nan),
           "rewrite_win": m["rewrite_win"], "paraphrase_win": m["paraphrase_win"],
           "neighborhood_win": m["neighborhood_win"]}
    row["average"] = (row["reliability"] + row["generality"] + row["locality"]) / 3
    return row


def zscore_analysis(ed: COMEBA, requests) -> dict:
    """Max z-score per prompt kind and layer, the z-score at the subject's last token of the edit
    prompts (Fig. 3), and the share of prompts with a swapped position at the final α."""
    kinds = {"rewrite": [r.text for r in requests],
             "paraphrase": [p for r in requests for p in r.paraphrase_prompts],
             "neighborhood": [p for r in requests for p in r.neighborhood_prompts],
             "locality": [r.locality_prompt for r in requests if r.locality_prompt]}
    out = {"alpha": {str(l): ed.alpha(l) for l in ed.layers}, "kinds": {}}
    for kind, prompts in kinds.items():
        z = torch.cat([ed.max_zscores(prompts[i:i + 64]) for i in range(0, len(prompts), 64)])
        per_layer = {}
        for j, l in enumerate(ed.layers):
            col = z[:, j]
            ok = col[~torch.isnan(col)]
            q = torch.quantile(ok, torch.tensor([0.1, 0.5, 0.9])).tolist() if ok.numel() else [math.nan] * 3
            per_layer[str(l)] = {"p10": q[0], "median": q[1], "p90": q[2],
                                 "swapped": float((col >= ed.alpha(l)).float().mean() * 100),
                                 "values": col.tolist()}
        any_swap = torch.stack([z[:, j] >= ed.alpha(l) for j, l in enumerate(ed.layers)], 1).any(1)
        out["kinds"][kind] = {"layers": per_layer, "any_layer_swapped": float(any_swap.float().mean() * 100)}
    texts, spans = zip(*(fill("{}", r) for r in requests))
    rec, batch = ed.zscore_map(list(texts), list(spans))
    last = ed.layers[-1]
    zl = rec[last][torch.arange(len(requests)), batch.subject_last].cpu()
    out["subject_last_z"] = {"layer": last, "values": zl.tolist(),
                             "median": float(zl.nanmedian()), "min": float(zl[~torch.isnan(zl)].min())}
    return out


def overhead(ed, requests, reps: int) -> dict:
    """Seconds per forward of the evaluation prompts and per cached generation, hooks on vs off."""
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests[:20])]
    prompts = [p.prompt for c in cases for p in c.prompts][:64]
    targets = [p.target for c in cases for p in c.prompts][:64]

    def fwd():
        with torch.no_grad():
            ed.target_logprobs(prompts, targets)

    def gen():
        ed.generate(prompts[:8], max_new_tokens=10)

    res = {}
    for name, fn in (("forward_64_prompts", fwd), ("generate_8x10_tokens", gen)):
        on, off = [], []
        fn()
        for _ in range(reps):  # interleaved, so that load from other processes hits both alike
            t = time.perf_counter(); fn(); on.append(time.perf_counter() - t)
            with ed.disabled():
                t = time.perf_counter(); fn(); off.append(time.perf_counter() - t)
        res[name] = {"hooks_s": statistics.median(on), "base_s": statistics.median(off),
                     "ratio": statistics.median(on) / statistics.median(off)}
    return res


def main() -> None:
    ap = sequence_parser(n=200, batch=10)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--methods", nargs="*", default=["comeba_hk", "memit", "comeba_nohook", "ft"])
    ap.add_argument("--layers", type=int, nargs="*", default=[3, 4, 5, 6, 7])
    ap.add_argument("--lam", type=float, default=1000.0)
    ap.add_argument("--alpha-z", type=float, default=2.2)
    ap.add_argument("--short-prompts", default="keep")
    ap.add_argument("--stats-samples", type=int, default=1000)
    ap.add_argument("--autocast", default="bfloat16")
    ap.add_argument("--v-steps", type=int, default=25, help="target optimisation steps (MEMIT: 25)")
    ap.add_argument("--templates", type=int, nargs=2, default=[10, 5], metavar=("LENGTH", "COUNT"),
                    help="generated context templates (MEMIT: 10 tokens x 5)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 runs best beside other jobs)")
    ap.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                    help="only merge the reports of runs of this script (methods split across processes)")
    ap.add_argument("--out", default="benchmarks/results/comeba_consecutive")
    args = ap.parse_args()
    if args.merge:
        return write_outputs(merge([json.loads(Path(p).read_text()) for p in args.merge]), Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = load_benchmark(kind="counterfactual")
    requests = bench.requests[: args.n]
    steps = [requests[i:i + args.batch] for i in range(0, len(requests), args.batch)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "curves": {}, "edit_seconds": {}}
    for method in args.methods:
        ed = make_editor(method, args)
        curve, done, seconds, t_start, refused = [], 0, 0.0, time.perf_counter(), []
        for s, batch in enumerate(steps):
            t = time.perf_counter()
            try:
                info = ed.edit(batch)
            except EditError as e:  # refused by the step checks and rolled back; its cases stay unedited
                info = {}
                refused.append(f"step {s}: {e.__cause__}")
                print(f"{method} step {s} refused: {e.__cause__}", flush=True)
            seconds += time.perf_counter() - t
            done += len(batch)
            if done % args.eval_every == 0 or s == len(steps) - 1:
                m = paper_metrics(ed.evaluate(requests[:done], style=bench.style))
                alpha = {k: v for k, v in info.items() if k.startswith("alpha_l")}
                curve.append({"edits": done, **m, "alpha": alpha})
                print(f"{method} {done:4d} edits: " + " ".join(f"{k} {m[k]:.1f}" for k in COLUMNS)
                      + (f" alpha {min(alpha.values()):.2f}" if alpha else "")
                      + f" ({time.perf_counter() - t_start:.0f} s)", flush=True)
        report["curves"][method] = curve
        report["edit_seconds"][method] = seconds
        report.setdefault("refused", {})[method] = refused
        if isinstance(ed, COMEBA) and ed.hparams.hook:
            report.setdefault("zscores", {})[method] = zscore_analysis(ed, requests)
        if (isinstance(ed, COMEBA) and ed.hparams.hook) or method.split(":")[0] in ("lora", "grace", "melo"):
            # edit modules that act at inference (hooks, adaptor, codebook, router + blocks): the
            # same editor with its edits acting vs `disabled()` (= the unedited model)
            report.setdefault("overhead", {})[method] = overhead(ed, requests, args.reps)
            print(json.dumps(report["overhead"][method]), flush=True)
        del ed
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_outputs(report, out)


def merge(reports: list[dict]) -> dict:
    """One report from several runs with the same settings (different methods)."""
    keys = ("n", "batch", "eval_every", "lam", "v_steps", "templates", "layers", "stats_samples")
    first = reports[0]
    for r in reports[1:]:
        if any(r["args"][k] != first["args"][k] for k in keys):
            raise ValueError("the runs to merge differ in their settings")
    out = {"args": first["args"], "curves": {}, "edit_seconds": {}}
    for r in reports:
        for part in ("curves", "edit_seconds", "zscores", "overhead", "refused"):
            out.setdefault(part, {}).update(r.get(part, {}))
    return out


def write_outputs(report: dict, out: Path) -> None:
    lines = [f"Consecutive batch editing, SmolLM2-135M, ParaRel counterfactual, batches of "
             f"{report['args']['batch']}, {report['args']['n']} edits (final evaluation over all edits).", "",
             "| method | " + " | ".join(COLUMNS) + " | edit s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for method, curve in report["curves"].items():
        last = curve[-1]
        lines.append(f"| {method} | " + " | ".join(f"{last[k]:.1f}" for k in COLUMNS)
                     + f" | {report['edit_seconds'][method]:.0f} |")
    refused = {m: len(r) for m, r in report.get("refused", {}).items() if r}
    if refused:
        lines += ["", "Steps refused by the step checks (rolled back, their cases evaluated unedited): "
                  + ", ".join(f"{m} {n}" for m, n in refused.items()) + "."]
    lines += ["", "Curve (reliability / generality / locality after each evaluation):", "",
              "| edits | " + " | ".join(report["curves"]) + " |", "|---" * (len(report["curves"]) + 1) + "|"]
    edits = [p["edits"] for p in next(iter(report["curves"].values()))]
    for i, e in enumerate(edits):
        cells = []
        for curve in report["curves"].values():
            p = curve[i] if i < len(curve) else None
            cells.append("" if p is None else f"{p['reliability']:.0f} / {p['generality']:.0f} / {p['locality']:.0f}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    for method, zs in report.get("zscores", {}).items():
        lines += ["", f"Maximum z-score per prompt, {method} after the last step (median [p10, p90]; "
                      "% of prompts swapped at the final α):", "",
                  "| kind | " + " | ".join(f"layer {l} (α={a:.2f})" for l, a in zs["alpha"].items())
                  + " | any layer swapped |", "|---" * (len(zs["alpha"]) + 2) + "|"]
        for kind, v in zs["kinds"].items():
            cells = [f"{c['median']:.2f} [{c['p10']:.2f}, {c['p90']:.2f}]; {c['swapped']:.0f} %"
                     for c in v["layers"].values()]
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {v['any_layer_swapped']:.0f} % |")
        sl = zs["subject_last_z"]
        lines.append(f"\nz-score at the subject's last token of the edit prompts, layer {sl['layer']}: "
                     f"median {sl['median']:.2f}, min {sl['min']:.2f}.")
    for method, ov in report.get("overhead", {}).items():
        lines += ["", f"Inference overhead of the edit modules ({method} after the last step, same editor, edits "
                      f"acting vs disabled, median of {report['args']['reps']}):", ""]
        for name, v in ov.items():
            lines.append(f"- {name}: {v['hooks_s'] * 1000:.0f} ms vs {v['base_s'] * 1000:.0f} ms, "
                         f"ratio {v['ratio']:.2f}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
        for ax, key in zip(axes[:3], ("reliability", "generality", "locality")):
            for method, curve in report["curves"].items():
                ax.plot([p["edits"] for p in curve], [p[key] for p in curve], marker="o", label=method)
            ax.set_title(key)
            ax.set_xlabel("edits")
            ax.set_ylim(0, 102)
        axes[0].legend(fontsize=8)
        for method, zs in list(report.get("zscores", {}).items())[:1]:
            last = str(list(zs["alpha"])[-1])
            vals = [[x for x in zs["kinds"][k]["layers"][last]["values"] if x == x] for k in zs["kinds"]]
            axes[3].boxplot(vals)
            axes[3].set_xticks(range(1, len(vals) + 1), list(zs["kinds"]))
            axes[3].axhline(zs["alpha"][last], color="red", ls="--", label="final α")
            axes[3].set_title(f"max z-score, layer {last} ({method})")
            axes[3].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as e:  # the table is the result; the plot is a convenience
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
