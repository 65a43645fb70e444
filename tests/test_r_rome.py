"""r-ROME (BASELINES.md §8 (i)): the rebuilt update solves Ŵk* + b = v* at the template-averaged key;
ROME's original one solves it at the bare key; identical keys give identical updates; and a bare key
nearly C⁻¹-orthogonal to k* blows ROME's update up while r-ROME's stays bounded (disabling edits)."""
import pytest
import torch

from editing.editors import ROME
from editing.layout import linear, weight_out_in
from tests.test_locate import REQS, with_stats

FAST = dict(template_spec=[[3, 2]], v_steps=8, v_lr=0.5, step_checks=False)


def edited(tiny, rebuild, req=REQS[0], **kw):
    ed = with_stats(ROME(base_model=tiny, layers=[1], rebuild=rebuild, **{**FAST, **kw}))
    seen = {}
    real = ed.targets

    def recording(requests, templates, cfg=None):
        out = real(requests, templates, cfg)
        seen["v"] = out.z["mlp"][0].detach().double()
        return out

    ed.targets = recording
    k_star = ed._keys_over([req], 1, [ed.templates()])[0].double()
    k_bare = ed._keys_over([req], 1, [["{}"]])[0].double()
    w0 = weight_out_in(ed.layout.mlp_out(1)).detach().double().clone()
    ed.edit([req])
    return ed, seen["v"], k_star, k_bare, w0


def out_at(ed, k):
    m = ed.layout.mlp_out(1)
    b = getattr(m, "bias", None)
    return linear(m, k.to(m.weight.dtype)).double() + (0 if b is None else b.double())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rebuilt_update_hits_v_star_at_k_star(family, tiny_dirs):
    ed, v, k_star, k_bare, _ = edited(str(tiny_dirs[family]), rebuild=True)
    torch.testing.assert_close(out_at(ed, k_star), v, rtol=1e-4, atol=1e-4)
    orig, v0, _, k0, _ = edited(str(tiny_dirs[family]), rebuild=False)
    torch.testing.assert_close(out_at(orig, k0), v0, rtol=1e-4, atol=1e-4)   # ROME: at the bare key
    miss = float((out_at(orig, k_star) - v0).norm())                          # ... and not at k*
    assert miss > 10 * float((out_at(orig, k0) - v0).norm()) and miss > 1e-2 * float(v0.norm())


def test_identical_keys_give_identical_updates(tiny_llama):
    a, *_ = edited(tiny_llama, rebuild=True, template_spec=[])
    b, *_ = edited(tiny_llama, rebuild=False, template_spec=[])
    assert a.templates() == ["{}"]
    torch.testing.assert_close(weight_out_in(a.layout.mlp_out(1)), weight_out_in(b.layout.mlp_out(1)))


def test_a_nearly_orthogonal_bare_key_disables_rome_not_r_rome(tiny_llama):
    def crafted(ed):
        real = ed._keys_over

        def keys(requests, layer, groups):
            k = real(requests, layer, groups)
            if groups == [["{}"]]:                 # the bare key: almost orthogonal to k* (C = λI here)
                k_star = real(requests, layer, [ed.templates()])
                perp = torch.randn_like(k_star)
                perp -= (perp * k_star).sum(-1, keepdim=True) / k_star.norm(dim=-1, keepdim=True) ** 2 * k_star
                k = perp / perp.norm() * k_star.norm() + 1e-3 * k_star
            return k
        ed._keys_over = keys
        return ed

    norms = {}
    for rebuild in (False, True):
        ed = crafted(with_stats(ROME(base_model=tiny_llama, layers=[1], rebuild=rebuild, **FAST)))
        w0 = weight_out_in(ed.layout.mlp_out(1)).detach().clone()
        torch.manual_seed(0)
        ed.edit(REQS[:1])
        norms[rebuild] = float((weight_out_in(ed.layout.mlp_out(1)) - w0).norm())
    assert norms[False] > 50 * norms[True]
