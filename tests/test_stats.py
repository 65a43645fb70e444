"""Second-moment statistics: equal to a brute-force reference, one pass for several layers, cached."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing import hooks
from editing.layout import Layout
from editing.stats import second_moments

TEXTS = ["The capital of France is Paris.", "Alan Turing works in the field of logic and more logic.",
         "Danielle Darrieux speaks French.", "Münster is a city in Germany.", "Numbers like 1984 appear."] * 3


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(TEXTS))
    return str(p)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_brute_force_and_caches(tiny_dirs, family, corpus, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
    tok.pad_token = tok.eos_token
    lay = Layout(model)
    ran = []
    lay.block(2).register_forward_hook(lambda *a: ran.append(1))
    got = second_moments(model, tok, [0, 1], corpus=corpus, batch_tokens=40, forward_dtype="float32", progress=False)
    assert not ran  # the forward stopped after the highest requested layer
    from editing.corpus import load_corpus
    keys = {0: [], 1: []}
    for text in load_corpus(corpus):
        ids = tok(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
        with hooks.capture({l: lay.mlp_out(l) for l in (0, 1)}, "input") as cap:
            model(ids)
        for l in (0, 1):
            keys[l].append(cap[l][0])
    for l in (0, 1):
        k = torch.cat(keys[l]).double()
        torch.testing.assert_close(got[l].double(), k.T @ k / k.shape[0], atol=1e-6, rtol=1e-4)
    # cached: no model call at all, and only a new layer is computed
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob(".*"))
    calls = []
    h = lay.block(0).register_forward_hook(lambda *a: calls.append(1))
    again = second_moments(model, tok, [0, 1], corpus=corpus, batch_tokens=40, forward_dtype="float32", progress=False)
    assert not calls and torch.equal(again[0], got[0])
    second_moments(model, tok, [0, 1, 2], corpus=corpus, batch_tokens=40, forward_dtype="float32", progress=False)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    h.remove()
    # bf16 forward is close to float32
    bf = second_moments(model, tok, [1], corpus=corpus, forward_dtype="bfloat16", cache=False, progress=False)
    assert (bf[1] - got[1]).norm() / got[1].norm() < 0.05


def test_other_model_never_reuses_the_cache(tiny_dirs, corpus, tmp_path):
    from conftest import make_tiny

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    a = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    b = AutoModelForCausalLM.from_pretrained(make_tiny("llama", tmp_path / "other", seed=1)).eval()
    sa = second_moments(a, tok, [1], corpus=corpus, forward_dtype="float32", progress=False)
    sb = second_moments(b, tok, [1], corpus=corpus, forward_dtype="float32", progress=False)
    assert not torch.allclose(sa[1], sb[1])
