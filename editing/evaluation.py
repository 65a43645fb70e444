"""Scoring an editor: teacher-forced prompt statistics, greedy generation, the metric updates of one
evaluation, and the Lightning `Callback` that writes results.json and prints the table.

The editor supplies only what its edit changes about a forward: `editor.logits_at(ids, mask,
positions, **scoring)` (the LM head at the scored positions, with the edit acting; iReVa places its
adaptor there) and `editor.disabled()` (the unedited model). Everything else lives here, so editors
never read the trainer or the DataModule; the callback reads both.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from editing.data.records import EvalCase
from editing.io import write_json_atomic
from editing.metrics import EditMetrics, PromptStats
from editing.tokens import encode

UNCHANGED_KINDS = ("neighborhood", "locality")


def target_logprobs(editor, prompts: list[str], targets: list[str], **scoring) -> tuple[torch.Tensor, Any]:
    """Log-probabilities [B, T, V] at the target positions of prompt+target, and the batch."""
    batch = encode(editor.tokenizer, [editor.prepare_prompt(p) for p in prompts], targets).to(editor.device)
    logits = editor.logits_at(batch.input_ids, batch.attention_mask, batch.target_positions, **scoring)
    return F.log_softmax(logits.float(), dim=-1), batch


def _pad(x: torch.Tensor, T: int) -> torch.Tensor:
    """Right-pad dim 1 to T with zeros (False for bool), on the CPU."""
    x = x.cpu()
    if x.shape[1] >= T:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], T - x.shape[1]))], dim=1)


def _forward(editor, prompts: list[str], targets: list[str], contrasts: list[str | None]) -> dict:
    """One forward of prompt+target (and prompt+contrast where there is one): per prompt the
    teacher-forced hits, mask, mean target and contrast log-probs and argmax ids at the target."""
    with_contrast = [i for i, c in enumerate(contrasts) if c is not None]
    lp, batch = target_logprobs(editor, prompts + [prompts[i] for i in with_contrast],
                                targets + [contrasts[i] for i in with_contrast])
    n = len(prompts)
    tok_lp = lp.gather(-1, batch.target_ids[..., None]).squeeze(-1) * batch.target_mask
    mean_lp = tok_lp.sum(1) / batch.target_mask.sum(1).clamp(min=1)
    argmax = lp.argmax(-1)
    c_lp = torch.full((n,), float("nan"), device=lp.device)
    if with_contrast:
        c_lp[torch.tensor(with_contrast, device=lp.device)] = mean_lp[n:]
    T = batch.target_ids.shape[1]
    return {"correct": _pad(argmax[:n] == batch.target_ids[:n], T), "mask": _pad(batch.target_mask[:n], T),
            "target_logprob": mean_lp[:n].cpu(), "contrast_logprob": c_lp.cpu(), "pred": _pad(argmax[:n], T)}


def _stats(kinds: list[str], groups: list[torch.Tensor], parts: list[dict], base_pred: list[torch.Tensor]) -> PromptStats:
    T = max(p["correct"].shape[1] for p in parts)
    cat = lambda key: torch.cat([_pad(p[key], T) for p in parts])
    return PromptStats(kinds=kinds, groups=torch.cat(groups), correct=cat("correct"), mask=cat("mask"),
                       target_logprob=torch.cat([p["target_logprob"] for p in parts]),
                       contrast_logprob=torch.cat([p["contrast_logprob"] for p in parts]), pred=cat("pred"),
                       base_pred=torch.cat([_pad(b, T) for b in base_pred]))


@torch.no_grad()
def score_prompts(editor, cases: list[EvalCase], batch_size: int = 64, unedited: bool = False):
    """Teacher-forced statistics of every prompt of every case (see `editing.metrics`): one forward per
    chunk for targets and contrasts together, and the unedited model's predictions where locality is
    measured. With `unedited`, also the same statistics of the unedited model on the same prompts
    (returned second; its locality forward is the one the edited statistics compare against, and an
    editor holding no edit reuses its own), for the console's edited-versus-unedited table."""
    items = [(c.index, p) for c in cases for p in c.prompts]
    chunk = max(1, batch_size)
    no_edit = not editor.edit_log
    kinds, groups, edited, base, base_pred = [], [], [], [], []
    for s in range(0, len(items), chunk):
        part = items[s:s + chunk]
        prompts, targets = [p.prompt for _, p in part], [p.target for _, p in part]
        contrasts = [p.contrast for _, p in part]
        out = _forward(editor, prompts, targets, contrasts)
        n, T = len(part), out["correct"].shape[1]
        kinds += [p.kind for _, p in part]
        groups.append(torch.tensor([g for g, _ in part]))
        edited.append(out)
        rows = [i for i, (_, p) in enumerate(part) if p.kind in UNCHANGED_KINDS]
        bp = torch.full((n, T), -1, dtype=torch.long)
        if unedited:
            if no_edit:
                ref = out
            else:
                with editor.disabled():
                    ref = _forward(editor, prompts, targets, contrasts)
            base.append(ref)
            bp[rows] = ref["pred"][rows]
        elif rows:
            with editor.disabled():
                ref = _forward(editor, [prompts[i] for i in rows], [targets[i] for i in rows], [None] * len(rows))
            bp[rows] = ref["pred"]
        base_pred.append(bp)
    stats = _stats(kinds, groups, edited, base_pred)
    if not unedited:
        return stats
    return stats, _stats(kinds, groups, base, base_pred)


@torch.no_grad()
def generate(editor, prompts: list[str], max_new_tokens: int = 30, **kwargs) -> list[str]:
    """Greedy continuations of the prompts by the edited model (left-padded, one batch)."""
    tok = editor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([editor.prepare_prompt(p) for p in prompts], return_tensors="pt", padding=True).to(editor.device)
    finally:
        tok.padding_side = side
    kwargs.setdefault("do_sample", False)
    out = editor.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def perplexity(editor, texts: list[str], max_length: int = 128, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) of the edited model over `texts` (each truncated to `max_length`
    tokens; the LM head through `editor.logits_at`, so the edit acts as when scoring)."""
    tok = editor.tokenizer
    enc = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    side, tok.padding_side = tok.padding_side, "right"
    nll, count = 0.0, 0
    try:
        for s in range(0, len(order), batch_size):
            batch = tok.pad({"input_ids": [enc[i] for i in order[s:s + batch_size]]}, return_tensors="pt").to(editor.device)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            positions = torch.arange(ids.shape[1] - 1, device=ids.device).expand(ids.shape[0], -1)
            logp = F.log_softmax(editor.logits_at(ids, mask, positions).float(), -1)
            m = mask[:, 1:].bool()
            nll -= float(logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[m].sum())
            count += int(m.sum())
    finally:
        tok.padding_side = side
    return float(torch.tensor(nll / max(count, 1)).exp())


class Evaluation:
    """One evaluation of one editor: the metrics of a style, updated case batch by case batch; with
    `unedited`, also the unedited model's metrics on the same cases (`compute_unedited`)."""

    def __init__(self, editor, style: str = "counterfact", unedited: bool = False):
        self.editor = editor
        self.metrics = EditMetrics(style).to(editor.device)
        self.unedited = EditMetrics(style).to(editor.device) if unedited else None
        self.started = time.perf_counter()

    def update(self, cases: list[EvalCase]) -> None:
        ed, h = self.editor, self.editor.hparams
        if self.unedited is None:
            self.metrics.update(score_prompts(ed, cases, h.forward_batch_size))
        else:
            stats, base = score_prompts(ed, cases, h.forward_batch_size, unedited=True)
            self.metrics.update(stats)
            self.unedited.update(base)
        if h.fluency:
            prompts = [p for c in cases for p in c.request.generation_prompts]
            if prompts:
                texts = generate(ed, prompts, max_new_tokens=h.fluency_tokens)
                self.metrics.update_fluency([ed.tokenizer(t)["input_ids"] for t in texts])
        ed.update_extra_metrics(cases, self.metrics)

    def compute(self) -> dict:
        """Percentages (synchronised across ranks by torchmetrics: call on every rank)."""
        return self.metrics.compute()

    def compute_unedited(self) -> dict | None:
        """The unedited model's percentages on the same cases (a collective too), or None."""
        return None if self.unedited is None else self.unedited.compute()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def evaluate(editor, cases: list, style: str = "counterfact") -> dict:
    """Metrics (percentages) of the editor over the cases (EditRequests are turned into cases), with
    the editor's own derived scores (e.g. iReVa's ES/PS/NS)."""
    cases = [c if isinstance(c, EvalCase) else EvalCase.from_request(c, i) for i, c in enumerate(cases)]
    ev = Evaluation(editor, style)
    chunk = max(1, editor.hparams.forward_batch_size // 8)
    for s in range(0, len(cases), chunk):
        ev.update(cases[s:s + chunk])
    values = ev.compute()
    return {**values, **editor.derived_scores(values)}


def report(editor, values: dict, eval_seconds: float, datamodule=None, world_size: int = 1,
           unedited: dict | None = None) -> dict:
    """The results.json document of one evaluation (`unedited`: the unedited model's metrics on the
    same cases)."""
    dm = datamodule
    edited = sum(len(e["cases"]) for e in editor.edit_log)
    return {
        "method": editor.method,
        "model": editor.hparams.base_model,
        "data": dm.description if dm is not None else None,
        "num_edits": edited if edited else (dm.num_selected if dm is not None else 0),
        "edit_file": editor.edit_file,
        "edit_batch_size": dm.hparams.edit_batch_size if dm is not None else None,
        "timing": {"edit": float(sum(e["seconds"] for e in editor.edit_log)), "evaluate": eval_seconds},
        "metrics": values,
        **({"unedited": unedited} if unedited is not None else {}),
        "style": editor.evaluation.metrics.style,
        "definitions": editor.evaluation.metrics.definitions(),
        "config": {"model": dict(editor.hparams), "data": dict(dm.hparams) if dm is not None else None},
        "world_size": world_size,
        **editor.report_extras(values),
    }


class EvaluationReport(pl.Callback):
    """Runs the evaluation of `trainer.test`: sets up the editor's `Evaluation` with the DataModule's
    style (and the unedited model's scores on the same cases, `eval_unedited`), logs the metrics,
    writes <run dir>/<results_name> atomically and prints the compact table (`editing.report.
    summary_table`; every metric when the editor's `verbose_metrics` is set)."""

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        dm = trainer.datamodule
        pl_module.evaluation = Evaluation(pl_module, dm.style if dm is not None else "counterfact",
                                          unedited=pl_module.hparams.eval_unedited)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        ev = pl_module.evaluation
        values = ev.compute()
        unedited = ev.compute_unedited()
        seconds = ev.seconds
        pl_module.log_dict({f"test/{k}": float(v) for k, v in values.items()}, rank_zero_only=True)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank
        if trainer.is_global_zero:
            doc = report(pl_module, values, seconds, trainer.datamodule, trainer.world_size, unedited)
            path = run_dir / pl_module.hparams.results_name
            write_json_atomic(doc, path)
            from editing.report import summary_table
            print(summary_table(doc, verbose=pl_module.verbose_metrics))
            print(f"results: {path}")
