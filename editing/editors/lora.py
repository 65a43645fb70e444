"""LoRA as an editing baseline (EasyEdit's `models/lora`), on the Hugging Face `peft` library.

Each targeted weight W computes y = W x + (α/r)·B A x (A Kaiming-uniform, B = 0, so a fresh adaptor
changes nothing); W is frozen and A, B minimise the edit's target-token NLL (labels on the target
only, the causal-LM loss), with a fresh Adam and `steps` steps per edit step, no early stop (as in
EasyEdit). Sequential editing accumulates every step in the one adaptor. PEFT does the LoRA math:
`inject_adapter_in_model` puts its `lora.Linear` layers into the model in place (`print(editor.model)`
shows them), `disabled()` switches them off through PEFT's `enable_adapters`, the edit state is
PEFT's `lora_A`/`lora_B` tensors, and export merges a copy with `merge_and_unload`.

Choices where the sources disagree (docs/baselines.md): plain LoRA by default (EasyEdit's configs say
AdaLoRA, which peft 0.21 rejects without `total_step` and which, with its allocator never called, is
a fixed-rank SVD-form adaptor); `adaptor="adalora"` keeps it as an option. Targets default to
EasyEdit's per family (`Layout.family.lora_targets`: Llama q_proj/v_proj, GPT-2 c_attn, GPT-J
fc_in/fc_out) at every layer; the model stays in eval mode as in EasyEdit, so LoRA dropout is off.
One step optimises all its requests together (EasyEdit: batch size 1, `num_steps` per request).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Literal

import torch

from editing.data.batch import EditBatch
from editing.editors.base import Editor
from editing.editors.ft import optimise, target_nll
from editing.editors.undo import SnapshotUndo
from editing.layout import is_transposed
from editing.validation import check_choice

Adaptor = Literal["lora", "adalora"]
ADAPTER = "edit"


class LoRA(SnapshotUndo, Editor):
    """A PEFT LoRA adaptor trained on each edit step.

    Args:
        target_modules: module paths relative to a block (e.g. "self_attn.q_proj"); None = the
            family's EasyEdit targets.
        layers: blocks whose target modules get an adaptor (negative counts from the end); None = all.
        rank, alpha, dropout: LoRA's r, lora_alpha and lora_dropout (dropout is inactive: eval mode).
        lr, steps: Adam's learning rate and the optimiser steps per edit step.
        adaptor: "lora" (PEFT LoraConfig) or "adalora" (AdaLoraConfig, init_r = rank, no rank pruning).
    """

    method = "lora"

    def __init__(self, target_modules: list[str] | None = None, layers: list[int] | None = None,
                 rank: int = 8, alpha: float = 32.0, dropout: float = 0.1, lr: float = 5e-3, steps: int = 70,
                 adaptor: Adaptor = "lora", **kwargs):
        super().__init__(**kwargs)
        check_choice("adaptor", adaptor, Adaptor)
        from peft import AdaLoraConfig, AdaLoraModel, LoraConfig, LoraModel

        rel = list(target_modules) if target_modules is not None else list(self.layout.family.lora_targets)
        if not rel:
            raise ValueError(f"no LoRA target modules for {self.layout.family.name}; pass target_modules")
        self.layers = sorted({self.layout.layer_index(l) for l in layers}) if layers is not None \
            else list(range(self.layout.num_layers))
        names = [f"{self.layout.block_name(l)}.{r}" for l in self.layers for r in rel]
        modules = dict(self.model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"LoRA target module(s) not in the model: {missing[:3]}")
        opts = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                    fan_in_fan_out=is_transposed(modules[names[0]]))
        if adaptor == "adalora":
            config, tuner = AdaLoraConfig(init_r=rank, target_r=rank, total_step=max(1, steps), **opts), AdaLoraModel
        else:
            config, tuner = LoraConfig(**opts), LoraModel
        self.peft_config = config
        # PEFT's tuner injects its layers into self.model in place; it is kept beside the editor (not
        # registered as a submodule, so the model's tensors are not listed twice) for PEFT's verbs.
        object.__setattr__(self, "tuner", tuner(self.model, config, ADAPTER))
        self.model.eval()  # PEFT's new modules start in train mode; EasyEdit never trains: dropout off
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)

    def edit_shape(self) -> dict:
        h = self.hparams
        return {"targets": sorted(n for n, _ in self.lora_modules()), "rank": h.rank, "adaptor": h.adaptor}

    def lora_modules(self):
        """(path, PEFT tuner layer) of every adapted module."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    # The edit state is PEFT's adaptor tensors (their keys as the model names them).
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out.update({f"{prefix}model.{k}": v for k, v in self.model.state_dict(keep_vars=keep_vars).items()
                    if "lora_" in k})
        return out

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model: PEFT's adaptor layers switched off (`disable_adapter_layers`), exactly."""
        was_on = not any(m.disable_adapters for _, m in self.lora_modules())
        with super().disabled():
            self.tuner.disable_adapter_layers()
            try:
                yield
            finally:
                if was_on:
                    self.tuner.enable_adapter_layers()

    def apply_edit(self, batch: EditBatch) -> dict:
        h = self.hparams
        loss = (lambda: target_nll(self, batch.requests) + self._orthogonality()) if h.adaptor == "adalora" \
            else (lambda: target_nll(self, batch.requests))
        return optimise(self.lora_parameters(), loss, h.steps, h.lr, desc=f"LoRA on {len(batch.requests)} request(s)")

    def _orthogonality(self) -> torch.Tensor:
        """AdaLoRA's regulariser as PEFT adds it to the model's loss (orth_reg_weight × the mean of
        ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F over the adapted modules); our loss is computed outside PEFT's
        forward, so it is added here."""
        terms = []
        for name, p in self.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                para = p @ p.T if "lora_A" in name else p.T @ p
                eye = torch.eye(*para.size(), device=p.device, dtype=p.dtype)
                terms.append(torch.norm(para - eye, p="fro"))
        return self.peft_config.orth_reg_weight * torch.stack(terms).mean()

    def merged_copy(self) -> torch.nn.Module:
        """A plain HF model with the adaptor merged in (PEFT's `merge_and_unload` on a copy, so the
        editor keeps its adaptor): what `export` saves."""
        return copy.deepcopy(self.tuner).merge_and_unload()
