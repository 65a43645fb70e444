"""The Editor contract on a tiny model: frozen base, edit-only checkpoints that refuse another base
model, atomic edit steps, exact disabling, and FT actually editing."""
import pytest
import torch

from editing.data.records import EditRequest, EvalCase
from editing.editors import FT, CheckpointMismatchError, EditError, NoEdit
from editing.tokens import encode

REQS = [
    EditRequest("0", "The capital of {} is", "France", "Tamil", "Paris",
                paraphrase_prompts=["France has its capital in"],
                neighborhood_prompts=["The capital of Arlon is"],
                locality_prompt="Alan Turing works in the field of", locality_answer="logic"),
    EditRequest("1", "{} speaks", "Danielle Darrieux", "Tamil", "French",
                paraphrase_prompts=["The mother tongue of Danielle Darrieux is"]),
]


def make_ft(path, **kw):
    kw.setdefault("layers", [1])
    kw.setdefault("lr", 5e-2)
    kw.setdefault("steps", 30)
    return FT(base_model=path, **kw)


def target_nll(ed, req):
    with torch.no_grad():
        lp, b = ed.target_logprobs([req.text], [req.target_new])
    return float(-(lp.gather(-1, b.target_ids[..., None]).squeeze(-1) * b.target_mask).sum())


def logits(ed, text="The capital of France is"):
    b = encode(ed.tokenizer, [text])
    with torch.no_grad():
        return ed.model(input_ids=b.input_ids).logits


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_ft_edits_and_disable_restores_base(tiny_dirs, family):
    ed = make_ft(str(tiny_dirs[family]))
    from editing.models import base_state_dict
    assert not any(p.requires_grad for p in base_state_dict(ed.model, parameters=True).values())
    trainable = {n for n, p in ed.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{ed.layout.module_name(1, 'mlp_out')}.delta"}
    base = logits(ed)
    before = target_nll(ed, REQS[0])
    info = ed.edit([REQS[0]])
    assert info["steps"] >= 1
    after = target_nll(ed, REQS[0])
    assert after < before - 1.0
    assert not torch.allclose(logits(ed), base)
    with ed.disabled():
        torch.testing.assert_close(logits(ed), base)
    # the base weights themselves never changed
    assert set(ed.state_dict()) == trainable


def test_ft_norm_constraint_bounds_each_step(tiny_llama):
    ed = make_ft(tiny_llama, objective="prompt_last", norm_constraint=1e-3)
    ed.edit([REQS[0]])
    assert ed.delta(1).abs().max() <= 1e-3 + 1e-7
    ed.edit([REQS[1]])  # the bound applies per edit step, relative to the weights before the step
    assert ed.delta(1).abs().max() <= 2e-3 + 1e-7


def test_checkpoint_round_trip_and_refusal(tiny_dirs, tmp_path):
    ed = make_ft(str(tiny_dirs["llama"]))
    ed.edit(REQS)
    path = ed.save_edit(tmp_path / "edit.ckpt")
    size = path.stat().st_size
    n_model = sum(p.numel() for p in ed.model.parameters()) * 4
    assert size < n_model  # the checkpoint holds the edit, not the model
    edited = logits(ed)
    fresh = make_ft(str(tiny_dirs["llama"]))
    assert not torch.allclose(logits(fresh), edited)
    fresh.load_edit(path)
    torch.testing.assert_close(logits(fresh), edited)
    assert [e["cases"] for e in fresh.edit_log] == [["0", "1"]]
    # another base model (a different random initialisation of the same architecture) is refused
    from conftest import make_tiny
    other = make_ft(str(make_tiny("llama", tmp_path / "other", seed=1)))
    with pytest.raises(CheckpointMismatchError, match="cannot be applied"):
        other.load_edit(path)
    with pytest.raises(CheckpointMismatchError):
        make_ft(str(tiny_dirs["gpt2"])).load_edit(path)
    # a bfloat16 copy of the same base model is accepted
    bf = make_ft(str(tiny_dirs["llama"]), dtype="bfloat16")
    bf.load_edit(path)


def test_failed_edit_step_restores_state(tiny_llama, monkeypatch):
    ed = make_ft(tiny_llama)
    ed.edit([REQS[0]])
    snap = {k: v.clone() for k, v in ed.state_dict().items()}
    out_before = logits(ed)
    calls = {"n": 0}
    real_loss = FT.loss

    def flaky(self, requests):
        calls["n"] += 1
        loss = real_loss(self, requests)
        return loss if calls["n"] < 5 else loss * float("nan")
    monkeypatch.setattr(FT, "loss", flaky)
    with pytest.raises(EditError, match="restored"):
        ed.edit([REQS[1]])
    assert calls["n"] == 5  # it did change the delta for 4 steps before failing
    for k, v in ed.state_dict().items():
        assert torch.equal(v, snap[k])
    torch.testing.assert_close(logits(ed), out_before)
    assert len(ed.edit_log) == 1


def test_evaluate_reports_headline_metrics(tiny_llama):
    ed = make_ft(tiny_llama)
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(REQS)]
    before = NoEdit(base_model=tiny_llama).evaluate(cases)
    ed.edit(REQS)
    after = ed.evaluate(cases)
    for key in ("reliability", "generality", "locality", "score", "rewrite_acc", "locality_unchanged"):
        assert key in after, key
    assert after["rewrite_acc"] >= before["rewrite_acc"]
    assert after["reliability"] == 100.0  # target_new now beats target_true on both rewrite prompts
    assert 0.0 <= after["locality_unchanged"] <= 100.0
    noedit = NoEdit(base_model=tiny_llama).evaluate(cases)
    assert noedit["locality_unchanged"] == 100.0 and noedit["neighborhood_unchanged"] == 100.0
