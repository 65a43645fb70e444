"""GRACE (BASELINES.md §2 (i)): an empty codebook and a query beyond every radius leave outputs
bit-identical; a query inside ε of a key gets that key's value at the replacement positions; a
conflicting label splits the radii, the same label expands them; training changes only the chosen
value; withdraw, undo, failing steps and edit files restore or reproduce the codebook exactly."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from editing.data.records import EditRequest
from editing.editors import GRACE
from editing.editors.base import EditError
from editing.tuners import Codebook
from conftest import fail_on_call
from tests.test_locate import REQS


def test_codebook_retrieves_inside_the_radius_only():
    torch.manual_seed(0)
    cb = Codebook(nn.Linear(4, 3), 4, 3, replacement="last")
    x = torch.randn(2, 5, 4)
    base = cb.base_layer(x)
    assert torch.equal(cb(x), base)                                   # empty codebook
    key, value = x[0, 2], torch.tensor([7.0, 8.0, 9.0])
    cb.add(key, value, eps=0.5)
    with cb.querying(torch.tensor([2, 2])):
        out = cb(torch.stack([x[0], x[0] + 10.0]))                    # row 1: far from the key
    assert torch.equal(out[0, 2], value) and torch.equal(out[0, :2], base[0, :2]) and torch.equal(out[0, 3:], base[0, 3:])
    assert torch.equal(out[1], cb.base_layer(x[0] + 10.0))
    near = x[0].clone()
    near[2] += 0.1                                                      # distance 0.2 ≤ 0.5
    with cb.querying(torch.tensor([2])):
        assert torch.equal(cb(near[None])[0, 2], value)
    cb.replacement = "prompt"
    with cb.querying(torch.tensor([2])):
        out = cb(x[:1])
    assert torch.equal(out[0, :2], value.expand(2, 3)) and torch.equal(out[0, 2:], base[0, 2:])
    cb.replacement = "all"                                             # generation: routed on the prompt pass
    cb.cache = SimpleNamespace(decoding=False)
    out = cb(x[:1, :3])                                                # key = the last position (2)
    assert torch.equal(out[0], value.expand(3, 3))
    far = torch.randn(1, 1, 4) + 10.0
    cb.cache.decoding = True
    assert torch.equal(cb(far)[0, 0], value)                           # the next decoding step keeps the route
    cb.cache.decoding = False
    assert torch.equal(cb(far), cb.base_layer(far))                    # a new one-token prompt is routed afresh


def request(i: int, target: str, subject: str | None = None) -> EditRequest:
    r = REQS[i]
    return EditRequest(case_id=f"{i}-{target}-{subject}", prompt=r.prompt, subject=subject or r.subject,
                       target_new=target, target_true=r.target_true)


@pytest.fixture
def tiny_grace(tiny_llama):
    return lambda **kw: GRACE(base_model=tiny_llama, layer=1, n_iter=20, edit_lr=1.0, **kw)


def test_an_edit_adds_an_entry_and_trains_only_its_value(tiny_grace):
    ed = tiny_grace(eps=1e-4)
    ids = ed.tokenizer(["The mother tongue of Léon Blum is"], return_tensors="pt")
    with torch.no_grad():
        base = ed.model(**ids).logits
    q, _, _ = ed._query(REQS[0])
    ed.edit(REQS[:1])
    assert ed.codebook.size == 1 and torch.equal(ed.codebook.keys[0], q)
    with torch.no_grad():
        assert torch.equal(ed.model(**ids).logits, base)               # another prompt: beyond ε
    first = ed.codebook.values[0].clone()
    ed.edit(REQS[1:2])
    assert ed.codebook.size == 2 and torch.equal(ed.codebook.values[0], first)   # the other value untouched
    lp, batch = ed.target_logprobs([REQS[1].text], [REQS[1].target_new])
    with ed.disabled():
        lp0, _ = ed.target_logprobs([REQS[1].text], [REQS[1].target_new])
    tgt = batch.target_ids[..., None]
    assert (lp.gather(-1, tgt) * batch.target_mask[..., None]).sum() > (lp0.gather(-1, tgt) * batch.target_mask[..., None]).sum()


def test_split_and_coverage(tiny_grace):
    # a neighbouring prompt (another subject) inside ε₀ + ε of the first edit's key
    ed = tiny_grace(eps=10.0)
    a, b = request(0, "Tamil"), request(0, "Berlin", subject="Léon Blum")
    ed.edit([a])
    qa, qb = ed._query(a)[0], ed._query(b)[0]
    d = float((qa - qb).norm())
    assert d <= 20.0
    ed.edit([b])                                                       # another label, overlapping: split
    assert ed.codebook.size == 2
    assert float(ed.codebook.eps[0]) == pytest.approx(d / 2 - 1e-5, abs=1e-5)
    assert float(ed.codebook.eps[1]) == pytest.approx(d / 2, abs=1e-5)
    assert float(ed.codebook.eps[0] + ed.codebook.eps[1]) < d

    cov = tiny_grace(eps=10.0)
    c = request(0, "Tamil", subject="Léon Blum")                       # the same label as a
    cov.edit([a])
    cov.edit([c])
    assert cov.codebook.size == 1                                      # no entry added
    dc = float((qa - cov._query(c)[0]).norm())
    assert float(cov.codebook.eps[0]) == pytest.approx(max(10.0, dc))


def test_withdraw_undo_failure_and_edit_file(tiny_grace, tmp_path, monkeypatch):
    ed = tiny_grace(eps=1e-4)
    with torch.no_grad():
        lp0, _ = ed.target_logprobs([REQS[0].text], [REQS[0].target_new])
    ed.edit(REQS[:1])
    keep = [t.clone() for t in (ed.codebook.keys, ed.codebook.values, ed.codebook.eps)]
    ed.edit(REQS[1:3])
    path = ed.save_edit(tmp_path / "grace-edit")
    fresh = tiny_grace(eps=1e-4)
    fresh.load_edit(path)
    assert fresh.entry_case == ed.entry_case and torch.equal(fresh.codebook.values, ed.codebook.values)

    ed.undo()                                                          # back to the first step exactly
    assert ed.entry_case == [REQS[0].case_id]
    assert all(torch.equal(a, b) for a, b in zip(keep, (ed.codebook.keys, ed.codebook.values, ed.codebook.eps)))

    import editing.editors.grace as grace
    real = fail_on_call(monkeypatch, grace, "target_nll", 25)          # inside the second request's training
    with pytest.raises(EditError):
        ed.edit(REQS[1:3])
    assert ed.entry_case == [REQS[0].case_id] and torch.equal(ed.codebook.values, keep[1])
    monkeypatch.setattr(grace, "target_nll", real)

    assert ed.withdraw(REQS[0].case_id) == 1 and ed.codebook.size == 0
    with torch.no_grad():
        lp, _ = ed.target_logprobs([REQS[0].text], [REQS[0].target_new])
    assert torch.equal(lp, lp0)                                        # withdrawn: the unedited output


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_every_family(family, tiny_dirs, tmp_path):
    ed = GRACE(base_model=str(tiny_dirs[family]), layer=1, n_iter=10, eps=1e-4)
    with torch.no_grad():
        lp0, _ = ed.target_logprobs([REQS[0].text], [REQS[0].target_new])
    ed.edit(REQS[:1])
    with torch.no_grad():
        lp1, _ = ed.target_logprobs([REQS[0].text], [REQS[0].target_new])
        with ed.disabled():
            assert torch.equal(ed.target_logprobs([REQS[0].text], [REQS[0].target_new])[0], lp0)
    assert not torch.equal(lp1, lp0)
    fresh = GRACE(base_model=str(tiny_dirs[family]), layer=1, n_iter=10, eps=1e-4)
    fresh.load_edit(ed.save_edit(tmp_path / "e"))
    with torch.no_grad():
        assert torch.equal(fresh.target_logprobs([REQS[0].text], [REQS[0].target_new])[0], lp1)


def test_a_new_one_token_prompt_after_generate_is_routed_afresh(tiny_grace):
    """generate keeps the prompt pass's route for its decoding steps; a later forward of a one-token
    prompt with the same batch size is no decoding step and must not reuse it."""
    ed = tiny_grace(eps=1e-4)
    ed.edit(REQS[:1])
    one = ed.tokenizer(["Hello"], return_tensors="pt", add_special_tokens=False)
    one = {k: v[:, :1] for k, v in one.items()}
    with torch.no_grad(), ed.disabled():
        base = ed.model(**one).logits
    edited = ed.generate([REQS[0].text], max_new_tokens=3)              # the edit prompt: routed to the entry
    assert ed.codebook._route is not None and int(ed.codebook._route[0]) == 0
    with torch.no_grad():
        assert torch.equal(ed.model(**one).logits, base)
    assert ed.generate([REQS[0].text], max_new_tokens=3) == edited      # decoding steps still keep the route
