"""COMEBA-HK (consecutive model editing with batch alongside hook layers), docs/specification.md §5.

MEMIT's multi-layer update (keys at the subject's last token, target z at h^L, residual spread evenly,
layers lowest first with keys and residuals recomputed), changed in two ways:

- **Consecutive update.** Step s solves Δ = R K₂ᵀ (λC₀ + K′K′ᵀ + K₂K₂ᵀ)⁻¹ with R measured on the
  current (hooked) model and K′K′ᵀ the sum of the keys' outer products of every earlier step at that
  layer. For one layer with fixed keys and values this is recursive least squares: two steps give
  exactly the one-shot solution on the union of the keys (tests/test_comeba.py derives it).
- **Hook layers.** The MLP output projections keep W₀. A persistent hook on each edited projection
  holds W_h = W₀ + ΣΔ (as the core's low-rank `EditHistory`) and, per sequence, computes
  P = W₀k̂ (the module's own output), O = W_hk̂ = P + k̂ΔWᵀ, M = ‖O − P‖ per position, the z-score of M
  over the sequence's real positions, and outputs O where Z ≥ α and P elsewhere ("validated"). During
  an edit step the layers not yet updated output O everywhere ("temporary").
- **Dynamic α** (Eq. 19), per hook layer: α₁ = α_z; after step s ≥ 2,
  α_s = min(α_{s−1}, min over the step's bare edit prompts of their maximum z-score), measured with
  all hooks validated at α_{s−1} after the step's update.

Decisions where the paper is silent (docs/comeba_hk.md):
- Statistics over the real positions of each sequence of the current forward: padding never counts;
  the first real position is left out when the tokenizer starts every text with a BOS token
  (`exclude_first="auto"`). Population standard deviation (ddof 0, `zscore_ddof`). A row whose
  deviation is 0 (or with fewer than 2 positions) has no outlier and keeps P.
- Short sequences: with n positions the largest z-score is √(n−1), so at α = 2.2 a sequence of ≤ 5
  positions is never swapped. `short_prompts="keep"` (the paper): such edit prompts still take part in
  the α rule (and so pull α down to what they can reach); `"skip"`: edit prompts whose bound √(n−1)
  is below α_z are left out of the α rule (they are not swapped, but do not lower α for everyone).
- KV cache: the z-score domain is the positions of the current forward. A prefill sees the whole
  prompt (the same decisions as a full forward of the prompt); a single-token decoding step has one
  position, no deviation and so keeps P: decoded positions use the original projection, while the
  prompt's edited states reach them through the cache. `generate(..., use_cache=False)` re-scores the
  whole sequence at every step instead (the non-causal statistic of teacher-forced evaluation).

State (all of it restored exactly by `undo` / a failed step, and saved in checkpoints):
`history` (ΣΔ as low-rank factors per step and layer), `key_history` (each step's keys K₂ per layer,
stored as factors (K₂ᵀ, K₂ᵀ), so K′K′ᵀ is their float64 sum in step order), `alphas` (α per layer
after every step).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from editing import hooks
from editing.data.batch import EditBatch
from editing.data.records import EditRequest
from editing.editors.base import Editor
from editing.editors.locate import EditHistory, fill
from editing.editors.memit import MEMIT
from editing.tokens import encode
from editing.tuners import HookLayer
from editing.tuners.hook_layer import max_zscore_bound, select, zscores
from editing.validation import check_choice

__all__ = ["COMEBA", "AlphaHistory", "max_zscore_bound", "select", "zscores"]

UpdateRule = Literal["consecutive", "memit"]
AlphaMode = Literal["dynamic", "fixed"]
AlphaScope = Literal["layer", "global"]
ShortPrompts = Literal["keep", "skip"]


class AlphaHistory(nn.Module):
    """α per hook layer after every step (a list of lists of floats), saved as extra state."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[float]] = []

    def get_extra_state(self):
        return [list(s) for s in self.steps]

    def set_extra_state(self, state) -> None:
        self.steps = [list(map(float, s)) for s in state]

    def truncate(self, n: int) -> None:
        del self.steps[n:]


class COMEBA(MEMIT):
    """COMEBA-HK. Takes every MEMIT/LocateEditor argument (layers, λ, statistics, templates, target
    optimisation, fusion) and:

    Args:
        hook: True = hook layers (COMEBA-HK); False = the consecutive update written into the weights
            ("COMEBA w/o HK" of the ablation).
        update_rule: "consecutive" (λC₀ + K′K′ᵀ + K₂K₂ᵀ) or "memit" (λC₀ + K₂K₂ᵀ, the plain MEMIT update, used
            with hooks in the ablation).
        last_layers: edit and hook only the last n of `layers` (the ablation's last 1 / last 3 / all).
        alpha_z: the initial threshold α₁ (2.2).
        alpha_mode: "dynamic" (Eq. 19) or "fixed" (α = alpha_z throughout).
        alpha_scope: "layer" (one α per hook layer, from that layer's z-scores) or "global" (the
            minimum over layers, shared).
        short_prompts: "keep" or "skip": whether edit prompts too short to reach α_z take part in the
            α rule (see the module docstring).
        exclude_first: leave each sequence's first real position out of the statistics and never swap
            it: "auto" (when the tokenizer starts texts with a BOS token), True or False.
        zscore_ddof: 0 = population standard deviation, 1 = sample.
    """

    method = "comeba_hk"

    def __init__(self, hook: bool = True, update_rule: UpdateRule = "consecutive", last_layers: int | None = None,
                 alpha_z: float = 2.2, alpha_mode: AlphaMode = "dynamic", alpha_scope: AlphaScope = "layer",
                 short_prompts: ShortPrompts = "keep", exclude_first: bool | Literal["auto"] = "auto",
                 zscore_ddof: Literal[0, 1] = 0, **kwargs):
        super().__init__(**kwargs)
        check_choice("update_rule", update_rule, UpdateRule)
        check_choice("alpha_mode", alpha_mode, AlphaMode)
        check_choice("alpha_scope", alpha_scope, AlphaScope)
        check_choice("short_prompts", short_prompts, ShortPrompts)
        if exclude_first not in (True, False, "auto"):
            raise ValueError(f"exclude_first must be true, false or 'auto', got {exclude_first!r}")
        if zscore_ddof not in (0, 1):
            raise ValueError(f"zscore_ddof must be 0 or 1, got {zscore_ddof}")
        if not alpha_z > 0:
            raise ValueError(f"alpha_z must be positive, got {alpha_z}")
        if last_layers is not None:
            if not 1 <= last_layers <= len(self.layers):
                raise ValueError(f"last_layers must be in 1..{len(self.layers)}, got {last_layers}")
            self.layers = self.layers[-last_layers:]
        self.key_history = EditHistory()
        self.alphas = AlphaHistory()
        if exclude_first == "auto":
            ids = self.tokenizer("x")["input_ids"]
            exclude_first = bool(ids) and self.tokenizer.bos_token_id is not None \
                and ids[0] == self.tokenizer.bos_token_id
        self.exclude_first = bool(exclude_first)
        self._alpha_override: float | None = None     # tests and analyses: one α for every layer
        if hook:
            self._mask = hooks.MaskTracker(self.layout.backbone)
            for l in self.layers:
                self.inject(l, "mlp_out", lambda base, l=l: HookLayer(
                    base, self._mask, lambda: self.alpha(l), self.exclude_first, zscore_ddof))

    # --- the hook layers ---------------------------------------------------------------------------------
    def alpha(self, layer: int) -> float:
        """The current threshold of a hook layer (α_z before the first step)."""
        if self._alpha_override is not None:
            return self._alpha_override
        if not self.alphas.steps:
            return float(self.hparams.alpha_z)
        return self.alphas.steps[-1][self.layers.index(layer)]

    def hook(self, layer: int) -> HookLayer:
        """The hook layer injected at `layer`'s MLP output projection."""
        return self.layout.mlp_out(layer)

    def hooks_mode(self, mode: str) -> None:
        """Set every hook layer to "validated" or "temporary"."""
        if self.hparams.hook:
            for l in self.layers:
                self.hook(l).mode = mode

    def edited_layers(self) -> set[int]:
        return set(self.layers) if self.hparams.hook else super().edited_layers()

    @torch.no_grad()
    def write_weight(self, layer: int) -> None:
        """With hooks the model keeps W₀; the hook layer gets W_h − W₀ = ΣΔ (float64 sum in step order)."""
        if not self.hparams.hook:
            return super().write_weight(layer)
        w = self._weight(layer)
        edited = any(layer in s for s in self.history.steps)
        self.hook(layer).set_delta(self.history.delta(layer, w.shape, w.device).to(w.dtype) if edited else None)

    def disabled(self):
        if self.hparams.hook:  # the hook layers switch off; the weights are W₀ anyway
            return Editor.disabled(self)
        return super().disabled()

    def edit_shape(self) -> dict:
        return {**super().edit_shape(), "hook": bool(self.hparams.hook)}

    @torch.no_grad()
    def relative_change(self) -> float | None:
        if not self.hparams.hook:
            return super().relative_change()
        ratios = [float(self.hook(l).delta.double().norm() / self._weight(l).double().norm())
                  for l in self.layers if self.hook(l).delta is not None]
        return max(ratios) if ratios else None

    def hook_layer(self, layer: int) -> torch.Tensor:
        """W_h of a hook layer, (out, in), in float64."""
        w0 = self._original(layer)
        return w0.double() + self.history.delta(layer, w0.shape, w0.device)

    def accumulated_keys(self, layer: int) -> torch.Tensor:
        """K′K′ᵀ: the sum of kkᵀ over every key edited into `layer` so far, [d_ff, d_ff] float64."""
        n = self.layout.mlp_key_size(layer)
        return self.key_history.delta(layer, (n, n), self.device)

    @torch.no_grad()
    def zscore_map(self, prompts: list[str], spans: list[tuple[int, int]] | None = None):
        """Run the prompts through the model with the hooks as they are and return (z, batch): z maps
        each hook layer to the z-scores [B, S] its validated hook computed (NaN where undefined) and
        batch is the `TargetBatch` (with subject_last when character spans are given)."""
        if not self.hparams.hook:
            raise RuntimeError("z-scores exist only with hook layers (hook=True)")
        batch = encode(self.tokenizer, [self.prepare_prompt(p) for p in prompts], spans=spans).to(self.device)
        layers = {l: self.hook(l) for l in self.layers}
        for h in layers.values():
            h.recording, h.recorded = True, None
        try:
            self.layout.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            rec = {l: h.recorded[0] for l, h in layers.items() if h.recorded is not None}
        finally:
            for h in layers.values():
                h.recording, h.recorded = False, None
        return rec, batch

    def max_zscores(self, prompts: list[str]) -> torch.Tensor:
        """The maximum z-score of each prompt at each hook layer [len(prompts), len(layers)] with the
        hooks as they are (NaN where a prompt has no defined z-score, or the layer holds no edit)."""
        rec, _ = self.zscore_map(prompts)
        out = torch.full((len(prompts), len(self.layers)), float("nan"))
        for j, layer in enumerate(self.layers):
            if layer in rec:
                z = rec[layer]
                top = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z).amax(1)
                out[:, j] = torch.where(torch.isinf(top), torch.full_like(top, math.nan), top).cpu()
        return out

    # --- one consecutive editing step (§5.5) ---------------------------------------------------------------
    def prior_keys(self, layer: int) -> torch.Tensor | None:
        """K′K′ᵀ for the consecutive update; None for the plain MEMIT rule."""
        return self.accumulated_keys(layer) if self.hparams.update_rule == "consecutive" else None

    def write_layer(self, layer: int, factors, K: torch.Tensor) -> None:
        kt = K.detach().double().T.contiguous()
        self.key_history.steps[-1][layer] = (kt, kt)
        super().write_layer(layer, factors, K)
        if self.hparams.hook:
            self.hook(layer).mode = "validated"

    def apply_edit(self, batch: EditBatch) -> dict:
        h, requests = self.hparams, batch.requests
        self.hooks_mode("validated")
        targets = self.targets(requests, self.templates())   # on the model as currently hooked (α_{s−1})
        self.history.steps.append({})
        self.key_history.steps.append({})
        try:
            self.hooks_mode("temporary")   # layers not yet updated output O everywhere
            norms = self.spread(requests, targets.z[self.z_part], self.layers, part=self.z_part,
                                top=self.layers[-1], lam=h.mom2_update_weight, spread=self.spread_rule)
        finally:
            self.hooks_mode("validated")
        info = {"target_loss": float(targets.loss.mean()), "target_steps": targets.steps,
                "residual_first": norms[0], "residual_last": norms[-1]}
        if h.hook:
            info.update(self._update_alpha(requests))
        return info

    def _update_alpha(self, requests: list[EditRequest]) -> dict:
        """Eq. 19 per layer (or globally), from the step's bare edit prompts."""
        h = self.hparams
        first = not self.alphas.steps
        prev = [self.alpha(l) for l in self.layers]
        texts = [fill("{}", r)[0] for r in requests]
        zmax = self.max_zscores(texts)                               # [u, layers]
        lengths = encode(self.tokenizer, [self.prepare_prompt(t) for t in texts]).attention_mask.sum(1)
        n_real = lengths - int(self.exclude_first)
        short = torch.tensor([not max_zscore_bound(int(n), h.zscore_ddof) >= h.alpha_z for n in n_real])
        use = ~short if h.short_prompts == "skip" else torch.ones_like(short)
        cand = zmax[use]
        cand = torch.where(torch.isnan(cand), torch.full_like(cand, math.inf), cand)
        alpha_c = cand.amin(0) if cand.numel() else torch.full((len(self.layers),), math.inf)
        if h.alpha_mode == "fixed" or first:
            new = [float(h.alpha_z)] * len(self.layers)
        else:
            new = [min(float(a), p) for a, p in zip(alpha_c, prev)]
        if h.alpha_scope == "global":
            new = [min(new)] * len(new)
        self.alphas.steps.append(new)
        info = {f"alpha_l{l}": a for l, a in zip(self.layers, new)}
        info["short_prompts"] = int(short.sum())
        info["alpha_candidate_min"] = float(alpha_c.min())
        return info

    # --- exact undo, atomic steps, checkpoints ------------------------------------------------------------
    def undo(self, steps: int = 1) -> None:
        n = len(self.history.steps) - steps
        super().undo(steps)
        self.key_history.truncate(n)
        self.alphas.truncate(n)

    def restore(self, snap) -> None:
        self.key_history.truncate(snap)
        self.alphas.truncate(snap)
        super().restore(snap)
        self.hooks_mode("validated")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name in ("key_history", "alphas"):
            extra = state_dict.get(f"{name}._extra_state")
            if extra is None:
                raise RuntimeError(f"this checkpoint holds no {name} (not a COMEBA-HK edit)")
            getattr(self, name).set_extra_state(extra)
        if len(self.key_history.steps) != len(state_dict["history._extra_state"]):
            raise RuntimeError("inconsistent COMEBA-HK checkpoint: key and weight histories differ in length")
        if self.hparams.hook and len(self.alphas.steps) != len(self.key_history.steps):
            raise RuntimeError("inconsistent COMEBA-HK checkpoint: α history and steps differ in length")
        return super().load_state_dict(state_dict, strict, assign)

    def detach_hooks(self) -> None:
        """Remove the hook layers from the model (the model is then exactly the base model)."""
        if self.hparams.hook and isinstance(self.layout.mlp_out(self.layers[0]), HookLayer):
            for l in self.layers:
                self.layout.eject(l, "mlp_out")
            self._mask.remove()
