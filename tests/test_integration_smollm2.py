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
