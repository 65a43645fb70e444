"""Fusion of an update into the weights (AdaPLE §6.4, usable by every closed-form editor): plain
addition, drop-and-rescale with a stored seed, or top-k% retain."""
from __future__ import annotations

from typing import Literal, get_args

import torch

from editing.validation import check_choice

Fusion = Literal["add", "dr", "topk"]
FUSIONS: tuple[str, ...] = get_args(Fusion)


def fusion_spec(kind: Fusion = "add", drop_rate: float = 0.8, keep: float = 0.2, seed: int = 0) -> dict | None:
    """How an update Δ is fused into the weights: "add" (vanilla: Δ as is, returns None), "dr"
    (drop-and-rescale: each entry dropped with probability `drop_rate`, the rest divided by
    1 − drop_rate, so E[Δ̂] = Δ; the mask is drawn on the CPU from `seed`, the same on every device),
    "topk" (top-k% retain: only the `keep` share of entries with the largest magnitude is kept)."""
    check_choice("fusion", kind, Fusion)
    if kind == "add" or (kind == "dr" and drop_rate == 0) or (kind == "topk" and keep >= 1):
        return None
    if kind == "dr" and not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if kind == "topk" and not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return {"kind": kind, "p": float(drop_rate), "keep": float(keep), "seed": int(seed)}


def drop_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The keep-mask of drop-and-rescale: True with probability 1 − p, from a CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=g) >= p


def fuse(delta: torch.Tensor, spec: dict | None) -> torch.Tensor:
    """Δ̂ of a dense Δ under a fusion spec (None: Δ itself)."""
    if spec is None:
        return delta
    if spec["kind"] == "dr":
        keep = drop_mask(delta.shape, spec["p"], spec["seed"]).to(delta.device)
        return delta * keep / (1 - spec["p"])
    k = max(1, int(round(spec["keep"] * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)
