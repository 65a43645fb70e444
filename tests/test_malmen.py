"""MALMEN (BASELINES.md §5 (i)): the solve is the regularised least squares (both the d_in and the n
system), one row gives k dᵀ / (‖k‖² + e^λ), an identity network with λ → −∞ meets every key's value,
the hand-derived ∂L/∂D and ∂L/∂λ equal autograd through the solve, the decoupled surrogate gives the
coupled loss's gradients exactly, and an edit step writes Sᵀ into the deltas; fit and test run."""
import json

import pytest
import torch

from editing.editors import MALMEN
from editing.editors.malmen import solve, solve_grads
from tests.test_cli import cli
from tests.test_locate import REQS
from tests.test_mend import FIT, ddp_and_one_process, instances


@pytest.mark.parametrize("n", [3, 12])  # fewer rows than d_in (the n×n system) and more
def test_solve_is_the_regularised_least_squares(n):
    torch.manual_seed(0)
    K, D, lam = torch.randn(n, 8, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64), torch.tensor(-0.7)
    c = float(lam.exp())
    A = torch.cat([K, c ** 0.5 * torch.eye(8, dtype=torch.float64)])   # min ‖KS − D‖² + c‖S‖²
    B = torch.cat([D, torch.zeros(8, 5, dtype=torch.float64)])
    torch.testing.assert_close(solve(K, D, lam), torch.linalg.lstsq(A, B).solution)
    k, d = K[:1], D[:1]
    torch.testing.assert_close(solve(k, d, lam), k.t() @ d / (k.square().sum() + c))


@pytest.mark.parametrize("n", [3, 12])
def test_hand_derived_gradients_equal_autograd(n):
    torch.manual_seed(1)
    K = torch.randn(n, 8, dtype=torch.float64)
    D = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    G = torch.randn(8, 5, dtype=torch.float64)
    S = solve(K, D, lam)
    dD, dlam = torch.autograd.grad(S, [D, lam], G)
    hD, hlam = solve_grads(K, S.detach(), G, lam.detach())
    torch.testing.assert_close(hD, dD)
    torch.testing.assert_close(hlam, dlam)


def test_identity_network_meets_every_value(tiny_llama):
    ed = MALMEN(base_model=tiny_llama, rank=4, layers=[1], step_checks=False)
    net = next(iter(ed.malmen.values()))
    dim = net.norm.total.numel()
    net.norm.add(torch.cat([torch.tensor([3.0]), torch.zeros(dim), torch.full((dim,), 2.0)]).double())  # μ 0, σ 1
    f = ed.factors(REQS[:2], answer_rows=True)
    ed.lam.data.fill_(-30.0)
    name = ed.names[0]
    K, D = f[name][0], ed.values(f)[name].detach()
    assert len(K) < K.shape[1]
    S = ed.updates(f, ed.values(f))[name]
    torch.testing.assert_close(K @ S, D, rtol=1e-4, atol=1e-9)
    kt, gt = net(*f[name], 0)
    torch.testing.assert_close(torch.cat([kt, gt], -1), torch.cat(f[name], -1))


def test_surrogate_gradient_equals_the_coupled_gradient(tiny_llama):
    torch.manual_seed(0)
    ed = MALMEN(base_model=tiny_llama, rank=4, layers=[1, 2], step_checks=False, edit_lr=1e-2)
    batch = instances(1, k=2)
    loss, _ = ed.meta_loss(batch)            # trains the normaliser too; run once so both see the same
    for net in ed.malmen.values():            # statistics, and give B a value so every parameter matters
        for B in net.B:
            B.data.normal_(std=0.01)
    params = [ed.eta, ed.lam, *ed.malmen.parameters()]
    loss, _ = ed.meta_loss(batch)
    decoupled = torch.autograd.grad(loss, params, allow_unused=True)
    # coupled: S = solve(K, D(θ), λ) with the graph, the loss straight through it (the normaliser as
    # the decoupled step left it: factors do not update it)
    inst = batch[0]
    f = ed.factors(inst.edits, answer_rows=True)
    D = ed.values(f)
    S = {n: solve(f[n][0], D[n], ed.lam[i]).float() for i, n in enumerate(ed.names)}
    coupled_loss, _ = ed.instance_loss(inst, S)
    coupled = torch.autograd.grad(coupled_loss, params, allow_unused=True)
    for a, b in zip(decoupled, coupled):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)


def test_edit_step_writes_the_transposed_solution(tiny_llama):
    ed = MALMEN(base_model=tiny_llama, rank=4, layers=[1], step_checks=False, edit_lr=1e-2)
    ed.meta_loss(instances(1, k=2))
    f = ed.factors(REQS, answer_rows=True)
    with torch.no_grad():
        S = ed.updates(f, ed.values(f))
    ed.edit(REQS)
    for n, m in ed.delta_layers().items():
        torch.testing.assert_close(m.delta, S[n].t())


def test_fit_then_test(tiny_llama, tmp_path):
    args = ["--config", "configs/malmen.yaml", "--model.init_args.base_model", tiny_llama,
            "--model.init_args.rank", 8, "--model.init_args.layers", "[1, 2]", *FIT[4:], "--data.meta_edits", 2]
    cli("fit", *args, "--trainer.default_root_dir", tmp_path / "fit")
    [edit] = list((tmp_path / "fit").rglob("edit.safetensors"))
    cli("test", *args, "--ckpt_path", edit, "--data.edit_batch_size", 4, "--trainer.default_root_dir", tmp_path / "test")
    [res] = [json.loads(p.read_text()) for p in (tmp_path / "test").rglob("results.json")]
    assert res["method"] == "malmen" and res["num_edits"] == 4 and res["edit_batch_size"] == 4


def test_ddp_training_equals_one_process(tiny_llama, tmp_path):
    """As MEND's: DDP on two CPU processes with one 2-edit instance each trains the editor that one
    process trains with both instances in its batch (to 1e-5)."""
    a, _ = ddp_and_one_process(tmp_path, "--config", "configs/malmen.yaml", "--model.init_args.base_model", tiny_llama,
                               "--model.init_args.rank", 8, "--model.init_args.layers", "[1, 2]", *FIT[4:],
                               "--data.meta_edits", 2, "--model.init_args.lr", 1e-3)
    init = MALMEN(base_model=tiny_llama, rank=8, layers=[1, 2]).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if k in init and a[k].is_floating_point())  # it trained
