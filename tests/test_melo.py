"""MELO (BASELINES.md §3 (i)): an empty database and a prompt routed to no block give the base output
exactly; block k's training changes only the prompts routed to it and leaves the other blocks
bit-identical; an edited prompt routes to its own block; the LoRA delta is s · x A_b B_b with
s = num_block; disabling, failing steps and edit files restore or reproduce the edit exactly."""
import pytest
import torch

from editing.editors import MELO
from editing.editors.base import EditError
from editing.tuners.melo import BASE
from conftest import fail_on_call
from tests.test_locate import REQS

OTHER = "The mother tongue of Léon Blum is"


@pytest.fixture
def make(tiny_llama):
    return lambda **kw: MELO(base_model=tiny_llama, router_layer=0, num_iter=15, edit_lr=1e-2,
                             init_radius=1e-3, num_block=10, **kw)


def logits(ed, texts):
    ids = ed.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return ed.model(**ids).logits


def test_routing_and_blocks(make):
    ed = make()
    base_other, base_0 = logits(ed, [OTHER]), logits(ed, [REQS[0].text])
    assert torch.equal(logits(ed, [REQS[0].text]), base_0)          # empty database: nothing changes
    ed.edit(REQS[:1])                                                # block 0
    q0 = ed._queries(REQS[:1])[0]
    assert ed.router.blocks_for(q0) == [0]                           # the edited prompt routes to its block
    assert torch.equal(logits(ed, [OTHER]), base_other)              # beyond every radius: the base, exactly
    after_0 = logits(ed, [REQS[0].text])
    assert not torch.equal(after_0, base_0)
    block0 = [p.clone() for p in ed.block_parameters(0)]
    ed.edit(REQS[1:2])                                               # block 1
    assert all(torch.equal(a, b) for a, b in zip(block0, ed.block_parameters(0)))
    assert torch.equal(logits(ed, [REQS[0].text]), after_0)          # block 1 changed only its own prompts
    with ed.disabled():
        assert torch.equal(logits(ed, [REQS[0].text]), base_0)


def test_scale_is_num_block(make):
    ed = make()
    ed.edit(REQS[:1])
    name, m = next((n, m) for n, m in ed.lora_modules())
    x = torch.randn(1, 3, m.base_layer.in_features)
    a, b = m.lora_A["block_0"].weight, m.lora_B["block_0"].weight        # A: [r, in], B: [out, r]
    expected = m.base_layer(x) + ed.hparams.num_block * (x @ a.T @ b.T)
    torch.testing.assert_close(m(x, adapter_names=["block_0"]), expected)
    assert torch.equal(m(x, adapter_names=["__base__"]), m.base_layer(x))


def test_failure_restores_and_edit_file_round_trips(make, tmp_path, monkeypatch):
    ed = make()
    ed.edit(REQS[:2])
    before = {k: v.clone() for k, v in ed.state_dict().items()}
    db, labels = ed.router.database(), list(ed.labels)
    import editing.editors.melo as melo
    real = fail_on_call(monkeypatch, melo, "target_nll", 5)
    with pytest.raises(EditError):
        ed.edit(REQS[2:3])
    monkeypatch.setattr(melo, "target_nll", real)
    after = ed.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(db[k], ed.router.database()[k]) for k in db) and ed.labels == labels and ed.blocks == 1

    ed.edit(REQS[2:3])
    path = ed.save_edit(tmp_path / "melo-edit")
    fresh = make()
    fresh.load_edit(path)
    texts = [r.text for r in REQS[:3]] + [OTHER]
    for t in texts:
        assert torch.equal(logits(fresh, [t]), logits(ed, [t]))


def test_undo_restores_blocks_and_database(make):
    ed = make()
    ed.edit(REQS[:1])
    db, after_1 = ed.router.database(), logits(ed, [REQS[0].text])
    ed.edit(REQS[1:2])
    ed.undo()
    assert ed.blocks == 1 and all(torch.equal(db[k], ed.router.database()[k]) for k in db)
    assert torch.equal(logits(ed, [REQS[0].text]), after_1)
    assert ed.router.blocks_for(ed._queries(REQS[1:2])[0]) != [1]


def test_withdrawing_one_edit_restores_its_prompt_exactly(make, tmp_path):
    ed = make()
    base_0 = logits(ed, [REQS[0].text])
    ed.edit(REQS[:1])                                                # block 0
    ed.edit(REQS[1:2])                                               # block 1
    after_1 = logits(ed, [REQS[1].text])
    assert ed.withdrawable_ids() == {REQS[0].case_id, REQS[1].case_id}
    path = ed.save_edit(tmp_path / "melo-both")
    assert ed.withdraw([REQS[0].case_id]) == 1
    assert torch.equal(logits(ed, [REQS[0].text]), base_0)           # the withdrawn edit: the base, exactly
    assert torch.equal(logits(ed, [REQS[1].text]), after_1)          # the other edit: untouched
    assert ed.router.blocks_for(ed._queries(REQS[:1])[0]) == [-1]
    assert ed.withdrawable_ids() == {REQS[1].case_id} and ed.withdraw(["nope"]) == 0
    with pytest.raises(ValueError):
        ed.undo()                                                    # the step history no longer applies
    fresh = make()
    fresh.load_edit(path)                                            # the edit file keeps each point's edit
    assert fresh.withdraw(REQS[0].case_id) == 1
    assert torch.equal(logits(fresh, [REQS[0].text]), base_0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_every_family(family, tiny_dirs, tmp_path):
    kw = dict(base_model=str(tiny_dirs[family]), router_layer=0, num_iter=10, edit_lr=1e-2, init_radius=1e-3,
              num_block=10)
    ed = MELO(**kw)
    base = logits(ed, [REQS[0].text])
    ed.edit(REQS[:1])
    edited = logits(ed, [REQS[0].text])
    assert not torch.equal(edited, base)
    with ed.disabled():
        assert torch.equal(logits(ed, [REQS[0].text]), base)
    fresh = MELO(**kw)
    fresh.load_edit(ed.save_edit(tmp_path / "e"))
    assert torch.equal(logits(fresh, [REQS[0].text]), edited)


def test_a_new_one_token_prompt_after_generate_is_routed_afresh(make):
    ed = make()
    ed.edit(REQS[:1])
    one = ed.tokenizer(["Hello"], return_tensors="pt", add_special_tokens=False)
    one = {k: v[:, :1] for k, v in one.items()}
    with torch.no_grad(), ed.disabled():
        base = ed.model(**one).logits
    edited = ed.generate([REQS[0].text], max_new_tokens=3)
    assert ed.router._kept is not None and ed.router._kept[0] != BASE
    with torch.no_grad():
        assert torch.equal(ed.model(**one).logits, base)
    assert ed.generate([REQS[0].text], max_new_tokens=3) == edited
