"""MEMIT (Meng et al. 2023): mass editing by spreading residuals over several MLP layers.

The target z is the residual stream h^L after the last edited layer (§2.7); for each edited layer,
lowest first: keys at that layer on the current model, the remaining residual z − h^L divided evenly
over the layers left, and the closed-form update with λ·E[kkᵀ] (../shared/METHODS.md §2.5).
PMET and others reuse `apply_edit` and change the target parts, the z part and the spreading.
"""
from __future__ import annotations

import math

from editing.data.records import EditRequest
from editing.editors.locate import LocateEditor, closed_form, current_values


class MEMIT(LocateEditor):
    method = "memit"
    target_parts = ("block",)
    z_part = "block"
    spread = "even"   # "even": 1/(n-i); "sqrt": 1/sqrt(n-i)

    key_weight = 1.0  # w in (λC + w KKᵀ)

    def layer_residual(self, layer: int, K, r):
        """The residual R the closed form inserts at `layer` for the spread target residual r
        (MEMIT: r itself; AdaPLE subtracts what the keys already produce)."""
        return r

    def divisor(self, remaining: int) -> float:
        return float(remaining) if self.spread == "even" else math.sqrt(remaining)

    def apply_edit(self, requests: list[EditRequest]) -> dict:
        templates = [t for g in self.template_groups() for t in g]
        targets = self.targets(requests, templates)
        z = targets.z[self.z_part]
        last = self.layers[-1]
        self.history.steps.append({})
        residual_norms = []
        for i, layer in enumerate(self.layers):
            C = self.covariance(layer)
            K = self.keys(requests, layer)
            cur = current_values(self, requests, self.z_part, last)
            R = self.layer_residual(layer, K, (z - cur) / self.divisor(len(self.layers) - i))
            residual_norms.append(float(R.norm(dim=-1).mean()))
            self.history.steps[-1][layer] = self.fused(
                layer, closed_form(K, R, C, self.hparams.mom2_update_weight, key_weight=self.key_weight))
            self.refresh_weights()  # later layers see this one's update
        return {"target_loss": float(targets.loss.mean()), "target_steps": targets.steps,
                "residual_first": residual_norms[0], "residual_last": residual_norms[-1]}
