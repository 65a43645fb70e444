"""Metrics on hand-computed examples; DDP-style merging equals one process."""
import math

import pytest
import torch

from editing.metrics import (EditMetrics, NgramEntropy, ProbabilityWin, PromptStats, TokenAccuracy,
                             UnchangedPrediction, arithmetic_mean, harmonic_mean, headline_definitions, ngram_entropy)


def test_token_accuracy_is_per_case_then_over_cases():
    # case 0: one prompt, 1/2 tokens right; case 1: three prompts with 1/1, 0/3 and 2/2 right
    correct = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    groups = torch.tensor([0, 1, 1, 1])
    m = TokenAccuracy()
    m.update(correct, mask, groups)
    case1 = (1 + 0 + 1) / 3
    assert float(m.compute()) == pytest.approx((0.5 + case1) / 2)
    flat = (0.5 + 1 + 0 + 1) / 4
    assert float(m.compute()) != pytest.approx(flat)


def test_probability_win_skips_missing_contrast():
    m = ProbabilityWin()
    m.update(torch.tensor([-1.0, -3.0, -1.0, -2.0]), torch.tensor([-2.0, -1.0, float("nan"), -2.5]),
             torch.tensor([0, 0, 1, 2]))
    # case 0: wins 1 of 2; case 1: no contrast (not counted); case 2: win
    assert float(m.compute()) == pytest.approx((0.5 + 1.0) / 2)


def test_unchanged_prediction():
    m = UnchangedPrediction()
    pred = torch.tensor([[5, 6, 7], [1, 2, 0]])
    base = torch.tensor([[5, 0, 7], [1, 2, 9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    m.update(pred, base, mask, torch.tensor([0, 1]))
    assert float(m.compute()) == pytest.approx((2 / 3 + 1.0) / 2)


def test_ngram_entropy_by_hand():
    tokens = [1, 2, 1, 2, 1]
    # bigrams: (1,2) x2, (2,1) x2 -> 1 bit; trigrams: (1,2,1) x2, (2,1,2) x1 -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * 1.0 + 4 / 3 * h3) / 2
    assert ngram_entropy(tokens) == pytest.approx(expected)
    m = NgramEntropy()
    m.update([tokens, "a a a a"])
    assert float(m.compute()) == pytest.approx((expected + 0.0) / 2)


def test_means():
    assert harmonic_mean([50, 100, 100]) == pytest.approx(3 / (1 / 50 + 2 / 100))
    assert harmonic_mean([0, 100, 100]) == 0.0
    assert arithmetic_mean([50, 100, 90]) == pytest.approx(80)


def stats(kinds, groups, correct, logp, contrast, pred, base):
    n = len(kinds)
    correct = torch.tensor(correct, dtype=torch.bool).reshape(n, -1)
    return PromptStats(kinds=kinds, groups=torch.tensor(groups), correct=correct,
                       mask=torch.ones_like(correct), target_logprob=torch.tensor(logp),
                       contrast_logprob=torch.tensor(contrast), pred=torch.tensor(pred).reshape(n, -1),
                       base_pred=torch.tensor(base).reshape(n, -1))


NAN = float("nan")
BATCH = dict(kinds=["rewrite", "paraphrase", "neighborhood", "locality", "rewrite", "paraphrase", "locality"],
             groups=[0, 0, 0, 0, 1, 1, 1],
             correct=[1, 0, 1, 1, 0, 0, 1],
             logp=[-1.0, -1.0, -1.0, -1.0, -1.0, -3.0, -1.0],
             contrast=[-2.0, -2.0, -0.5, NAN, -2.0, -2.0, NAN],
             pred=[1, 1, 1, 1, 1, 1, 1], base=[1, 1, 2, 1, 1, 1, 3])


def test_edit_metrics_routing_counterfact_and_zsre():
    cf = EditMetrics("counterfact")
    cf.update(stats(**BATCH))
    out = cf.compute()
    assert out["rewrite_win"] == 100.0 and out["paraphrase_win"] == 50.0 and out["neighborhood_win"] == 0.0
    assert out["reliability"] == 100.0 and out["generality"] == 50.0 and out["locality"] == 0.0
    assert out["score"] == 0.0 and out["score_mean"] == pytest.approx(50.0)
    assert out["rewrite_acc"] == 50.0 and out["locality_acc"] == 100.0
    assert out["neighborhood_unchanged"] == 0.0 and out["locality_unchanged"] == 50.0
    assert "fluency" not in out and "neighborhood_acc" in out
    z = EditMetrics("zsre")
    z.update(stats(**BATCH))
    out = z.compute()
    assert out["reliability"] == 50.0 and out["generality"] == 0.0 and out["locality"] == 50.0
    assert headline_definitions("zsre")["locality"] == "locality_unchanged"


def test_zsre_locality_falls_back_to_neighbourhood():
    b = {k: v[:3] for k, v in BATCH.items()}
    z = EditMetrics("zsre")
    z.update(stats(**b))
    out = z.compute()
    assert "locality_unchanged" not in out and out["locality"] == out["neighborhood_unchanged"] == 0.0


def test_split_over_ranks_equals_one_process():
    """Two metric collections with disjoint cases, states summed (what DDP sync does) == one."""
    one = EditMetrics("counterfact")
    one.update(stats(**BATCH))
    a, b = EditMetrics("counterfact"), EditMetrics("counterfact")
    first = {k: v[:4] for k, v in BATCH.items()}
    second = {k: v[4:] for k, v in BATCH.items()}
    a.update(stats(**first))
    b.update(stats(**second))
    for name, metric in a.metrics.items():
        metric.merge_state(b.metrics[name])
    assert a.compute() == pytest.approx(one.compute())
