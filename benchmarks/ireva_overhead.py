"""iReVa inference overhead (issue 4; paper App. 10.4): greedy generation of 64 tokens from BOS with
a KV cache, by the unedited model (adaptor module ejected) and by iReVa with 0 / 100 / 1000 neurons,
all in the same process, rounds interleaved so that machine load hits every setting alike.

    python benchmarks/ireva_overhead.py --neurons 0 100 1000 --tokens 64 --rounds 7 \
        --out benchmarks/results/ireva_overhead

The neurons are real ones: counterfactual ParaRel edits inserted without retrofitting (one batched
step), the bank then cut to exactly the first N neurons.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from editing.data import load_benchmark
from editing.editors import IReVa


def cut(editor: IReVa, n: int, full: dict) -> None:
    """Keep the first n neurons of the full bank."""
    editor.kv.load_bank({name: t[:, :n] if name == "keys" else t[:n] for name, t in full.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neurons", type=int, nargs="+", default=[0, 100, 1000])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--layer", type=int, default=27)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    editor = IReVa(layers=[args.layer], retrofit=False)
    bench = load_benchmark(kind="counterfactual")
    need = max(args.neurons)
    requests, pairs = [], 0
    for r in bench.requests:
        if pairs >= need:
            break
        requests.append(r)
        pairs += len(editor.pairs(r))
    if pairs < need:
        sys.exit(f"only {pairs} neurons available from {len(bench.requests)} requests")
    start = time.perf_counter()
    for s in range(0, len(requests), 64):
        editor.edit(requests[s:s + 64])
    insert_s = time.perf_counter() - start
    full = editor.kv.bank()
    bos = editor.tokenizer.bos_token_id if editor.tokenizer.bos_token_id is not None else editor.tokenizer.eos_token_id
    ids = torch.tensor([[bos]])

    def generate() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = editor.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=args.tokens, min_new_tokens=args.tokens, use_cache=True,
                                        pad_token_id=editor.tokenizer.eos_token_id)
        assert out.shape[1] == 1 + args.tokens
        return time.perf_counter() - t

    settings = ["unedited"] + [f"ireva_{n}" for n in args.neurons]
    times = {s: [] for s in settings}
    generate()  # warm-up
    for _ in range(args.rounds):
        for s in settings:
            if s == "unedited":   # the adaptor module taken out of the model, put back afterwards
                adaptor = editor.layout.eject(editor.layer, "mlp")
            else:
                cut(editor, int(s.split("_")[1]), full)
            times[s].append(generate())
            if s == "unedited":
                editor.layout.inject(editor.layer, "mlp", lambda mlp: adaptor)
    base = statistics.median(times["unedited"])
    rows = [{"setting": s, "neurons": 0 if s == "unedited" else int(s.split("_")[1]),
             "median_s": statistics.median(v), "min_s": min(v), "ratio": statistics.median(v) / base}
            for s, v in times.items()]
    lines = ["| setting | neurons | median s | min s | ratio to unedited |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['neurons']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['ratio']:.3f} |"
              for r in rows]
    md = "\n".join(lines)
    print(md)
    print(f"inserting {pairs} neurons ({len(requests)} requests, no retrofitting): {insert_s:.1f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows, "times": times,
                                                        "insert_s": insert_s}, indent=2))
        out.with_suffix(".md").write_text(f"`{' '.join(sys.argv)}`\n\n{md}\n\ninsert: {insert_s:.1f} s\n")


if __name__ == "__main__":
    main()
