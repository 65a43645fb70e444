"""`KeyValueAdaptor`: iReVa's bank of knowledge neurons on an MLP (docs/specification.md §3):

    MLP(x) + α · V̂ᵀ g(K̂ᵀ x̂ − b)

with x̂ the MLP input standardised per token, K̂ [d, n] the keys (columns), V̂ [n, d] the values
(rows), b the margins and g the activation. With max-pooling only the neuron with the largest
activation contributes. Every neuron records the edit (an index) and target token it serves, so one
edit can be withdrawn (its values zeroed, or its neurons removed) without touching the others.

Where it acts: at the positions of `acting(mask)` inside a forward its editor drives, else at the
last position of the input (and at the one new position of each incremental decoding step).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from editing.tuners.base import EditLayer

WithdrawMode = Literal["zero", "remove"]
BANK = ("keys", "values", "shifts", "neuron_edit", "neuron_token")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per vector over the last dim: (x − mean) / sqrt(unbiased variance + 1e-8) (official `rmsnorm`)."""
    x = x.float()
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + 1e-8)


@dataclass
class Acting:
    """Where and how the adaptor acts during one of its editor's forwards."""

    mask: torch.Tensor                         # [B, S] bool: positions that receive the adaptor
    withdraw: torch.Tensor | None = None       # [B] long: edit index withdrawn for that row (-1: none)
    train: tuple | None = None                 # (k [R, d], v [R, d], b [R]) neurons being trained, R in {1, B}


class KeyValueAdaptor(EditLayer):
    position_wise = False   # acts at the input's last position
    def __init__(self, base_layer: nn.Module, hidden_size: int, act: Callable, alpha: float,
                 margin: bool = True, max_pooling: bool = True, withdraw_mode: WithdrawMode = "zero",
                 gate: bool = False):
        super().__init__(base_layer)
        self.act, self.alpha, self.margin, self.max_pooling = act, alpha, margin, max_pooling
        # gate: a neuron whose shifted activation K̂ᵀx̂ − b is not positive contributes nothing (SiLU and
        # GELU are not zero below 0, so without the gate every neuron always adds a little)
        self.gate = gate
        self.withdraw_mode = withdraw_mode
        self.register_buffer("keys", torch.zeros(hidden_size, 0))              # K̂ [d, n]
        self.register_buffer("values", torch.zeros(0, hidden_size))            # V̂ [n, d]
        self.register_buffer("shifts", torch.zeros(0))                         # b [n]
        self.register_buffer("neuron_edit", torch.zeros(0, dtype=torch.long))  # neuron -> edit index
        self.register_buffer("neuron_token", torch.zeros(0, dtype=torch.long))  # neuron -> target token
        self.acting_now: Acting | None = None

    @property
    def num_neurons(self) -> int:
        return self.keys.shape[1]

    def extra_repr(self) -> str:
        return f"neurons={self.num_neurons}, alpha={self.alpha}, {super().extra_repr()}"

    # --- the bank ------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor, edit: list[int], token: list[int]) -> None:
        """New neurons: keys k [P, d], values v [P, d], margins b [P], their edit and token indices."""
        dev = self.keys.device
        self.keys = torch.cat([self.keys, k.detach().float().t().to(dev)], 1)
        self.values = torch.cat([self.values, v.detach().float().to(dev)], 0)
        self.shifts = torch.cat([self.shifts, b.detach().float().to(dev)], 0)
        self.neuron_edit = torch.cat([self.neuron_edit, torch.tensor(edit, dtype=torch.long, device=dev)])
        self.neuron_token = torch.cat([self.neuron_token, torch.tensor(token, dtype=torch.long, device=dev)])

    def bank(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).clone() for n in BANK}

    def load_bank(self, bank: dict[str, torch.Tensor]) -> None:
        for n in BANK:
            setattr(self, n, bank[n].clone().to(self.keys.device))

    def resize(self, n: int) -> None:
        """An empty bank of n neurons (shaped for loading a checkpoint)."""
        d, dev = self.keys.shape[0], self.keys.device
        self.load_bank({"keys": torch.zeros(d, n, device=dev), "values": torch.zeros(n, d, device=dev),
                        "shifts": torch.zeros(n, device=dev), "neuron_edit": torch.zeros(n, dtype=torch.long, device=dev),
                        "neuron_token": torch.zeros(n, dtype=torch.long, device=dev)})

    def withdraw(self, edits: torch.Tensor, mode: WithdrawMode) -> int:
        """Withdraw the edits with these indices for good: zero their neurons' values ("zero") or
        remove the neurons ("remove"); returns the number of neurons affected."""
        hit = torch.isin(self.neuron_edit, edits.to(self.neuron_edit.device))
        if mode == "zero":
            self.values = self.values.masked_fill(hit[:, None], 0.0)
        else:
            keep = ~hit
            self.keys, self.values, self.shifts = self.keys[:, keep], self.values[keep], self.shifts[keep]
            self.neuron_edit, self.neuron_token = self.neuron_edit[keep], self.neuron_token[keep]
        return int(hit.sum())

    # --- the forward ---------------------------------------------------------------------------------
    def output(self, x_hat: torch.Tensor, withdraw: torch.Tensor | None = None,
               train: tuple | None = None) -> torch.Tensor:
        """α · adaptor output [N, d] for standardised inputs x_hat [N, d] (float32).

        `withdraw` [N]: per row, the edit index whose neurons are withdrawn (-1: none). `train`: the
        neurons being trained, (k, v, b) each with 1 or N rows, added to the bank's output; the bank
        is then summed (max-pooling is off in training)."""
        out = torch.zeros_like(x_hat)
        pooled = self.max_pooling and train is None
        if self.num_neurons:
            pre = x_hat @ self.keys - (self.shifts if self.margin else 0.0)               # [N, n]
            act = self.act(pre)
            if self.gate:
                act = act.masked_fill(pre <= 0, 0.0)
            hit = None
            if withdraw is not None:
                hit = self.neuron_edit[None, :] == withdraw[:, None]                       # [N, n]
            if pooled:
                if hit is not None and self.withdraw_mode == "remove":
                    act = act.masked_fill(hit, float("-inf"))
                a, j = act.max(1)
                if hit is not None:
                    gone = ~torch.isfinite(a) | hit.gather(1, j[:, None])[:, 0]
                    a = a.masked_fill(gone, 0.0)
                out = a[:, None] * self.values[j]
            else:
                if hit is not None:
                    act = act.masked_fill(hit, 0.0)
                out = act @ self.values
        if train is not None:
            k, v, b = train
            pre = (x_hat * k).sum(-1) - (b if self.margin else 0.0)
            a = self.act(pre)
            if self.gate:
                a = a.masked_fill(pre <= 0, 0.0)
            out = out + a[:, None] * v
        return self.alpha * out

    def edit(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        acting = self.acting_now
        if self.num_neurons == 0 and (acting is None or acting.train is None):
            return None
        B, S = out.shape[:2]
        if acting is not None:
            mask = acting.mask.to(out.device)
        else:  # a forward we do not drive: the last position, or the one new position when decoding
            mask = torch.zeros(B, S, dtype=torch.bool, device=out.device)
            mask[:, -1] = True
        if mask.shape != (B, S):
            raise ValueError(f"adaptor position mask {tuple(mask.shape)} does not fit the MLP output {(B, S)}")
        rows, cols = mask.nonzero(as_tuple=True)
        withdraw = train = None
        if acting is not None and acting.withdraw is not None:
            withdraw = acting.withdraw.to(out.device)[rows]
        if acting is not None and acting.train is not None:
            train = tuple(t if t.shape[0] == 1 else t[rows] for t in acting.train)
        delta = self.output(standardize(x[rows, cols]), withdraw, train)
        return out.index_put((rows, cols), delta.to(out.dtype), accumulate=True)

    @contextmanager
    def acting(self, mask: torch.Tensor, withdraw: torch.Tensor | None = None,
               train: tuple | None = None) -> Iterator[None]:
        """The adaptor acts at `mask` [B, S] (bool) in forwards inside the context."""
        before = self.acting_now
        self.acting_now = Acting(mask, withdraw, train)
        try:
            yield
        finally:
            self.acting_now = before
