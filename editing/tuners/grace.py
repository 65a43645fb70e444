"""`Codebook`: GRACE's retrieval adaptor around one module f (docs/baselines.md, BASELINES.md §2).

Entries (k_i, v_i, ε_i): a frozen key (f's input at the key position of the edit prompt), a value
that replaces f's output, and a radius. For a query q (f's input at a row's key position),
i* = argmin ‖q − k_i‖₂; if ‖q − k_{i*}‖ ≤ ε_{i*} the output at the replacement positions becomes
v_{i*}, otherwise f's output is left exactly as it is (an empty codebook never changes anything).

Key position: inside a forward the editor drives (`querying(key_pos)`), each row's given position
(its last prompt token); in any other forward (`generate`), the last position of the prompt pass,
whose routing is kept for the incremental decoding steps that follow (routed once per prompt; the
backbone's `CacheTracker`, `cache`, tells a decoding step from a new prompt).
Replacement: "last" (the key position; EasyEdit), "prompt" (the positions before it; the official
code), "all" (every position, new decoding positions included).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from editing.hooks import CacheTracker
from editing.tuners.base import EditLayer

Replacement = Literal["last", "prompt", "all"]


class Codebook(EditLayer):
    position_wise = False   # routes on each row's last prompt token
    def __init__(self, base_layer: nn.Module, d_in: int, d_out: int, replacement: Replacement = "last",
                 cache: CacheTracker | None = None):
        super().__init__(base_layer)
        self.replacement = replacement
        self.cache = cache   # whether the forward continues a KV cache (None: never a decoding step)
        self.register_buffer("keys", torch.zeros(0, d_in))
        self.register_buffer("values", torch.zeros(0, d_out))
        self.register_buffer("eps", torch.zeros(0))
        self.key_pos: torch.Tensor | None = None       # [B] key positions of the forward being driven
        self.training_value: tuple[int, torch.Tensor] | None = None  # (entry, trainable value)
        self._route: torch.Tensor | None = None         # generation: each row's entry (-1 none)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def extra_repr(self) -> str:
        return f"entries={self.size}, replacement={self.replacement}, {super().extra_repr()}"

    def resize(self, n: int) -> None:
        """An empty codebook of n entries (shaped for loading a checkpoint)."""
        dev = self.keys.device
        self.keys = torch.zeros(n, self.keys.shape[1], device=dev)
        self.values = torch.zeros(n, self.values.shape[1], device=dev)
        self.eps = torch.zeros(n, device=dev)

    def add(self, key: torch.Tensor, value: torch.Tensor, eps: float) -> int:
        self.keys = torch.cat([self.keys, key.detach().float()[None].to(self.keys.device)])
        self.values = torch.cat([self.values, value.detach().float()[None].to(self.values.device)])
        self.eps = torch.cat([self.eps, torch.tensor([eps], device=self.eps.device)])
        return self.size - 1

    def remove(self, entries: list[int]) -> None:
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[entries] = False
        self.keys, self.values, self.eps = self.keys[keep], self.values[keep], self.eps[keep]

    def _decoding_step(self, B: int, S: int) -> bool:
        return S == 1 and self.cache is not None and self.cache.decoding

    def nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(entry, distance) of the nearest key to each query q [N, d_in] (float32 distances)."""
        d = torch.cdist(q.float(), self.keys.to(q.device))
        dist, idx = d.min(1)
        return idx, dist

    @contextmanager
    def querying(self, key_pos: torch.Tensor) -> Iterator[None]:
        self.key_pos = key_pos
        try:
            yield
        finally:
            self.key_pos = None

    def edit(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if self.size == 0:
            return None
        B, S = out.shape[:2]
        rows = torch.arange(B, device=out.device)
        if self.key_pos is not None:
            pos = self.key_pos.to(out.device)
        elif self._decoding_step(B, S) and self._route is not None and self._route.shape[0] == B:
            pos = None  # an incremental decoding step: the prompt pass decided the route
        else:
            pos = torch.full((B,), S - 1, device=out.device)
        if pos is not None:
            idx, dist = self.nearest(x[rows, pos])
            route = torch.where(dist <= self.eps.to(dist.device)[idx], idx, torch.full_like(idx, -1))
            if self.key_pos is None:
                self._route = route
        else:
            route = self._route
        hit = route >= 0
        if not hit.any():
            return None
        values = self.values.to(out.dtype)
        if self.training_value is not None:
            entry, v = self.training_value
            values = torch.cat([values[:entry], v[None].to(out.dtype), values[entry + 1:]])
        new_v = values[route.clamp(min=0)]                                   # [B, d_out]
        cols = torch.arange(S, device=out.device)[None, :]
        if pos is None:
            where = torch.full((B, S), self.replacement == "all", device=out.device)
        elif self.replacement == "last":
            where = cols == pos[:, None]
        elif self.replacement == "prompt":
            where = cols < pos[:, None]
        else:
            where = torch.ones(B, S, dtype=torch.bool, device=out.device)
        where = where & hit[:, None]
        return torch.where(where[..., None], new_v[:, None, :], out)
