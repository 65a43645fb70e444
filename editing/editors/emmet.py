"""EMMET (Gupta, Sajnani and Anumanchipalli 2024, "A Unified Framework for Model Editing"): MEMIT's
keys, targets and layer loop with the edits as equality constraints instead of a least-squares term,
i.e. ROME's constrained problem for a batch of keys (docs/emmet.md):

    min tr(Δ λC Δᵀ)  subject to  Δ Kᵀ = Rᵀ   →   Δ = Rᵀ (K(λC)⁻¹Kᵀ + ρI)⁻¹ K (λC)⁻¹

(`editing.editors.locate.spread.equality_form`). ρ = `emmet_lambda` (official 0.1) keeps the u×u
system invertible when keys are nearly dependent; a single edit gets no ρ. The official code edits one
layer (GPT-2 XL 17, GPT-J 5, Llama-2 5); several layers spread the residual as MEMIT does.
"""
from __future__ import annotations

from editing.editors.memit import MEMIT


class EMMET(MEMIT):
    method = "emmet"

    def __init__(self, layers: list[int] = [5], emmet_lambda: float = 0.1, **kwargs):
        if kwargs.get("projection", "none") != "none":
            raise ValueError("EMMET's equality-constrained update does not take the null-space projection "
                             "(use AlphaEdit or --model.projection null_space with MEMIT)")
        if emmet_lambda < 0:
            raise ValueError(f"emmet_lambda must be >= 0, got {emmet_lambda}")
        super().__init__(layers=layers, **kwargs)

    def equality_ridge(self) -> float:
        return float(self.hparams.emmet_lambda)
