"""SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale"; BASELINES.md §6), offline.

An edit is appended to an explicit memory of (edit prompt, new target). For an input x the scope
classifier scores every entry, s_i = exp(−‖e(z_i) − e(x)‖²) (the official embedding mode: squared
distance, scale 1), and in the official hard mode the input goes to the counterfactual model when
max_i s_i > `threshold` (0.5), else to the base model unchanged. No hub model is reachable here, so
the components are BASELINES.md §6 (f)'s offline adaptation:
- the classifier's encoder is the base model itself, frozen: the hidden states after block `layer`
  (default: the middle one), mean-pooled over the prompt's tokens and normalised (a layer norm
  without parameters), then a trainable linear projection to `dim` (256) dimensions, the only
  trained part (the paper fine-tunes DistilBERT);
- the counterfactual model is the base model with the retrieved edit in context (the paper's
  `freeze_cntr`): it reads `context` filled with the edit, then x (the paper trains a small
  seq2seq model for it; with the counterfactual frozen its loss is constant and not trained). What
  the context looks like is `context` ("{prompt} {target} " by default, the official decoder-only
  format; configs/serac.yaml states the edit twice on its own lines, which SmolLM2 copies far more
  often: docs/trained.md).
Training minimises the paper's balanced classification loss, mean over in-scope inputs of −log s
plus mean over out-of-scope inputs of −log(1 − s), with the edit's paraphrases as in-scope inputs and
its locality prompt and neighbourhood prompts (same relation, other subjects: the hard negatives) as
out-of-scope ones. The encoder's features of a prompt are cached (the encoder never changes).

The routing happens in `prepare_prompt`, the one place every scoring and generation path builds its
text, so teacher-forced scores, generation and drift all see it. An empty memory, a disabled editor,
or an input scored ≤ threshold for every entry gives the base model's outputs exactly; withdrawing an
edit removes its entry (exact).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from editing import hooks
from editing.data.batch import EditBatch
from editing.data.meta import MetaInstance
from editing.editors.trained import TrainedEditor

FEATURE_CACHE = 200_000  # prompts whose encoder features are kept


class SERAC(TrainedEditor):
    """SERAC with a frozen-base-model scope classifier and the base model as counterfactual model.

    Args:
        layer: the block whose output the classifier pools (None: the middle block).
        dim: the classifier's embedding size.
        threshold: an input goes to the counterfactual model when its best score is above this.
        context: the text put before the input for the counterfactual model, with {prompt} (the
            edit prompt) and {target} (the new target); the paper's is "{prompt} {target} ".
    """

    method = "serac"

    def __init__(self, layer: int | None = None, dim: int = 256, threshold: float = 0.5, context: str = "{prompt} {target} ",
                 lr: float = 1e-3, **kwargs):
        super().__init__(lr=lr, **kwargs)
        lay = self.layout
        self.layer = lay.layer_index(lay.num_layers // 2 if layer is None else layer)
        hidden = lay.hidden_size
        self.proj = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden * dim) ** 0.5)  # ‖e‖² ≈ 1 at the start
        self.memory: list[dict] = []             # {"case_id", "prompt", "target"} per edit, in edit order
        self._features: dict[str, torch.Tensor] = {}
        self._keys: torch.Tensor | None = None   # e(z_i) of the memory, rebuilt when it changes

    def edit_shape(self) -> dict:
        return {"layer": self.layer, "dim": self.hparams.dim}

    def edit_meta(self) -> dict:
        return {"memory": [dict(m) for m in self.memory]}

    def load_edit_meta(self, meta: dict) -> None:
        self.set_memory(meta.get("memory", []))

    def optimizer_groups(self) -> list[dict]:
        return [{"params": list(self.proj.parameters()), "lr": self.hparams.lr}]

    def set_memory(self, memory: list[dict]) -> None:
        self.memory = [dict(m) for m in memory]
        self._keys = None

    # --- the classifier ---------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, prompts: list[str]) -> torch.Tensor:
        """The frozen encoder's features [N, hidden] (mean-pooled block output, normalised), cached."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._features))
        if todo:
            if len(self._features) + len(todo) > FEATURE_CACHE:
                self._features.clear()
            tok = self.tokenizer
            for s in range(0, len(todo), self.hparams.forward_batch_size):
                part = todo[s:s + self.hparams.forward_batch_size]
                enc = tok([super(SERAC, self).prepare_prompt(p) for p in part], return_tensors="pt",
                          padding=True).to(self.device)
                block = self.layout.block(self.layer)
                with self.disabled(), hooks.capture({"h": block}) as got:
                    hooks.run_until(self.model, block, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                    use_cache=False)
                mask = enc.attention_mask[..., None].to(got["h"].dtype)
                pooled = (got["h"] * mask).sum(1) / mask.sum(1)
                for p, f in zip(part, F.layer_norm(pooled.float(), pooled.shape[-1:])):
                    self._features[p] = f.clone()
        return torch.stack([self._features[p] for p in prompts]).to(self.device)

    def distances(self, keys: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """‖e(z_i) − e(x)‖² [N, M] of each prompt to each key e(z_i) [M, dim]."""
        return torch.cdist(self.proj(self.features(prompts)), keys).square()

    def keys(self) -> torch.Tensor:
        if self._keys is None:
            with torch.no_grad():
                self._keys = self.proj(self.features([m["prompt"] for m in self.memory]))
        return self._keys

    def route(self, prompt: str) -> int | None:
        """The memory entry the prompt goes to (None: the base model)."""
        if not self.memory or not self.enabled:
            return None
        with torch.no_grad():
            s = torch.exp(-self.distances(self.keys(), [prompt]))[0]
        best = int(s.argmax())
        return best if float(s[best]) > self.hparams.threshold else None

    def prepare_prompt(self, prompt: str) -> str:
        i = self.route(prompt)
        if i is None:
            return super().prepare_prompt(prompt)
        m = self.memory[i]
        return super().prepare_prompt(self.hparams.context.format(prompt=m["prompt"], target=m["target"]) + prompt)

    # --- training -------------------------------------------------------------------------------------------
    def scope_samples(self, inst: MetaInstance) -> list[tuple[int, str, bool]]:
        """(edit index, prompt, in scope) of an instance: paraphrases in scope; the locality and
        neighbourhood prompts out of scope."""
        out = []
        for i, r in enumerate(inst.edits):
            out += [(i, p, True) for p in r.paraphrase_prompts]
            out += [(i, p, False) for p in r.neighborhood_prompts]
            if r.locality_prompt is not None:
                out.append((i, r.locality_prompt, False))
        return out

    def classifier_loss(self, inst: MetaInstance) -> tuple[torch.Tensor, dict]:
        samples = self.scope_samples(inst)
        keys = self.proj(self.features([r.text for r in inst.edits]))
        x = self.proj(self.features([p for _, p, _ in samples]))
        d = (x - keys[torch.tensor([i for i, _, _ in samples], device=x.device)]).square().sum(-1)
        pos = torch.tensor([s for _, _, s in samples], device=x.device)
        loss_pos = d[pos].mean() if pos.any() else d.new_zeros(())              # −log s = d
        neg = -torch.log(-torch.expm1(-d[~pos].clamp(min=1e-6)))                 # −log(1 − s)
        loss = loss_pos + (neg.mean() if (~pos).any() else 0.0)
        th = self.hparams.threshold
        s = torch.exp(-d.detach())
        return loss, {"recall": float((s[pos] > th).float().mean()) if pos.any() else 1.0,
                      "rejection": float((s[~pos] <= th).float().mean()) if (~pos).any() else 1.0}

    def meta_loss(self, instances: list[MetaInstance]) -> tuple[torch.Tensor, dict]:
        losses, logs = [], {}
        for inst in instances:
            loss, info = self.classifier_loss(inst)
            losses.append(loss)
            for k, v in info.items():
                logs[k] = logs.get(k, 0.0) + v / len(instances)
        return torch.stack(losses).mean(), logs

    @contextmanager
    def holding(self, inst: MetaInstance) -> Iterator[None]:
        """The memory holding only the instance's edits for the duration."""
        saved = self.memory
        self.set_memory([{"case_id": r.case_id, "prompt": r.text, "target": r.target_new} for r in inst.edits])
        try:
            yield
        finally:
            self.set_memory(saved)

    @torch.no_grad()
    def meta_eval(self, inst: MetaInstance) -> dict[str, float]:
        loss, info = self.classifier_loss(inst)
        with self.holding(inst):
            lp, batch = self.target_logprobs([p for p, _ in inst.equivalence], [t for _, t in inst.equivalence])
            hit = ((lp.argmax(-1) == batch.target_ids) | ~batch.target_mask.bool()).all(-1)
            unrouted = [self.route(p) is None for p, _ in inst.locality]
        return {"loss": float(loss), "edit_success": float(hit.float().mean()),
                "locality": sum(unrouted) / len(unrouted), **info}

    # --- edit steps: the memory is the edit state ---------------------------------------------------------------
    def apply_edit(self, batch: EditBatch) -> dict:
        self.set_memory(self.memory + [{"case_id": r.case_id, "prompt": r.text, "target": r.target_new}
                                       for r in batch.requests])
        return {"memory": len(self.memory)}

    def holds_edits(self) -> bool:
        return bool(self.memory)

    def snapshot(self):
        return [dict(m) for m in self.memory]

    def restore(self, snap) -> None:
        self.set_memory(snap)

    def withdrawable_ids(self) -> set[str]:
        return {m["case_id"] for m in self.memory}

    def withdraw(self, case_ids: list[str] | str) -> int:
        """Remove the edits' memory entries (exact: outputs are as if they had never been made);
        returns how many were removed. Unknown case ids are an error."""
        case_ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        unknown = sorted(set(case_ids) - self.withdrawable_ids())
        if unknown:
            raise KeyError(f"no edit with case id(s) {unknown}")
        before = len(self.memory)
        self.set_memory([m for m in self.memory if m["case_id"] not in set(case_ids)])
        return before - len(self.memory)
