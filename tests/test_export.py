"""Export to a plain Hugging Face directory: FT (merged) and MEMIT (written weights) load with
transformers alone and give the edited logits; the editor is left exactly as it was; an iReVa or
COMEBA-HK (hooks) edit is refused with the reason."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing.editors import COMEBA, FT, JEEP, MEMIT, PMET, ROME, AdaPLE, IReVa
from editing.export import ExportError
from editing.tuners import DeltaLinear
from tests.test_locate import REQS, with_stats

FAST = dict(template_spec=[[3, 2]], v_steps=8, mom2_update_weight=1.0, clamp_norm_factor=50.0, v_weight_decay=1e-4)


def logits(model, tok, texts):
    b = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**b).logits.float()


@pytest.mark.parametrize("make", [lambda p: FT(base_model=p, layers=[1], steps=10, lr=5e-2),
                                  lambda p: with_stats(MEMIT(base_model=p, layers=[0, 1], **FAST))])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_loads_with_transformers_and_matches(tiny_dirs, tmp_path, family, make):
    ed = make(str(tiny_dirs[family]))
    ed.edit(REQS[:2])
    texts = [r.text for r in REQS[:2]]
    edited = logits(ed.model, ed.tokenizer, texts)
    out = ed.export(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    got = logits(plain, tok, texts)
    assert (got - edited).abs().max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[family]))
    assert (logits(base, tok, texts) - edited).abs().max() > 1e-3
    assert "DeltaLinear" not in str(plain) and "| 0 | The capital of France is | Tamil |" in (out / "README.md").read_text()
    # the editor is exactly as before
    assert torch.equal(logits(ed.model, ed.tokenizer, texts), edited)
    if isinstance(ed, FT):
        assert isinstance(ed.layout.mlp_out(1), DeltaLinear) and not ed.layout.mlp_out(1).merged


@pytest.mark.parametrize("make", [lambda p: with_stats(ROME(base_model=p, layers=[1], **FAST)),
                                  lambda p: with_stats(PMET(base_model=p, layers=[0, 1], **FAST)),
                                  lambda p: with_stats(AdaPLE(base_model=p, layers=[0, 1], **FAST)),
                                  lambda p: with_stats(JEEP(base_model=p, layers=[0], high_layers=[2], **FAST)),
                                  lambda p: with_stats(COMEBA(base_model=p, layers=[0, 1], hook=False, **FAST))],
                         ids=["rome", "pmet", "adaple", "jeep", "comeba_hk-nohook"])
def test_every_weight_writing_editor_exports(tiny_llama, tmp_path, make):
    ed = make(tiny_llama)
    ed.edit(REQS[:2] if not isinstance(ed, ROME) else REQS[:1])
    texts = [r.text for r in REQS[:2]]
    edited = logits(ed.model, ed.tokenizer, texts)
    out = ed.export(tmp_path / "out")
    got = logits(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), texts)
    assert (got - edited).abs().max() <= 1e-4
    with ed.disabled():
        assert (logits(ed.model, ed.tokenizer, texts) - edited).abs().max() > 1e-4


@pytest.mark.parametrize("make", [lambda p: IReVa(base_model=p, layers=[1], retrofit=False),
                                  lambda p: with_stats(COMEBA(base_model=p, layers=[0, 1], **FAST))])
def test_unmergeable_edits_are_refused(tiny_llama, tmp_path, make):
    ed = make(tiny_llama)
    ed.edit(REQS[:1])
    with pytest.raises(ExportError, match="cannot be merged.*save_edit"):
        ed.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_editor_without_an_edit_does_not_export(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="nothing to export"):
        FT(base_model=tiny_llama, layers=[1]).export(tmp_path / "out")
    assert not (tmp_path / "out").exists()
