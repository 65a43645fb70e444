"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection per edit (§2.6).

u = E[kkᵀ]⁻¹k* (k* the key averaged over all context templates; `mom2_adjustment=False` uses k*),
normalised; v* = m^L + δ from the target optimisation at the MLP output; Δ = (v* − W k) uᵀ / (uᵀk)
with k and Wk at the bare prompt (the official code's choice; the paper uses k* there too:
`bare_key=False`). Several requests are applied one after another (sequential ROME).
"""
from __future__ import annotations

import torch

from editing.data.batch import EditBatch
from editing.data.records import EditRequest
from editing.editors.locate import LocateEditor, compute_keys


class ROME(LocateEditor):
    method = "rome"
    target_parts = ("mlp",)

    def __init__(self, layers: list[int] = [5], template_spec: list[list[int]] = [[5, 10], [10, 10]],
                 v_steps: int = 20, clamp_norm_factor: float = 4.0, mom2_adjustment: bool = True,
                 bare_key: bool = True, **kwargs):
        if len(layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got {layers}")
        super().__init__(layers=layers, template_spec=template_spec, v_steps=v_steps,
                         clamp_norm_factor=clamp_norm_factor, **kwargs)

    def _keys_over(self, requests: list[EditRequest], layer: int, groups: list[list[str]]):
        return compute_keys(self.layout, self.tokenizer, requests, layer, groups, self.hparams.key_position)

    def apply_edit(self, batch: EditBatch) -> dict:
        requests = batch.requests
        layer = self.layers[0]
        flat = self.templates()
        self.history.steps.append({})
        losses = []
        for r in requests:
            targets = self.targets([r], flat)
            v = targets.z["mlp"][0].double()
            k_star = self._keys_over([r], layer, [flat])[0].double()
            if self.hparams.mom2_adjustment:
                u = torch.linalg.solve(self.covariance(layer).double(), k_star)
            else:
                u = k_star
            u = u / u.norm()
            k = self._keys_over([r], layer, [["{}"]])[0].double() \
                if self.hparams.bare_key else k_star
            wk = self.values([r], "mlp", layer)[0].double()
            right = (v - wk) / (k @ u)
            step = self.history.steps[-1]
            entry = self.fused(layer, (right[:, None], u[:, None]), index=len(losses))
            if len(entry) > 2:  # fused: each request's rank-one Δ gets its own mask
                step[layer] = step.get(layer, []) + [entry]
            else:               # plain: the step's Δ stays one low-rank factor pair
                a, b = step.get(layer, (right.new_zeros(right.shape[0], 0), u.new_zeros(u.shape[0], 0)))
                step[layer] = (torch.cat([a, right[:, None]], 1), torch.cat([b, u[:, None]], 1))
            self.refresh_weights([layer])
            losses.append(float(targets.loss.mean()))
        return {"target_loss": sum(losses) / len(losses)}
