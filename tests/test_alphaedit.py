"""AlphaEdit (BASELINES.md §7 (i)): P is a symmetric idempotent projector (I for an infinite
threshold); the projected closed form is the stationary point of its least squares and Δ(I − P) = 0,
so keys C₀ is made of are left alone; C_p grows by exactly KKᵀ of the step's keys; undo and failing
steps keep weights and C_p exact; `MEMIT(projection="null_space")` is AlphaEdit."""
import pytest
import torch

from editing.editors import MEMIT, AlphaEdit, EditError
from editing.editors.locate.projection import null_space
from editing.editors.locate.spread import closed_form
from editing.layout import weight_out_in
from tests.test_locate import REQS

FAST = dict(template_spec=[[3, 2]], v_steps=8, v_lr=0.5, layers=[1, 2], step_checks=False)


def test_projector():
    torch.manual_seed(0)
    A = torch.randn(12, 12, dtype=torch.float64)
    C = A @ A.T / 12
    S = torch.linalg.eigvalsh(C)
    P = null_space(C, float(S[5]))                       # the 5 smallest directions
    torch.testing.assert_close(P, P.T)
    torch.testing.assert_close(P @ P, P)
    assert round(float(torch.trace(P))) == 5
    torch.testing.assert_close(null_space(C, float("inf")), torch.eye(12, dtype=torch.float64))
    # relative: a share of the largest eigenvalue, so the same for C and any multiple of it
    rel = float((S[4] + S[5]) / 2 / S.max())
    torch.testing.assert_close(null_space(C, rel, "relative"), P)
    torch.testing.assert_close(null_space(100.0 * C, rel, "relative"), P)
    assert round(float(torch.trace(null_space(100.0 * C, float(S[5]))))) < 5     # absolute: another space


def test_projected_closed_form_is_stationary_and_in_range():
    torch.manual_seed(1)
    u, d_ff, d = 3, 10, 6
    K, R, Kp = torch.randn(u, d_ff), torch.randn(u, d), torch.randn(4, d_ff, dtype=torch.float64)
    B = torch.randn(d_ff, d_ff, dtype=torch.float64)
    C = B @ B.T / d_ff
    P = null_space(C, float(torch.linalg.eigvalsh(C)[6]))
    alpha = 10.0
    left, right = closed_form(K, R, C, lam=123.0, prior=Kp.T @ Kp, projection=P, alpha=alpha)
    delta = left @ right.T                                # [d, d_ff]
    I = torch.eye(d_ff, dtype=torch.float64)
    assert float((delta @ (I - P)).abs().max()) < 1e-10  # Δ lies in range(P): Δk₀ = 0 off the null space
    K64, R64 = K.double(), R.double()
    # the gradient of ‖Δ̃PKᵀ − Rᵀ‖² + ‖Δ̃PK_pᵀ‖² + α‖Δ̃P‖² at Δ̃ = Δ vanishes
    grad = (delta @ K64.T - R64.T) @ K64 @ P + delta @ (Kp.T @ Kp) @ P + alpha * delta @ P
    assert float(grad.abs().max()) < 1e-9


def structured(ed, big=1.0, small=1e-4):
    """A covariance with a real null space: half its eigenvalues large, half small (P = the small half)."""
    torch.manual_seed(0)
    for l in ed.layers:
        n = ed.layout.mlp_key_size(l)
        Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        S = torch.tensor([big] * (n // 2) + [small] * (n - n // 2), dtype=torch.float64)
        ed._stats[l] = (Q * S) @ Q.T
    return ed


def test_alphaedit_protects_the_preserved_keys_and_accumulates_c_p(tiny_llama):
    ed = structured(AlphaEdit(base_model=tiny_llama, **FAST))
    w0 = {l: weight_out_in(ed.layout.mlp_out(l)).detach().double().clone() for l in ed.layers}
    ed.edit(REQS[:2])
    for l in ed.layers:
        P = ed.null_space(l)
        assert 0 < round(float(torch.trace(P))) < P.shape[0]
        delta = weight_out_in(ed.layout.mlp_out(l)).double() - w0[l]
        assert float(delta.abs().max()) > 1e-6
        # float32 weights: Δ(I − P) is zero up to the weights' rounding
        assert float((delta @ (torch.eye(P.shape[0], dtype=torch.float64) - P)).norm()) < 1e-3 * float(delta.norm())
        K = ed.keys(REQS[:2], l).double()                # recomputed on the edited model
        torch.testing.assert_close(ed.prior_keys(l), K.T @ K, rtol=1e-6, atol=1e-9)
    # MEMIT with the projection is AlphaEdit
    m = structured(MEMIT(base_model=tiny_llama, projection="null_space", **FAST))
    m.edit(REQS[:2])
    for l in ed.layers:
        torch.testing.assert_close(weight_out_in(m.layout.mlp_out(l)), weight_out_in(ed.layout.mlp_out(l)))


def test_undo_and_failure_keep_weights_and_c_p_exact(tiny_llama, monkeypatch):
    ed = structured(AlphaEdit(base_model=tiny_llama, **FAST))
    ed.edit(REQS[:1])
    after_1 = {l: weight_out_in(ed.layout.mlp_out(l)).clone() for l in ed.layers}
    cp_1 = {l: ed.prior_keys(l).clone() for l in ed.layers}
    ed.edit(REQS[1:2])
    assert not torch.equal(ed.prior_keys(1), cp_1[1])
    ed.undo()
    for l in ed.layers:
        assert torch.equal(weight_out_in(ed.layout.mlp_out(l)), after_1[l]) and torch.equal(ed.prior_keys(l), cp_1[l])

    real = AlphaEdit.write_layer

    def failing(self, layer, factors, K):
        real(self, layer, factors, K)
        if layer == self.layers[-1]:
            raise RuntimeError("boom")

    monkeypatch.setattr(AlphaEdit, "write_layer", failing)
    with pytest.raises(EditError):
        ed.edit(REQS[2:3])
    for l in ed.layers:
        assert torch.equal(weight_out_in(ed.layout.mlp_out(l)), after_1[l]) and torch.equal(ed.prior_keys(l), cp_1[l])
    assert len(ed.projected_keys.steps) == 1
