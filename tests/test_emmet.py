"""EMMET (Gupta et al. 2024; docs/emmet.md): the equality-constrained closed form meets every edit
constraint exactly (ρ = 0) and is the minimum-norm solution a direct KKT solve finds; with ρ > 0 it is
the least-squares form with key weight 1/ρ; one key gets no ρ; the editor writes Δ K̄ᵀ = Rᵀ into its
layer, on GPT-2 (Conv1D) and Llama layouts, and undo is exact."""
import pytest
import torch

from editing.editors import EMMET
from editing.editors.locate.spread import closed_form, equality_form
from editing.layout import weight_out_in
from tests.test_locate import REQS, with_stats


def problem(u=3, d_ff=10, d=6, seed=0):
    torch.manual_seed(seed)
    K, R = torch.randn(u, d_ff, dtype=torch.float64), torch.randn(u, d, dtype=torch.float64)
    B = torch.randn(d_ff, d_ff, dtype=torch.float64)
    return K, R, B @ B.T / d_ff + 0.1 * torch.eye(d_ff, dtype=torch.float64)


def test_equality_form_is_the_constrained_least_squares():
    K, R, C = problem()
    lam = 7.0
    left, right = equality_form(K, R, C, lam, ridge=0.0)
    delta = left @ right.T                                         # [d, d_ff]
    torch.testing.assert_close(delta @ K.T, R.T, rtol=1e-10, atol=1e-10)   # every constraint met
    # direct KKT solve of min δᵀ(λC)δ s.t. Kδ = r, one output row at a time
    u, d_ff = K.shape
    kkt = torch.zeros(d_ff + u, d_ff + u, dtype=torch.float64)
    kkt[:d_ff, :d_ff], kkt[:d_ff, d_ff:], kkt[d_ff:, :d_ff] = 2 * lam * C, K.T, K
    rhs = torch.cat([torch.zeros(d_ff, R.shape[1], dtype=torch.float64), R], 0)
    direct = torch.linalg.solve(kkt, rhs)[:d_ff].T
    torch.testing.assert_close(delta, direct, rtol=1e-9, atol=1e-10)
    # λ cancels without ρ; the least-squares form (MEMIT) misses the constraints
    torch.testing.assert_close(equality_form(K, R, C, 1.0, 0.0)[1], right, rtol=1e-9, atol=1e-9)
    l2, r2 = closed_form(K, R, C, lam)
    assert float((l2 @ r2.T @ K.T - R.T).norm()) > 1e-2 * float(R.norm())


def test_ridge_is_a_penalty_of_weight_one_over_rho():
    K, R, C = problem(seed=1)
    lam, rho = 3.0, 0.1
    left, right = equality_form(K, R, C, lam, ridge=rho)
    l2, r2 = closed_form(K, R / rho, C, lam, key_weight=1 / rho)
    torch.testing.assert_close(left @ right.T, l2 @ r2.T, rtol=1e-8, atol=1e-10)
    assert float((left @ right.T @ K.T - R.T).norm()) > 1e-6            # no longer exact
    # a single key gets no ridge: its constraint holds exactly (r-ROME's update)
    left, right = equality_form(K[:1], R[:1], C, lam, ridge=rho)
    torch.testing.assert_close(left @ right.T @ K[:1].T, R[:1].T, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="equality"):
        closed_form(K, R, C, lam, prior=K.T @ K, equality=rho)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_emmet_writes_its_constraints_and_undoes_exactly(family, tiny_dirs):
    ed = with_stats(EMMET(base_model=str(tiny_dirs[family]), layers=[1], emmet_lambda=0.0, mom2_update_weight=1.0,
                          template_spec=[[3, 2]], v_steps=8, v_lr=0.5, step_checks=False))
    seen = {}
    real = ed.targets
    ed.targets = lambda requests, templates, cfg=None: seen.setdefault("t", real(requests, templates, cfg))
    w0 = weight_out_in(ed.layout.mlp_out(1)).detach().double().clone()
    cur0 = ed.values(REQS[:2], "block", 1).double()
    ed.edit(REQS[:2])
    delta = weight_out_in(ed.layout.mlp_out(1)).double() - w0
    K = ed.keys(REQS[:2], 1).double()                 # a layer's keys do not depend on its own update
    R = seen["t"].z["block"].double() - cur0
    assert float(R.norm()) > 1e-3
    torch.testing.assert_close(delta @ K.T, R.T, rtol=1e-3, atol=1e-4 * float(R.abs().max()))
    ed.undo()
    assert torch.equal(weight_out_in(ed.layout.mlp_out(1)).double(), w0)


def test_emmet_refuses_the_projection(tiny_llama):
    with pytest.raises(ValueError, match="projection"):
        EMMET(base_model=tiny_llama, projection="null_space")
    with pytest.raises(ValueError, match="emmet_lambda"):
        EMMET(base_model=tiny_llama, emmet_lambda=-1.0)
