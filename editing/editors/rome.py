"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection per edit (§2.6).

u = E[kkᵀ]⁻¹k* (k* the key averaged over all context templates; `mom2_adjustment=False` uses k*),
normalised; v* = m^L + δ from the target optimisation at the MLP output; Δ = (v* − W k) uᵀ / (uᵀk)
with k and Wk at the bare prompt (the official code's choice; the paper uses k* there too:
`bare_key=False`). Several requests are applied one after another (sequential ROME).

r-ROME (Gupta et al. 2024, "Rebuilding ROME"; `rebuild=True`, configs/r_rome.yaml): the residual and
the denominator are taken at the key u is built on, Δ = (v* − (W k* + b)) uᵀ / (uᵀk*), the exact
solution of ROME's constrained least squares (Ŵk* + b = v*). uᵀk* = k*ᵀC⁻¹k*/‖C⁻¹k*‖ > 0 for any SPD
C, so the update cannot blow up when the bare key is nearly C⁻¹-orthogonal to k* (ROME's "disabling
edits"). `bare_key` is not used then; v* keeps the bare-prompt m_init in both.
"""
from __future__ import annotations

import torch

from editing.data.batch import EditBatch
from editing.data.records import EditRequest
from editing.editors.locate import LocateEditor, compute_keys
from editing.layout import linear


class ROME(LocateEditor):
    method = "rome"
    target_parts = ("mlp",)

    def __init__(self, layers: list[int] = [5], template_spec: list[list[int]] = [[5, 10], [10, 10]],
                 v_steps: int = 20, clamp_norm_factor: float = 4.0, mom2_adjustment: bool = True,
                 bare_key: bool = True, rebuild: bool = False, **kwargs):
        if len(layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got {layers}")
        if kwargs.get("projection", "none") != "none":
            raise ValueError("ROME's rank-one update does not use the closed form: the null-space projection "
                             "is for MEMIT, PMET, AdaPLE, JEEP and COMEBA-HK (docs/alphaedit.md)")
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
            if self.hparams.rebuild:  # r-ROME: W k* + b, the template average of the output
                k = k_star
                out = self.layout.mlp_out(layer)
                bias = getattr(out, "bias", None)
                wk = linear(out, k_star.to(out.weight.dtype)).double() + (0 if bias is None else bias.double())
            else:
                k = self._keys_over([r], layer, [["{}"]])[0].double() if self.hparams.bare_key else k_star
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
