"""AlphaEdit (Fang et al. 2025): MEMIT whose update is projected onto the null space of the preserved
keys, so that sequential edits leave what C₀ = E[kkᵀ] is made of (and earlier edits, through C_p)
alone. Everything up to the residual is MEMIT's (keys, targets, spreading); the update is the core's
projected closed form (`editing.editors.locate.projection`), which any closed-form editor also takes
with `--model.projection null_space` (docs/alphaedit.md)."""
from __future__ import annotations

from editing.editors.memit import MEMIT


class AlphaEdit(MEMIT):
    method = "alphaedit"

    def __init__(self, projection: str = "null_space", nullspace_threshold: float = 2e-2,
                 projection_l2: float = 10.0, **kwargs):
        if projection != "null_space":
            raise ValueError("AlphaEdit is MEMIT with projection='null_space'; use MEMIT for the plain update")
        super().__init__(projection=projection, nullspace_threshold=nullspace_threshold,
                         projection_l2=projection_l2, **kwargs)
