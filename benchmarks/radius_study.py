"""Where GRACE's and MELO's radii fall on SmolLM2-135M: the distances, at the module each one keys on,
from an edit prompt's key to its own paraphrases, to its neighbourhood prompts (other subjects of the
same relation) and from every unrelated locality prompt to the nearest of the N edit keys, and what
share of each a radius ε would capture (issue 18's radius study; docs/baselines.md).

    python benchmarks/radius_study.py [--n 100] [--kind counterfactual] [--out benchmarks/results/radius_study]

Keys as the editors compute them (unedited model, each row's last prompt token): GRACE
(configs/grace.yaml) the input of `down_proj` of block 25; MELO (configs/melo.yaml) the output of the
MLP of block 22. A radius captures a prompt when its key is within ε of the edit's key: a paraphrase
captured is generality gained, a neighbourhood or locality prompt captured is locality lost (it then
gets the edit's value or block).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _common import editor_from_config
from editing import hooks
from editing.data.readers import load_benchmark
from editing.tokens import pad_right

MODULES = {"grace": ("input", "layer", "mlp_out"), "melo": ("output", "router_layer", "mlp_out")}


@torch.no_grad()
def keys(ed, module, where: str, texts: list[str]) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), 32):
        seqs = [ed.tokenizer(ed.prepare_prompt(t))["input_ids"] for t in texts[s:s + 32]]
        ids, mask = pad_right(ed.tokenizer, seqs)
        last = torch.tensor([len(x) - 1 for x in seqs])
        with ed.disabled(), hooks.capture({"k": module}, where, positions=last) as cap:
            hooks.run_until(ed.layout.backbone, module, input_ids=ids, attention_mask=mask, use_cache=False)
        out.append(cap["k"].float())
    return torch.cat(out)


def quantiles(x: torch.Tensor) -> list[float]:
    return torch.quantile(x, torch.tensor([0.1, 0.5, 0.9])).tolist()


def study(method: str, requests, eps_grid) -> dict:
    where, layer_key, part = MODULES[method]
    ed, _ = editor_from_config(method)
    module = base = ed.layout.module(ed.layout.layer_index(ed.hparams[layer_key]), part)
    module = getattr(base, "base_layer", base)  # the injected edit module wraps the original
    K = keys(ed, module, where, [r.text for r in requests])
    par = [(i, p) for i, r in enumerate(requests) for p in r.paraphrase_prompts]
    nb = [(i, p) for i, r in enumerate(requests) for p in r.neighborhood_prompts]
    loc = [r.locality_prompt for r in requests if r.locality_prompt]
    d = {}
    for name, pairs in (("paraphrase", par), ("neighborhood", nb)):
        if pairs:
            Q = keys(ed, module, where, [p for _, p in pairs])
            d[name] = (Q - K[[i for i, _ in pairs]]).norm(dim=-1)
    if loc:
        d["locality (nearest edit)"] = torch.cdist(keys(ed, module, where, loc), K).min(1).values
    other = torch.cdist(K, K) + torch.diag(torch.full((len(K),), float("inf")))
    d["nearest other edit"] = other.min(1).values
    return {"module": f"{where} of {ed.layout.module_name(ed.layout.layer_index(ed.hparams[layer_key]), part)}",
            "key_norm_median": float(K.norm(dim=-1).median()), "eps_config": float(ed.hparams.get("eps", ed.hparams.get("init_radius"))),
            "distances": {k: {"n": len(v), "q10_50_90": quantiles(v)} for k, v in d.items()},
            "captured": {k: {str(e): float((v < e).float().mean() * 100) for e in eps_grid} for k, v in d.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--kind", default="counterfactual")
    ap.add_argument("--eps", type=float, nargs="*", default=[0.5, 1, 5, 10, 20, 40, 60, 80])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/radius_study")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = load_benchmark(kind=args.kind).requests[: args.n]
    report = {"args": vars(args), "methods": {m: study(m, requests, args.eps) for m in MODULES}}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"Key distances on SmolLM2-135M, the first {args.n} {args.kind} records (unedited model, last prompt token).",
             "", f"`python benchmarks/radius_study.py --n {args.n} --kind {args.kind}`"]
    for m, r in report["methods"].items():
        lines += ["", f"**{m}**: {r['module']}; median key norm {r['key_norm_median']:.1f}; the config's radius "
                      f"{r['eps_config']:g}.", "",
                  "| prompts | n | distance p10 / p50 / p90 | " + " | ".join(f"ε={e:g}" for e in args.eps) + " |",
                  "|---" * (3 + len(args.eps)) + "|"]
        for k, v in r["distances"].items():
            q = " / ".join(f"{x:.1f}" for x in v["q10_50_90"])
            lines.append(f"| {k} | {v['n']} | {q} | " + " | ".join(f"{r['captured'][k][str(e)]:.0f} %" for e in args.eps) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
