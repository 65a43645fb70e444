"""General-ability drift pieces: `perplexity` equals the model's own language-model loss (padding and
batching do not change it; an edit that acts changes it), and `held_out` texts are never among the
first texts statistics take."""
import math

import pytest
import torch

from editing.corpus import held_out, load_corpus
from editing.editors import MEMIT
from editing.evaluation import perplexity
from tests.test_locate import REQS, with_stats

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "A longer text about the history of science and the people who made it, from antiquity on."]


def test_perplexity_is_the_lm_loss(tiny_llama):
    ed = with_stats(MEMIT(base_model=tiny_llama, layers=[1], template_spec=[[3, 2]], v_steps=8,
                          mom2_update_weight=1.0, clamp_norm_factor=50.0, step_checks=False))
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in TEXTS:
            ids = ed.tokenizer(t, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            nll += float(ed.model(input_ids=ids, labels=ids).loss) * n
            count += n
    ref = math.exp(nll / count)
    assert perplexity(ed, TEXTS, batch_size=1) == pytest.approx(ref, rel=1e-5)
    assert perplexity(ed, TEXTS, batch_size=3) == pytest.approx(ref, rel=1e-5)
    ed.edit(REQS[:2])
    edited = perplexity(ed, TEXTS)
    assert edited != pytest.approx(ref, rel=1e-6)
    with ed.disabled():
        assert perplexity(ed, TEXTS) == pytest.approx(ref, rel=1e-5)


def test_held_out_texts_are_the_last_of_the_order(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(f"text number {i}" for i in range(50)))
    texts = load_corpus(str(path))
    out = held_out(str(path), n=10)
    assert out == texts[-10:] and not set(out) & set(load_corpus(str(path), n=40))
    with pytest.raises(ValueError, match="at most"):
        held_out(str(path), n=50)


def test_the_unedited_perplexity_is_cached_per_base_model(tiny_llama, tmp_path, monkeypatch):
    import editing.drift as evaluation
    from editing.editors import NoEdit
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path))
    ed = NoEdit(base_model=tiny_llama)
    first = evaluation.unedited_perplexity(ed, TEXTS)
    assert first == pytest.approx(perplexity(ed, TEXTS, evaluation.DRIFT_LENGTH), rel=1e-6)
    monkeypatch.setattr(evaluation, "perplexity", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert evaluation.unedited_perplexity(ed, TEXTS) == first
    with pytest.raises(AssertionError, match="recomputed"):
        evaluation.unedited_perplexity(ed, TEXTS[:2])          # other texts: another entry
