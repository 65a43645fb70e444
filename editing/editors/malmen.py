"""MALMEN (Tan et al. 2024, "Massive Editing for Large Language Models via Meta Learning";
BASELINES.md §5).

For each edited module and every position j that predicts an answer token of the m edits: the key
k_j (module input) and g_j = ∂L/∂v_j (output gradient of the edits' token-mean NLL). The network
maps the normalised [k_j; g_j] to [k̃_j; g̃_j]; the value difference is d_j = −η (k_j · k̃_j) g̃_j (MEND's
shift at its own key, the diagonal term), and the update is the least-squares solution

    S = argmin_S Σ_j ‖Sᵀ k_j − d_j‖² + e^λ ‖S‖²_F = (KᵀK + e^λ I)⁻¹ Kᵀ D     (`solve`),

added as ΔW = Sᵀ (out, in). η and λ are learned per module. The network: a normaliser, then
`n_blocks` residual blocks y ← y + γ_m ⊙ ReLU(y A B + b) + β_m (scale and shift after the ReLU, a
clamp at 0 as in MEND), A ~ N(0, 1), B = 0, b = 0; one network per weight shape.

Meta-training decouples the two back-propagations, so memory does not grow with m: with S computed
without a graph and put into the model as a leaf, the loss L = NLL(equivalence | W + S) +
loc_coef · KL(p_W ‖ p_{W+S}) over the locality answers gives G = ∂L/∂S by one backward through the LM;
then M = (KᵀK + e^λ I)⁻¹ G, ∂L/∂D = K M and ∂L/∂λ = −e^λ ⟨M, S⟩_F (`solve_grads`), and the
surrogate Σ_j ⟨(∂L/∂D)_j, d_j⟩ + (∂L/∂λ) λ, whose gradient in the network, η and λ is L's, is what
Lightning back-propagates. There is no loss on the edit prompts themselves.
"""
from __future__ import annotations

import torch
from torch import nn

from editing.data.batch import EditBatch
from editing.data.meta import MetaInstance
from editing.editors.mend import FactorEditor, Normaliser


def solve(K: torch.Tensor, D: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """S [d_in, d_out] = (KᵀK + e^λ I)⁻¹ Kᵀ D for K [n, d_in], D [n, d_out], in float64; through the
    n × n system Kᵀ (K Kᵀ + e^λ I)⁻¹ D when n < d_in (the same matrix)."""
    K, D, reg = K.double(), D.double(), lam.double().exp()
    n, d = K.shape
    if n < d:
        return K.t() @ torch.linalg.solve(K @ K.t() + reg * torch.eye(n, dtype=K.dtype, device=K.device), D)
    return torch.linalg.solve(K.t() @ K + reg * torch.eye(d, dtype=K.dtype, device=K.device), K.t() @ D)


def solve_grads(K: torch.Tensor, S: torch.Tensor, G: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂D, ∂L/∂λ) from G = ∂L/∂S: M = (KᵀK + e^λ I)⁻¹ G, ∂L/∂D = K M, ∂L/∂λ = −e^λ ⟨M, S⟩."""
    K, S, G, reg = K.double(), S.double(), G.double(), lam.double().exp()
    n, d = K.shape
    if n < d:  # (KᵀK + cI)⁻¹ = (I − Kᵀ (KKᵀ + cI)⁻¹ K) / c
        M = (G - K.t() @ torch.linalg.solve(K @ K.t() + reg * torch.eye(n, dtype=K.dtype, device=K.device), K @ G)) / reg
    else:
        M = torch.linalg.solve(K.t() @ K + reg * torch.eye(d, dtype=K.dtype, device=K.device), G)
    return K @ M, -reg * (M * S).sum()


class MALMENNet(nn.Module):
    """[k; g] rows -> [k̃; g̃] rows for one weight shape (d_out, d_in), with n_modes module modes."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int = 1920, n_blocks: int = 2):
        super().__init__()
        self.d_in, dim = d_in, d_in + d_out
        r = min(rank, dim)
        self.norm = Normaliser(dim)
        self.A = nn.ParameterList([nn.Parameter(torch.randn(dim, r)) for _ in range(n_blocks)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(r, dim)) for _ in range(n_blocks)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(n_blocks)])
        self.gamma = nn.ParameterList([nn.Parameter(torch.ones(n_modes, dim)) for _ in range(n_blocks)])
        self.beta = nn.ParameterList([nn.Parameter(torch.zeros(n_modes, dim)) for _ in range(n_blocks)])

    def forward(self, k: torch.Tensor, g: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(torch.cat([k, g], dim=-1))
        for A, B, b, gam, bet in zip(self.A, self.B, self.b, self.gamma, self.beta):
            y = y + gam[mode] * ((y @ A) @ B + b).clamp(min=0) + bet[mode]
        return y[:, :self.d_in], y[:, self.d_in:]


class MALMEN(FactorEditor):
    """MALMEN on the linear maps `modules` (relative to a block) of `layers`.

    Args:
        layers: the edited layers (negative counts from the end).
        modules: module paths inside a block (None: the MLP's output projection, as the official code).
        rank: rank of the blocks (capped at d_in + d_out).
        n_blocks: residual blocks of the network.
        edit_lr: initial η of every module (the official `lr`); learned.
        lr: Adam learning rate of the network, η and λ (the official `meta_lr`).
        loc_coef: weight of the locality KL.
    """

    method = "malmen"

    def __init__(self, layers: list[int] = [-6, -5, -4, -3, -2, -1], modules: list[str] | None = None,
                 rank: int = 1920, n_blocks: int = 2, edit_lr: float = 1e-6, lr: float = 1e-5, loc_coef: float = 1.0,
                 **kwargs):
        super().__init__(lr=lr, **kwargs)
        self.inject_modules(layers, modules, [self.layout.family.mlp_out])
        self.malmen = nn.ModuleDict({key: MALMENNet(int(key.split("x")[1]), int(key.split("x")[0]), len(names), rank,
                                                    n_blocks) for key, names in self.groups.items()})
        self.eta = nn.Parameter(torch.full((len(self.names),), float(edit_lr)))
        self.lam = nn.Parameter(torch.zeros(len(self.names)))

    def nets(self) -> nn.ModuleDict:
        return self.malmen

    def edit_shape(self) -> dict:
        return {"modules": list(self.names), "rank": self.hparams.rank, "n_blocks": self.hparams.n_blocks}

    def optimizer_groups(self) -> list[dict]:
        return [{"params": [*self.malmen.parameters(), self.eta, self.lam], "lr": self.hparams.lr}]

    # --- the paper's quantities ------------------------------------------------------------------------
    def values(self, factors: dict) -> dict[str, torch.Tensor]:
        """D [n, d_out] per module: d_j = −η (k_j · k̃_j) g̃_j."""
        out = {}
        for i, n in enumerate(self.names):
            k, g = factors[n]
            kt, gt = self.malmen[self.shape_of[n]](k, g, self.mode[n])
            out[n] = -self.eta[i] * (k * kt).sum(-1, keepdim=True) * gt
        return out

    def updates(self, factors: dict, values: dict) -> dict[str, torch.Tensor]:
        """S [d_in, d_out] per module (no graph)."""
        return {n: solve(factors[n][0], values[n].detach(), self.lam[i].detach()).float()
                for i, n in enumerate(self.names)}

    def instance_loss(self, inst: MetaInstance, S: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """L with S put into the model (S's leaves may require grad)."""
        loc = self.locality_batch(inst)
        with torch.no_grad():
            base = self.locality_logprobs(loc)
        self.pending({n: s.t() for n, s in S.items()})
        try:
            nll, hit = self.nll(inst.equivalence)
            post = self.locality_logprobs(loc)
        finally:
            self.pending(None)
        answers = torch.zeros_like(loc.attention_mask, dtype=torch.bool)   # the positions predicting answers
        rows = torch.arange(len(inst.locality), device=answers.device)[:, None].expand_as(loc.target_positions)
        keep = loc.target_mask.bool()
        answers[rows[keep], loc.target_positions[keep]] = True
        kl = (base.exp() * (base - post)).sum(-1)[answers].sum() / len(inst.locality)   # batchmean over answer rows
        same = (base.argmax(-1) == post.argmax(-1))[answers].float().mean()
        loss = nll.mean() + self.hparams.loc_coef * kl
        return loss, {"edit_nll": float(nll.mean().detach()), "kl": float(kl.detach()),
                      "edit_success": float(hit.float().mean()), "locality": float(same)}

    def meta_loss(self, instances: list[MetaInstance]) -> tuple[torch.Tensor, dict]:
        factors = [self.factors(inst.edits, answer_rows=True) for inst in instances]
        self.update_statistics(factors)
        surrogate, logs = 0.0, {}
        for inst, f in zip(instances, factors):
            with torch.no_grad():
                S = self.updates(f, self.values(f))
            leaves = {n: s.clone().requires_grad_(True) for n, s in S.items()}
            with torch.enable_grad():
                loss, info = self.instance_loss(inst, leaves)
                G = torch.autograd.grad(loss, [leaves[n] for n in self.names])
            D = self.values(f)  # again, with the graph through the network and η
            for i, (n, g) in enumerate(zip(self.names, G)):
                dD, dlam = solve_grads(f[n][0], S[n], g, self.lam[i].detach())
                surrogate = surrogate + (dD.float() * D[n]).sum() + dlam.float() * self.lam[i]
            info["loss"] = float(loss.detach())
            for k, v in info.items():
                logs[k] = logs.get(k, 0.0) + v / len(instances)
        return surrogate / len(instances), logs

    def meta_eval(self, inst: MetaInstance) -> dict[str, float]:
        f = self.factors(inst.edits, answer_rows=True)
        with torch.no_grad():
            loss, info = self.instance_loss(inst, self.updates(f, self.values(f)))
        return {**info, "loss": float(loss)}

    # --- edit steps ---------------------------------------------------------------------------------------
    def apply_edit(self, batch: EditBatch) -> dict:
        f = self.factors(batch.requests, answer_rows=True)
        with torch.no_grad():
            self.apply_deltas({n: s.t() for n, s in self.updates(f, self.values(f)).items()})
        return {"rows": sum(len(k) for k, _ in f.values()) / len(self.names)}
