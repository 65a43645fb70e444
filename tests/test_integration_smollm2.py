"""Integration on the embedded SmolLM2-135M (slow: seconds per edit on a CPU)."""
import pytest

from editing.data import EvalCase, load_benchmark
from editing.editors import FT

pytestmark = pytest.mark.slow


def test_ft_lifts_reliability_on_five_edits(smollm2_path):
    bench = load_benchmark(kind="counterfactual")
    requests = bench.requests[:5]
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(requests)]
    editor = FT(layers=[21], lr=5e-4, steps=25)
    before = editor.evaluate(cases, style=bench.style)
    for r in requests:
        editor.edit([r])
    after = editor.evaluate(cases, style=bench.style)
    assert after["reliability"] >= before["reliability"] + 40
    assert after["reliability"] >= 80
    assert after["rewrite_acc"] > before["rewrite_acc"]
    with editor.disabled():
        again = editor.evaluate(cases, style=bench.style)
    assert again["reliability"] == before["reliability"]


def test_memit_efficacy_on_twenty_edits(smollm2_path):
    """Issue 3: MEMIT on SmolLM2 reaches efficacy >= 90 % on 20 counterfactual edits (one batch)."""
    from editing.editors import MEMIT

    bench = load_benchmark(kind="counterfactual")
    requests = bench.requests[:20]
    editor = MEMIT(layers=[3, 4, 5, 6, 7], mom2_update_weight=1000, stats_samples=1000, v_autocast="bfloat16")
    before = editor.evaluate(requests, style=bench.style)
    editor.edit(requests)
    after = editor.evaluate(requests, style=bench.style)
    assert after["rewrite_win"] >= 90, after
    assert after["paraphrase_win"] > before["paraphrase_win"]
    assert after["neighborhood_unchanged"] >= 80  # unrelated predictions mostly kept
    editor.undo()
    assert editor.evaluate(requests, style=bench.style) == before
