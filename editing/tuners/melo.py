"""`Router`: MELO's vector database at one module (docs/baselines.md, BASELINES.md §3). It passes the
module's output through unchanged and decides, per row, which LoRA block (a PEFT adapter named
`block_<b>`) the LoRA layers above it apply, or none ("__base__").

The database holds clusters (centre μ, radius ρ) and points (key, block, cluster). The query is the
module's **output** at a row's key position (the last prompt token in the forwards the editor drives;
the last position of the prompt pass otherwise, kept for the incremental decoding steps that follow).
Routing: the nearest centre; beyond its radius, no block; within it, the block of the nearest point of
that cluster (a placeholder point of block -1 routes to none).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from editing.hooks import CacheTracker
from editing.tuners.base import EditLayer

BASE = "__base__"
DB = ("centres", "radii", "point_keys", "point_block", "point_cluster")


def block_name(b: int) -> str:
    return f"block_{b}"


class Router(EditLayer):
    position_wise = False   # routes on each row's last prompt token
    def __init__(self, base_layer: nn.Module, dim: int, cache: CacheTracker | None = None):
        super().__init__(base_layer)
        self.cache = cache   # whether the forward continues a KV cache (None: never a decoding step)
        self.register_buffer("centres", torch.zeros(0, dim))
        self.register_buffer("radii", torch.zeros(0))
        self.register_buffer("point_keys", torch.zeros(0, dim))
        self.register_buffer("point_block", torch.zeros(0, dtype=torch.long))
        self.register_buffer("point_cluster", torch.zeros(0, dtype=torch.long))
        self.key_pos: torch.Tensor | None = None    # [B] key positions of the forward being driven
        self.forced: str | None = None              # training: every row uses this block
        self.route: list[str] | None = None         # the last decision, read by the LoRA layers
        self._kept: list[str] | None = None         # generation: the prompt pass's decision

    def extra_repr(self) -> str:
        return f"clusters={self.centres.shape[0]}, points={self.point_keys.shape[0]}, {super().extra_repr()}"

    def database(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).clone() for n in DB}

    def load_database(self, db: dict[str, torch.Tensor]) -> None:
        for n in DB:
            setattr(self, n, db[n].clone().to(self.centres.device))

    def resize(self, clusters: int, points: int) -> None:
        d, dev = self.centres.shape[1], self.centres.device
        self.load_database({"centres": torch.zeros(clusters, d, device=dev), "radii": torch.zeros(clusters, device=dev),
                            "point_keys": torch.zeros(points, d, device=dev),
                            "point_block": torch.zeros(points, dtype=torch.long, device=dev),
                            "point_cluster": torch.zeros(points, dtype=torch.long, device=dev)})

    @contextmanager
    def querying(self, key_pos: torch.Tensor | None = None, forced: str | None = None) -> Iterator[None]:
        self.key_pos, self.forced = key_pos, forced
        try:
            yield
        finally:
            self.key_pos, self.forced = None, None

    def blocks_for(self, q: torch.Tensor) -> list[int]:
        """The block of each query q [N, d] (-1: none)."""
        if self.centres.shape[0] == 0:
            return [-1] * q.shape[0]
        d = torch.cdist(q.float(), self.centres.to(q.device))
        dist, c = d.min(1)
        out = []
        for i in range(q.shape[0]):
            ci = int(c[i])
            if float(dist[i]) > float(self.radii[ci]):
                out.append(-1)
                continue
            mine = (self.point_cluster == ci).nonzero()[:, 0]
            j = mine[torch.cdist(q[i:i + 1].float(), self.point_keys[mine].to(q.device))[0].argmin()]
            out.append(int(self.point_block[j]))
        return out

    def edit(self, x: torch.Tensor, out: torch.Tensor) -> None:
        B, S = out.shape[:2]
        if self.forced is not None:
            self.route = [self.forced] * B
            return None
        decoding = S == 1 and self.cache is not None and self.cache.decoding
        if self.key_pos is None and decoding and self._kept is not None and len(self._kept) == B:
            self.route = self._kept               # an incremental decoding step: routed on the prompt
            return None
        pos = self.key_pos.to(out.device) if self.key_pos is not None else torch.full((B,), S - 1, device=out.device)
        q = out[torch.arange(B, device=out.device), pos]
        self.route = [BASE if b < 0 else block_name(b) for b in self.blocks_for(q)]
        if self.key_pos is None:
            self._kept = self.route
        return None
