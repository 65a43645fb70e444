"""Scoring an editor: teacher-forced prompt statistics, greedy generation, the metric updates of one
evaluation, and the Lightning `Callback` that writes results.json and prints the table.

The editor supplies only what its edit changes about a forward: `editor.logits_at(ids, mask,
positions, **scoring)` (the LM head at the scored positions, with the edit acting; iReVa places its
adaptor there) and `editor.disabled()` (the unedited model). Everything else lives here, so editors
never read the trainer or the DataModule; the callback reads both.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from editing.data.records import EvalCase
from editing.io import write_json_atomic, write_text_atomic
from editing.definitions import GEN_HEADLINE_KEYS, HEADLINE_KEYS
from editing.metrics import EditMetrics, PromptStats, prompt_values
from editing.tokens import encode, join
from editing.drift import DRIFT_LENGTH, drift_texts, perplexity, unedited_perplexity  # noqa: F401
from editing.generation import (HIT_KINDS, generate, generate_ids, generation_values,  # noqa: F401
                                normalize_answer, starts_with_answer)

UNCHANGED_KINDS = ("neighborhood", "locality")


def cases_path(results: str | Path) -> Path:
    """The per-case file beside a results file: cases.jsonl beside results.json, else <stem>.cases.jsonl."""
    results = Path(results)
    return results.with_name("cases.jsonl" if results.name == "results.json" else f"{results.stem}.cases.jsonl")


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


def _stats(kinds: list[str], groups: list[torch.Tensor], parts: list[dict], base_pred: list[torch.Tensor],
           back: torch.Tensor) -> PromptStats:
    """The chunks' statistics joined, row i of the result being row back[i] of the chunks'."""
    T = max(p["correct"].shape[1] for p in parts)
    cat = lambda key: torch.cat([_pad(p[key], T) for p in parts])[back]
    return PromptStats(kinds=[kinds[i] for i in back.tolist()], groups=torch.cat(groups)[back], correct=cat("correct"),
                       mask=cat("mask"), target_logprob=torch.cat([p["target_logprob"] for p in parts])[back],
                       contrast_logprob=torch.cat([p["contrast_logprob"] for p in parts])[back], pred=cat("pred"),
                       base_pred=torch.cat([_pad(b, T) for b in base_pred])[back])


@torch.no_grad()
def score_prompts(editor, cases: list[EvalCase], batch_size: int = 64, unedited: bool = False):
    """Teacher-forced statistics of every prompt of every case (see `editing.metrics`): one forward per
    chunk for targets and contrasts together, and the unedited model's predictions where locality is
    measured. With `unedited`, also the same statistics of the unedited model on the same prompts
    (returned second; its locality forward is the one the edited statistics compare against, and an
    editor holding no edit reuses its own), for the console's edited-versus-unedited table."""
    items = [(c.index, p) for c in cases for p in c.prompts]
    # Chunks of similar token length, so little is spent on padding (32 shipped counterfactual cases
    # at a time: 1.17x the real tokens instead of 1.75x); the statistics come back in case order.
    ids = editor.tokenizer([join(p.prompt, p.target) for _, p in items] +
                           [join(p.prompt, p.contrast or "") for _, p in items])["input_ids"]
    n_items = len(items)
    order = sorted(range(n_items), key=lambda i: max(len(ids[i]), len(ids[n_items + i])))
    items = [items[i] for i in order]
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
            bp[rows] = _pad(ref["pred"], T)   # its own longest target may be shorter than the chunk's
        base_pred.append(bp)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    stats = _stats(kinds, groups, edited, base_pred, back)
    if not unedited:
        return stats
    return stats, _stats(kinds, groups, base, base_pred, back)


class Evaluation:
    """One evaluation of one editor: the metrics of a style, updated case batch by case batch; with
    `unedited`, also the unedited model's metrics on the same cases (`compute_unedited`). With the
    editor's `gen_eval`, generation-based scores beside the teacher-forced ones; with `drift`, the
    perplexity ratio on held-out text; every case's prompts and scores in `cases` (cases.jsonl)."""

    def __init__(self, editor, style: str = "counterfact", unedited: bool = False):
        self.editor = editor
        self.metrics = EditMetrics(style).to(editor.device)
        self.unedited = EditMetrics(style).to(editor.device) if unedited else None
        self.cases: list[dict] = []   # this rank's per-case records
        self.perplexity: dict | None = None   # the drift's perplexities, after compute()
        self.started = time.perf_counter()

    def update(self, cases: list[EvalCase]) -> None:
        ed, h = self.editor, self.editor.hparams
        if self.unedited is None:
            stats = score_prompts(ed, cases, h.forward_batch_size)
        else:
            stats, base = score_prompts(ed, cases, h.forward_batch_size, unedited=True)
            self.unedited.update(base)
        self.metrics.update(stats)
        gen = None
        if h.gen_eval:
            prompts = [p for c in cases for p in c.prompts]
            gen = generation_values(ed, prompts, h.gen_extra_tokens, h.forward_batch_size, self.unedited is not None)
            self.metrics.update_generation(stats.kinds, gen["value"], stats.groups)
            if self.unedited is not None:
                self.unedited.update_generation(stats.kinds, gen["unedited_value"], stats.groups)
        if h.fluency:
            prompts = [p for c in cases for p in c.request.generation_prompts]
            if prompts:
                texts = generate(ed, prompts, max_new_tokens=h.fluency_tokens)
                self.metrics.update_fluency([ed.tokenizer(t)["input_ids"] for t in texts])
        ed.update_extra_metrics(cases, self.metrics)
        self.cases += case_records(cases, stats, gen)

    def drift(self) -> dict:
        """{"ppl_ratio": edited / unedited perplexity on the drift texts} (1.0 without an edit), or {}.
        The unedited perplexity is cached on disk per base model and texts (it never changes)."""
        ed, h = self.editor, self.editor.hparams
        if not h.drift:
            return {}
        texts = drift_texts(h.drift_texts, h.drift_samples)
        base = unedited_perplexity(ed, texts)
        if not ed.edit_log:
            return {"ppl_ratio": 1.0, "ppl": base, "ppl_unedited": base}
        edited = perplexity(ed, texts, DRIFT_LENGTH, batch_size=max(1, h.forward_batch_size // 4))
        return {"ppl_ratio": edited / base, "ppl": edited, "ppl_unedited": base}

    def compute(self) -> dict:
        """Percentages (synchronised across ranks by torchmetrics: call on every rank), and the drift."""
        values = self.metrics.compute()
        drift = self.drift()
        if drift:
            values["ppl_ratio"] = drift["ppl_ratio"]
            self.perplexity = drift
        return values

    def compute_unedited(self) -> dict | None:
        """The unedited model's percentages on the same cases (a collective too), or None."""
        if self.unedited is None:
            return None
        values = self.unedited.compute()
        if self.editor.hparams.drift:
            values["ppl_ratio"] = 1.0
        return values

    def all_cases(self) -> list[dict]:
        """Every rank's case records, in case order (a collective under DDP: call on every rank)."""
        dist = torch.distributed
        records = self.cases
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return sorted(records, key=lambda r: r["case"])

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def case_records(cases: list[EvalCase], stats: PromptStats, gen: dict | None = None) -> list[dict]:
    """One JSON-ready record per case: its request, and per prompt its kind, text, target and every
    score (`editing.metrics.prompt_values`; "gen" and "generated" with generation-based scoring),
    with the case's mean of each score per kind in "scores" (the numbers the metrics average)."""
    values = prompt_values(stats)
    if gen is not None:
        values["gen"] = gen["value"]
    by_case: dict[int, list[int]] = {}
    for i, g in enumerate(stats.groups.tolist()):
        by_case.setdefault(g, []).append(i)
    prompts_of = {c.index: c.prompts for c in cases}
    out = []
    for c in cases:
        rows = by_case.get(c.index, [])
        r = c.request
        prompts, scores = [], {}
        for i, p in zip(rows, prompts_of[c.index]):
            entry = {"kind": p.kind, "prompt": p.prompt, "target": p.target}
            for name, v in values.items():
                x = float(v[i])
                if x == x:  # not NaN
                    entry[name] = x
                    scores.setdefault(f"{p.kind}_{name}", []).append(x)
            if gen is not None:
                entry["generated"] = gen["text"][i]
            prompts.append(entry)
        out.append({"case": c.index, "case_id": r.case_id, "subject": r.subject, "target_new": r.target_new,
                    "target_true": r.target_true, "prompts": prompts,
                    "scores": {k: 100.0 * sum(v) / len(v) for k, v in scores.items()}})
    return out


def intervals(records: list[dict], sources: dict[str, str], confidence: float = 0.95, n_resamples: int = 2000,
              seed: int = 0) -> dict:
    """Bootstrap confidence intervals over cases (`scipy.stats.bootstrap`, BCa) of each headline metric
    (`sources`: headline -> the metric it took, `EditMetrics.headline_sources`) from the per-case
    scores of `case_records`, and of "score" / "gen_score" (their harmonic mean, resampling cases
    paired). An interval of identical values is that value."""
    import numpy as np
    from scipy.stats import bootstrap

    def ci(samples, statistic, paired=False):
        samples = tuple(np.asarray(x, dtype=np.float64) for x in samples)
        if len(samples[0]) < 2:
            return None
        if all(np.ptp(x) == 0 for x in samples):
            v = float(statistic(*samples, axis=-1))
            return [v, v]
        with warnings.catch_warnings():  # BCa on few or nearly constant cases: NaN, reported as no interval
            warnings.simplefilter("ignore")
            res = bootstrap(samples, statistic, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                            paired=paired, vectorized=True, random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        return None if lo != lo or hi != hi else [lo, hi]

    def hmean(*xs, axis=-1):
        means = np.stack([np.mean(x, axis=axis) for x in xs])
        safe = np.where(means > 0, means, 1.0)
        return np.where((means > 0).all(0), len(xs) / (1.0 / safe).sum(0), 0.0)

    out: dict = {}
    for head, metric in sources.items():
        x = [r["scores"][metric] for r in records if metric in r["scores"]]
        got = ci([x], lambda a, axis=-1: np.mean(a, axis=axis))
        if got is not None:
            out[head] = got
    for score, heads in (("score", HEADLINE_KEYS), ("gen_score", GEN_HEADLINE_KEYS)):
        if not all(h in sources for h in heads):
            continue
        rows = [r for r in records if all(sources[h] in r["scores"] for h in heads)]
        got = ci([[r["scores"][sources[h]] for r in rows] for h in heads], hmean, paired=True)
        if got is not None:
            out[score] = got
    return {"confidence": confidence, "method": f"BCa bootstrap over cases, {n_resamples} resamples", **out}


def evaluate(editor, cases: list, style: str = "counterfact") -> dict:
    """Metrics (percentages) of the editor over the cases (EditRequests are turned into cases), with
    the editor's own derived scores (e.g. iReVa's ES/PS/NS)."""
    cases = [c if isinstance(c, EvalCase) else EvalCase.from_request(c, i) for i, c in enumerate(cases)]
    ev = Evaluation(editor, style)
    chunk = max(1, editor.hparams.forward_batch_size // 2)   # cases per update (sorted by length inside)
    for s in range(0, len(cases), chunk):
        ev.update(cases[s:s + chunk])
    values = ev.compute()
    return {**values, **editor.derived_scores(values)}


def report(editor, values: dict, eval_seconds: float, datamodule=None, world_size: int = 1,
           unedited: dict | None = None, intervals: dict | None = None) -> dict:
    """The results.json document of one evaluation (`unedited`: the unedited model's metrics on the
    same cases; `intervals`: bootstrap confidence intervals of the headline metrics)."""
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
        **({"intervals": intervals} if intervals else {}),
        **({"perplexity": editor.evaluation.perplexity} if editor.evaluation.perplexity else {}),
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
        records = ev.all_cases()                                      # collectives: every rank
        pl_module.log_dict({f"test/{k}": float(v) for k, v in values.items()}, rank_zero_only=True)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            cis = intervals(records, ev.metrics.headline_sources) if records else None
            doc = report(pl_module, values, seconds, trainer.datamodule, trainer.world_size, unedited, cis)
            path = run_dir / pl_module.hparams.results_name
            write_json_atomic(doc, path)
            write_text_atomic("".join(json.dumps(r) + "\n" for r in records), cases_path(path))
            from editing.report import summary_table
            print(summary_table(doc, verbose=pl_module.verbose_metrics))
            print(f"results: {path}")
