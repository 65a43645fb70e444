"""What a many-edit MEMIT step spends besides targets, keys and solves ("other" in scale.py), before
and after it was chunked, in one process on the same requests:

- the step checks' mean target log-probability (run before and after every step): one padded
  forward over all requests with a [n, T, V] log-softmax (before) against length-sorted forwards of
  `forward_batch_size` requests (`editing.editors.checks.target_logprob`);
- the current values z − h measured before each layer's solve (once per edited layer): one padded
  forward of whole rows (before) against rows cut after the subject in length-sorted chunks
  (`editing.editors.locate.current_values`).

    python benchmarks/step_overhead.py [--n 1000] [--threads 2] [--out benchmarks/results/step_overhead]
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import editor_from_config, report
from editing import hooks
from editing.data import load_benchmark
from editing.editors import checks
from editing.editors.locate import current_values
from editing.editors.locate.templates import fill
from editing.tokens import encode
from scale import consistent


def one_forward_logprob(editor, requests) -> float:
    """The step checks' number as it was computed: every request in one padded forward."""
    with torch.no_grad():
        lp, b = editor.target_logprobs([r.text for r in requests], [r.target_new for r in requests])
    tok = lp.gather(-1, b.target_ids[..., None]).squeeze(-1) * b.target_mask
    return float((tok.sum(1) / b.target_mask.sum(1).clamp(min=1)).mean())


@torch.no_grad()
def whole_row_values(editor, requests, layer: int) -> torch.Tensor:
    """The current values as they were computed: whole rows in one padded forward."""
    texts, spans = zip(*(fill("{}", r) for r in requests))
    b = encode(editor.tokenizer, list(texts), spans=list(spans))
    with hooks.capture({"v": editor.layout.block(layer)}, "output", positions=b.subject_last) as cap:
        hooks.run_until(editor.layout.backbone, editor.layout.block(layer), input_ids=b.input_ids,
                        attention_mask=b.attention_mask, use_cache=False)
    return cap["v"].float()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="shipped counterfactual requests that agree")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ed, _ = editor_from_config("memit", gen_eval=False, drift=False)
    requests = consistent(load_benchmark(kind="counterfactual").requests, args.n)
    top = ed.layers[-1]
    checks.target_logprob(ed, requests[:8])   # warm-up, so that neither path pays the first forward
    rows = []
    old_s, old = timed(lambda: one_forward_logprob(ed, requests))
    new_s, new = timed(lambda: checks.target_logprob(ed, requests))
    rows.append(("step checks: target log-probability (twice a step)", old_s, new_s, abs(old - new)))
    old_s, old = timed(lambda: whole_row_values(ed, requests, top))
    new_s, new = timed(lambda: current_values(ed.layout, ed.tokenizer, requests, "block", top))
    rel = float(((old - new).abs().max(1).values / old.norm(dim=1)).max())   # float32 noise: values' norms ≈ 160
    rows.append((f"current values at layer {top} (once per edited layer)", old_s, new_s, rel))
    lines = [f"{args.n} shipped counterfactual requests, smollm2-135m (configs/memit.yaml), "
             f"{args.threads or torch.get_num_threads()} thread(s)", "",
             "| what | one padded forward s | chunked s | speed-up | max difference (absolute; relative to each value's norm) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {what} | {a:.1f} | {b:.1f} | {a / b:.1f}x | {d:.1e} |" for what, a, b, d in rows]
    report(lines, args.out, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
