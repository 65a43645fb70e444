"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale"; BASELINES.md §4).

For each edited linear map with per-row input u_b and output gradient δ_b = ∂L/∂y_b of the edit's
loss (rows = batch × positions), ∇_W L = Σ_b δ_b u_bᵀ. MEND's editor network maps each row's
(u_b, δ_b) to (ũ_b, δ̃_b) and the edit is W̃ = W + sign · α_l Σ_b δ̃_b ũ_bᵀ, with a learned
per-weight step α_l (`edit_lrs`, initialised to `edit_lr`). The official code adds (sign +1, a bug
confirmed by the author that training learns to flip); the paper subtracts (sign −1); `sign`
chooses. The network (`GradientTransform`): per-feature normalisation of [u; δ] by running
statistics over every training row (frozen outside training), then `n_hidden + 1` residual
low-rank layers z ← z + ReLU(γ_m ⊙ (U V z + c) + β_m) (a clamp at 0, whose gradient at 0 is 1, as the
official code does, so that the identity start trains), U = 0 and c = 0 at start (the identity), V ~
N(0, 1), γ = 1, β = 0, one network per weight shape with the weight's index among those of its shape
as the mode m. u and δ are detached: MEND is first-order in the language model.

Meta-training (one instance: edits, an equivalence sample, locality samples): the LM loss of the
edits gives (u, δ); the proposed update enters the model as the pending delta of each edited
module's `DeltaLinear` (functional: the model's weights never change); the loss is
c_edit · NLL(equivalence target | edited) + c_loc · KL(p_unedited ‖ p_edited) over the locality
texts' positions. At test time an edit step computes (u, δ) on its requests, transforms them and
adds α ∇̃W into the deltas: batched edits sum their rows; sequential edits repeat this.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from editing import hooks
from editing.data.batch import EditBatch
from editing.data.meta import MetaInstance
from editing.data.records import EditRequest
from editing.editors.trained import TrainedEditor
from editing.layout import weight_out_in
from editing.tokens import TargetBatch, encode
from editing.tuners import DeltaLinear

Sign = Literal["official", "paper"]


class Normaliser(nn.Module):
    """Running per-feature mean and (unbiased) standard deviation from float64 sums, so that
    processes can add their counts and sums (DDP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("squares", torch.zeros(dim, dtype=torch.float64))

    def increments(self, rows: torch.Tensor) -> torch.Tensor:
        """[count, Σ rows, Σ rows²] of new rows as one vector (for an all-reduce)."""
        r = rows.detach().double()
        return torch.cat([r.new_tensor([len(r)]), r.sum(0), (r * r).sum(0)])

    def add(self, inc: torch.Tensor) -> None:
        d = self.total.numel()
        self.count += inc[0]
        self.total += inc[1:1 + d]
        self.squares += inc[1 + d:]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            raise ValueError("MEND's normaliser has seen fewer than 2 rows: train the editor first "
                             "(`cli.py fit --config configs/mend.yaml`) or set norm: false")
        mean = self.total / self.count
        var = ((self.squares - self.count * mean * mean) / (self.count - 1)).clamp(min=0)
        return ((z.double() - mean) / (var.sqrt() + 1e-7)).to(z.dtype)


class GradientTransform(nn.Module):
    """(u, δ) rows -> (ũ, δ̃) rows for one weight shape (d_out, d_in), with n_modes layer modes."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int = 1920, n_hidden: int = 1, norm: bool = True):
        super().__init__()
        self.d_in, dim = d_in, d_in + d_out
        r = min(rank, dim)
        self.norm = Normaliser(dim) if norm else None
        self.U = nn.ParameterList([nn.Parameter(torch.zeros(dim, r)) for _ in range(n_hidden + 1)])
        self.V = nn.ParameterList([nn.Parameter(torch.randn(r, dim)) for _ in range(n_hidden + 1)])
        self.c = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(n_hidden + 1)])
        self.gamma = nn.ParameterList([nn.Parameter(torch.ones(n_modes, dim)) for _ in range(n_hidden + 1)])
        self.beta = nn.ParameterList([nn.Parameter(torch.zeros(n_modes, dim)) for _ in range(n_hidden + 1)])

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], dim=-1)
        if self.norm is not None:
            z = self.norm(z)
        for U, V, c, g, b in zip(self.U, self.V, self.c, self.gamma, self.beta):
            # clamp, not relu: its gradient at 0 is 1, so the identity start (pre-activation 0) trains
            z = z + (g[mode] * ((z @ V.t()) @ U.t() + c) + b[mode]).clamp(min=0)
        return z[:, :self.d_in], z[:, self.d_in:]


def shape_key(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


class FactorEditor(TrainedEditor):
    """The part MEND and MALMEN share: `DeltaLinear`s at the edited modules (the edit state; the
    trained network is not), grouped by weight shape (one network per shape, the index within the
    shape as the mode), the gradient factors (module input, output gradient) of an edit's LM loss,
    normaliser statistics summed over processes, and the functional (pending) application."""

    def inject_modules(self, layers: list[int], modules: list[str] | None, default: list[str]) -> None:
        lay = self.layout
        rel = list(modules) if modules is not None else default
        self.layers = sorted({lay.layer_index(l) for l in layers})
        self.names = [f"{lay.block_name(l)}.{r}" for l in self.layers for r in rel]
        found = dict(self.model.named_modules())
        if not self.names or any(n not in found for n in self.names):
            raise ValueError(f"{type(self).__name__} modules not in the model: "
                             f"{[n for n in self.names if n not in found][:3] or rel}")
        self.groups: dict[str, list[str]] = {}   # weight shape "outxin" -> module names
        for n in self.names:
            layer = DeltaLinear(found[n])
            layer.delta.requires_grad_(False)  # written by edit steps, never trained
            lay.swap(n, layer)
            self.groups.setdefault(shape_key(layer.delta.shape), []).append(n)
        self.mode = {n: names.index(n) for names in self.groups.values() for n in names}
        self.shape_of = {n: key for key, names in self.groups.items() for n in names}

    def nets(self) -> nn.ModuleDict:
        """The editor network of each weight shape."""
        raise NotImplementedError

    def delta_layers(self) -> dict[str, DeltaLinear]:
        modules = dict(self.model.named_modules())
        return {n: modules[n] for n in self.names}

    def factors(self, requests: list[EditRequest], answer_rows: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited module the rows (u, δ) of the edits' LM loss: the module's input and the loss's
        gradient with respect to its output. MEND (`answer_rows` False): every position, rows with
        u = 0 or δ = 0 dropped, the loss the mean over edits of each one's token-mean NLL. MALMEN
        (True): the positions that predict answer tokens only, the loss the token mean over all."""
        layers = self.delta_layers()
        with torch.enable_grad(), hooks.capture_io(layers) as io:
            lp, batch = self.target_logprobs([r.text for r in requests], [r.target_new for r in requests])
            tok = lp.gather(-1, batch.target_ids[..., None]).squeeze(-1) * batch.target_mask
            mask = batch.target_mask
            loss = -tok.sum() / mask.sum() if answer_rows else (-tok.sum(1) / mask.sum(1)).mean()
            outs = [io[n][-1][1] for n in self.names]
            grads = torch.autograd.grad(loss, outs)
        out = {}
        for n, g in zip(self.names, grads):
            x = io[n][-1][0]
            if answer_rows:
                pos, keep = batch.target_positions.to(x.device), mask.bool().to(x.device)
                out[n] = (hooks.gather_at(x, pos)[keep].detach().float(), hooks.gather_at(g, pos)[keep].detach().float())
                continue
            u, d = x.detach().reshape(-1, x.shape[-1]).float(), g.detach().reshape(-1, g.shape[-1]).float()
            keep = (u != 0).any(-1) & (d != 0).any(-1)
            out[n] = (u[keep], d[keep])
        return out

    def update_statistics(self, factors: list[dict]) -> None:
        """Add the rows [u; δ] to each network's normaliser (summed over processes under DDP)."""
        for key, net in self.nets().items():
            if net.norm is None:
                continue
            rows = [torch.cat(f[n], -1) for f in factors for n in self.groups[key]]
            inc = net.norm.increments(torch.cat(rows))
            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1:
                inc = trainer.strategy.reduce(inc, reduce_op="sum")
            net.norm.add(inc)

    def pending(self, deltas: dict[str, torch.Tensor] | None):
        """Put proposed deltas (out, in) into the model functionally (None: take them out)."""
        for n, m in self.delta_layers().items():
            m.pending = None if deltas is None else deltas[n]

    def nll(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL per target token of each (prompt, target) and whether every token is the argmax."""
        lp, batch = self.target_logprobs([p for p, _ in pairs], [t for _, t in pairs])
        tok = lp.gather(-1, batch.target_ids[..., None]).squeeze(-1)
        mask = batch.target_mask
        hit = ((lp.argmax(-1) == batch.target_ids) | ~mask.bool()).all(-1)
        return (-(tok * mask).sum(1) / mask.sum(1)), hit

    def locality_batch(self, inst: MetaInstance) -> TargetBatch:
        """The instance's locality texts (prompt + answer), tokenised once for every forward over them."""
        return encode(self.tokenizer, [p for p, _ in inst.locality], [a for _, a in inst.locality]).to(self.device)

    def locality_logprobs(self, batch: TargetBatch) -> torch.Tensor:
        """Log-probabilities [B, S, V] at every position of the locality texts."""
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return F.log_softmax(logits.float(), -1)

    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, m in self.delta_layers().items():
                m.delta += deltas[n]


class MEND(FactorEditor):
    """MEND on the linear maps `modules` (relative to a block) of `layers`.

    Args:
        layers: the edited layers (negative counts from the end).
        modules: module paths inside a block (None: the MLP's input and output projections, as the
            official GPT-2 / GPT-J and EasyEdit's Llama settings).
        rank: rank of the editor network's low-rank layers (capped at d_in + d_out).
        n_hidden: hidden layers of the editor network (it has n_hidden + 1 layers).
        norm: normalise (u, δ) by running statistics of the training rows.
        edit_lr: initial per-weight step α_l.
        lr_lr: Adam learning rate of the steps α_l (`lr` is the network's).
        sign: "official" (W + α∇̃W) or "paper" (W − α∇̃W).
        c_edit, c_loc: weights of the equivalence NLL and of the locality KL.
    """

    method = "mend"

    def __init__(self, layers: list[int] = [-3, -2, -1], modules: list[str] | None = None, rank: int = 1920,
                 n_hidden: int = 1, norm: bool = True, edit_lr: float = 1e-4, lr_lr: float = 1e-4,
                 sign: Sign = "official", c_edit: float = 0.1, c_loc: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.inject_modules(layers, modules, [*self.layout.family.mlp_in, self.layout.family.mlp_out])
        self.mend = nn.ModuleDict({key: GradientTransform(int(key.split("x")[1]), int(key.split("x")[0]), len(names),
                                                          rank, n_hidden, norm) for key, names in self.groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.names),), float(edit_lr)))

    def nets(self) -> nn.ModuleDict:
        return self.mend

    def edit_shape(self) -> dict:
        h = self.hparams
        return {"modules": list(self.names), "rank": h.rank, "n_hidden": h.n_hidden, "norm": h.norm, "sign": h.sign}

    def optimizer_groups(self) -> list[dict]:
        return [{"params": list(self.mend.parameters()), "lr": self.hparams.lr},
                {"params": [self.edit_lrs], "lr": self.hparams.lr_lr}]

    def proposed(self, factors: dict) -> dict[str, torch.Tensor]:
        """sign · α_l ∇̃W (out, in) per module, ∇̃W = Σ_b δ̃_b ũ_bᵀ."""
        sign = 1.0 if self.hparams.sign == "official" else -1.0
        out = {}
        for i, n in enumerate(self.names):
            u, d = factors[n]
            ut, dt = self.mend[self.shape_of[n]](u, d, self.mode[n])
            out[n] = sign * self.edit_lrs[i] * (dt.t() @ ut)
        return out

    def instance_loss(self, inst: MetaInstance, factors: dict) -> tuple[torch.Tensor, dict]:
        loc = self.locality_batch(inst)
        mask = loc.attention_mask.bool()
        with torch.no_grad():
            base = self.locality_logprobs(loc)
        self.pending(self.proposed(factors))
        try:
            nll, hit = self.nll(inst.equivalence)
            post = self.locality_logprobs(loc)
        finally:
            self.pending(None)
        kl = (base.exp() * (base - post)).sum(-1)[mask].mean()
        same = (base.argmax(-1) == post.argmax(-1))[mask].float().mean()
        loss = self.hparams.c_edit * nll.mean() + self.hparams.c_loc * kl
        return loss, {"edit_nll": float(nll.mean().detach()), "kl": float(kl.detach()), "edit_success": float(hit.float().mean()),
                      "locality": float(same)}

    def meta_loss(self, instances: list[MetaInstance]) -> tuple[torch.Tensor, dict]:
        factors = [self.factors(inst.edits) for inst in instances]
        self.update_statistics(factors)
        losses, logs = [], {}
        for inst, f in zip(instances, factors):
            loss, info = self.instance_loss(inst, f)
            losses.append(loss)
            for k, v in info.items():
                logs[k] = logs.get(k, 0.0) + v / len(instances)
        return torch.stack(losses).mean(), logs

    def meta_eval(self, inst: MetaInstance) -> dict[str, float]:
        factors = self.factors(inst.edits)
        with torch.no_grad():
            loss, info = self.instance_loss(inst, factors)
        return {**info, "loss": float(loss)}

    # --- edit steps ---------------------------------------------------------------------------------------
    def apply_edit(self, batch: EditBatch) -> dict:
        factors = self.factors(batch.requests)
        with torch.no_grad():
            self.apply_deltas(self.proposed(factors))
        return {"rows": sum(len(u) for u, _ in factors.values()) / len(self.names)}
