"""Fine-tuning baselines: FT-L, FT-M and FT-WD on the MLP output projection of chosen layers.

The trainable state is one weight delta per edited layer, a `DeltaLinear` injected around the
projection (`editing.tuners`: `print(editor.model)` shows it, `disabled()` switches it off exactly,
`merge()` writes it into the base weight, and a checkpoint holds only the deltas). Variants:
- FT-L (ROME's "constrained fine-tuning", Zhu et al. 2020): `objective="prompt_last"` (every target
  token's log-probability at the last prompt position) with an L-infinity bound `norm_constraint` on
  the change of each weight within an edit step.
- FT-M (EasyEdit): `objective="target_tokens"`: teacher-forced NLL of the target tokens only.
- FT-WD (JEEP's baseline): `weight_decay > 0` with AdamW. Decay acts on the delta, i.e. it pulls the
  weights towards the *original* weights rather than towards zero.
Each edit step runs `steps` optimiser steps over all its requests at once, stopping early when the
loss falls below `early_stop_loss`. Steps accumulate (sequential editing, no rollback).
"""
from __future__ import annotations

from typing import Literal

import torch

from editing.console import progress
from editing.data.batch import EditBatch
from editing.data.records import EditRequest
from editing.editors.base import Editor
from editing.tokens import encode
from editing.tuners import DeltaLinear
from editing.validation import check_choice

Objective = Literal["target_tokens", "prompt_last"]


class FT(Editor):
    """Fine-tune the MLP output projection of `layers`.

    Args:
        layers: layers whose MLP output projection is tuned (negative counts from the end).
        lr: optimiser learning rate.
        steps: optimiser steps per edit step.
        objective: "target_tokens" (FT-M) or "prompt_last" (FT-L).
        norm_constraint: L-infinity bound on each weight's change per edit step (FT-L); None = none.
        weight_decay: AdamW decoupled weight decay on the delta (FT-WD); 0 = Adam.
        early_stop_loss: stop an edit step once the loss is below this.
    """

    method = "ft"

    def __init__(self, layers: list[int] = [-9], lr: float = 5e-4, steps: int = 25,
                 objective: Objective = "target_tokens", norm_constraint: float | None = None,
                 weight_decay: float = 0.0, early_stop_loss: float = 1e-2, **kwargs):
        super().__init__(**kwargs)
        check_choice("objective", objective, Objective)
        if not layers:
            raise ValueError("FT needs at least one layer")
        self.layers = sorted({self.layout.layer_index(l) for l in layers})
        for l in self.layers:
            self.inject(l, "mlp_out", DeltaLinear)

    def edit_shape(self) -> dict:
        return {"layers": list(self.layers)}

    def delta(self, layer: int) -> torch.Tensor:
        """Δ (out, in) of the edited projection of `layer` (the trainable parameter)."""
        return self.layout.mlp_out(layer).delta

    def merge(self) -> None:
        """Write every delta into its base weight (the model is then a plain HF model with the edit);
        `unmerge` restores the base weights exactly."""
        for l in self.layers:
            self.layout.mlp_out(l).merge()

    def unmerge(self) -> None:
        for l in self.layers:
            self.layout.mlp_out(l).unmerge()

    def loss(self, requests: list[EditRequest]) -> torch.Tensor:
        if self.hparams.objective == "target_tokens":
            return target_nll(self, requests)
        prompts = [r.text for r in requests]  # prompt_last: every target token scored at the last prompt position
        batch = encode(self.tokenizer, [self.prepare_prompt(p) for p in prompts],
                       [r.target_new for r in requests]).to(self.device)
        logits = self.logits_at(batch.input_ids, batch.attention_mask, batch.prompt_last[:, None])
        tok = torch.log_softmax(logits.float(), -1)[:, 0].gather(-1, batch.target_ids) * batch.target_mask
        return (-tok.sum(1) / batch.target_mask.sum(1)).mean()

    def apply_edit(self, batch: EditBatch) -> dict:
        params = [self.delta(l) for l in self.layers]
        start = [p.detach().clone() for p in params]

        def bound():
            if self.hparams.norm_constraint is not None:
                eps = self.hparams.norm_constraint
                for p, p0 in zip(params, start):
                    p.copy_(p0 + (p - p0).clamp(-eps, eps))

        return optimise(params, lambda: self.loss(batch.requests), self.hparams.steps, self.hparams.lr,
                        self.hparams.weight_decay, self.hparams.early_stop_loss, bound,
                        f"fine-tuning on {len(batch.requests)} request(s)")


def target_nll(editor: Editor, requests: list[EditRequest]) -> torch.Tensor:
    """The mean over requests of the teacher-forced NLL per target token of target_new (FT-M's and
    EasyEdit's LoRA objective: the causal-LM loss with labels on the target only)."""
    lp, batch = editor.target_logprobs([r.text for r in requests], [r.target_new for r in requests])
    tok = lp.gather(-1, batch.target_ids[..., None]).squeeze(-1) * batch.target_mask
    return (-tok.sum(1) / batch.target_mask.sum(1)).mean()


def optimise(params: list[torch.Tensor], loss_fn, steps: int, lr: float, weight_decay: float = 0.0,
             early_stop_loss: float | None = None, after_step=None, desc: str = "optimising",
             schedule=None) -> dict:
    """`steps` steps of a fresh Adam (AdamW when `weight_decay` > 0) on `params` minimising `loss_fn()`,
    stopping once the loss is below `early_stop_loss`; `after_step()` runs (without grad) after each;
    `schedule(optimizer)` makes a learning-rate scheduler stepped after every step (MELO's StepLR)."""
    opt_cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    opt = opt_cls(params, lr=lr, weight_decay=weight_decay)
    sched = schedule(opt) if schedule is not None else None
    loss_value, step = float("nan"), 0
    with progress(steps, desc) as bar:
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss_value = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss_value}")
            if early_stop_loss is not None and loss_value < early_stop_loss:
                break
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            bar.set_postfix_str(f"loss {loss_value:.3f}", refresh=False)
            bar.update()
    return {"loss": loss_value, "steps": step}
