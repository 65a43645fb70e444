"""`HookLayer`: COMEBA-HK's hook layer on an MLP output projection (docs/specification.md §5.3).

The base layer keeps W₀ and gives P = W₀k̂; the hook layer holds ΔW = W_h − W₀ (the sum of the
edits, set by its editor) and computes O = P + k̂ΔWᵀ, M = ‖O − P‖ per position, the z-score of M over
each sequence's real positions, and outputs O where Z ≥ α and P elsewhere ("validated"), or O at
every position ("temporary", the layers not yet updated during an edit step). With `recording` on,
the z-scores of the latest forward are kept in `recorded` (for the α rule and analyses).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

from editing.hooks import MaskTracker
from editing.layout import linear
from editing.tuners.base import EditLayer

Mode = Literal["validated", "temporary"]


def zscores(m: torch.Tensor, real: torch.Tensor, ddof: int = 0) -> torch.Tensor:
    """Z [B, S] of m [B, S] over each row's real positions; NaN where a position is not real, or the
    row has fewer than ddof + 2 real positions or zero deviation (no outlier is defined)."""
    m = m.float()
    w = real.float()
    n = w.sum(1, keepdim=True)
    mean = (m * w).sum(1, keepdim=True) / n.clamp(min=1)
    var = (((m - mean) * w) ** 2).sum(1, keepdim=True) / (n - ddof).clamp(min=1)
    std = var.sqrt()
    ok = real & (n >= ddof + 2) & (std > 0)
    z = (m - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(ok, z, torch.full_like(z, float("nan")))


def max_zscore_bound(n: int, ddof: int = 0) -> float:
    """The largest z-score any position of n can have: √(n−1) (population) or (n−1)/√n (sample)."""
    if n < 2:
        return float("nan")
    return math.sqrt(n - 1) if ddof == 0 else (n - 1) / math.sqrt(n)


def select(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """The positions whose output is swapped for the hook layer's: Z ≥ α (NaN never is)."""
    return z >= alpha


class HookLayer(EditLayer):
    """Args: the wrapped projection; `mask`: the backbone's `MaskTracker` (real positions of the
    current forward); `alpha`: the current threshold (called at every forward); `exclude_first`:
    leave each sequence's first real position out; `ddof`: 0 population, 1 sample deviation."""
    position_wise = False   # z-scores over each sequence

    def __init__(self, base_layer: nn.Module, mask: MaskTracker, alpha: Callable[[], float],
                 exclude_first: bool = False, ddof: int = 0):
        super().__init__(base_layer)
        self.mask, self.alpha = mask, alpha
        self.exclude_first, self.ddof = exclude_first, ddof
        self.register_buffer("delta", None, persistent=False)   # W_h − W₀ (out, in), model dtype
        self.mode: Mode = "validated"
        self.recording = False
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None   # (z [B, S], real [B, S])

    def extra_repr(self) -> str:
        return f"edited={self.delta is not None}, mode={self.mode}, {super().extra_repr()}"

    def set_delta(self, delta: torch.Tensor | None) -> None:
        self.delta = delta

    def edit(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if self.delta is None:
            return None
        diff = linear(self.base_layer, x, self.delta.to(x.device, x.dtype))   # O − P = ΔW k̂, [B, S, d]
        if self.mode == "temporary":
            return out + diff.to(out.dtype)
        real, index = self.mask.positions(x.shape[0], x.shape[1], x.device)
        if self.exclude_first:
            real = real & (index > 0)
        z = zscores(diff.float().norm(dim=-1), real, self.ddof)
        if self.recording:
            self.recorded = (z.detach(), real)
        swap = select(z, self.alpha())
        if not swap.any():
            return None                               # P everywhere: the module's own output
        return torch.where(swap[..., None], out + diff.to(out.dtype), out)
