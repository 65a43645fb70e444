"""AdaPLE: the closed form solves the objective written in its docstring, the "memit" residual mode is
PMET's update, drop-and-rescale is on by default, and edits undo exactly."""
import pytest
import torch

from editing.editors import PMET, AdaPLE
from editing.editors.locate import closed_form
from tests.test_locate import FAST, REQS, with_stats


def test_eq4_closed_form_solves_documented_objective():
    torch.manual_seed(0)
    d, dff, u, lam = 5, 9, 3, 0.7
    W = torch.randn(d, dff, dtype=torch.float64)
    K = torch.randn(u, dff, dtype=torch.float64)        # keys as rows
    r = torch.randn(u, d, dtype=torch.float64)
    Lc = torch.randn(dff, dff, dtype=torch.float64)
    C = Lc @ Lc.T / dff
    V1 = K @ W.T                                         # what the keys produce now
    V2 = V1 + r                                          # the new values
    R = V2 - 3 * V1                                      # the paper's R = V₂ − 3WK₁
    left, right = closed_form(K, R, C, lam, key_weight=2.0)
    delta = left @ right.T
    # min λ tr(ΔCΔᵀ) + ‖ΔK₁ − (V₂ − V₁)‖² + ‖ΔK₁ + 2V₁‖² as one least-squares problem in Δ
    chol = torch.linalg.cholesky(C)
    A = torch.cat([lam ** 0.5 * chol, K.T, K.T], dim=1)                 # Δ A ≈ B
    B = torch.cat([torch.zeros(d, dff, dtype=torch.float64), (V2 - V1).T, (-2 * V1).T], dim=1)
    direct = torch.linalg.lstsq(A.T, B.T).solution.T
    assert torch.allclose(delta, direct, atol=1e-9)
    # and the AdaPLE editor builds exactly this R from the spread residual r
    ed = AdaPLE.__new__(AdaPLE)
    ed.residual_mode = "eq4"
    ed._weight = lambda layer: W
    assert torch.allclose(AdaPLE.layer_residual(ed, 0, K, r), R)


def test_memit_mode_without_dr_is_pmet(tiny_llama):
    kw = dict(base_model=tiny_llama, layers=[0, 1], mom2_update_weight=1.0, **FAST)
    pmet = with_stats(PMET(**kw))
    ada = with_stats(AdaPLE(residual_mode="memit", fusion="add", **kw))
    pmet.edit(REQS[:2])
    ada.edit(REQS[:2])
    for l in pmet.layers:
        assert torch.equal(ada._weight(l), pmet._weight(l))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_default_edit_is_dropped_and_undoes_exactly(tiny_dirs, family):
    ed = with_stats(AdaPLE(base_model=str(tiny_dirs[family]), layers=[0, 1], mom2_update_weight=1.0, **FAST))
    assert ed.hparams.fusion == "dr" and ed.hparams.drop_rate == 0.8 and ed.target_parts == ("attn_out", "mlp")
    w0 = {l: ed._weight(l).detach().clone() for l in ed.layers}
    info = ed.edit(REQS)
    assert info["residual_first"] > 0
    for l in ed.layers:
        changed = (ed._weight(l) != w0[l]).double().mean()
        assert 0.1 < changed < 0.3           # p = 0.8: about a fifth of the entries move
    ed.undo()
    for l in ed.layers:
        assert torch.equal(ed._weight(l), w0[l])


def test_options_validated_and_mlp_only_ablation(tiny_llama):
    with pytest.raises(ValueError, match="residual_mode"):
        AdaPLE(base_model=tiny_llama, layers=[0], residual_mode="eq3")
    ed = AdaPLE(base_model=tiny_llama, layers=[0, 1], attn_delta=False)
    assert ed.target_config().parts == ("mlp",)
