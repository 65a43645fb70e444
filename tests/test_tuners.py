"""Edits as injected modules and the one layer loop: `print(model)` names the edit module of FT,
iReVa and COMEBA-HK; switching it off, merging and unmerging are exact; the base model's identity
and parameters do not change by injection; a step over 5 layers rebuilds each layer's weight once."""
import pytest
import torch

from editing.editors import COMEBA, FT, JEEP, MEMIT, PMET, AdaPLE, IReVa
from editing.editors.locate import spread_update
from editing.layout import weight_out_in
from editing.models import fingerprint, load_model
from editing.tokens import encode
from editing.tuners import DeltaLinear, EditLayer, HookLayer, KeyValueAdaptor
from tests.conftest import make_tiny
from tests.test_locate import REQS, with_stats

FAST = dict(template_spec=[[3, 2]], v_steps=4, mom2_update_weight=1.0)


def logits(ed, text="The capital of France is"):
    b = encode(ed.tokenizer, [text]).to(ed.device)
    with torch.no_grad():
        return ed.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


@pytest.mark.parametrize("make,cls,part", [
    (lambda p: FT(base_model=p, layers=[1], steps=3), DeltaLinear, "mlp_out"),
    (lambda p: IReVa(base_model=p, layers=[1], steps=2, irr_weight=0.0), KeyValueAdaptor, "mlp"),
    (lambda p: with_stats(COMEBA(base_model=p, layers=[0, 1], alpha_z=0.1, **FAST)), HookLayer, "mlp_out"),
])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_module_is_visible_and_switches_off_exactly(tiny_dirs, family, make, cls, part):
    path = str(tiny_dirs[family])
    ed = make(path)
    base_params = {n: p.detach().clone() for n, p in load_model(path).named_parameters()}
    base = logits(ed)
    ed.edit(REQS[:2])
    assert cls.__name__ in str(ed.model)                      # print(editor.model) names it
    module = ed.layout.module(1, part)
    assert isinstance(module, cls) and ed.edit_layers()
    assert not torch.equal(logits(ed), base)
    with ed.disabled():
        assert torch.equal(logits(ed), base)
        assert not any(m.active for m in ed.edit_layers().values())
    assert all(m.active for m in ed.edit_layers().values())
    # the base model's own tensors are untouched and keep their identity
    from editing.models import base_state_dict
    state = base_state_dict(ed.model, parameters=True)
    assert state.keys() == base_params.keys()
    assert all(torch.equal(state[n], base_params[n]) for n in base_params)
    assert fingerprint(ed.model) == fingerprint(load_model(path))
    # the edit's tensors are the checkpoint; the base layer's are not in it
    assert ed.state_dict() and not any("base_layer" in k for k in ed.state_dict())


def test_ft_merge_and_unmerge(tiny_llama):
    ed = FT(base_model=tiny_llama, layers=[1], steps=3)
    ed.edit(REQS[:1])
    edited = logits(ed)
    w = weight_out_in(ed.layout.mlp_out(1)).detach().clone()
    ed.merge()
    assert isinstance(ed.layout.mlp_out(1), DeltaLinear) and ed.layout.mlp_out(1).merged
    torch.testing.assert_close(weight_out_in(ed.layout.mlp_out(1)), w + ed.delta(1).detach())
    torch.testing.assert_close(logits(ed), edited, atol=1e-5, rtol=1e-5)
    ed.unmerge()
    assert torch.equal(weight_out_in(ed.layout.mlp_out(1)), w) and torch.equal(logits(ed), edited)
    with pytest.raises(TypeError, match="cannot be merged"):
        KeyValueAdaptor(torch.nn.Identity(), 4, torch.relu, 1.0).merge()


def test_inject_and_eject_through_the_layout(tiny_gpt2):
    ed = FT(base_model=tiny_gpt2, layers=[0], steps=1)
    lay = ed.layout
    assert isinstance(lay.mlp_out(0), EditLayer) and lay.mlp_out_weight(0) is not None
    out = lay.eject(0, "mlp_out")
    assert isinstance(out, DeltaLinear) and not isinstance(lay.mlp_out(0), EditLayer)
    with pytest.raises(ValueError, match="no edit module"):
        lay.eject(0, "mlp_out")


def test_comeba_detach_hooks_restores_the_base_model(tiny_gpt2):
    ed = with_stats(COMEBA(base_model=tiny_gpt2, layers=[0, 1], alpha_z=0.1, **FAST))
    base = logits(ed)
    ed.edit(REQS[:2])
    ed.detach_hooks()
    assert not ed.edit_layers() and "HookLayer" not in str(ed.model)
    assert torch.equal(logits(ed), base)


@pytest.fixture(scope="module")
def tiny_six(tmp_path_factory):
    return str(make_tiny("llama", tmp_path_factory.mktemp("six") / "llama", layers=6))


@pytest.mark.parametrize("cls,kw", [(MEMIT, {}), (PMET, {}), (AdaPLE, {}), (COMEBA, dict(hook=False)),
                                    (COMEBA, {}), (JEEP, dict(high_layers=[5]))])
def test_a_step_over_five_layers_rebuilds_each_layer_once(tiny_six, monkeypatch, cls, kw):
    ed = with_stats(cls(base_model=tiny_six, layers=[0, 1, 2, 3, 4], **FAST, **kw))
    ed.edit(REQS[:1])  # warm caches (templates) before counting
    writes: list[int] = []
    real = type(ed).write_weight
    monkeypatch.setattr(type(ed), "write_weight", lambda self, layer: (writes.append(layer), real(self, layer))[1])
    ed.edit(REQS[1:3])
    assert sorted(writes) == sorted(ed.layers), writes


def test_spread_update_is_the_layer_loop():
    """Fake callables: the residual is spread 1/n, 1/(n−1), ... and each layer is written once, in order."""
    torch.manual_seed(0)
    z = torch.randn(2, 3)
    state = {"cur": torch.zeros(2, 3)}
    written = []
    eye = torch.eye(4)

    def write(layer, factors, K):
        left, right = factors
        delta = left @ right.T                                   # [3, 4]
        state["cur"] = state["cur"] + (K.double() @ delta.T).float()
        written.append(layer)
    K = torch.eye(2, 4) * 10
    norms = spread_update([3, 4, 5], z, keys=lambda l: K, current=lambda: state["cur"], covariance=lambda l: eye,
                          write=write, lam=1e-6, spread="even")
    assert written == [3, 4, 5] and len(norms) == 3
    torch.testing.assert_close(state["cur"], z, atol=1e-4, rtol=1e-4)
