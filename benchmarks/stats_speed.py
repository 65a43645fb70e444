"""Speed of the second-moment statistics E[kkᵀ] (editing.stats) on SmolLM2-135M.

Measures `second_moments` (one pass for all layers, forward stopped after the highest layer, bf16
autocast on a CPU by default, no cache) on --n-samples texts of the corpus and prints wall time and
tokens/s. On a small subset (--baseline-samples) it also times, in the same run:

- ours on that subset;
- "per-layer, stop": one pass per layer, float32 forward stopped after that layer, float32 KᵀK, as
  the MEMIT/ROME/EasyEdit `layer_stats` code does (Trace(..., stop=True));
- "per-layer, full": one pass per layer with the whole forward (LM head included), on the first
  --full-samples texts only (it is very slow: the float32 logits over a 49k vocabulary);

with the same length-sorted token-budget batches, and prints the ratios and the relative
difference of our statistics (forward dtype as chosen) from the float32 ones.

    python benchmarks/stats_speed.py --n-samples 500
    python benchmarks/stats_speed.py                      # the whole corpus (~10k texts)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editing import hooks, stats  # noqa: E402
from editing.corpus import DEFAULT_CORPUS, load_corpus  # noqa: E402
from editing.layout import Layout  # noqa: E402
from editing.models import load  # noqa: E402
from editing.tokens import pad_right  # noqa: E402


def count_tokens(tok, texts: list[str], max_length: int) -> int:
    return sum(len(e) for e in tok(texts, truncation=True, max_length=max_length)["input_ids"])


@torch.no_grad()
def per_layer(model, tok, layers: list[int], texts: list[str], max_length: int, batch_tokens: int,
              stop: bool) -> dict[int, torch.Tensor]:
    """The per-layer approach: one float32 pass over the texts for each layer."""
    lay = Layout(model)
    enc = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    out = {}
    for l in layers:
        acc = torch.zeros(lay.mlp_key_size(l), lay.mlp_key_size(l), dtype=torch.float64)
        n = 0
        for batch in stats._batches([len(e) for e in enc], batch_tokens):
            ids, mask = pad_right(tok, [enc[i] for i in batch])
            with hooks.capture({l: lay.mlp_out(l)}, "input") as cap:
                if stop:
                    hooks.run_until(model, lay.block(l), input_ids=ids, attention_mask=mask, use_cache=False)
                else:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            k = cap[l][mask.bool()].float()
            acc += (k.T @ k).double()
            n += int(mask.sum())
        out[l] = (acc / n).float()
    return out


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--layers", default="3,4,5,6,7", help="comma-separated, or a range like 3-7")
    ap.add_argument("--n-samples", type=int, default=None, help="texts (default: the whole corpus)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--forward-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--mode", default="autocast", choices=["autocast", "cast"],
                    help="how a narrower forward dtype is applied (library default: autocast)")
    ap.add_argument("--baseline-samples", type=int, default=100,
                    help="texts for the per-layer comparison (0: skip)")
    ap.add_argument("--full-samples", type=int, default=20,
                    help="texts for the per-layer full-forward baseline, which is very slow (0: skip)")
    args = ap.parse_args(argv)
    if "-" in args.layers:
        a, b = args.layers.split("-")
        layers = list(range(int(a), int(b) + 1))
    else:
        layers = [int(x) for x in args.layers.split(",")]

    torch.set_grad_enabled(False)
    model, tok = load(args.model)
    dtype_name = stats.resolve_forward_dtype(model, args.forward_dtype)
    print(f"model {args.model}, layers {layers}, corpus {args.corpus}, max_length {args.max_length}, "
          f"batch_tokens {args.batch_tokens}, forward {dtype_name} ({args.mode}), "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)

    real = stats._accumulate

    def ours(texts_n):
        def acc(*a, **k):
            return real(*a, **{**k, "mode": args.mode})
        stats._accumulate = acc
        try:
            return stats.second_moments(model, tok, layers, corpus=args.corpus, n_samples=texts_n,
                                        max_length=args.max_length, batch_tokens=args.batch_tokens,
                                        forward_dtype=args.forward_dtype, cache=False, progress=True)
        finally:
            stats._accumulate = real

    texts = load_corpus(args.corpus, args.n_samples)
    tokens = count_tokens(tok, texts, args.max_length)
    _, wall = timed(lambda: ours(args.n_samples))
    print(f"one pass, {len(texts)} texts, {tokens} tokens: {wall:.1f} s, {tokens / wall:.0f} tokens/s, "
          f"{1000 * wall / tokens:.3f} ms/token", flush=True)
    full_texts = len(load_corpus(args.corpus))
    if args.n_samples is not None and args.n_samples < full_texts:
        est = wall * full_texts / len(texts)
        print(f"  extrapolated to the whole corpus ({full_texts} texts): {est:.0f} s ({est / 60:.1f} min)")

    if args.baseline_samples:
        n = args.baseline_samples
        sub = load_corpus(args.corpus, n)
        sub_tokens = count_tokens(tok, sub, args.max_length)
        print(f"\ncomparison on {n} texts ({sub_tokens} tokens), {len(layers)} layers:", flush=True)
        mine, t_ours = timed(lambda: ours(n))
        print(f"  ours (one pass, {dtype_name}):        {t_ours:7.1f} s  {sub_tokens / t_ours:7.0f} tokens/s",
              flush=True)
        ref, t_stop = timed(lambda: per_layer(model, tok, layers, sub, args.max_length, args.batch_tokens, True))
        print(f"  per-layer, stop, float32:        {t_stop:7.1f} s  {sub_tokens / t_stop:7.0f} tokens/s"
              f"  -> ours is {t_stop / t_ours:.1f}x faster", flush=True)
        if args.full_samples:
            few = sub[: args.full_samples]
            few_tokens = count_tokens(tok, few, args.max_length)
            _, t_full = timed(lambda: per_layer(model, tok, layers, few, args.max_length, args.batch_tokens, False))
            ratio = (few_tokens / t_full) / (sub_tokens / t_ours)
            print(f"  per-layer, full forward, float32 ({len(few)} texts, {few_tokens} tokens): {t_full:.1f} s  "
                  f"{few_tokens / t_full:.0f} tokens/s  -> ours is {1 / ratio:.1f}x faster (tokens/s)", flush=True)
        print(f"  difference of ours ({dtype_name}) from float32, per layer:")
        for l in layers:
            d = (mine[l].double() - ref[l].double())
            r = ref[l].double()
            print(f"    layer {l}: ||d||/||C|| = {(d.norm() / r.norm()).item():.2e}, "
                  f"max|d|/max|C| = {(d.abs().max() / r.abs().max()).item():.2e}, "
                  f"max rel diag = {(d.diagonal().abs() / r.diagonal()).max().item():.2e}")


if __name__ == "__main__":
    main()
