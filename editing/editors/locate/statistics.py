"""Access to the key statistics C = E[kkᵀ] the closed form needs (computed and cached on disk by
`editing.stats`), kept in memory per layer."""
from __future__ import annotations

from pathlib import Path

import torch

from editing.stats import cache_paths, second_moments


class KeyStatistics(dict):
    """layer -> E[kkᵀ] [d_ff, d_ff] of the unedited model. `fill` computes every missing layer of a
    list in one corpus pass (a disk-cache hit runs nothing); tests may set entries directly."""

    def __init__(self, corpus: str = "wiki-offline", n_samples: int | None = None, max_length: int = 256):
        super().__init__()
        self.corpus, self.n_samples, self.max_length = corpus, n_samples, max_length

    def fill(self, model, tokenizer, layers: list[int]) -> None:
        missing = [l for l in layers if l not in self]
        if missing:
            self.update(second_moments(model, tokenizer, missing, corpus=self.corpus, n_samples=self.n_samples,
                                       max_length=self.max_length))

    def files(self, model, tokenizer, layers: list[int]) -> dict[int, Path]:
        """Fill `layers` (computing what is not cached) and return each layer's cache file."""
        self.fill(model, tokenizer, layers)
        return cache_paths(model, layers, self.corpus, self.n_samples, self.max_length)

    def at(self, layer: int, device) -> torch.Tensor:
        return self[layer].to(device)
