"""How well iReVa's keys separate an edit from unrelated prompts, layer by layer, on SmolLM2-135M
(issue 21, docs/ireva.md "Calibrated margins"): the cosine between standardised MLP inputs at the last
prompt token of an edit prompt and of (a) its own paraphrase, (b) the same prompt template with
another subject, and (c) for every unrelated locality prompt, the nearest of the N edit prompts.
A neuron fires where cos > θ (margin θ‖k̂‖²), so the θ that keeps 95 % of locality prompts silent is
the 95th percentile of (c), and the share of (a) above it is the generality that survives.

    python benchmarks/ireva_key_similarity.py [--n 100] [--kind factual] [--split test] [--layers 3 7 ...]
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from editing.data import meta
from editing.data.readers import load_benchmark
from editing.editors import IReVa
from editing.tuners.kv_adaptor import standardize


def unit_states(ed: IReVa, texts: list[str]) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), 50):
        ids, mask, last = ed._pad([ed.tokenizer(ed.prepare_prompt(t))["input_ids"] for t in texts[s:s + 50]])
        out.append(standardize(ed._states(ids, mask, last)[0]))
    x = torch.cat(out)
    return x / x.norm(dim=-1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--kind", default="factual")
    ap.add_argument("--split", choices=["all", "test"], default="test")
    ap.add_argument("--layers", type=int, nargs="*", default=[3, 7, 11, 15, 19, 23, 25, 27, 29])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/ireva_key_similarity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reqs = load_benchmark(kind=args.kind).requests
    reqs = (reqs if args.split == "all" else meta.select(reqs, "test"))[: args.n]
    subjects = sorted({r.subject for r in reqs})
    swapped = [replace(r, subject=random.Random(r.case_id).choice([s for s in subjects if s != r.subject])) for r in reqs]
    ed = IReVa(layers=[27], alpha=1.0, theta=0.85)
    rows = []
    for layer in args.layers:
        ed.layer = ed.layout.layer_index(layer)   # only the states are read; the adaptor is not used
        K = unit_states(ed, [r.text for r in reqs])
        own = (K * unit_states(ed, [r.paraphrase_prompts[0] for r in reqs])).sum(-1)
        other = (K * unit_states(ed, [r.text for r in swapped])).sum(-1)
        loc = (unit_states(ed, [r.locality_prompt for r in reqs]) @ K.T).max(1).values
        theta95 = float(torch.quantile(loc, 0.95))
        rows.append({"layer": layer, "paraphrase": float(own.mean()), "other_subject": float(other.mean()),
                     "locality_nearest_q50": float(loc.median()), "theta_95": theta95,
                     "paraphrase_above": float((own > theta95).float().mean() * 100),
                     "other_subject_above": float((other > theta95).float().mean() * 100)})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"iReVa key cosines on SmolLM2-135M, {len(reqs)} {args.kind} edits ({args.split} relations), last prompt "
             "token, standardised MLP inputs of the unedited model.", "",
             f"`python benchmarks/ireva_key_similarity.py --n {args.n} --kind {args.kind} --split {args.split}`", "",
             "| layer | cos own paraphrase (mean) | cos same template, other subject (mean) | locality → nearest edit (median) "
             "| θ keeping 95 % of locality silent | paraphrases above it | other-subject prompts above it |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['paraphrase']:.3f} | {r['other_subject']:.3f} | {r['locality_nearest_q50']:.3f} | "
              f"{r['theta_95']:.3f} | {r['paraphrase_above']:.0f} % | {r['other_subject_above']:.0f} % |" for r in rows]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
