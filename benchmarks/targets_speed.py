"""Target-vector computation speed against the reference path, in one process on the same requests.

The reference is the field's own way (the official ROME/MEMIT code and EasyEdit): one request at a
time, the whole model over whole rows, every position projected to the vocabulary, float32. The
toolkit's paths, each on all requests together:

- whole rows: the forward starts at the delta's block from cached lower states, the LM head only at
  scored positions (`prefix_cache=False`);
- prefix cache: the same, and only the positions from each row's delta on run; the earlier ones'
  keys and values are computed once (`Layout.prefix`);
- prefix cache + bf16: the same under bfloat16 autocast (`v_autocast: bfloat16`).

Every path runs the same fixed number of steps (early stopping would make the work depend on each
path's rounding); then each path's targets are scored the same way, in float32 over whole rows: the
target probability with z written in at the subject's last token (efficacy: mean over templates of
exp(−NLL)), and each request's final loss as its own path computed it. Finally the toolkit's default
(prefix cache, early stopping on) is run once more to show how many steps early stopping leaves.

    python benchmarks/targets_speed.py [--n 20] [--layer 7] [--steps 25] [--threads 2]
        [--out benchmarks/results/targets_speed]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from _common import report
from editing import hooks
from editing.data import load_benchmark
from editing.editors import MEMIT
from editing.editors.locate import compute_targets, fill
from editing.tokens import encode


def efficacy(editor, requests, z: torch.Tensor, templates: list[str], layer: int) -> torch.Tensor:
    """[u] mean over templates of P(target_new) with block `layer`'s output at the subject's last
    token replaced by z, float32, whole model (the same scorer for every path)."""
    lay = editor.layout
    out = []
    for i, r in enumerate(requests):
        texts, spans = zip(*(fill(t, r) for t in templates))
        batch = encode(editor.tokenizer, list(texts), [r.target_new] * len(texts), spans=list(spans)).to(lay.device)
        with torch.no_grad(), hooks.replace_at(lay.block(layer), batch.subject_last, z[i].expand(len(texts), -1)):
            logits = lay.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(hooks.gather_at(logits, batch.target_positions).float(), -1)
        tok = logp.gather(-1, batch.target_ids[..., None]).squeeze(-1) * batch.target_mask
        nll = -tok.sum(1) / batch.target_mask.sum(1)
        out.append(nll.neg().exp().mean())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    editor = MEMIT(base_model=args.model, layers=[args.layer], v_steps=args.steps)
    requests = load_benchmark(kind="counterfactual").requests[: args.n]
    templates = [t for g in editor.template_groups() for t in g]
    base = replace(editor.target_config(), early_stop_loss=-1.0)   # a fixed number of steps
    paths = {
        "reference: one at a time, full forward, all positions to the vocabulary": None,
        "whole rows (truncated from the delta's block)": replace(base, prefix_cache=False),
        "prefix cache": base,
        "prefix cache + bf16 autocast": replace(base, autocast="bfloat16"),
    }
    results, rows = {}, []
    for name, cfg in paths.items():
        t0 = time.perf_counter()
        if cfg is None:
            parts = [compute_targets(editor.layout, editor.tokenizer, [r], base, templates, truncated=False)
                     for r in requests]
            z = torch.cat([p.z["block"] for p in parts])
            loss = torch.cat([p.loss for p in parts])
        else:
            t = compute_targets(editor.layout, editor.tokenizer, requests, cfg, templates)
            z, loss = t.z["block"], t.loss
        seconds = time.perf_counter() - t0
        results[name] = dict(seconds=seconds, z=z, loss=loss, eff=efficacy(editor, requests, z, templates, args.layer))
        print(f"{name}: {seconds:.1f} s", flush=True)
    ref = results[next(iter(paths))]
    for name, r in results.items():
        rows.append(dict(path=name, seconds=r["seconds"], per_request=r["seconds"] / args.n,
                         speedup=ref["seconds"] / r["seconds"],
                         max_rel_z=float(((r["z"] - ref["z"]).norm(dim=-1) / ref["z"].norm(dim=-1)).max()),
                         max_loss_diff=float((r["loss"] - ref["loss"]).abs().max()),
                         mean_loss=float(r["loss"].mean()), efficacy=float(r["eff"].mean()),
                         max_efficacy_diff=float((r["eff"] - ref["eff"]).abs().max())))
    t0 = time.perf_counter()
    early = compute_targets(editor.layout, editor.tokenizer, requests, editor.target_config(), templates)
    early_s = time.perf_counter() - t0
    lines = [f"Target vectors, {args.model}, {args.n} counterfactual requests, {len(templates)} templates, "
             f"block {args.layer}, {args.steps} steps each (fixed), {torch.get_num_threads()} thread(s)", "",
             "| path | s | s/request | speed-up | max rel. Δz | max Δloss | mean loss | efficacy | max Δefficacy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['seconds']:.1f} | {r['per_request']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['max_rel_z']:.1e} | {r['max_loss_diff']:.1e} | {r['mean_loss']:.4f} | "
                     f"{100 * r['efficacy']:.1f} % | {100 * r['max_efficacy_diff']:.2f} |")
    lines += ["", f"The default (prefix cache, float32, early stop at loss < {editor.target_config().early_stop_loss}): "
              f"{early_s:.1f} s, {early.steps} steps at most (the slowest request), mean loss "
              f"{float(early.loss.mean()):.4f}; {ref['seconds'] / early_s:.1f}x the fixed-step reference."]
    report(lines, args.out, dict(args=vars(args), rows=rows, early_stop=dict(
        seconds=early_s, steps=early.steps, mean_loss=float(early.loss.mean()))))


if __name__ == "__main__":
    main()
