"""GRACE (Hartvigsen et al. 2023): a codebook adaptor at one module, one entry per edit, values trained
to produce the new target (docs/baselines.md, BASELINES.md §2; the layer is `editing.tuners.Codebook`).

Per edit (GRACE edits one request at a time; a step of N requests runs N GRACE edits in order):
the query q is the module's input at the last prompt token; with i* the nearest key and d* its
distance,
1. an empty codebook, or d* > ε₀ + ε_{i*}: add (q, v, ε₀);
2. overlap with another label: add (q, v, d*/2) and shrink ε_{i*} to d*/2 − 1e-5 (split);
3. overlap with the same label: "coverage" grows ε_{i*} to d* when d* > ε_{i*}, "moving_average"
   moves k_{i*} to (k_{i*} + q)/2 and sets ε_{i*} = d*; no entry is added and v_{i*} is retrained.
Then `n_iter` steps of Adam(edit_lr) train only that value on the target-token NLL. Labels are the
exact target token ids (the official code compares label means, which can collide). A new value
starts "cold" (U[0, 1), the official default, seeded) or "warm" (the module's current output).

`undo(steps)` restores the codebook exactly as it was before the last steps (kept in memory for the
session); `withdraw(case_ids)` removes the entries those edits created.
"""
from __future__ import annotations

from typing import Literal

import torch

from editing import hooks
from editing.data.batch import EditBatch
from editing.data.records import EditRequest
from editing.editors.base import Editor
from editing.editors.ft import optimise, target_nll
from editing.layout import base_layer, weight_out_in
from editing.tokens import encode
from editing.tuners.grace import Codebook, Replacement
from editing.validation import check_choice

ValInit = Literal["cold", "warm"]
Expand = Literal["coverage", "moving_average"]


class GRACE(Editor):
    """A GRACE codebook at `part` of `layer`.

    Args:
        layer: the block whose module is wrapped (negative counts from the end).
        part: "mlp_out" (EasyEdit's GPT-J / Llama choice: fc_out, down_proj) or "attn_out".
        eps: ε₀, the initial radius (absolute, in the module's input space).
        edit_lr, n_iter: Adam's learning rate and steps per edit (only the value trains).
        val_init: "cold" (U[0, 1)) or "warm" (the module's current output at the key position).
        replacement: where a retrieved value replaces the output: "last", "prompt" or "all".
        eps_expand: "coverage" or "moving_average" (same-label overlap).
        seed: the seed of cold value initialisation.
    """

    method = "grace"

    def __init__(self, layer: int = -5, part: Literal["mlp_out", "attn_out"] = "mlp_out", eps: float = 1.0,
                 edit_lr: float = 1.0, n_iter: int = 50, val_init: ValInit = "cold",
                 replacement: Replacement = "last", eps_expand: Expand = "coverage", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        for name, value, choices in (("val_init", val_init, ValInit), ("replacement", replacement, Replacement),
                                     ("eps_expand", eps_expand, Expand), ("part", part, Literal["mlp_out", "attn_out"])):
            check_choice(name, value, choices)
        self.layer = self.layout.layer_index(layer)
        out_dim, in_dim = weight_out_in(base_layer(self.layout.module(self.layer, part))).shape
        self._cache = hooks.CacheTracker(self.layout.backbone)
        self.inject(self.layer, part, lambda m: Codebook(m, in_dim, out_dim, replacement, self._cache))
        self.entry_case: list[str] = []          # the edit (case id) that created each entry
        self.entry_label: list[list[int]] = []   # each entry's target token ids
        self._undo: list[dict] = []              # per edit: what to put back (this session)

    @property
    def codebook(self) -> Codebook:
        return self.layout.module(self.layer, self.hparams.part)

    def edit_shape(self) -> dict:
        return {"layer": self.layer, "part": self.hparams.part}

    def edit_meta(self) -> dict:
        return {"entry_case": list(self.entry_case), "entry_label": [list(l) for l in self.entry_label]}

    def load_edit_meta(self, meta: dict) -> None:
        self.entry_case = list(meta.get("entry_case", []))
        self.entry_label = [list(l) for l in meta.get("entry_label", [])]
        self.codebook.resize(len(self.entry_case))
        self._undo = []

    def withdrawable_ids(self) -> set[str]:
        return set(self.entry_case)

    # --- atomic steps: the codebook changes size, so a snapshot holds its lists too ----------------------
    def snapshot(self):
        cb = self.codebook
        return (cb.keys.clone(), cb.values.clone(), cb.eps.clone(), list(self.entry_case),
                [list(l) for l in self.entry_label], len(self._undo))

    def restore(self, snap) -> None:
        cb = self.codebook
        cb.keys, cb.values, cb.eps = snap[0].clone(), snap[1].clone(), snap[2].clone()
        self.entry_case, self.entry_label = list(snap[3]), [list(l) for l in snap[4]]
        del self._undo[snap[5]:]
        cb.training_value = None

    def undo(self, steps: int = 1) -> None:
        """Put the codebook back exactly as it was before the last `steps` edit steps."""
        if not 1 <= steps <= len(self.edit_log):
            raise ValueError(f"undo takes 1..{len(self.edit_log)} steps, got {steps}")
        if len(self._undo) < sum(len(s["cases"]) for s in self.edit_log[-steps:]):
            raise ValueError("undo holds only this session's steps since the last load_edit or withdraw")
        for step in reversed(self.edit_log[-steps:]):
            for _ in step["cases"]:
                self.restore(self._undo.pop())
        del self.edit_log[-steps:]

    def withdraw(self, case_ids: list[str] | str) -> int:
        """Remove the entries the edits `case_ids` created; returns how many were removed."""
        ids = {case_ids} if isinstance(case_ids, str) else set(case_ids)
        gone = [i for i, c in enumerate(self.entry_case) if c in ids]
        if gone:
            self.codebook.remove(gone)
            self.entry_case = [c for i, c in enumerate(self.entry_case) if i not in gone]
            self.entry_label = [l for i, l in enumerate(self.entry_label) if i not in gone]
            self._undo = []  # the per-step history no longer describes this codebook
        return len(gone)

    # --- scoring: the key is each row's last prompt token --------------------------------------------------
    def logits_at(self, input_ids, attention_mask, positions, **scoring):
        with self.codebook.querying(positions[:, 0]):
            return super().logits_at(input_ids, attention_mask, positions, **scoring)

    # --- editing ---------------------------------------------------------------------------------------------
    def _query(self, req: EditRequest) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(module input q, module output at the key, target ids) of the request's prompt."""
        batch = encode(self.tokenizer, [self.prepare_prompt(req.text)], [req.target_new]).to(self.device)
        pl = batch.prompt_last
        base = self.codebook.base_layer
        with torch.no_grad(), self.codebook.querying(pl), hooks.capture({"q": base}, "input", positions=pl) as qi, \
                hooks.capture({"o": base}, "output", positions=pl) as qo:
            self.layout.backbone(input_ids=batch.input_ids[:, : int(pl) + 1],
                                 attention_mask=batch.attention_mask[:, : int(pl) + 1], use_cache=False)
        label = batch.target_ids[0][batch.target_mask[0].bool()].tolist()
        return qi["q"][0].float(), qo["o"][0].float(), label

    def _update_codebook(self, req: EditRequest, q: torch.Tensor, out: torch.Tensor, label: list[int]) -> int:
        """The codebook rules (module docstring); returns the entry whose value is trained."""
        h, cb = self.hparams, self.codebook
        self._undo.append(self.snapshot())
        if cb.size:
            idx, dist = cb.nearest(q[None])
            i, d = int(idx), float(dist)
            if d <= h.eps + float(cb.eps[i]):
                if label == self.entry_label[i]:
                    if h.eps_expand == "moving_average":
                        cb.keys[i] = (cb.keys[i] + q.to(cb.keys.device)) / 2
                        cb.eps[i] = d
                    elif d > float(cb.eps[i]):
                        cb.eps[i] = d
                    return i
                cb.eps[i] = d / 2 - 1e-5
                return self._add(req, q, out, label, d / 2)
        return self._add(req, q, out, label, h.eps)

    def _add(self, req, q, out, label, eps) -> int:
        h = self.hparams
        if h.val_init == "warm":
            value = out
        else:
            g = torch.Generator().manual_seed(h.seed * 1_000_003 + len(self.entry_case))
            value = torch.rand(out.shape, generator=g)
        self.entry_case.append(req.case_id)
        self.entry_label.append(label)
        return self.codebook.add(q, value, eps)

    def apply_edit(self, batch: EditBatch) -> dict:
        h, cb = self.hparams, self.codebook
        info = {}
        for req in batch.requests:
            q, out, label = self._query(req)
            entry = self._update_codebook(req, q, out, label)
            v = torch.nn.Parameter(cb.values[entry].clone())
            cb.training_value = (entry, v)
            try:
                info = optimise([v], lambda: target_nll(self, [req]), h.n_iter, h.edit_lr,
                                desc=f"GRACE value for {req.case_id}")
            finally:
                cb.training_value = None
            with torch.no_grad():
                cb.values[entry] = v.detach().to(cb.values.dtype)
        return {**info, "entries": cb.size}
