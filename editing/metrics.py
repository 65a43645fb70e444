"""Editing metrics as torchmetrics, exact under DDP.

Every per-prompt quantity is averaged per case (the prompts of one edit request), then over cases;
the only states are the sum over cases of the per-case means and the number of cases, both summed
across ranks (``dist_reduce_fx="sum"``), so the synchronised result equals a single process. Cases are
never split across batches or ranks, so the per-case grouping happens inside ``update``.

What each number means lives in `editing.definitions` (every key's definition, the headline metric
each benchmark style takes); this module computes them.

Percentages are 0–100 in `EditMetrics.compute`; the metric classes themselves return fractions 0–1
(NaN when they have no data).
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric

from editing.definitions import (DEFINITIONS, GEN_HEADLINE_KEYS, HEADLINE_FALLBACKS,  # noqa: F401
                                 HEADLINE_KEYS, HEADLINES, WITHDRAWAL_KEYS, headline_definitions)

KINDS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood", "locality", "portability")
WIN_KINDS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood")
UNCHANGED_KINDS: tuple[str, ...] = ("neighborhood", "locality")


@dataclass
class PromptStats:
    """One batch of N scored prompts (T = longest target in tokens).

    ``groups`` holds the case index of each prompt; a case's prompts are all in one batch.
    ``base_pred`` entries below 0 mean "not computed" and are left out of `UnchangedPrediction`.
    """

    kinds: list[str]
    groups: torch.Tensor            # [N] long: case index of each prompt
    correct: torch.Tensor           # [N, T] bool: teacher-forced argmax == target token
    mask: torch.Tensor              # [N, T] bool: valid target positions
    target_logprob: torch.Tensor    # [N] float: mean per-token log-prob of the target
    contrast_logprob: torch.Tensor  # [N] float: same for the contrast answer, NaN where none
    pred: torch.Tensor              # [N, T] long: argmax ids at the target positions, edited model
    base_pred: torch.Tensor | None = None  # [N, T] long: same with the edit disabled

    def __len__(self) -> int:
        return len(self.kinds)

    def validate(self) -> "PromptStats":
        n = len(self.kinds)
        checks = {"groups": (self.groups, 1), "target_logprob": (self.target_logprob, 1),
                  "contrast_logprob": (self.contrast_logprob, 1), "correct": (self.correct, 2),
                  "mask": (self.mask, 2), "pred": (self.pred, 2)}
        if self.base_pred is not None:
            checks["base_pred"] = (self.base_pred, 2)
        for name, (t, dim) in checks.items():
            if t.dim() != dim or t.shape[0] != n:
                raise ValueError(f"PromptStats.{name}: expected {dim} dims and {n} rows, got shape {tuple(t.shape)}")
        for name in ("correct", "pred", "base_pred"):
            t = getattr(self, name)
            if t is not None and t.shape != self.mask.shape:
                raise ValueError(f"PromptStats.{name}: shape {tuple(t.shape)} differs from mask {tuple(self.mask.shape)}")
        return self

    def select(self, rows: torch.Tensor) -> "PromptStats":
        """The prompts at `rows` (a LongTensor of indices)."""
        def take(t):
            return None if t is None else t[rows.to(t.device)]
        return PromptStats([self.kinds[i] for i in rows.tolist()], take(self.groups), take(self.correct),
                           take(self.mask), take(self.target_logprob), take(self.contrast_logprob),
                           take(self.pred), take(self.base_pred))


class Float64Mean(MeanMetric):
    """`MeanMetric` in float64 that stays float64: torchmetrics resets the dtype its `update` casts
    inputs to whenever the metric is moved (`.to(device)`), so it is restored here."""

    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(nan_strategy="disable", **kwargs)
        self.set_dtype(torch.float64)

    def _apply(self, fn, exclude_state=""):
        this = super()._apply(fn, exclude_state)
        this._dtype = this.mean_value.dtype
        return this


class GroupedMean(Float64Mean):
    """Mean over cases of the mean over each case's prompts of a per-prompt value: a `MeanMetric`
    (float64, summed across ranks) updated with one per-case mean per case.

    ``update(values, groups)``: values [N] (NaN = prompt not counted), groups [N] case indices.
    A case none of whose prompts counts is not counted either; ``cases`` is the number counted.
    """

    @property
    def cases(self) -> torch.Tensor:
        return self.weight

    def update(self, values: torch.Tensor, groups: torch.Tensor) -> None:
        self._accumulate(values, groups)

    def _accumulate(self, values: torch.Tensor, groups: torch.Tensor) -> None:
        device = self.mean_value.device
        values = values.detach().to(device=device, dtype=torch.float64).reshape(-1)
        groups = groups.detach().to(device).reshape(-1)
        if values.shape != groups.shape:
            raise ValueError(f"{type(self).__name__}: {values.numel()} values but {groups.numel()} group ids")
        keep = ~torch.isnan(values)
        values, groups = values[keep], groups[keep]
        if values.numel() == 0:
            return
        uniq, inverse = torch.unique(groups, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=device).index_add_(0, inverse, values)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64, device=device).index_add_(
            0, inverse, torch.ones_like(values))
        super().update(sums / counts)


def _masked_share(hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: share of masked positions that hit; NaN for rows with no masked position."""
    n = mask.sum(1)
    share = (hits & mask).sum(1).to(torch.float64) / n.clamp(min=1)
    return share.masked_fill(n == 0, float("nan"))


def token_accuracy(correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] per prompt: share of target tokens that are the teacher-forced argmax (NaN: no tokens)."""
    return _masked_share(correct.bool(), mask.bool())


def probability_win(target_logprob: torch.Tensor, contrast_logprob: torch.Tensor) -> torch.Tensor:
    """[N] per prompt: 1 if the target's mean token log-prob beats the contrast's (ties lose), NaN
    where either is NaN."""
    tgt, con = target_logprob.to(torch.float64), contrast_logprob.to(torch.float64)
    return (tgt > con).to(torch.float64).masked_fill(torch.isnan(tgt) | torch.isnan(con), float("nan"))


def unchanged_prediction(pred: torch.Tensor, base_pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] per prompt: share of target positions whose edited argmax equals the unedited model's
    (positions with base_pred < 0 left out; NaN: none left)."""
    return _masked_share(pred == base_pred, mask.bool() & (base_pred >= 0))


def prompt_values(stats: "PromptStats") -> dict[str, torch.Tensor]:
    """The per-prompt values [N] the grouped metrics average (NaN where a value does not apply):
    "acc", "win" (rewrite, paraphrase, neighbourhood) and "unchanged" (neighbourhood, locality)."""
    kinds = stats.kinds
    nan = torch.full((len(kinds),), float("nan"), dtype=torch.float64)
    win = probability_win(stats.target_logprob.cpu(), stats.contrast_logprob.cpu())
    win = torch.where(torch.tensor([k in WIN_KINDS for k in kinds]), win, nan)
    unchanged = nan.clone()
    if stats.base_pred is not None:
        rows = torch.tensor([k in UNCHANGED_KINDS for k in kinds])
        unchanged = torch.where(rows, unchanged_prediction(stats.pred.cpu(), stats.base_pred.cpu(), stats.mask.cpu()), nan)
    return {"acc": token_accuracy(stats.correct.cpu(), stats.mask.cpu()), "win": win, "unchanged": unchanged}


class TokenAccuracy(GroupedMean):
    """Per prompt: share of target tokens that are the teacher-forced argmax (prompts without tokens: skipped)."""

    def update(self, correct: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> None:
        device = self.mean_value.device
        self._accumulate(token_accuracy(correct.detach().to(device), mask.detach().to(device)), groups)


class ProbabilityWin(GroupedMean):
    """Per prompt: 1 if the target's mean token log-prob beats the contrast's, else 0 (ties lose).

    Prompts whose contrast (or target) log-prob is NaN are skipped.
    """

    def update(self, target_logprob: torch.Tensor, contrast_logprob: torch.Tensor, groups: torch.Tensor) -> None:
        device = self.mean_value.device
        self._accumulate(probability_win(target_logprob.detach().to(device), contrast_logprob.detach().to(device)),
                         groups)


class UnchangedPrediction(GroupedMean):
    """Per prompt: share of target positions whose edited argmax equals the unedited model's.

    Positions where ``base_pred`` < 0 ("not computed") are left out; a prompt with none left is skipped.
    """

    def update(self, pred: torch.Tensor, base_pred: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> None:
        device = self.mean_value.device
        self._accumulate(unchanged_prediction(pred.detach().to(device), base_pred.detach().to(device),
                                              mask.detach().to(device)), groups)


def ngram_entropy(tokens: Sequence, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text (``compute_n_gram_entropy``): the mean over n of weight_n · H_n, with
    H_n the entropy in bits of the text's n-gram frequency distribution. An n with no n-gram counts 0."""
    ents = []
    for n in ns:
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        ents.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(w * e for w, e in zip(weights, ents)) / len(ns)


def _tokens(text) -> list:
    if isinstance(text, str):
        return text.split()
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).tolist()
    return list(text)


class NgramEntropy(Float64Mean):
    """Mean ROME fluency over generated texts: token-id lists (or 1-D tensors), or strings split on whitespace."""

    def update(self, texts: Iterable) -> None:
        if isinstance(texts, str):
            texts = [texts]
        values = [ngram_entropy(_tokens(t)) for t in texts]
        if values:
            super().update(torch.tensor(values, dtype=torch.float64, device=self.mean_value.device))


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (or negative)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic_mean of no values")
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def arithmetic_mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("arithmetic_mean of no values")
    return math.fsum(values) / len(values)


class EditMetrics(nn.Module):
    """Every metric of one evaluation, routed by prompt kind; `compute()` gives percentages.

    The metrics are submodules (a ModuleDict), so ``.to(device)`` / Lightning moves their states.
    Under DDP, ``compute()`` synchronises every metric on every rank in the same order (a rank with no
    prompts of a kind still takes part), so it must be called on all ranks.
    """

    def __init__(self, style: str = "counterfact"):
        super().__init__()
        self.headlines = headline_definitions(style)
        self.style = style
        m: dict[str, Metric] = {f"{k}_acc": TokenAccuracy() for k in KINDS}
        m.update({f"{k}_win": ProbabilityWin() for k in WIN_KINDS})
        m.update({f"{k}_unchanged": UnchangedPrediction() for k in UNCHANGED_KINDS})
        m.update({f"{k}_gen": GroupedMean() for k in KINDS})
        m["fluency"] = NgramEntropy()
        m.update({k: GroupedMean() for k in WITHDRAWAL_KEYS})
        self.metrics = nn.ModuleDict(m)
        # headline key -> the metric it took in the last compute() (after fallbacks)
        self.headline_sources: dict[str, str] = {}

    def update(self, stats: PromptStats) -> None:
        stats.validate()
        unknown = sorted(set(stats.kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown prompt kind(s) {unknown}; expected {KINDS}")
        kinds = stats.kinds
        for kind in KINDS:
            rows = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
            if rows.numel() == 0:
                continue
            s = stats if rows.numel() == len(kinds) else stats.select(rows)
            self.metrics[f"{kind}_acc"].update(s.correct, s.mask, s.groups)
            if kind in WIN_KINDS:
                self.metrics[f"{kind}_win"].update(s.target_logprob, s.contrast_logprob, s.groups)
            if kind in UNCHANGED_KINDS and s.base_pred is not None:
                self.metrics[f"{kind}_unchanged"].update(s.pred, s.base_pred, s.mask, s.groups)

    def update_generation(self, kinds: list[str], values: torch.Tensor, groups: torch.Tensor) -> None:
        """Generation-based values per prompt (`editing.evaluation.generation_values`): 1/0 whether
        the greedy continuation starts with the target (rewrite, paraphrase, portability) or equals
        the unedited model's (neighbourhood, locality)."""
        for kind in KINDS:
            rows = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
            if rows.numel():
                self.metrics[f"{kind}_gen"].update(values[rows], groups[rows])

    def update_withdrawal(self, changed: torch.Tensor, consistent: torch.Tensor, groups: torch.Tensor) -> None:
        """Traceable editors: per withdrawn edit (case index in ``groups``), whether its predictions
        changed on withdrawal (Retrieve Success) and whether they then equal the unedited model's
        (Consistency)."""
        self.metrics["retrieve_success"].update(changed.float(), groups)
        self.metrics["consistency"].update(consistent.float(), groups)

    def update_fluency(self, texts: Iterable) -> None:
        """Generated texts (token-id lists or whitespace-split strings) for ROME's fluency."""
        self.metrics["fluency"].update(texts)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            # Every metric is computed (and synchronised) even without local updates, so that all ranks
            # run the same collectives; a metric without data anywhere returns NaN and is left out.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
                value = float(metric.compute())
            if not math.isnan(value):
                out[name] = value if name == "fluency" else 100.0 * value
        self.headline_sources = {}
        fallbacks = HEADLINE_FALLBACKS.get(self.style, {})
        for head, source in self.headlines.items():
            for candidate in (source, *fallbacks.get(head, ())):
                if candidate in out:
                    out[head] = out[candidate]
                    self.headline_sources[head] = candidate
                    break
        heads = [out[h] for h in HEADLINE_KEYS if h in out]
        if len(heads) == len(HEADLINE_KEYS):
            out["score"] = harmonic_mean(heads)
            out["score_mean"] = arithmetic_mean(heads)
        gen = [out[h] for h in GEN_HEADLINE_KEYS if h in out]
        if len(gen) == len(GEN_HEADLINE_KEYS):
            out["gen_score"] = harmonic_mean(gen)
        return out

    def definitions(self) -> dict[str, str]:
        """One line per key; headline keys say which metric they took (after the last compute())."""
        d = dict(DEFINITIONS)
        for head, source in self.headlines.items():
            used = self.headline_sources.get(head, source)
            note = "" if used == source else f" (fallback: no {source} data)"
            d[head] = f"= {used}{note}: {DEFINITIONS[used]}"
        return d

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.headline_sources = {}


def ireva_scores(values: dict) -> dict:
    """The paper's ES / PS / NS (teacher-forced token accuracies on the edit prompts, paraphrases and
    the locality prompts' own answers) and their harmonic (v2) and arithmetic (draft, code) means."""
    keys = {"ES": "rewrite_acc", "PS": "paraphrase_acc", "NS": "locality_acc"}
    out = {k: values[v] for k, v in keys.items() if v in values}
    if len(out) == 3:
        out["score_harmonic"] = harmonic_mean(out.values())
        out["score_mean"] = arithmetic_mean([out["ES"], out["PS"], out["NS"]])
    return out
