"""LoRA on PEFT (BASELINES.md §1 (i)): a fresh adaptor and the disabled adaptor leave the logits
bit-identical; only lora_* parameters train and the base weights never change; an edit raises its
target; sequential steps accumulate in one adaptor with a fresh Adam each; the merged copy (export)
matches the adapted model; the edit file round-trips exactly and refuses another shape; a failing
step leaves the exact previous adaptor."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from editing.editors import LoRA
from editing.editors.base import CheckpointMismatchError, EditError
from editing.models import base_state_dict
from conftest import fail_on_call
from tests.test_locate import REQS

KW = dict(steps=15, lr=2e-2)


def logits(ed, text="The capital of France is"):
    ids = ed.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return ed.model(**ids).logits


@torch.no_grad()
def target_logprob(ed, req):
    lp, batch = ed.target_logprobs([req.text], [req.target_new])
    return float((lp.gather(-1, batch.target_ids[..., None]).squeeze(-1) * batch.target_mask).sum())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_lora_edits_and_disables_exactly(family, tiny_dirs):
    ed = LoRA(base_model=str(tiny_dirs[family]), **KW)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[family])).eval()
    ids = ed.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = plain(**ids).logits
    assert torch.equal(logits(ed), base)                       # a fresh adaptor (B = 0) changes nothing
    targets = {n for n, _ in ed.lora_modules()}
    assert targets and all(any(n.endswith(t) for t in ed.layout.family.lora_targets) for n in targets)
    trainable = [n for n, p in ed.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    weights = {k: v.clone() for k, v in base_state_dict(ed.model).items()}

    before = target_logprob(ed, REQS[0])
    ed.edit(REQS[:1])
    assert target_logprob(ed, REQS[0]) > before + 0.5
    assert not torch.equal(logits(ed), base)
    with ed.disabled():
        assert torch.equal(logits(ed), base)                   # PEFT's layers switched off: exactly the base
    assert not torch.equal(logits(ed), base)                   # and back on afterwards
    after = base_state_dict(ed.model)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)


def test_sequential_steps_accumulate_in_one_adaptor(tiny_llama):
    ed = LoRA(base_model=tiny_llama, **KW)
    ed.edit(REQS[:1])
    first = {k: v.clone() for k, v in ed.state_dict().items()}
    ed.edit(REQS[1:2])
    second = ed.state_dict()
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    # the same two steps, the second one started from the first's adaptor, by hand
    again = LoRA(base_model=tiny_llama, **KW)
    again.load_state_dict(first)
    again.edit(REQS[1:2])
    assert all(torch.allclose(again.state_dict()[k], second[k], atol=1e-6) for k in second)


def test_merged_copy_export_and_edit_file(tiny_llama, tmp_path):
    ed = LoRA(base_model=tiny_llama, **KW)
    ed.edit(REQS[:2])
    edited = logits(ed)
    out = ed.export(tmp_path / "exported")
    assert torch.equal(logits(ed), edited)                     # the editor keeps its adaptor
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ids = ed.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, edited, rtol=1e-4, atol=1e-5)

    path = ed.save_edit(tmp_path / "lora-edit")
    fresh = LoRA(base_model=tiny_llama, **KW)
    fresh.load_edit(path)
    assert torch.equal(logits(fresh), edited)
    with pytest.raises(CheckpointMismatchError):
        LoRA(base_model=tiny_llama, rank=4, **KW).load_edit(path)


def test_a_failing_step_leaves_the_previous_adaptor(tiny_llama, monkeypatch):
    ed = LoRA(base_model=tiny_llama, **KW)
    ed.edit(REQS[:1])
    before = {k: v.clone() for k, v in ed.state_dict().items()}
    import editing.editors.lora as lora
    fail_on_call(monkeypatch, lora, "target_nll", 5)
    with pytest.raises(EditError):
        ed.edit(REQS[1:2])
    assert all(torch.equal(ed.state_dict()[k], before[k]) for k in before) and len(ed.edit_log) == 1


def test_adalora_option(tiny_llama):
    ed = LoRA(base_model=tiny_llama, adaptor="adalora", **KW)
    base = logits(ed)
    before = target_logprob(ed, REQS[0])
    ed.edit(REQS[:1])
    assert target_logprob(ed, REQS[0]) > before
    with ed.disabled():
        assert torch.equal(logits(ed), base)
    assert any("lora_E" in k for k in ed.state_dict())


def test_undo_restores_the_adaptor_exactly(tiny_llama):
    ed = LoRA(base_model=tiny_llama, **KW)
    ed.edit(REQS[:1])
    first, edited = {k: v.clone() for k, v in ed.state_dict().items()}, logits(ed)
    ed.edit(REQS[1:2])
    ed.edit(REQS[2:3])
    ed.undo(2)
    assert all(torch.equal(ed.state_dict()[k], first[k]) for k in first) and len(ed.edit_log) == 1
    assert torch.equal(logits(ed), edited)
    ed.undo()
    with ed.disabled():
        base = logits(ed)
    assert torch.equal(logits(ed), base)                       # no edit left: B = 0 again
    with pytest.raises(ValueError, match="only 0 step"):
        ed.undo()
