"""Teacher-forced against generation-based scores on SmolLM2-135M (issue "evaluation users can trust"):
each method edits the same counterfactual requests of the shipped set with its shipped config and is
evaluated with both kinds of score, portability (two-hop prompts) and general-ability drift.

    python benchmarks/eval_gap.py [--n 100] [--methods memit rome@20 ft ireva comeba_hk adaple jeep]

`method@k` edits only the first k requests (ROME is sequential and collapses past a few dozen edits).
The requests: the shipped records with portability prompts first (`--portability` of them), then the
first others up to --n, so that portability is measured on enough cases. Every number comes from
the editor's own evaluation (results.json keys); 95 % BCa bootstrap intervals over cases for the
headline pairs. Writes <out>.json after every method (a rerun skips the methods it holds) and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _common import editor_from_config
from editing.data import EvalCase, load_benchmark
from editing.evaluation import Evaluation, intervals

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("reliability", "rewrite_acc", "rewrite_gen"), ("generality", "paraphrase_acc", "paraphrase_gen"),
         ("locality", "neighborhood_unchanged", "neighborhood_gen"), ("portability", "portability_acc", "portability_gen"))


def select(requests, n: int, with_portability: int):
    port = [r for r in requests if r.portability_prompts][:with_portability]
    rest = [r for r in requests if not r.portability_prompts][: n - len(port)]
    return port + rest


def run(method: str, requests, args) -> dict:
    name, _, k = method.partition("@")
    reqs = requests[: int(k)] if k else requests
    ed, batch = editor_from_config(name, args.stats_samples, args.autocast, args.base_model)
    step = len(reqs) if batch in (-1, None) else batch
    t = time.perf_counter()
    for s in range(0, len(reqs), step):
        ed.edit(reqs[s:s + step])
    edit_s = time.perf_counter() - t
    ev = Evaluation(ed, "counterfact")
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(reqs)]
    t = time.perf_counter()
    for s in range(0, len(cases), 8):
        ev.update(cases[s:s + 8])
    values = ev.compute()
    records = ev.cases
    sources = {**{p[0]: p[1] for p in PAIRS}, **{f"{p[0]}_gen": p[2] for p in PAIRS}}
    return {"method": method, "edits": len(reqs), "edit_s": edit_s, "eval_s": time.perf_counter() - t,
            "metrics": values, "intervals": intervals(records, sources),
            "portability_cases": sum(1 for r in reqs if r.portability_prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--portability", type=int, default=40, help="records with portability prompts among the n")
    ap.add_argument("--methods", nargs="*", default=["memit", "rome@20", "ft", "ireva", "comeba_hk", "adaple", "jeep"])
    ap.add_argument("--stats-samples", type=int, default=2000)
    ap.add_argument("--autocast", default="bfloat16")
    ap.add_argument("--base-model", default=None, help="another model (a smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_gap"))
    ap.add_argument("--report-only", action="store_true", help="rebuild <out>.md from <out>.json, run nothing")
    args = ap.parse_args()
    if args.report_only:
        return write_table(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.autocast = None if args.autocast == "none" else args.autocast
    torch.manual_seed(0)
    requests = select(load_benchmark(kind="counterfactual").requests, args.n, args.portability)
    out = Path(args.out)
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    report.setdefault("args", {k: v for k, v in vars(args).items() if k != "out"})
    report.setdefault("runs", {})
    for method in args.methods:
        if method in report["runs"]:
            continue
        report["runs"][method] = run(method, requests, args)
        m = report["runs"][method]["metrics"]
        print(method, " ".join(f"{h} {m.get(b, float('nan')):.1f}/{m.get(c, float('nan')):.1f}" for h, b, c in PAIRS),
              f"ppl x{m.get('ppl_ratio', float('nan')):.3f}", flush=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_table(report, out)


def write_table(report: dict, out: Path) -> None:
    a = report["args"]
    lines = [f"Teacher-forced (tf) against generation-based (gen) scores, SmolLM2-135M, shipped counterfactual set: "
             f"{a['n']} requests ({a['portability']} of them with two-hop portability prompts first), each method "
             f"with its shipped config (statistics from {a['stats_samples']} texts, target optimisation "
             f"{a['autocast'] or 'float32'}). Reliability / generality: teacher-forced token accuracy of the new "
             "target vs greedy continuation starting with it; locality: teacher-forced argmax tokens unchanged vs "
             "greedy continuation unchanged (neighbourhood prompts); ppl x: perplexity on 64 held-out texts over "
             "the unedited model's. [95 % BCa intervals over cases.]", "",
             f"`python benchmarks/eval_gap.py --n {a['n']} --methods {' '.join(report['runs'])}`", "",
             "| method | edits | " + " | ".join(f"{p[0]} tf | {p[0]} gen" for p in PAIRS) + " | ppl x |",
             "|---" * (2 + 2 * len(PAIRS) + 1) + "|"]

    def cell(run, key, head):
        v = run["metrics"].get(key)
        ci = run["intervals"].get(head)
        if v is None:
            return "–"
        return f"{v:.1f}" + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else "")

    for method, run in report["runs"].items():
        cells = []
        for head, tf, gen in PAIRS:
            cells += [cell(run, tf, head), cell(run, gen, f"{head}_gen")]
        lines.append(f"| {method} | {run['edits']} | " + " | ".join(cells) + f" | {run['metrics'].get('ppl_ratio', float('nan')):.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
