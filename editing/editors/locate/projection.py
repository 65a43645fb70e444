"""AlphaEdit's null-space projection (Fang et al. 2025), a plug-in of the core's closed form.

P = Û Ûᵀ with Û the eigenvectors of C₀ = E[kkᵀ] (the original model's key second moment) whose
eigenvalues are below `threshold` (absolute, as the official code; log `rank(P)`: the null space's
size depends on the model's activation scale; `nullspace_rule="relative"` takes the threshold as a
share of the largest eigenvalue instead). With P the closed form becomes

    Δ = R Kᵀ P ((K Kᵀ + C_p) P + α I)⁻¹        (official code: X = solve(P(KKᵀ + C_p) + αI, P K Rᵀ))

with C_p the keys of the earlier steps (`LocateEditor.projected_keys`) and α the L2 weight (the paper
writes I, the code α = 10). Δ(I − P) = 0, so Δ k₀ ≈ 0 for the keys C₀ is made of. `--model.projection
null_space` gives it to every closed-form editor (MEMIT, PMET, AdaPLE, JEEP): their residuals and
targets, AlphaEdit's update; λC is not used then."""
from __future__ import annotations

from typing import Literal

import torch

Projection = Literal["none", "null_space"]
ThresholdRule = Literal["absolute", "relative"]


def null_space(C: torch.Tensor, threshold: float, rule: ThresholdRule = "absolute") -> torch.Tensor:
    """P = Û Ûᵀ [d_ff, d_ff] (float64) over the eigenvectors of the symmetric C with eigenvalue below
    `threshold` ("absolute", the official code) or below `threshold` × C's largest eigenvalue
    ("relative": the same null space for C and sC, so one setting carries across models whose
    activations differ in scale)."""
    S, U = torch.linalg.eigh(C.double())
    limit = threshold * float(S.max()) if rule == "relative" else threshold
    U_hat = U[:, S < limit]
    return U_hat @ U_hat.T
