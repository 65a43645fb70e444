"""`LocateEditor`: the Editor base of the closed-form methods. It keeps every step's Δ as low-rank
factors (`EditHistory`), writes W = W₀ + ΣΔ into the MLP output projections (storage orientation
from the module type), can disable or undo edits exactly (a layer's weight is recomputed from W₀ in
a fixed order, so it is bit-for-bit the same), and wires the math of the package (templates, keys,
targets, statistics, `spread_update`) to the model it edits."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from editing.data.records import EditRequest
from editing.editors.base import Editor
from editing.editors.locate.fusion import Fusion, fusion_spec
from editing.editors.locate.history import EditHistory
from editing.editors.locate.keys import Part, Position, compute_keys, current_values
from editing.editors.locate.projection import Projection, ThresholdRule, null_space
from editing.editors.locate.spread import Factors, Spread, spread_update
from editing.editors.locate.statistics import KeyStatistics
from editing.editors.locate.targets import TargetConfig, Targets, compute_targets
from editing.editors.locate.templates import context_templates, flatten, templates_path
from editing.layout import weight_out_in
from editing.validation import check_choice


class LocateEditor(Editor):
    """Base of the closed-form editors: statistics, templates, targets, and exact weight bookkeeping.

    Args:
        layers: the MLP output projections edited (lowest first).
        mom2_update_weight: λ, the weight of the key covariance in the closed form.
        corpus, stats_samples, stats_max_length: where E[kkᵀ] comes from (cached on disk). 1,000
            texts by default (None: all): on SmolLM2 MEMIT's Score at 1,000 texts equals its Score
            at all ~10k; AdaPLE's moves by up to 3 points with the count (docs/performance.md §2).
        template_spec: [[length, count], ...] of generated context templates after "{}".
        template_seed: seed of the template generation.
        key_position: "subject_last" or "prompt_last".
        v_steps, v_lr, clamp_norm_factor, v_weight_decay, kl_factor: target optimisation (§2.3).
        v_autocast: run the target optimisation under autocast in this dtype ("bfloat16": about 3x
            faster on CPUs with bf16 units; the targets differ by a few percent); None = exact.
        fusion: how each layer's Δ enters the weights: "add" (plain), "dr" (AdaPLE's drop-and-rescale,
            each entry dropped with probability `drop_rate` and the rest scaled by 1/(1 − drop_rate),
            a fresh seeded mask per step and layer), "topk" (keep the `fusion_keep` share of entries
            with the largest magnitude). Applied inside the layer loop: later layers see the fused Δ.
        projection: "null_space" replaces the closed form by AlphaEdit's projected one
            (`editing.editors.locate.projection`): eigenvectors of E[kkᵀ] below `nullspace_threshold`,
            the keys of earlier steps in `projected_keys`, L2 weight `projection_l2`; `nullspace_rule`
            "relative" reads the threshold as a share of E[kkᵀ]'s largest eigenvalue.
    """

    method = "locate"
    target_parts: tuple[str, ...] = ("block",)
    key_weight = 1.0  # w in (λC + w KKᵀ)

    def __init__(self, layers: list[int] = [3, 4, 5, 6, 7], mom2_update_weight: float = 15000.0,
                 corpus: str = "wiki-offline", stats_samples: int | None = 1000, stats_max_length: int = 256,
                 template_spec: list[list[int]] = [[10, 5]], template_seed: int = 0,
                 key_position: Position = "subject_last", v_steps: int = 25, v_lr: float = 0.5,
                 clamp_norm_factor: float = 0.75, v_weight_decay: float = 0.5, kl_factor: float = 0.0625,
                 v_autocast: Literal["bfloat16", "float16"] | None = None, fusion: Fusion = "add",
                 drop_rate: float = 0.8, fusion_keep: float = 0.2, fusion_seed: int = 0,
                 projection: Projection = "none", nullspace_threshold: float = 2e-2, projection_l2: float = 10.0,
                 nullspace_rule: ThresholdRule = "absolute",
                 **kwargs):
        super().__init__(**kwargs)
        fusion_spec(fusion, drop_rate, fusion_keep, fusion_seed)  # validates
        check_choice("projection", projection, Projection)
        check_choice("nullspace_rule", nullspace_rule, ThresholdRule)
        if not layers:
            raise ValueError("at least one layer must be edited")
        self.layers = sorted({self.layout.layer_index(l) for l in layers})
        self.history = EditHistory()
        self.projected_keys = EditHistory()   # AlphaEdit's C_p: (Kᵀ, Kᵀ) of each step and layer
        self._projectors: dict[int, torch.Tensor] = {}
        self._w0: dict[int, torch.Tensor] = {}
        self._stats = KeyStatistics(corpus, stats_samples, stats_max_length)
        self._templates: list[list[str]] | None = None

    def edit_shape(self) -> dict:
        shape = {"layers": list(self.layers), "parts": list(self.target_parts)}
        return shape if self.hparams.projection == "none" else {**shape, "projection": self.hparams.projection}

    # --- exact weight bookkeeping ---------------------------------------------------------------
    def _weight(self, layer: int) -> torch.Tensor:
        return weight_out_in(self.layout.mlp_out(layer))

    def _original(self, layer: int) -> torch.Tensor:
        if layer not in self._w0:
            self._w0[layer] = self._weight(layer).detach().clone()
        return self._w0[layer]

    def edited_layers(self) -> set[int]:
        """The layers whose weights the history (or an earlier write) touches."""
        return {l for s in self.history.steps for l in s} | set(self._w0)

    @torch.no_grad()
    def write_weight(self, layer: int) -> None:
        """W = W₀ + ΣΔ (or W₀ when disabled) of one layer, recomputed from W₀ and the history."""
        w0 = self._original(layer)
        w = (w0.double() + self.history.delta(layer, w0.shape, w0.device)).to(w0.dtype) if self.enabled else w0
        self._weight(layer).copy_(w)

    def refresh_weights(self, layers: list[int] | None = None) -> None:
        """Rebuild the weights of `layers` (default: every edited layer) from W₀ and the history."""
        for layer in sorted(self.edited_layers() if layers is None else layers):
            self.write_weight(layer)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        before = self.enabled
        self.enabled = False
        self.refresh_weights()
        try:
            yield
        finally:
            self.enabled = before
            self.refresh_weights()

    def fused(self, layer: int, factors: Factors, index: int = 0) -> tuple:
        """A history entry for this step's Δ = left @ rightᵀ at `layer` under the configured fusion.
        The drop mask's seed depends on the fusion seed, the step number, the layer and `index` (the
        request within a sequential step), so every step and layer gets a fresh, reproducible mask."""
        h = self.hparams
        seed = (h.fusion_seed * 1_000_003 + len(self.history.steps) * 10_007 + layer * 101 + index) % (2 ** 62)
        spec = fusion_spec(h.fusion, h.drop_rate, h.fusion_keep, seed)
        return tuple(factors) if spec is None else (factors[0], factors[1], spec)

    def undo(self, steps: int = 1) -> None:
        """Withdraw the last `steps` edit steps; the weights return to their exact previous values."""
        if steps < 1:
            raise ValueError(f"undo takes a number of steps >= 1, got {steps}")
        if steps > len(self.history.steps):
            raise ValueError(f"only {len(self.history.steps)} steps to undo")
        self.history.truncate(len(self.history.steps) - steps)
        self.projected_keys.truncate(len(self.history.steps))
        del self.edit_log[max(0, len(self.edit_log) - steps):]
        self.refresh_weights()

    def snapshot(self):
        return len(self.history.steps)

    def restore(self, snap) -> None:
        self.history.truncate(snap)
        self.projected_keys.truncate(snap)
        self.refresh_weights()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        extra = state_dict.get("history._extra_state")
        if extra is None:
            raise RuntimeError("this checkpoint holds no edit history")
        self.history.set_extra_state(extra)
        self.projected_keys.set_extra_state(state_dict.get("projected_keys._extra_state") or [])
        self.refresh_weights()
        return nn.modules.module._IncompatibleKeys([], [])

    @torch.no_grad()
    def relative_change(self) -> float | None:
        """max over edited layers of ‖W − W₀‖ / ‖W₀‖ (the weights as written)."""
        ratios = [float((self._weight(l).double() - w0.double()).norm() / w0.double().norm())
                  for l, w0 in self._w0.items()]
        return max(ratios) if ratios else None

    def check_finite(self) -> None:
        for s in self.history.steps[-1:]:
            for layer, e in s.items():
                if not all(torch.isfinite(x).all() for f in (e if isinstance(e, list) else [e]) for x in f[:2]):
                    raise FloatingPointError(f"non-finite update at layer {layer}")

    # --- the pieces of a step ----------------------------------------------------------------------
    def covariance(self, layer: int) -> torch.Tensor:
        """C = E[kkᵀ] of the original model at `layer` (cached on disk and in memory)."""
        if layer not in self._stats:
            with self.disabled():
                self._stats.fill(self.model, self.tokenizer, self.layers)
        return self._stats.at(layer, self.device)

    def statistics_files(self) -> dict:
        """The cache file of every edited layer's E[kkᵀ] (computed first where missing; `cli.py stats`)."""
        with self.disabled():
            return self._stats.files(self.model, self.tokenizer, self.layers)

    def template_groups(self) -> list[list[str]]:
        """The context template groups (generated by the unedited model once, cached on disk)."""
        if self._templates is None:
            h = self.hparams
            path = templates_path(self.base_identity["digest"], h.template_spec, h.template_seed)
            if path.exists():
                self._templates = context_templates(self.model, self.tokenizer, h.template_spec, h.template_seed, path)
            else:
                with self.disabled():
                    self._templates = context_templates(self.model, self.tokenizer, h.template_spec,
                                                        h.template_seed, path)
        return self._templates

    def templates(self) -> list[str]:
        return flatten(self.template_groups())

    def target_config(self) -> TargetConfig:
        h = self.hparams
        return TargetConfig(layer=self.layers[-1], parts=self.target_parts, steps=h.v_steps, lr=h.v_lr,
                            clamp=h.clamp_norm_factor, weight_decay=h.v_weight_decay, kl_factor=h.kl_factor,
                            autocast=h.v_autocast)

    def targets(self, requests: list[EditRequest], templates: list[str], cfg: TargetConfig | None = None) -> Targets:
        """`compute_targets` (with `cfg`, default `target_config()`), shared across ranks under DDP:
        rank r optimises requests r, r+W, ... and every rank gathers all targets, so all ranks apply
        the same update."""
        cfg = self.target_config() if cfg is None else cfg
        run = lambda reqs: compute_targets(self.layout, self.tokenizer, reqs, cfg, templates)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return run(requests)
        world, rank = dist.get_world_size(), dist.get_rank()
        mine = requests[rank::world]
        local = run(mine) if mine else None
        payload = None if local is None else (
            {p: v.cpu() for p, v in local.z.items()}, {p: v.cpu() for p, v in local.init.items()},
            local.loss.cpu(), local.steps)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, payload)
        order = [(i % world, i // world) for i in range(len(requests))]
        pick = lambda which, p: torch.stack([gathered[r][which][p][j] for r, j in order]).to(self.device)
        parts = cfg.names
        return Targets(z={p: pick(0, p) for p in parts}, init={p: pick(1, p) for p in parts},
                       loss=torch.stack([gathered[r][2][j] for r, j in order]).to(self.device),
                       steps=max(g[3] for g in gathered if g is not None))

    def keys(self, requests: list[EditRequest], layer: int, position: Position | None = None) -> torch.Tensor:
        """k [u, d_ff] at `layer` on the model as it is now (`compute_keys`)."""
        position = self.hparams.key_position if position is None else position
        return compute_keys(self.layout, self.tokenizer, requests, layer, self.template_groups(), position)

    def values(self, requests: list[EditRequest], part: Part, layer: int,
               position: Position = "subject_last") -> torch.Tensor:
        """The current output of `part` at `layer` of each bare prompt [u, d] (`current_values`)."""
        return current_values(self.layout, self.tokenizer, requests, part, layer, position)

    # --- the layer loop and its seams ------------------------------------------------------------
    def layer_residual(self, layer: int, K: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The residual R the closed form inserts at `layer` for the spread residual r (MEMIT: r;
        AdaPLE subtracts what the keys already produce)."""
        return r

    def prior_keys(self, layer: int) -> torch.Tensor | None:
        """K′K′ᵀ added to λC at `layer` (None; COMEBA-HK: the keys of earlier steps; with the null-space
        projection, AlphaEdit's C_p: the keys of earlier steps)."""
        if self.hparams.projection == "none" or not any(layer in s for s in self.projected_keys.steps):
            return None
        d = self.layout.mlp_key_size(layer)
        return self.projected_keys.delta(layer, (d, d), self.device)

    def equality_ridge(self) -> float | None:
        """ρ of the equality-constrained closed form (None: the least-squares form; EMMET: its ρ)."""
        return None

    def null_space(self, layer: int) -> torch.Tensor | None:
        """AlphaEdit's projector P at `layer` (None without the projection), from the original E[kkᵀ]."""
        if self.hparams.projection == "none":
            return None
        if layer not in self._projectors:
            self._projectors[layer] = null_space(self.covariance(layer), self.hparams.nullspace_threshold,
                                                 self.hparams.nullspace_rule)
        return self._projectors[layer]

    def write_layer(self, layer: int, factors: Factors, K: torch.Tensor) -> None:
        """Record this step's Δ at `layer` (fused as configured) and rebuild that layer alone; with
        the projection, also the step's keys (their K Kᵀ joins C_p; a layer's keys do not depend on
        its own or higher layers' updates, so these equal AlphaEdit's keys recomputed after the step)."""
        self.history.steps[-1][layer] = self.fused(layer, factors)
        if self.hparams.projection != "none":
            while len(self.projected_keys.steps) < len(self.history.steps):
                self.projected_keys.steps.append({})
            kt = K.detach().double().T.contiguous()
            self.projected_keys.steps[-1][layer] = (kt, kt)
        self.refresh_weights([layer])

    def spread(self, requests: list[EditRequest], z: torch.Tensor, layers: list[int], *, part: Part, top: int,
               lam: float, spread: Spread, key_position: Position | None = None,
               value_position: Position = "subject_last") -> list[float]:
        """`spread_update` of the target z (the value of `part` at layer `top`) over `layers` of the
        current step (the last entry of the history), keys at `key_position`, residuals measured at
        `value_position`. Returns the mean residual norm per layer."""
        return spread_update(
            layers, z, keys=lambda l: self.keys(requests, l, key_position),
            current=lambda: self.values(requests, part, top, value_position), covariance=self.covariance,
            write=self.write_layer, lam=lam, spread=spread, key_weight=self.key_weight,
            layer_residual=self.layer_residual, prior=self.prior_keys, projection=self.null_space,
            alpha=self.hparams.projection_l2, equality=self.equality_ridge())
