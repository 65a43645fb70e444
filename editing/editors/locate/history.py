"""`EditHistory`: every applied step's Δ per layer as low-rank factors, the exact record from which the
weights are rebuilt (W = W₀ + ΣΔ, summed in step order in float64)."""
from __future__ import annotations

import torch
from torch import nn

from editing.editors.locate.fusion import fuse


class EditHistory(nn.Module):
    """Every applied step's Δ per layer, saved in checkpoints as extra state. An entry is the low-rank
    factors (left [d, r], right [d_ff, r]) with Δ = left @ rightᵀ, optionally with a fusion spec as
    a third element (the dense Δ is then fused, e.g. drop-and-rescale with a stored seed, so the
    history stays low-rank and exactly reproducible).

    `delta` sums the steps in order in float64; the sum over all but the last step is cached per
    layer, so appending a step costs one Δ, not one per earlier step. Mutate earlier steps only
    through `truncate` / `set_extra_state`, which drop the cache."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict[int, tuple]] = []
        self._prefix: dict[int, tuple[int, torch.Tensor]] = {}

    def get_extra_state(self):
        cpu = lambda e: [cpu(x) for x in e] if isinstance(e, list) else \
            tuple(x.cpu() if torch.is_tensor(x) else x for x in e)
        return [{str(l): cpu(e) for l, e in s.items()} for s in self.steps]

    def set_extra_state(self, state) -> None:
        self.steps = [{int(l): (e if isinstance(e, list) else tuple(e)) for l, e in s.items()} for s in state]
        self._prefix = {}

    def truncate(self, n: int) -> None:
        """Keep the first `n` steps."""
        del self.steps[n:]
        self._prefix = {}

    @staticmethod
    def dense(entry: tuple | list, shape, device) -> torch.Tensor:
        """The Δ of one entry (or the sum of a list of entries, e.g. sequential ROME with fusion)."""
        if isinstance(entry, list):
            return sum(EditHistory.dense(e, shape, device) for e in entry)
        a, b = entry[0].to(device, torch.float64), entry[1].to(device, torch.float64)
        d = a @ b.T
        return fuse(d, entry[2]) if len(entry) > 2 else d

    def delta(self, layer: int, shape, device) -> torch.Tensor:
        """ΣΔ of a layer, summed in step order in float64 (deterministic)."""
        n = len(self.steps) - 1
        cached = self._prefix.get(layer)
        if cached is not None and cached[0] <= n and cached[1].device == torch.device(device):
            start, total = cached[0], cached[1].clone()
        else:
            start, total = 0, torch.zeros(shape, dtype=torch.float64, device=device)
        for i in range(start, max(n, 0)):
            if layer in self.steps[i]:
                total += self.dense(self.steps[i][layer], shape, device)
        if n >= 0:
            self._prefix[layer] = (n, total.clone())
            if layer in self.steps[-1]:
                total += self.dense(self.steps[-1][layer], shape, device)
        return total
