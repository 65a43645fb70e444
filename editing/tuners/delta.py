"""`DeltaLinear`: a trainable weight delta on a linear layer (FT-L/FT-M/FT-WD's and MEND's edit):
out = base(x) + x (Δ + P)ᵀ, with Δ stored (out, in) in float32 whatever the model's dtype. P
(`pending`, normally None) is a proposed delta that is not part of the edit state: a trained editor's
update while it is being trained, kept in the autograd graph of the editor network."""
from __future__ import annotations

import torch
from torch import nn

from editing.layout import linear, weight_out_in
from editing.tuners.base import EditLayer


class DeltaLinear(EditLayer):
    mergeable = True

    def __init__(self, base_layer: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__(base_layer)
        self.delta = nn.Parameter(torch.zeros_like(weight_out_in(base_layer), dtype=dtype))
        self._unmerged: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def edit(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        delta = self.delta if self.pending is None else self.delta + self.pending
        return out + linear(self.base_layer, x.to(self.delta.dtype), delta).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + Δ in the base weight (rounded to its dtype); `unmerge` puts W back bit for bit."""
        if self.merged:
            return
        w = weight_out_in(self.base_layer)
        self._unmerged = w.detach().clone()
        w.copy_((w.double() + self.delta.detach().double()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight_out_in(self.base_layer).copy_(self._unmerged)
        self._unmerged = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"delta={tuple(self.delta.shape)}, {super().extra_repr()}"
