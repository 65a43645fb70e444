"""AdaPLE (Adaptive Precise LLM Editing; "Can We Continually Edit Language Models? On the Knowledge
Attenuation in Sequential Model Editing"): PMET's targets, an "erase old, insert new" closed form, and
drop-and-rescale fusion (docs/specification.md §6).

- Targets (§6.1): as PMET, deltas on the attention output and the MLP output of the last edited layer
  optimised together (NLL over context-prefixed prompts + KL on "{subject} is a", KL weight 1); only
  the MLP target z = m + δᵐ is used. `attn_delta=False` is the "w/o δᵃ" ablation (MLP delta only).
- Spreading (§6.3): the MLP residual divided by √(layers left), layers lowest first, keys recomputed.
- The closed form (`residual_mode`):
  * "eq4" (default, the paper's Eq. 4 as published): Δ = R K₁ᵀ (λC + 2K₁K₁ᵀ)⁻¹ with
    R = V₂ − 3WK₁, where at layer l the new values are V₂ = WK₁ + r (r the spread residual) and W the
    current weights, so R = r − 2WK₁. What this solves (derived, and checked by tests/test_adaple.py):
        min_Δ  λ tr(ΔCΔᵀ) + ‖ΔK₁ − (V₂ − V₁)‖² + ‖ΔK₁ + 2V₁‖²,   V₁ = WK₁,
    i.e. the block form [V₀, −V₁, V₂] of the paper's appendix: the edited keys are asked to produce
    V₂ and, at the same time, −V₁ ("erase"), so for a small C the edited keys' output lands near
    (V₂ − V₁)/2, not V₂. The paper's Eq. 3 with its minus sign would instead give Δ = (V₂ − V₁)K₁ᵀC⁻¹
    (the K₁K₁ᵀ terms cancel); Eq. 4 is what the paper states as its solution, so it is what we solve.
  * "alg1" (the paper's Algorithm 1): R = r with the (λC + 2K₁K₁ᵀ) denominator.
  * "memit" (the "w/o new objective" ablation): R = r with (λC + K₁K₁ᵀ), i.e. PMET's update.
- Drop-and-rescale fusion (§6.4): on by default (p = 0.8), a fresh seeded mask per step and layer,
  applied inside the layer loop; `fusion="add"` is the "w/o DR" ablation. The fusion itself is a
  plug-in of the shared core (`LocateEditor.fused`), usable with ROME, MEMIT, PMET, JEEP, COMEBA-HK.
"""
from __future__ import annotations

from typing import Literal

import torch

from editing.editors.locate.fusion import Fusion
from editing.editors.pmet import PMET
from editing.validation import check_choice

ResidualMode = Literal["eq4", "alg1", "memit"]


class AdaPLE(PMET):
    method = "adaple"

    def __init__(self, residual_mode: ResidualMode = "eq4", attn_delta: bool = True, fusion: Fusion = "dr",
                 drop_rate: float = 0.8, **kwargs):
        check_choice("residual_mode", residual_mode, ResidualMode)
        super().__init__(fusion=fusion, drop_rate=drop_rate, **kwargs)
        self.residual_mode = residual_mode
        self.key_weight = 1.0 if residual_mode == "memit" else 2.0
        self.target_parts = ("attn_out", "mlp") if attn_delta else ("mlp",)

    @torch.no_grad()
    def layer_residual(self, layer: int, K: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.residual_mode != "eq4":
            return r
        WK = K.double() @ self._weight(layer).double().T   # V₁ = W K₁ (current weights, no bias)
        return r.double() - 2 * WK                          # V₂ − 3V₁ with V₂ = V₁ + r
