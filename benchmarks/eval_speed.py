"""Teacher-forced evaluation against the physical floor, in one process on the same cases.

The editor is configs/ft.yaml's FT after one edit (so the unedited model runs where locality is
measured, as for every real edit). Timed, in this order:

- floor: the forwards evaluation cannot avoid, as bare batched forwards over the same token
  sequences sorted by token length, as many rows per forward as evaluation runs: the edited model over every prompt + target and
  prompt + contrast, the unedited model over the prompts whose predictions must stay unchanged, the
  LM head at the target positions only;
- evaluation: `editing.evaluation.score_prompts` (tokenisation, the same forwards, statistics) and
  the metrics computed from it (`EditMetrics`).

Generation-based scores and the perplexity drift are further measurements (greedy decoding, held-out
text) and are timed apart.

    python benchmarks/eval_speed.py [--n 1000] [--batch 64] [--threads 2] [--out benchmarks/results/eval_speed]
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import editor_from_config, report
from editing import hooks
from editing.data import EvalCase, load_benchmark
from editing.evaluation import Evaluation, score_prompts
from editing.metrics import UNCHANGED_KINDS
from editing.tokens import encode, join


@torch.no_grad()
def floor(editor, cases: list[EvalCase], batch: int) -> tuple[float, int]:
    """Seconds of the bare forwards and the number of real tokens they ran."""
    prompts = [p for c in cases for p in c.prompts]
    edited = [(p.prompt, p.target) for p in prompts] + [(p.prompt, p.contrast) for p in prompts if p.contrast]
    unedited = [(p.prompt, p.target) for p in prompts if p.kind in UNCHANGED_KINDS]
    batches = []
    # sorted by token length; as many rows per forward as evaluation runs (a chunk's prompts and
    # their contrasts together; the unedited model over the chunk's locality prompts alone)
    for pairs, rows in ((edited, 2 * batch), (unedited, batch)):
        ids = editor.tokenizer([join(editor.prepare_prompt(a), b) for a, b in pairs])["input_ids"]
        pairs = [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: len(ids[i]))]
        batches.append([encode(editor.tokenizer, [editor.prepare_prompt(a) for a, _ in pairs[i:i + rows]],
                               [b for _, b in pairs[i:i + rows]]) for i in range(0, len(pairs), rows)])
    lay = editor.layout
    tokens = sum(int(b.attention_mask.sum()) for bs in batches for b in bs)
    t0 = time.perf_counter()
    for b in batches[0]:
        hidden = lay.backbone(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)[0]
        lay.lm_head(hooks.gather_at(hidden, b.target_positions))
    with editor.disabled():
        for b in batches[1]:
            hidden = lay.backbone(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)[0]
            lay.lm_head(hooks.gather_at(hidden, b.target_positions))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="evaluation cases (shipped counterfactual requests)")
    ap.add_argument("--batch", type=int, default=64, help="forward_batch_size")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generation", action="store_true", help="also time generation-based scoring and the drift")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    editor, _ = editor_from_config("ft", steps=5)
    requests = load_benchmark(kind="counterfactual").requests
    editor.edit(requests[:1])
    editor.hparams.forward_batch_size = args.batch
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests[: args.n])]
    n_prompts = sum(len(c.prompts) for c in cases)
    floor_runs, eval_runs = [], []
    for _ in range(args.rounds):   # interleaved; the fastest of each (other load on the machine varies)
        floor_s, tokens = floor(editor, cases, args.batch)
        floor_runs.append(floor_s)
        t0 = time.perf_counter()
        stats = score_prompts(editor, cases, args.batch)
        ev = Evaluation(editor, "counterfact")
        ev.metrics.update(stats)
        values = ev.metrics.compute()
        eval_runs.append(time.perf_counter() - t0)
    floor_s, eval_s = min(floor_runs), min(eval_runs)
    lines = [f"Teacher-forced evaluation, smollm2-135m after one FT edit, {args.n} counterfactual cases "
             f"({n_prompts} prompts, {tokens} real tokens in the forwards), chunks of {args.batch}, "
             f"{torch.get_num_threads()} thread(s), fastest of {args.rounds} interleaved rounds", "",
             "| what | s | ratio to the floor |", "|---|---:|---:|",
             f"| floor: bare forwards over the same sequences | {floor_s:.1f} | 1.00 |",
             f"| evaluation: score_prompts + metrics | {eval_s:.1f} | {eval_s / floor_s:.2f} |"]
    extra = {}
    if args.generation:
        editor.hparams.gen_eval, editor.hparams.drift = True, True
        t0 = time.perf_counter()
        full = Evaluation(editor, "counterfact")
        full.update(cases)
        full.compute()
        extra["full_evaluation_s"] = time.perf_counter() - t0
        lines.append(f"| whole evaluation (teacher-forced, generated, drift) | {extra['full_evaluation_s']:.1f} | "
                     f"{extra['full_evaluation_s'] / floor_s:.2f} |")
    lines += ["", f"reliability {values['rewrite_acc']:.1f}, locality (unchanged) {values['neighborhood_unchanged']:.1f}"]
    report(lines, args.out, dict(args=vars(args), prompts=n_prompts, tokens=tokens, floor_s=floor_s,
                                 eval_s=eval_s, floor_runs=floor_runs, eval_runs=eval_runs, **extra))


if __name__ == "__main__":
    main()
