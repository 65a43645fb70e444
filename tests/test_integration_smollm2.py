"""Integration on the embedded SmolLM2-135M (slow: seconds per edit on a CPU)."""
import pytest

import torch
from transformers import AutoModelForCausalLM

from editing.data import EvalCase, load_benchmark
from editing.editors import FT

pytestmark = pytest.mark.slow


def exported_logit_difference(editor, requests, out) -> float:
    """Export the edited SmolLM2, load it with plain transformers, and return the largest logit
    difference against the editor on the rewrite prompts (the unedited base must differ)."""
    texts = [r.text for r in requests]
    batch = editor.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        edited = editor.model(**batch).logits.float()
        with editor.disabled():
            base = editor.model(**batch).logits.float()
        editor.export(out)
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(**batch).logits.float()
    assert (base - edited).abs().max() > 1e-2
    assert "## Edited facts" in (out / "README.md").read_text()
    diff = float((plain - edited).abs().max())
    print(f"export {editor.method}: max |logit difference| {diff:.2e} (unedited base: {(base - edited).abs().max():.2f})")
    return diff


def test_ft_lifts_reliability_on_five_edits(smollm2_path, tmp_path):
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
    assert exported_logit_difference(editor, requests, tmp_path / "ft") <= 1e-4   # the delta merged


def test_memit_efficacy_on_twenty_edits(smollm2_path, tmp_path):
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
    assert exported_logit_difference(editor, requests, tmp_path / "memit") <= 1e-4
    editor.undo()
    assert editor.evaluate(requests, style=bench.style) == before
