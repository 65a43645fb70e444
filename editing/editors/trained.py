"""`TrainedEditor`: the base of editors that are trained before they edit (MEND, MALMEN, SERAC).

For these editors `cli.py fit` is a real training run of Lightning: automatic optimisation of the
editor network (Adam, a learning-rate schedule, gradient clipping and accumulation from the
trainer), a validation loop every `val_check_interval` batches logging `val/edit_success` (and
`val/score`, its harmonic mean with `val/locality`), `SafeCheckpoint` keeping the best editor by
`monitor` (edit success by default; a safe edit file, never a pickle), `EarlyStopping`,
and DDP that averages gradients (the data module gives each rank its share of every global batch).
At the end the best editor is written as <run dir>/checkpoints/edit.safetensors.

`cli.py test --ckpt_path <that file>` then edits the data's requests with the trained editor, in steps
of `--data.edit_batch_size` (sequential when 1), and evaluates them as every editor's `test` does.
The trained network is not edit state that changes in an edit step: a step's snapshot and rollback
cover the weight deltas only. A step that fails its checks in `test` is rolled back and the run goes
on: that case is evaluated unedited and results.json lists it under `refused_steps`.

Subclasses implement `meta_loss(instances) -> (loss to back-propagate, logs)` (logs["loss"], when
given, is the loss reported, e.g. for MALMEN's surrogate), `meta_eval(instance) -> metrics` (the
post-edit edit success, in [0, 1], and more), `optimizer_groups()` and `apply_edit`.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torchmetrics import MeanMetric

import editing.editors.checks as checks
from editing.editors.base import Editor

Schedule = Literal["constant", "cosine"]
MONITOR = "val/edit_success"


class SafeCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files are safe edit files (`Editor.save_edit`: safetensors and JSON, read
    without unpickling), so the best trained editor is what `--ckpt_path` accepts."""

    FILE_EXTENSION = ".safetensors"

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            trainer.lightning_module.save_edit(filepath)
        trainer.strategy.barrier("safe_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


class TrainedEditor(Editor):
    """Args (besides the `Editor`'s):
        lr: Adam learning rate of the editor network.
        lr_schedule: "constant" or "cosine" (to zero at the trainer's last step), after warmup.
        warmup_steps: optimiser steps of linear warmup.
        early_stop_patience: validations without a better monitored value before training stops.
        monitor: what picks the best editor and stops early: "val/edit_success", or "val/score",
            the harmonic mean of validation edit success and locality (for an editor that can buy
            edit success with locality, such as SERAC's classifier).
    """

    trained = True

    def __init__(self, lr: float = 1e-6, lr_schedule: Schedule = "constant", warmup_steps: int = 0,
                 early_stop_patience: int = 5, monitor: Literal["val/edit_success", "val/score"] = MONITOR,
                 **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = True
        self.val_metrics: dict[str, MeanMetric] = {}

    # --- what a subclass supplies ----------------------------------------------------------------------
    def meta_loss(self, instances: list) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def meta_eval(self, instance) -> dict[str, float]:
        raise NotImplementedError

    def optimizer_groups(self) -> list[dict]:
        raise NotImplementedError

    # --- training ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the base model is frozen and deterministic (no dropout) in training too
        return self

    def on_train_start(self) -> None:
        pass  # unlike edit steps, training steps keep DDP's gradient averaging

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        loss, logs = self.meta_loss(batch)
        value = logs.pop("loss", loss.detach())  # an editor that returns a surrogate reports its true loss
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, on_step=True, batch_size=len(batch))
        self.log("train/loss", float(value), on_step=True, prog_bar=True, batch_size=len(batch))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if any(not torch.isfinite(g).all() for g in grads):  # skip the step (official MEND does)
            warnings.warn("non-finite gradient: optimiser step skipped")
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.optimizer_groups())
        h, total = self.hparams, max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            if h.lr_schedule == "constant":
                return 1.0
            done = (step - h.warmup_steps) / max(1, total - h.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation ------------------------------------------------------------------------------------
    def validation_step(self, batch: list, batch_idx: int) -> None:
        for inst in batch:
            with torch.inference_mode(False), torch.enable_grad():  # the edit needs the LM's gradients
                values = self.meta_eval(inst)
            for k, v in values.items():
                if k not in self.val_metrics:
                    self.val_metrics[k] = MeanMetric(sync_on_compute=True).to(self.device)
                self.val_metrics[k].update(float(v))

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": m.compute() for k, m in self.val_metrics.items()}
        for m in self.val_metrics.values():
            m.reset()
        if "val/edit_success" in values and "val/locality" in values:
            e, l = values["val/edit_success"], values["val/locality"]
            values["val/score"] = 2 * e * l / (e + l) if float(e + l) > 0 else e * 0
        self.log_dict(values, prog_bar=True, sync_dist=False)

    def configure_callbacks(self):
        h = self.hparams
        return [*super().configure_callbacks(),
                SafeCheckpoint(monitor=h.monitor, mode="max", save_top_k=1, filename="best-{step}"),
                EarlyStopping(monitor=h.monitor, mode="max", patience=h.early_stop_patience, strict=False)]

    def best_checkpoint(self) -> str | None:
        trainer = self._trainer
        cb = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        path = getattr(cb, "best_model_path", "") if isinstance(cb, SafeCheckpoint) else ""
        return path if path and Path(path).is_file() else None

    def on_train_end(self) -> None:
        """The best editor by validation (the last one without validation) becomes the edit file."""
        best = self.best_checkpoint()
        if best is not None:
            self.load_edit(best)
        super().on_train_end()

    # --- edit steps: the deltas are the edit state a step may roll back -----------------------------
    def snapshot(self):
        return {n: {k: v.detach().clone() for k, v in m.own_state().items()} for n, m in self.edit_layers().items()}

    def restore(self, snap) -> None:
        with torch.no_grad():
            for n, m in self.edit_layers().items():
                own = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
                for k, v in snap[n].items():
                    own[k].copy_(v)

    def holds_edits(self) -> bool:
        """Whether edits were made (a weight delta is not zero)."""
        return any(v.any() for state in self.snapshot().values() for v in state.values())

    def on_test_start(self) -> None:
        """`test` first edits the data's requests with the trained editor (every rank all of them),
        unless the loaded edit file holds edits already (then those are evaluated)."""
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "edit_steps"):
            return
        if self.holds_edits():
            return  # the checkpoint holds a trained editor's edits already: evaluate those
        if self.edit_file is None:
            warnings.warn(f"{type(self).__name__} is untrained here (no --ckpt_path): its edits are an untrained "
                          "editor's")
        from editing.console import progress
        from editing.editors.base import EditError
        steps = dm.edit_steps()
        self.refused = []
        with progress(len(steps), f"editing with the trained {self.method}") as bar, \
                torch.inference_mode(False), torch.enable_grad():
            for step in steps:
                try:
                    self.edit(step)
                except EditError as e:  # rolled back: evaluated as not edited (results.json lists it)
                    if not isinstance(e.__cause__, checks.StepCheckError):
                        raise
                    self.refused.append({"cases": [r.case_id for r in step.requests], "reason": str(e.__cause__)})
                    warnings.warn(f"step refused and rolled back: {e}")
                bar.update()

    def report_extras(self, values: dict) -> dict:
        refused = getattr(self, "refused", None)
        return {} if refused is None else {"refused_steps": refused}
