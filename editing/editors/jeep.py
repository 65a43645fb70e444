"""JEEP (Shi et al., AAAI 2025): joint editing of low and high MLP layers (docs/specification.md §4).

Two regions of MLP output projections: low layers [l′..L′] (information enrichment, keyed at the
subject's last token, SL) and high layers [l*..L*] (probability promotion, keyed at the prediction
position PL, the prompt's last token). One edit step:

1. Synergistic optimisation: one Adam over two deltas per request, δ′ at L′ at SL and δ* at L* at PL,
   loss = NLL(target_new | every template-prefixed prompt, both deltas applied) + β′‖δ′‖/‖init′‖²
   + β*‖δ*‖/‖init*‖² + α′·KL at SL of "{subject} is a"; after every step ‖δ′‖ ≤ γ′‖init′‖ and
   ‖δ*‖ ≤ γ*‖init*‖ (`compute_targets` with two `DeltaSite`s; the KL sees δ* too, but δ* sits after
   the KL position, so by causality it cannot change it: the paper's "KL with δ′ applied").
2. Low region, lowest layer first: keys at SL, residual z′ − (current value at L′, SL), spread by
   1/√(layers left) (PMET's rule), closed form with λ′.
3. High region, after all low layers: keys at PL, residual z* − (current value at L*, PL), spread
   evenly, closed form with λ*. Keys and residuals are recomputed on the model in which every
   earlier layer (low region included) is already updated.

`mode="paper"` (default, the paper's Eq. 8/11/12): both deltas on the residual stream h (block
outputs), clamps relative to ‖h‖, residuals measured in the same space (z − h_current).
`mode="code"` reproduces the official code (the paper's numbers come from it): δ′ on the MLP output
m^{L′} (clamp relative to ‖m‖), δ* on the attention output a^{L*} (clamp relative to ‖a‖; on
sequential blocks it also feeds L*'s MLP), low residual z′ − m^{L′}, and the high residual
(a_init + δ*) − m^{L*}_current, which mixes the attention and MLP spaces (it holds a − m even when
δ* = 0; docs/specification.md §8 JEEP-3). Early stopping follows the code in both modes (mean target probability
over rows ≥ `v_min_prob`; None: the core's loss < 0.05 rule). The weight decay is the code's
‖δ‖/‖init‖² (the paper writes β‖δ‖).

Ablations of the paper's Table 4: `optimise` = "joint" (default) | "low" (δ′ only, "w/o δ* & Step 3"
with `update_regions="low"`) | "high" (δ* only, "w/o δ′ & Step 2" with
`update_regions="high"`) | "separate" (δ′ and
the low update, then δ* optimised on the updated model and the high update); `update_regions` = "both" |
"low" ("w/o Step 3") | "high" ("w/o Step 2"); `low_spread="even"` ("Even Spread in Step 2"). The
"w/ MHSA in Step 3" row (editing attention output projections) is not implemented: the core's exact
weight history covers MLP output projections only.
"""
from __future__ import annotations

from typing import Literal

from editing.data.batch import EditBatch
from editing.data.records import EditRequest
from editing.editors.locate import DeltaSite, LocateEditor, TargetConfig
from editing.editors.locate.spread import Spread
from editing.validation import check_choice

Mode = Literal["paper", "code"]
Optimise = Literal["joint", "separate", "low", "high"]
Update = Literal["both", "low", "high"]


class JEEP(LocateEditor):
    """Joint low- and high-layer editing.

    Args:
        layers: the low region [l′..L′] (MLP output projections, as MEMIT's `layers`).
        high_layers: the high region [l*..L*]; every high layer must lie above every low layer.
        mode: "paper" (deltas on the residual stream, residuals in one space) or "code" (the official
            code: low delta on the MLP output, high delta on the attention output).
        mom2_update_weight / high_mom2_update_weight: λ′ / λ*.
        clamp_norm_factor / high_clamp_norm_factor: γ′ / γ* (γ′ > γ* in the paper).
        v_weight_decay / high_v_weight_decay: β′ / β*.  kl_factor: α′ (at the subject's last token).
        v_min_prob: stop a request's optimisation when its mean target probability reaches this.
        optimise, update_regions, low_spread, high_spread: the ablations (module docstring).
        Other arguments: `LocateEditor`'s.
    """

    method = "jeep"

    def __init__(self, layers: list[int] = [3, 4, 5, 6, 7], high_layers: list[int] = [22, 23],
                 mode: Mode = "paper", mom2_update_weight: float = 1000.0, high_mom2_update_weight: float = 1000.0,
                 clamp_norm_factor: float = 0.75, high_clamp_norm_factor: float = 0.25,
                 v_weight_decay: float = 0.5, high_v_weight_decay: float = 0.5, kl_factor: float = 0.0625,
                 v_steps: int = 30, v_lr: float = 0.5, v_min_prob: float | None = 0.9,
                 optimise: Optimise = "joint", update_regions: Update = "both", low_spread: Spread = "sqrt",
                 high_spread: Spread = "even", **kwargs):
        check_choice("mode", mode, Mode)
        check_choice("optimise", optimise, Optimise)
        check_choice("update_regions", update_regions, Update)
        check_choice("low_spread", low_spread, Spread)
        check_choice("high_spread", high_spread, Spread)
        if optimise in ("low", "high") and update_regions != optimise:
            raise ValueError(f"optimise={optimise!r} computes only the {optimise} target: update_regions must be "
                             f"{optimise!r}")
        if optimise == "separate" and update_regions != "both":
            raise ValueError("optimise='separate' updates both regions: update_regions must be 'both'")
        if not layers or not high_layers:
            raise ValueError("JEEP needs a low region (layers) and a high region (high_layers)")
        if v_min_prob is not None and not 0 < v_min_prob <= 1:
            raise ValueError(f"v_min_prob must be in (0, 1] or None, got {v_min_prob}")
        super().__init__(layers=list(layers) + list(high_layers), mom2_update_weight=mom2_update_weight,
                         clamp_norm_factor=clamp_norm_factor, v_weight_decay=v_weight_decay,
                         kl_factor=kl_factor, v_steps=v_steps, v_lr=v_lr, **kwargs)
        self.low = sorted({self.layout.layer_index(l) for l in layers})
        self.high = sorted({self.layout.layer_index(l) for l in high_layers})
        if self.high[0] <= self.low[-1]:
            raise ValueError(f"the high region {self.high} must lie above the low region {self.low}")
        # self.layers (from LocateEditor) is the union: statistics and bookkeeping cover both regions.

    # --- the two deltas ------------------------------------------------------------------------
    def site(self, region: str) -> DeltaSite:
        """Where the region's delta is injected (and its target lives)."""
        h = self.hparams
        if region == "low":
            return DeltaSite("low", "block" if h.mode == "paper" else "mlp", self.low[-1], "subject_last",
                             clamp=h.clamp_norm_factor, weight_decay=h.v_weight_decay)
        return DeltaSite("high", "block" if h.mode == "paper" else "attn_out", self.high[-1], "prompt_last",
                         clamp=h.high_clamp_norm_factor, weight_decay=h.high_v_weight_decay)

    def joint_config(self, regions: tuple[str, ...]) -> TargetConfig:
        h = self.hparams
        sites = tuple(self.site(r) for r in regions)
        return TargetConfig(layer=max(s.layer for s in sites), parts=tuple(s.part for s in sites), steps=h.v_steps,
                            lr=h.v_lr, clamp=h.clamp_norm_factor, weight_decay=h.v_weight_decay,
                            kl_factor=h.kl_factor, autocast=h.v_autocast, sites=sites,
                            early_stop_prob=h.v_min_prob)

    def target_config(self) -> TargetConfig:
        """The first optimisation of a step (both deltas for "joint", δ′ first for "separate")."""
        opt = self.hparams.optimise
        return self.joint_config({"joint": ("low", "high"), "separate": ("low",), "low": ("low",),
                                  "high": ("high",)}[opt])

    # --- the region updates (steps 2 and 3) -------------------------------------------------------
    def update_region(self, region: str, requests: list[EditRequest], z) -> list[float]:
        """Write the region's target into its layers, lowest first (the core's `spread_update`);
        returns the mean residual norm (after spreading) per layer."""
        h = self.hparams
        site = self.site(region)
        # paper: z and the current value in the same space; code: the output of W_out at the top layer
        # of the region (for the high region that mixes z's attention space with the MLP's)
        return self.spread(requests, z, self.low if region == "low" else self.high,
                           part=site.part if h.mode == "paper" else "mlp", top=site.layer,
                           lam=h.mom2_update_weight if region == "low" else h.high_mom2_update_weight,
                           spread=h.low_spread if region == "low" else h.high_spread,
                           key_position=site.position, value_position=site.position)

    def apply_edit(self, batch: EditBatch) -> dict:
        requests = batch.requests
        h = self.hparams
        templates = self.templates()
        info: dict = {}
        self.history.steps.append({})
        if h.optimise == "separate":
            first = self.targets(requests, templates, self.joint_config(("low",)))
            residual_low = self.update_region("low", requests, first.z["low"])
            second = self.targets(requests, templates, self.joint_config(("high",)))  # on the updated model
            residual_high = self.update_region("high", requests, second.z["high"])
            info.update(target_loss=float(first.loss.mean()), target_loss_high=float(second.loss.mean()),
                        target_steps=first.steps + second.steps)
        else:
            targets = self.targets(requests, templates, self.target_config())
            residual_low = self.update_region("low", requests, targets.z["low"]) if h.update_regions in ("both", "low") else []
            residual_high = self.update_region("high", requests, targets.z["high"]) if h.update_regions in ("both", "high") else []
            info.update(target_loss=float(targets.loss.mean()), target_steps=targets.steps)
        for name, norms in (("low", residual_low), ("high", residual_high)):
            if norms:
                info[f"residual_{name}_first"], info[f"residual_{name}_last"] = norms[0], norms[-1]
        return info
