"""MELO (Yu et al. 2024): neuron-indexed dynamic LoRA — one LoRA block per edit step, chosen per input
by a vector database (docs/baselines.md, BASELINES.md §3).

The LoRA math is PEFT's: each block is a PEFT LoRA adapter `block_<b>` of rank `nrpb` on the target
modules (created when its step comes), and a row uses one block through PEFT's mixed-batch forward
(`adapter_names`, "__base__" for none). With `lora_alpha = num_block · nrpb` PEFT's scaling α/r is
MELO's s = num_block, and A is initialised as MELO's (U(±1/√R), R = num_block · nrpb), B = 0. The
new part is the routing (`editing.tuners.melo.Router`, at a module below the LoRA layers; its output
at the last prompt token is the query).

Per edit step b (a batch of requests): the database is searched as it stood before the step; per
request, with c the nearest cluster at distance d: none or d > ρ_c + ρ₀ → a new cluster (q, ρ₀);
the same label → a point (q, b) in c, μ_c the mean of its points, ρ_c = max(max ‖k − μ_c‖, ρ₀);
another label → a new cluster (q, d/2 + 1e-5) and c split (ρ_c = d/2 − 1e-5, its points beyond it
dropped, a placeholder of no block if none remain). Then every request of the step trains block b:
`num_iter` steps of Adam(edit_lr) with StepLR(20, 0.5), on the target-token NLL, only block b's
tensors (the other blocks stay bit-identical). Labels are exact target ids.

Per-edit withdrawal (not in MELO): every point records the edit it came from; `withdraw(case_ids)`
removes those points (a cluster left empty gets a placeholder routing to no block) and keeps every
centre, radius and block, so a withdrawn edit's prompt falls back to the unedited output exactly
(unless another edit of the same label in its cluster claims it) and no other routing changes.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from editing import hooks
from editing.data.batch import EditBatch
from editing.editors.base import Editor
from editing.editors.ft import optimise, target_nll
from editing.editors.undo import SnapshotUndo
from editing.layout import base_layer, is_transposed, weight_out_in
from editing.tokens import encode
from editing.tuners.melo import BASE, Router, block_name


class MELO(SnapshotUndo, Editor):
    """MELO's router at `part` of `router_layer`, LoRA blocks on `target_modules` of `lora_layers`.

    Args:
        router_layer: the block whose module's output is the query (negative counts from the end).
        part: that module ("mlp_out" or "attn_out").
        lora_layers: blocks with LoRA (must lie above the router); None = the two above it.
        target_modules: module paths relative to a block; None = the family's MLP input projection(s).
        init_radius: ρ₀ (absolute, in the router output's space).
        num_block, nrpb: the number of blocks (MELO's scale s) and the rank of each block.
        edit_lr, num_iter: Adam's learning rate and steps per edit step.
    """

    method = "melo"

    def __init__(self, router_layer: int = -6, part: Literal["mlp_out", "attn_out"] = "mlp_out",
                 lora_layers: list[int] | None = None, target_modules: list[str] | None = None,
                 init_radius: float = 0.5, num_block: int = 350, nrpb: int = 2, edit_lr: float = 1e-3,
                 num_iter: int = 50, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        from peft import LoraConfig, LoraModel

        lay = self.layout
        self.router_layer = lay.layer_index(router_layer)
        self.lora_layers = sorted({lay.layer_index(l) for l in lora_layers}) if lora_layers is not None \
            else [l for l in (self.router_layer + 1, self.router_layer + 2) if l < lay.num_layers]
        if not self.lora_layers or min(self.lora_layers) <= self.router_layer:
            raise ValueError(f"MELO's LoRA layers {self.lora_layers} must lie above its router layer {self.router_layer}")
        rel = list(target_modules) if target_modules is not None else list(lay.family.mlp_in)
        names = [f"{lay.block_name(l)}.{r}" for l in self.lora_layers for r in rel]
        modules = dict(self.model.named_modules())
        if not rel or any(n not in modules for n in names):
            raise ValueError(f"MELO target modules not in the model: {[n for n in names if n not in modules][:3] or rel}")
        dim = weight_out_in(base_layer(lay.module(self.router_layer, part))).shape[0]
        self._cache = hooks.CacheTracker(self.layout.backbone)
        self.inject(self.router_layer, part, lambda m: Router(m, dim, self._cache))
        self.peft_config = LoraConfig(r=nrpb, lora_alpha=num_block * nrpb, lora_dropout=0.0, target_modules=names,
                                      bias="none", fan_in_fan_out=is_transposed(modules[names[0]]))
        object.__setattr__(self, "tuner", LoraModel(self.model, self.peft_config, block_name(0)))
        self.model.eval()
        self.blocks = 0                              # blocks trained so far (block_0 exists from the start)
        self._init_block(0)
        self.labels: list[list[int]] = []            # each cluster's target ids
        self.point_case: list[str | None] = []       # each database point's edit (None: a placeholder)
        for name, m in self.lora_modules():
            m.register_forward_pre_hook(self._routed, with_kwargs=True)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def router(self) -> Router:
        return self.layout.module(self.router_layer, self.hparams.part)

    def lora_modules(self):
        from peft.tuners.lora import LoraLayer
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def _init_block(self, b: int) -> None:
        """Create block b (a PEFT adapter) if needed and initialise it as MELO does."""
        name = block_name(b)
        if name not in self.tuner.peft_config:
            self.tuner.peft_config[name] = self.peft_config
            self.tuner.inject_adapter(self.model, name)
            self.model.eval()
        h = self.hparams
        bound = 1 / math.sqrt(h.num_block * h.nrpb)
        g = torch.Generator().manual_seed(h.seed * 1_000_003 + b)
        with torch.no_grad():
            for _, m in self.lora_modules():
                a = m.lora_A[name].weight
                a.copy_((torch.rand(a.shape, generator=g) * 2 - 1) * bound)
                m.lora_B[name].weight.zero_()

    def block_parameters(self, b: int) -> list[torch.nn.Parameter]:
        name = block_name(b)
        return [p for _, m in self.lora_modules() for p in (m.lora_A[name].weight, m.lora_B[name].weight)]

    def _routed(self, module, args, kwargs):
        """Before each LoRA layer: the router's decision as PEFT's per-row `adapter_names` (unless the
        caller names the adapters itself)."""
        if "adapter_names" in kwargs:
            return None
        route = self.router.route
        x = args[0] if args else kwargs.get("x")
        if not self.enabled or not self.router.active or route is None or len(route) != x.shape[0]:
            route = [BASE] * x.shape[0]
        return args, {**kwargs, "adapter_names": list(route)}

    def edit_shape(self) -> dict:
        h = self.hparams
        return {"router_layer": self.router_layer, "lora_layers": self.lora_layers, "nrpb": h.nrpb,
                "num_block": h.num_block, "targets": sorted(n for n, _ in self.lora_modules())}

    # --- the edit state: LoRA blocks, the database and the labels ------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        names = {block_name(b) for b in range(self.blocks)}
        out.update({f"{prefix}model.{k}": v for k, v in self.model.state_dict(keep_vars=keep_vars).items()
                    if "lora_" in k and k.split(".")[-2] in names})
        return out

    def edit_meta(self) -> dict:
        return {"blocks": self.blocks, "labels": [list(l) for l in self.labels],
                "points": int(self.router.point_keys.shape[0]), "point_case": list(self.point_case)}

    def load_edit_meta(self, meta: dict) -> None:
        self.blocks = int(meta.get("blocks", 0))
        for b in range(self.blocks + 1):
            self._init_block(b)
        self.labels = [list(l) for l in meta.get("labels", [])]
        self.router.resize(len(self.labels), int(meta.get("points", 0)))
        self.point_case = list(meta.get("point_case", [None] * int(meta.get("points", 0))))

    def snapshot(self):
        return (super().snapshot(), self.router.database(), [list(l) for l in self.labels], self.blocks,
                list(self.point_case))

    def restore(self, snap) -> None:
        tensors, db, labels, blocks, self.point_case = snap
        self.point_case = list(self.point_case)
        self.router.load_database(db)
        self.labels, self.blocks = [list(l) for l in labels], blocks
        self._init_block(blocks)                     # the block a failed step was training starts afresh
        super().restore(tensors)

    # --- scoring: the key is each row's last prompt token ----------------------------------------------------
    def logits_at(self, input_ids, attention_mask, positions, **scoring):
        with self.router.querying(positions[:, 0], self._training_block):
            return super().logits_at(input_ids, attention_mask, positions, **scoring)

    _training_block: str | None = None

    # --- editing ---------------------------------------------------------------------------------------------
    def _queries(self, requests) -> tuple[torch.Tensor, list[list[int]]]:
        batch = encode(self.tokenizer, [self.prepare_prompt(r.text) for r in requests],
                       [r.target_new for r in requests]).to(self.device)
        with torch.no_grad(), self.router.querying(batch.prompt_last), \
                hooks.capture({"q": self.router.base_layer}, "output", positions=batch.prompt_last) as cap:
            self.layout.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        labels = [ids[m.bool()].tolist() for ids, m in zip(batch.target_ids, batch.target_mask)]
        return cap["q"].float(), labels

    def _update_database(self, q: torch.Tensor, labels: list[list[int]], b: int, cases: list[str]) -> None:
        r, rho0 = self.router, self.hparams.init_radius
        before = r.database()
        n_before = before["centres"].shape[0]
        for i in range(q.shape[0]):
            qi = q[i].to(r.centres.device)
            if n_before:
                d_all = torch.cdist(qi[None], before["centres"])[0]
                c = int(d_all.argmin())
                d = float(d_all[c])
            if not n_before or d > float(before["radii"][c]) + rho0:
                self._new_cluster(qi, rho0, labels[i], b, cases[i])
            elif labels[i] == self.labels[c]:
                self._point(qi, b, c, cases[i])
                mine = r.point_cluster == c
                r.centres[c] = r.point_keys[mine].mean(0)
                r.radii[c] = max(float((r.point_keys[mine] - r.centres[c]).norm(dim=1).max()), rho0)
            else:
                self._new_cluster(qi, d / 2 + 1e-5, labels[i], b, cases[i])
                r.radii[c] = d / 2 - 1e-5
                mine = r.point_cluster == c
                self._keep_points(~(mine & ((r.point_keys - r.centres[c]).norm(dim=1) > r.radii[c])))

    def _new_cluster(self, q: torch.Tensor, radius: float, label: list[int], b: int, case: str) -> None:
        r = self.router
        r.centres = torch.cat([r.centres, q[None]])
        r.radii = torch.cat([r.radii, torch.tensor([radius], device=r.radii.device)])
        self.labels.append(list(label))
        self._point(q, b, r.centres.shape[0] - 1, case)

    def _point(self, key: torch.Tensor, block: int, cluster: int, case: str | None) -> None:
        r = self.router
        r.point_keys = torch.cat([r.point_keys, key[None]])
        r.point_block = torch.cat([r.point_block, torch.tensor([block], device=r.point_block.device)])
        r.point_cluster = torch.cat([r.point_cluster, torch.tensor([cluster], device=r.point_cluster.device)])
        self.point_case.append(case)

    def _keep_points(self, keep: torch.Tensor) -> None:
        """Keep the points of the mask; a cluster left empty gets a placeholder (its centre, no block)."""
        r = self.router
        r.point_keys, r.point_block, r.point_cluster = r.point_keys[keep], r.point_block[keep], r.point_cluster[keep]
        self.point_case = [c for c, k in zip(self.point_case, keep.tolist()) if k]
        for c in sorted(set(range(r.centres.shape[0])) - set(r.point_cluster.tolist())):
            self._point(r.centres[c], -1, c, None)

    # --- per-edit withdrawal ---------------------------------------------------------------------------------
    def withdrawable_ids(self) -> set[str]:
        return {c for c in self.point_case if c is not None}

    def withdraw(self, case_ids: list[str] | str) -> int:
        """Remove the database points of the edits `case_ids` (blocks, centres and radii stay); returns
        how many points were removed. The session's undo history no longer applies afterwards."""
        ids = {case_ids} if isinstance(case_ids, str) else set(case_ids)
        keep = torch.tensor([c not in ids for c in self.point_case], dtype=torch.bool,
                            device=self.router.point_keys.device)
        gone = int((~keep).sum())
        if gone:
            self._keep_points(keep)
            self.__dict__["_undo_snapshots"] = []
        return gone

    def apply_edit(self, batch: EditBatch) -> dict:
        h, b = self.hparams, self.blocks
        q, labels = self._queries(batch.requests)
        self._update_database(q, labels, b, [r.case_id for r in batch.requests])
        self._init_block(b)
        params = self.block_parameters(b)
        for p in params:
            p.requires_grad_(True)
        self._training_block = block_name(b)
        try:
            info = optimise(params, lambda: target_nll(self, batch.requests), h.num_iter, h.edit_lr,
                            desc=f"MELO block {b} on {len(batch.requests)} request(s)",
                            schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5))
        finally:
            self._training_block = None
            for p in params:
                p.requires_grad_(False)
        self.blocks = b + 1
        self._init_block(self.blocks)                # the next step's block, fresh
        return {**info, "block": b, "clusters": int(self.router.centres.shape[0])}
