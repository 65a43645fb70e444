"""MEMIT (Meng et al. 2023): mass editing by spreading residuals over several MLP layers.

The target z is the residual stream h^L after the last edited layer (§2.7); for each edited layer,
lowest first: keys at that layer on the current model, the remaining residual z − h^L divided evenly
over the layers left, and the closed-form update with λ·E[kkᵀ] (docs/specification.md §2.5), all in
the core's `spread_update`. PMET and others reuse `apply_edit` and change the target parts, the z
part and the spreading.
"""
from __future__ import annotations

from editing.data.batch import EditBatch
from editing.editors.locate import LocateEditor


class MEMIT(LocateEditor):
    method = "memit"
    target_parts = ("block",)
    z_part = "block"
    spread_rule = "even"   # "even": 1/(n-i); "sqrt": 1/sqrt(n-i)

    def apply_edit(self, batch: EditBatch) -> dict:
        requests = batch.requests
        targets = self.targets(requests, self.templates())
        self.history.steps.append({})
        norms = self.spread(requests, targets.z[self.z_part], self.layers, part=self.z_part, top=self.layers[-1],
                            lam=self.hparams.mom2_update_weight, spread=self.spread_rule)
        return {"target_loss": float(targets.loss.mean()), "target_steps": targets.steps,
                "residual_first": norms[0], "residual_last": norms[-1]}
