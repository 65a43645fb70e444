"""Target-vector computation speed: batched + truncated forward vs one request at a time with the
full forward and full-vocabulary logits (the official code's path), same process, same requests.

    python benchmarks/targets_speed.py [--n 20] [--layer 7] [--steps 25]

Prints seconds for each path, the ratio, and the largest difference between the two paths' targets.
"""
from __future__ import annotations

import argparse
import time

import torch

from editing.data import load_benchmark
from editing.editors import MEMIT
from editing.editors.locate import compute_targets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.manual_seed(0)
    editor = MEMIT(base_model=args.model, layers=[args.layer], v_steps=args.steps)
    requests = load_benchmark(kind="counterfactual").requests[: args.n]
    templates = [t for g in editor.template_groups() for t in g]
    cfg = editor.target_config()
    # Early stopping makes the work depend on the path's rounding: time a fixed number of steps.
    cfg.early_stop_loss = -1.0
    t0 = time.perf_counter()
    fast = compute_targets(editor.layout, editor.tokenizer, requests, cfg, templates)
    t1 = time.perf_counter()
    slow = [compute_targets(editor.layout, editor.tokenizer, [r], cfg, templates, truncated=False) for r in requests]
    t2 = time.perf_counter()
    z_fast = fast.z["block"]
    z_slow = torch.cat([s.z["block"] for s in slow])
    rel = ((z_fast - z_slow).norm(dim=-1) / z_slow.norm(dim=-1)).max()
    print(f"{args.n} requests, {len(templates)} templates, layer {args.layer}, {cfg.steps} steps each")
    print(f"batched + truncated: {t1 - t0:.1f} s ({(t1 - t0) / args.n:.2f} s/request)")
    print(f"one at a time, full forward: {t2 - t1:.1f} s ({(t2 - t1) / args.n:.2f} s/request)")
    print(f"speed-up: {(t2 - t1) / (t1 - t0):.1f}x; max relative difference of the targets: {float(rel):.2e}")
    cfg.autocast = "bfloat16"
    t3 = time.perf_counter()
    amp = compute_targets(editor.layout, editor.tokenizer, requests, cfg, templates)
    t4 = time.perf_counter()
    rel = ((amp.z["block"] - z_slow).norm(dim=-1) / z_slow.norm(dim=-1)).max()
    print(f"batched + truncated + bf16 autocast: {t4 - t3:.1f} s ({(t4 - t3) / args.n:.2f} s/request), "
          f"speed-up {(t2 - t1) / (t4 - t3):.1f}x; max relative difference {float(rel):.2e}")


if __name__ == "__main__":
    main()
