"""The closed form and its spreading over layers (docs/specification.md §2.5, §2.7): the one layer
loop of MEMIT, PMET, AdaPLE, JEEP and COMEBA-HK.

Symbols as in the MEMIT paper and code: keys K [u, d_ff] and residuals R [u, d] as rows (one per
request), C [d_ff, d_ff] the key covariance E[kkᵀ], λ its weight, Δ [d, d_ff] the update of an
output projection stored (out, in), returned as factors (left [d, u], right [d_ff, u]) with
Δ = left @ rightᵀ.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from editing.validation import check_choice

Spread = Literal["even", "sqrt"]
Factors = tuple[torch.Tensor, torch.Tensor]


def closed_form(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, key_weight: float = 1.0,
                prior: torch.Tensor | None = None, projection: torch.Tensor | None = None,
                alpha: float = 1.0, equality: float | None = None) -> Factors:
    """Δ = R Kᵀ (λC + K′K′ᵀ + w K Kᵀ)⁻¹ in float64 by a linear solve: the minimiser of
    w‖Δ Kᵀ − Rᵀ/w‖² + λ tr(Δ C Δᵀ) (+ tr(Δ K′K′ᵀ Δᵀ) with `prior` = K′K′ᵀ [d_ff, d_ff], the keys of
    earlier steps, COMEBA-HK's consecutive update). w = `key_weight`: 1 for MEMIT, 2 for AdaPLE.
    Returns (left [d, u], right [d_ff, u]) = (Rᵀ, (λC + K′K′ᵀ + wKᵀK)⁻¹ Kᵀ).

    With `projection` P (AlphaEdit, `editing.editors.locate.projection`): right = (P(wKᵀK + K′K′ᵀ) + αI)⁻¹ P Kᵀ,
    i.e. Δ = R K P ((wKᵀK + K′K′ᵀ) P + αI)⁻¹ in this file's orientation; C and λ are not used.

    With `equality` ρ (EMMET): `equality_form(K, R, C, λ, ρ)`, the edits as constraints."""
    if equality is not None:
        if prior is not None or projection is not None:
            raise ValueError("the equality-constrained form (EMMET) takes neither earlier keys nor a projection")
        return equality_form(K, R, C, lam, equality)
    K64, R64 = K.double(), R.double()
    if projection is not None:
        P = projection.to(K64)
        M = key_weight * (K64.T @ K64) + (0.0 if prior is None else prior.to(K64))
        A = P @ M + alpha * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        return R64.T.contiguous(), torch.linalg.solve(A, P @ K64.T)
    C64 = C.double().to(K.device)
    A = lam * C64
    if prior is not None:
        A = A + prior.to(A)
    A = A + key_weight * (K64.T @ K64)
    right = torch.linalg.solve(A, K64.T)          # [d_ff, u]
    return R64.T.contiguous(), right


def equality_form(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, ridge: float) -> Factors:
    """EMMET (Gupta et al. 2024): min tr(Δ λC Δᵀ) subject to Δ Kᵀ = Rᵀ, batched ROME. The solution is

        Δ = Rᵀ D⁻¹ K (λC)⁻¹,   D = K (λC)⁻¹ Kᵀ + ρI   [u, u]

    returned as (Rᵀ, (λC)⁻¹ Kᵀ D⁻¹). ρ = `ridge` counters an ill-conditioned D (official code
    `emmet_lambda`, 0.1; added only for more than one key, so a single edit is r-ROME's exact update).
    With ρ > 0 this is the least squares of `closed_form` with key weight 1/ρ and residual R/ρ (the
    constraints become a penalty of weight 1/ρ); ρ = 0 meets every constraint exactly."""
    K64, R64 = K.double(), R.double()
    A = lam * C.double().to(K.device)
    X = torch.linalg.solve(A, K64.T)                              # (λC)⁻¹ Kᵀ  [d_ff, u]
    D = K64 @ X
    if D.shape[0] > 1:
        D = D + ridge * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    return R64.T.contiguous(), torch.linalg.solve(D, X.T).T.contiguous()


def divisor(spread: Spread, remaining: int) -> float:
    """The share of the residual a layer takes with `remaining` layers left (itself included):
    1/remaining ("even", MEMIT) or 1/√remaining ("sqrt", PMET)."""
    check_choice("spread", spread, Spread)
    return float(remaining) if spread == "even" else math.sqrt(remaining)


def spread_update(layers: list[int], z: torch.Tensor, *, keys: Callable[[int], torch.Tensor],
                  current: Callable[[], torch.Tensor], covariance: Callable[[int], torch.Tensor],
                  write: Callable[[int, Factors, torch.Tensor], None], lam: float, spread: Spread = "even",
                  key_weight: float = 1.0,
                  layer_residual: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  prior: Callable[[int], torch.Tensor | None] | None = None,
                  projection: Callable[[int], torch.Tensor | None] | None = None, alpha: float = 1.0,
                  equality: float | None = None) -> list[float]:
    """Write the target z [u, d] into `layers`, lowest first. At layer ℓ with n layers left:

        C = covariance(ℓ);  K = keys(ℓ)            (on the model with every lower layer updated)
        r = (z − current()) / divisor(spread, n)     (current(): the value z is measured against)
        R = layer_residual(ℓ, K, r)                  (default r; AdaPLE subtracts 2·KWᵀ)
        write(ℓ, closed_form(K, R, C, λ, w, prior(ℓ), projection(ℓ), α, equality), K)

    `write` must update layer ℓ (and only what ℓ changes) before the next layer's keys are taken.
    Returns the mean residual norm ‖R‖ of each layer."""
    norms = []
    for i, layer in enumerate(layers):
        C = covariance(layer)
        K = keys(layer)
        r = (z - current()) / divisor(spread, len(layers) - i)
        R = r if layer_residual is None else layer_residual(layer, K, r)
        norms.append(float(R.norm(dim=-1).mean()))
        P = None if projection is None else projection(layer)
        write(layer, closed_form(K, R, C, lam, key_weight, None if prior is None else prior(layer), P, alpha,
                                 equality), K)
    return norms
