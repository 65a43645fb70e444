"""PMET (Li et al. 2024): attention and MLP deltas optimised together at the last edited layer; only
the MLP target is used, spread over the layers by the square root of the layers left (§2.8)."""
from __future__ import annotations

from editing.editors.memit import MEMIT


class PMET(MEMIT):
    method = "pmet"
    target_parts = ("attn_out", "mlp")
    z_part = "mlp"
    spread_rule = "sqrt"

    def __init__(self, kl_factor: float = 1.0, **kwargs):
        super().__init__(kl_factor=kl_factor, **kwargs)
