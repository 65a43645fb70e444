"""Editing metrics as torchmetrics, exact under DDP.

Every per-prompt quantity is averaged per case (the prompts of one edit request), then over cases;
the states are the sum over cases and the number of cases, both summed across ranks. Cases are never
split across batches or ranks, so the grouping happens inside `update`.

The papers use the same words for different things (../shared/METHODS.md §7), so every number is
reported under its own name (`DEFINITIONS`) and the headline `reliability` / `generality` /
`locality` name the underlying metric they take for the benchmark's style.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import Metric

KINDS = ("rewrite", "paraphrase", "neighborhood", "locality")
WIN_KINDS = ("rewrite", "paraphrase", "neighborhood")
UNCHANGED_KINDS = ("neighborhood", "locality")

DEFINITIONS: dict[str, str] = {
    "rewrite_acc": "teacher-forced token accuracy of target_new on the edit prompt (zsRE ES; EasyEdit reliability)",
    "paraphrase_acc": "teacher-forced token accuracy of target_new on paraphrases (zsRE PS; EasyEdit generality)",
    "neighborhood_acc": "teacher-forced token accuracy of target_true on neighbourhood prompts",
    "locality_acc": "teacher-forced token accuracy of the locality answer (zsRE NS of MEMIT/JEEP/iReVa)",
    "rewrite_win": "share of edit prompts where target_new's mean token log-prob beats target_true's (COUNTERFACT efficacy score)",
    "paraphrase_win": "share of paraphrases where target_new beats target_true (COUNTERFACT paraphrase score)",
    "neighborhood_win": "share of neighbourhood prompts where target_true beats target_new (COUNTERFACT neighbourhood score)",
    "neighborhood_unchanged": "share of teacher-forced argmax tokens on neighbourhood prompts unchanged against the unedited model",
    "locality_unchanged": "share of teacher-forced argmax tokens on the locality prompt unchanged against the unedited model (EasyEdit/COMEBA-HK locality)",
    "fluency": "ROME's generation entropy: weighted mean of 2- and 3-gram entropies (weights 2/3, 4/3, bits) of generations (not a percentage)",
    "reliability": "headline reliability (see headline_definitions for the metric it takes)",
    "generality": "headline generality (see headline_definitions)",
    "locality": "headline locality (see headline_definitions)",
    "score": "harmonic mean of reliability, generality and locality (JEEP, AdaPLE, iReVa published version)",
    "score_mean": "arithmetic mean of reliability, generality and locality (iReVa draft and code, COMEBA-HK)",
}

HEADLINES = {
    "counterfact": {"reliability": "rewrite_win", "generality": "paraphrase_win", "locality": "neighborhood_win"},
    "zsre": {"reliability": "rewrite_acc", "generality": "paraphrase_acc", "locality": "locality_unchanged"},
}


def headline_definitions(style: str) -> dict[str, str]:
    """Which underlying metric each headline key uses for a benchmark style."""
    if style not in HEADLINES:
        raise ValueError(f"unknown style {style!r}; expected one of {sorted(HEADLINES)}")
    return dict(HEADLINES[style])


@dataclass
class PromptStats:
    """One batch of N scored prompts (T = longest target in tokens)."""

    kinds: list[str]
    groups: torch.Tensor            # [N] case index of each prompt
    correct: torch.Tensor           # [N, T] teacher-forced argmax == target token
    mask: torch.Tensor              # [N, T] valid target positions
    target_logprob: torch.Tensor    # [N] mean per-token log-prob of the target
    contrast_logprob: torch.Tensor  # [N] same for the contrast answer, NaN where none
    pred: torch.Tensor              # [N, T] argmax ids at the target positions, edited model
    base_pred: torch.Tensor | None = None  # [N, T] same with the edit disabled

    def select(self, rows: torch.Tensor) -> "PromptStats":
        take = lambda t: None if t is None else t[rows.to(t.device)]
        idx = rows.tolist()
        return PromptStats([self.kinds[i] for i in idx], take(self.groups), take(self.correct), take(self.mask),
                           take(self.target_logprob), take(self.contrast_logprob), take(self.pred),
                           take(self.base_pred))


class GroupedMean(Metric):
    """Mean over cases of the mean over each case's prompts of a per-prompt value."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update_values(self, values: torch.Tensor, groups: torch.Tensor) -> None:
        values = values.to(self.total.device, torch.float64)
        groups = groups.to(self.total.device)
        keep = ~torch.isnan(values)
        values, groups = values[keep], groups[keep]
        if values.numel() == 0:
            return
        uniq, inverse = torch.unique(groups, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
        counts = torch.zeros(len(uniq), dtype=torch.float64, device=values.device).index_add_(
            0, inverse, torch.ones_like(values))
        self.total += (sums / counts).sum()
        self.cases += len(uniq)

    def compute(self) -> torch.Tensor:
        if self.cases == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.cases


class TokenAccuracy(GroupedMean):
    """Per prompt: share of target tokens predicted by argmax under teacher forcing."""

    def update(self, correct: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> None:
        mask = mask.bool()
        n = mask.sum(1)
        per_prompt = (correct.bool() & mask).sum(1).double() / n.clamp(min=1)
        per_prompt[n == 0] = float("nan")
        self.update_values(per_prompt, groups)


class ProbabilityWin(GroupedMean):
    """Per prompt: 1 if the target's mean token log-prob beats the contrast's (NaN contrast: skipped)."""

    def update(self, target_logprob: torch.Tensor, contrast_logprob: torch.Tensor, groups: torch.Tensor) -> None:
        win = (target_logprob > contrast_logprob).double()
        win[torch.isnan(contrast_logprob) | torch.isnan(target_logprob)] = float("nan")
        self.update_values(win, groups)


class UnchangedPrediction(GroupedMean):
    """Per prompt: share of target positions whose argmax equals the unedited model's."""

    def update(self, pred: torch.Tensor, base_pred: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> None:
        mask = mask.bool()
        n = mask.sum(1)
        same = ((pred == base_pred.to(pred.device)) & mask).sum(1).double() / n.clamp(min=1)
        same[n == 0] = float("nan")
        self.update_values(same, groups)


def ngram_entropy(tokens: list, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: weighted mean of its n-gram entropies (bits)."""
    ents = []
    for n in ns:
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        ents.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(w * e for w, e in zip(weights, ents)) / sum(weights)


class NgramEntropy(Metric):
    """Mean ROME fluency over generated texts (token-id lists, or strings split on whitespace)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: list) -> None:
        for t in texts:
            self.total += ngram_entropy(t.split() if isinstance(t, str) else list(t))
            self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def harmonic_mean(values) -> float:
    values = [float(v) for v in values]
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def arithmetic_mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


class EditMetrics(nn.Module):
    """All metrics of one evaluation, routed by prompt kind; `compute()` gives percentages."""

    def __init__(self, style: str = "counterfact"):
        super().__init__()
        self.style = style
        self.headlines = headline_definitions(style)
        m: dict[str, Metric] = {f"{k}_acc": TokenAccuracy() for k in KINDS}
        m.update({f"{k}_win": ProbabilityWin() for k in WIN_KINDS})
        m.update({f"{k}_unchanged": UnchangedPrediction() for k in UNCHANGED_KINDS})
        m["fluency"] = NgramEntropy()
        self.metrics = nn.ModuleDict(m)

    def update(self, stats: PromptStats) -> None:
        kinds = list(stats.kinds)
        for kind in KINDS:
            rows = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
            if rows.numel() == 0:
                continue
            s = stats.select(rows)
            self.metrics[f"{kind}_acc"].update(s.correct, s.mask, s.groups)
            if kind in WIN_KINDS:
                self.metrics[f"{kind}_win"].update(s.target_logprob, s.contrast_logprob, s.groups)
            if kind in UNCHANGED_KINDS and s.base_pred is not None:
                self.metrics[f"{kind}_unchanged"].update(s.pred, s.base_pred, s.mask, s.groups)

    def update_fluency(self, texts: list) -> None:
        self.metrics["fluency"].update(texts)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if not metric.update_called:
                value = float(metric.compute()) if _synced_has_data(metric) else float("nan")
            else:
                value = float(metric.compute())
            if not math.isnan(value):
                out[name] = value if name == "fluency" else 100.0 * value
        for head, source in self.headlines.items():
            if source in out:
                out[head] = out[source]
            elif head == "locality" and source == "locality_unchanged" and "neighborhood_unchanged" in out:
                out[head] = out["neighborhood_unchanged"]
        heads = [out[h] for h in ("reliability", "generality", "locality") if h in out]
        if len(heads) == 3:
            out["score"] = harmonic_mean(heads)
            out["score_mean"] = arithmetic_mean(heads)
        return out

    def definitions(self) -> dict[str, str]:
        """Every reported key's definition, with the headline mapping of this style."""
        d = dict(DEFINITIONS)
        for head, source in self.headlines.items():
            d[head] = f"= {source}: {DEFINITIONS[source]}"
        return d

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def _synced_has_data(metric: Metric) -> bool:
    """Under DDP a rank may have no prompts of a kind while others do: compute() still syncs."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
