"""Metrics on hand-computed examples; DDP-style merging (and real gloo DDP) equals one process."""
import math
import multiprocessing
import socket

import pytest
import torch

from editing.metrics import (DEFINITIONS, HEADLINES, EditMetrics, GroupedMean, NgramEntropy, ProbabilityWin,
                             PromptStats, TokenAccuracy, UnchangedPrediction, arithmetic_mean, harmonic_mean,
                             headline_definitions, ngram_entropy)

NAN = float("nan")


def test_token_accuracy_is_per_case_then_over_cases():
    # case 0: one prompt, 1/2 tokens right; case 1: three prompts with 1/1, 0/3 and 2/2 right
    correct = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    groups = torch.tensor([0, 1, 1, 1])
    m = TokenAccuracy()
    m.update(correct, mask, groups)
    case1 = (1 + 0 + 1) / 3
    expected = (0.5 + case1) / 2  # 7/12
    assert float(m.compute()) == pytest.approx(expected)
    flat_prompts = (0.5 + 1 + 0 + 1) / 4
    flat_tokens = 4 / 8
    assert expected != pytest.approx(flat_prompts) and expected != pytest.approx(flat_tokens)
    # Correct flags outside the mask never count; a prompt without target tokens is skipped.
    m2 = TokenAccuracy()
    m2.update(torch.ones(3, 3, dtype=torch.bool), torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool),
              torch.tensor([5, 5, 9]))
    assert float(m2.compute()) == 1.0 and int(m2.cases) == 1


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_grouped_mean_unsorted_groups_nan_and_several_updates():
    m = GroupedMean()
    m.update(torch.tensor([1.0, 0.0, 0.5, NAN, 1.0]), torch.tensor([7, 3, 7, 4, 3]))
    # case 7: (1 + .5)/2 = .75; case 3: (0 + 1)/2 = .5; case 4: nothing counted
    m.update(torch.tensor([0.0]), torch.tensor([11]))
    assert int(m.cases) == 3
    assert float(m.compute()) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    m.reset()
    assert math.isnan(float(m.compute()))


def test_probability_win_skips_missing_contrast_and_ties_lose():
    m = ProbabilityWin()
    m.update(torch.tensor([-1.0, -3.0, -1.0, -2.0, -1.0]), torch.tensor([-2.0, -1.0, NAN, -2.5, -1.0]),
             torch.tensor([0, 0, 1, 2, 3]))
    # case 0: wins 1 of 2; case 1: no contrast (not counted); case 2: win; case 3: tie = loss
    assert int(m.cases) == 3
    assert float(m.compute()) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_unchanged_prediction():
    m = UnchangedPrediction()
    pred = torch.tensor([[5, 6, 7], [1, 2, 0], [4, 4, 4], [8, 8, 0]])
    base = torch.tensor([[5, 0, 7], [1, 2, 9], [-1, -1, -1], [8, 9, -1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    # case 0: 2/3; case 1: 2/2 (the unmasked mismatch ignored); row 2: base not computed -> skipped;
    # row 3 (case 1 too): the -1 position is skipped -> 1/2
    m.update(pred, base, mask, torch.tensor([0, 1, 2, 1]))
    assert int(m.cases) == 2
    assert float(m.compute()) == pytest.approx((2 / 3 + (1.0 + 0.5) / 2) / 2)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_ngram_entropy_by_hand():
    tokens = [1, 2, 1, 2, 1]
    # bigrams: (1,2) x2, (2,1) x2 -> 1 bit; trigrams: (1,2,1) x2, (2,1,2) x1 -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * 1.0 + 4 / 3 * h3) / 2  # ROME: np.mean of the weighted entropies
    assert ngram_entropy(tokens) == pytest.approx(expected)
    assert ngram_entropy("x y x y x".split()) == pytest.approx(expected)
    # four distinct bigrams (2 bits) and three distinct trigrams (log2 3 bits)
    assert ngram_entropy([1, 2, 3, 4, 5]) == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy([1]) == 0.0
    m = NgramEntropy()
    m.update([tokens, "a a a a"])
    m.update([torch.tensor(tokens)])
    assert float(m.compute()) == pytest.approx((2 * expected + 0.0) / 3)
    assert math.isnan(float(NgramEntropy().compute()))


def test_means():
    assert harmonic_mean([50, 100, 100]) == pytest.approx(3 / (1 / 50 + 2 / 100))
    assert harmonic_mean([0, 100, 100]) == 0.0
    assert harmonic_mean([80.0]) == 80.0
    assert arithmetic_mean([50, 100, 90]) == pytest.approx(80)
    assert math.isnan(harmonic_mean([NAN, 1.0]))
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        arithmetic_mean([])


def stats(kinds, groups, correct, logp, contrast, pred, base):
    n = len(kinds)
    correct = torch.tensor(correct, dtype=torch.bool).reshape(n, -1)
    return PromptStats(kinds=kinds, groups=torch.tensor(groups), correct=correct,
                       mask=torch.ones_like(correct), target_logprob=torch.tensor(logp),
                       contrast_logprob=torch.tensor(contrast), pred=torch.tensor(pred).reshape(n, -1),
                       base_pred=None if base is None else torch.tensor(base).reshape(n, -1))


BATCH = dict(kinds=["rewrite", "paraphrase", "neighborhood", "locality", "rewrite", "paraphrase", "locality"],
             groups=[0, 0, 0, 0, 1, 1, 1],
             correct=[1, 0, 1, 1, 0, 0, 1],
             logp=[-1.0, -1.0, -1.0, -1.0, -1.0, -3.0, -1.0],
             contrast=[-2.0, -2.0, -0.5, NAN, -2.0, -2.0, NAN],
             pred=[1, 1, 1, 1, 1, 1, 1], base=[1, 1, 2, 1, 1, 1, 3])


def part(batch, rows):
    return {k: (v if v is None else [v[i] for i in rows]) for k, v in batch.items()}


def test_edit_metrics_routing_counterfact_and_zsre():
    cf = EditMetrics("counterfact")
    cf.update(stats(**BATCH))
    out = cf.compute()
    assert out["rewrite_win"] == 100.0 and out["paraphrase_win"] == 50.0 and out["neighborhood_win"] == 0.0
    assert out["reliability"] == 100.0 and out["generality"] == 50.0 and out["locality"] == 0.0
    assert out["score"] == 0.0 and out["score_mean"] == pytest.approx(50.0)
    assert out["rewrite_acc"] == 50.0 and out["paraphrase_acc"] == 0.0 and out["locality_acc"] == 100.0
    assert out["neighborhood_acc"] == 100.0
    assert out["neighborhood_unchanged"] == 0.0 and out["locality_unchanged"] == 50.0
    # no contrast on locality prompts -> no locality_win; no generations -> no fluency
    assert set(out) == {"rewrite_acc", "paraphrase_acc", "neighborhood_acc", "locality_acc", "rewrite_win",
                        "paraphrase_win", "neighborhood_win", "neighborhood_unchanged", "locality_unchanged",
                        "reliability", "generality", "locality", "score", "score_mean"}
    assert all(isinstance(v, float) for v in out.values())
    assert set(out) <= set(DEFINITIONS) and set(cf.definitions()) == set(DEFINITIONS)
    assert "rewrite_win" in cf.definitions()["reliability"]

    z = EditMetrics("zsre")
    z.update(stats(**BATCH))
    out = z.compute()
    assert out["reliability"] == 50.0 and out["generality"] == 0.0 and out["locality"] == 50.0
    assert out["score"] == 0.0 and out["score_mean"] == pytest.approx(100 / 3)
    assert headline_definitions("zsre") == {"reliability": "rewrite_acc", "generality": "paraphrase_acc",
                                            "locality": "locality_unchanged", "gen_reliability": "rewrite_gen",
                                            "gen_generality": "paraphrase_gen", "gen_locality": "locality_gen"}
    assert headline_definitions("counterfact")["locality"] == "neighborhood_win"
    with pytest.raises(ValueError):
        headline_definitions("mquake")


def test_fluency_is_raw_and_optional():
    m = EditMetrics("counterfact")
    m.update_fluency(["a b c d e"])
    out = m.compute()
    assert out == {"fluency": pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)}
    m.reset()
    assert m.compute() == {}


def test_zsre_locality_falls_back_to_neighbourhood():
    z = EditMetrics("zsre")
    z.update(stats(**part(BATCH, range(3))))
    out = z.compute()
    assert "locality_unchanged" not in out and out["locality"] == out["neighborhood_unchanged"] == 0.0
    assert z.headline_sources["locality"] == "neighborhood_unchanged"
    assert "fallback" in z.definitions()["locality"]


def test_headline_without_data_is_absent():
    z = EditMetrics("zsre")
    z.update(stats(**{**BATCH, "base": None}))  # no unedited predictions: no locality at all
    out = z.compute()
    assert "locality" not in out and "score" not in out and "score_mean" not in out
    assert not any(k.endswith("_unchanged") for k in out)
    assert out["reliability"] == 50.0


def test_bad_input_is_rejected():
    m = EditMetrics("counterfact")
    with pytest.raises(ValueError, match="unknown prompt kind"):
        m.update(stats(**{**BATCH, "kinds": ["rewrite"] * 6 + ["mquake"]}))
    bad = stats(**BATCH)
    bad.groups = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="groups"):
        m.update(bad)
    bad = stats(**BATCH)
    bad.pred = bad.pred[:, :0]
    with pytest.raises(ValueError, match="pred"):
        m.update(bad)


def test_inputs_in_other_dtypes_and_devices_land_on_the_metric_device():
    m = EditMetrics("counterfact")
    s = stats(**BATCH)
    s.target_logprob, s.contrast_logprob = s.target_logprob.half(), s.contrast_logprob.double()
    s.groups = s.groups.int()
    m.update(s)
    ref = EditMetrics("counterfact")
    ref.update(stats(**BATCH))
    assert m.compute() == pytest.approx(ref.compute())
    assert all(t.device == torch.device("cpu") for metric in m.metrics.values() for t in metric.metric_state.values())


def test_split_over_ranks_equals_one_process():
    """Two collections with disjoint cases, states merged (what DDP sync does) == one process,
    also into a collection that was never updated and for a kind one side never saw."""
    one = EditMetrics("counterfact")
    one.update(stats(**BATCH))
    one.update_fluency(["a b a b", "c d e"])
    expected = one.compute()

    a, b = EditMetrics("counterfact"), EditMetrics("counterfact")
    a.update(stats(**part(BATCH, range(4, 7))))  # case 1: no neighbourhood prompt
    b.update(stats(**part(BATCH, [0, 1])))  # case 0 in two batches of whole kinds
    b.update(stats(**part(BATCH, [2, 3])))
    b.update_fluency(["a b a b", "c d e"])
    merged = EditMetrics("counterfact")
    for name, metric in merged.metrics.items():
        metric.merge_state(a.metrics[name])
        metric.merge_state(b.metrics[name])
    assert merged.compute() == pytest.approx(expected)

    # Summing the raw states gives the same.
    summed = EditMetrics("counterfact")
    for name, metric in summed.metrics.items():
        for attr in metric.metric_state:
            setattr(metric, attr, getattr(a.metrics[name], attr) + getattr(b.metrics[name], attr))
    assert summed.compute() == pytest.approx(expected)


def _ddp_worker(rank, port, rows, fluency, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = EditMetrics("zsre")
        m.update(stats(**part(BATCH, rows)))
        if fluency:
            m.update_fluency(fluency)
        queue.put((rank, m.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed and fork")
def test_real_gloo_ddp_equals_one_process():
    """Two gloo ranks, each missing some prompt kinds, compute() the same numbers as one process."""
    one = EditMetrics("zsre")
    one.update(stats(**BATCH))
    one.update_fluency(["a b a b"])
    expected = one.compute()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    work = [([0, 1, 2, 3], []), ([4, 5, 6], ["a b a b"])]  # rank 1 has no neighbourhood prompt, rank 0 no text
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, rows, flu, queue)) for r, (rows, flu) in enumerate(work)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)


def test_definitions_cover_every_key():
    keys = set()
    for style in HEADLINES:
        m = EditMetrics(style)
        keys |= set(m.metrics) | set(m.headlines) | {"score", "score_mean", "gen_score", "ppl_ratio"}
    assert keys == set(DEFINITIONS)
    assert all(v and "\n" not in v for v in DEFINITIONS.values())


def test_means_stay_float64_after_moving():
    """torchmetrics resets a metric's cast dtype on `.to(device)`; the grouped means must not round
    their inputs to float32 afterwards."""
    m = GroupedMean().to("cpu")
    x = torch.tensor([1 / 3], dtype=torch.float64)
    m.update(x, torch.tensor([0]))
    assert m.dtype == torch.float64 and float(m.compute()) == float(x[0])
