"""Fusion of an update into the weights (AdaPLE's drop-and-rescale, top-k retain) as a plug-in of the
locate-then-edit core: DR keeps the expectation, a seed fixes the mask, p = 0 is the plain update,
the history stays exactly reproducible (undo, checkpoints) and every closed-form editor takes it."""
import pytest
import torch

from editing.editors import MEMIT, ROME
from editing.editors.locate import EditHistory, drop_mask, fuse, fusion_spec
from tests.test_locate import FAST, REQS, with_stats


def test_drop_and_rescale_keeps_expectation():
    torch.manual_seed(0)
    delta = torch.randn(8, 12, dtype=torch.float64)
    mean = sum(fuse(delta, fusion_spec("dr", 0.8, seed=s)) for s in range(4000)) / 4000
    # each entry is Δ·Bernoulli(0.2)/0.2: std of the mean = |Δ|·sqrt(0.8/0.2/4000) ≈ 0.032|Δ|
    assert torch.allclose(mean, delta, atol=0.15 * float(delta.abs().max()))
    assert float((mean - delta).abs().mean()) < 0.05 * float(delta.abs().mean())
    one = fuse(delta, fusion_spec("dr", 0.8, seed=3))
    kept = one != 0
    assert 0.1 < kept.double().mean() < 0.3
    assert torch.allclose(one[kept], delta[kept] / 0.2)


def test_seed_fixes_mask_and_p0_is_plain():
    a, b = drop_mask((50, 40), 0.7, 11), drop_mask((50, 40), 0.7, 11)
    assert torch.equal(a, b)
    assert not torch.equal(a, drop_mask((50, 40), 0.7, 12))
    assert fusion_spec("dr", 0.0) is None and fusion_spec("add") is None
    with pytest.raises(ValueError, match="fusion"):
        fusion_spec("average")
    with pytest.raises(ValueError, match="drop_rate"):
        fusion_spec("dr", 1.0)


def test_topk_retains_largest_share():
    delta = torch.arange(1, 101, dtype=torch.float64).reshape(10, 10) * torch.tensor([1.0, -1.0]).repeat(50).reshape(10, 10)
    out = fuse(delta, fusion_spec("topk", keep=0.2))
    assert int((out != 0).sum()) == 20
    assert torch.equal(out[out != 0].abs().sort().values, torch.arange(81, 101, dtype=torch.float64))


def test_history_prefix_cache_equals_from_scratch():
    torch.manual_seed(0)
    h = EditHistory()
    for i in range(6):
        spec = fusion_spec("dr", 0.5, seed=i) if i % 2 else None
        entry = (torch.randn(5, 2), torch.randn(7, 2)) + ((spec,) if spec else ())
        h.steps.append({0: entry})
        incremental = h.delta(0, (5, 7), "cpu")
    scratch = EditHistory()
    scratch.set_extra_state(h.get_extra_state())
    assert torch.equal(scratch.delta(0, (5, 7), "cpu"), incremental)
    h.truncate(3)
    scratch.set_extra_state(h.get_extra_state())
    assert torch.equal(h.delta(0, (5, 7), "cpu"), scratch.delta(0, (5, 7), "cpu"))


def test_memit_with_dr_fuses_each_layer_and_undoes_exactly(tiny_llama, tmp_path):
    kw = dict(base_model=tiny_llama, layers=[0, 1], mom2_update_weight=1.0, **FAST)
    plain = with_stats(MEMIT(**kw))
    dr = with_stats(MEMIT(fusion="dr", drop_rate=0.5, fusion_seed=7, **kw))
    w0 = {l: dr._weight(l).detach().clone() for l in dr.layers}
    plain.edit(REQS[:2])
    dr.edit(REQS[:2])
    for l in dr.layers:
        d_plain = plain._weight(l).double() - w0[l].double()
        d_dr = dr._weight(l).double() - w0[l].double()
        zero = d_dr.abs() < 1e-12
        assert 0.35 < zero.double().mean() < 0.65          # about half of the entries dropped
    # layer 0 is fused from the same Δ as the plain run (layer 1's Δ sees the dropped layer 0)
    d_plain0 = plain._weight(0).double() - w0[0].double()
    d_dr0 = dr._weight(0).double() - w0[0].double()
    kept = d_dr0.abs() > 1e-12
    assert torch.allclose(d_dr0[kept], 2 * d_plain0[kept], rtol=1e-4, atol=1e-6)
    # checkpoint round-trip reproduces the masks; undo restores W0 bit-for-bit
    path = dr.save_edit(tmp_path / "dr.ckpt")
    fresh = MEMIT(fusion="dr", drop_rate=0.5, fusion_seed=7, **kw)
    fresh.load_edit(path)
    for l in dr.layers:
        assert torch.equal(fresh._weight(l), dr._weight(l))
    dr.undo()
    for l in dr.layers:
        assert torch.equal(dr._weight(l), w0[l])


def test_rome_with_dr_masks_each_request(tiny_gpt2):
    ed = with_stats(ROME(base_model=tiny_gpt2, layers=[1], fusion="dr", drop_rate=0.8, **FAST))
    w0 = ed._weight(1).detach().clone()
    ed.edit(REQS[:2])
    entry = ed.history.steps[-1][1]
    assert isinstance(entry, list) and len(entry) == 2
    assert entry[0][2]["seed"] != entry[1][2]["seed"]
    changed = (ed._weight(1) != w0).double().mean()
    assert 0.2 < changed < 0.5   # two independent 20 % masks: ≈ 1 − 0.8² = 36 %
    ed.undo()
    assert torch.equal(ed._weight(1), w0)
