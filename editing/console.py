"""What a person sees while the CLI works: quiet by default, progress that counts edits.

- `quiet(verbose)`: silences the notices and warnings that are expected in an editing run (each
  filter says why it is expected here); `--verbose true` leaves them all visible.
- `EditProgressBar`: Lightning's tqdm bar, counting cases instead of batches: a first line that says
  what will happen, then "editing 18/50 cases [00:40<01:10, 2.2 s/case, ETA 12:04]" (the rate and
  the ETA come from the steps done so far and update as it goes); "evaluating 20/50 cases" in test.
- `progress(total, desc)`: the bar of an inner loop (statistics texts, target optimisation steps, FT
  steps), below the main bar and gone when done; off on ranks > 0 and with EDITING_PROGRESS=0.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from datetime import datetime, timedelta

from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm  # (editing/__init__.py hides its notice in notebooks without ipywidgets)

# Expected here, so not shown unless --verbose:
EXPECTED_WARNINGS = (
    # the frozen base model is in eval mode on purpose (dropout off while an edit is optimised)
    r".*module\(s\) in eval mode.*",
    # a deprecation inside Lightning's own code (lightning/pytorch/utilities/_pytree.py), not ours
    r".*isinstance\(treespec, LeafSpec\).*",
    # the test metrics are torchmetrics states summed across ranks before they are logged
    r".*when logging on epoch level in distributed setting.*",
)
# Lightning's informational loggers: device notices, "Seed set to 0", the advertisement for a cloud
# logger, "`Trainer.fit` stopped: `max_epochs=1` reached", that the editor's callbacks replace the
# Trainer's (they are the editor's own), "`weights_only` was not set" (edit files hold no pickle).
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


def quiet(verbose: bool = False) -> None:
    """Filter what is expected in an editing run (see EXPECTED_WARNINGS), unless `verbose`."""
    if verbose:
        return
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers' "Loading weights" bar and its info messages are not needed either.
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0


def progress(total: int, desc: str, unit: str = "step", enabled: bool = True):
    """A bar for an inner loop, removed when done, nested under the main bar when one is open (the
    CLI's; the Python API has none); on rank 0 only, and off with EDITING_PROGRESS=0."""
    on = enabled and _rank_zero() and os.environ.get("EDITING_PROGRESS", "1") != "0"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not on, dynamic_ncols=True,
                position=1 if tqdm._instances else None, mininterval=1.0)


def _eta(bar) -> str:
    """Wall-clock time at which the bar will be done, from its average rate ("" before the first)."""
    n, total = bar.n, bar.total
    elapsed = time.time() - bar.start_t
    if not n or not total or n >= total:
        return ""
    done = datetime.now() + timedelta(seconds=elapsed / n * (total - n))
    return done.strftime("ETA %H:%M")


class EditProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, in cases: "editing 18/50 cases [elapsed<remaining, s/case, ETA hh:mm]"."""

    BAR = "{desc} {n_fmt}/{total_fmt} {unit}s |{bar:20}| [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]"

    def __init__(self):
        super().__init__(refresh_rate=1, leave=True)
        self._cases = 0

    def _bar(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="case", leave=True, dynamic_ncols=True, file=sys.stdout,
                    smoothing=0, bar_format=self.BAR, disable=self.is_disabled)

    def _total_cases(self, trainer) -> int:
        dm = trainer.datamodule
        n = getattr(dm, "num_selected", None) if dm is not None else None
        return int(n) if n else 0

    # A trained editor's `fit` is a training run: Lightning's own bars (steps, validation, metrics).
    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "trained", False):
            return super().on_train_start(trainer, pl_module)
        total = self._total_cases(trainer)
        dm = trainer.datamodule
        if trainer.is_global_zero:
            steps = step_plan(dm)
            tqdm.write(f"editing {total} cases of {getattr(dm, 'description', 'the data')} into "
                       f"{pl_module.hparams.base_model} with {pl_module.method} ({steps}); "
                       f"an ETA follows the first step", file=sys.stdout)
        self._cases = 0
        self.train_progress_bar = self._bar("editing", total)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "trained", False):
            return super().on_train_epoch_start(trainer, pl_module)
        # one epoch: the bar made in on_train_start counts every case

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "trained", False):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._cases += len(batch) * trainer.world_size if hasattr(batch, "__len__") else 1
        bar = self.train_progress_bar
        if bar.disable:  # ranks > 0, or --trainer.enable_progress_bar false
            return
        bar.n = min(self._cases, bar.total or self._cases)
        seconds = (pl_module.edit_log[-1]["seconds"] if pl_module.edit_log else None)
        postfix = [_eta(bar)] + ([f"last step {seconds:.1f} s"] if seconds is not None else [])
        bar.set_postfix_str(", ".join(p for p in postfix if p), refresh=False)
        bar.refresh()
        if bar.total and bar.n >= bar.total:
            bar.close()  # done: what is printed next (the edit file, the table) comes after it

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "trained", False):
            return super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "trained", False):
            return super().on_train_end(trainer, pl_module)
        self.train_progress_bar.close()

    def on_test_start(self, trainer, pl_module) -> None:
        self._cases = 0
        self.test_progress_bar = self._bar("evaluating", self._total_cases(trainer))

    def on_test_batch_start(self, *args, **kwargs) -> None:
        pass

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._cases += len(batch) * trainer.world_size
        bar = self.test_progress_bar
        if bar.disable:
            return
        bar.n = min(self._cases, bar.total or self._cases)
        bar.set_postfix_str(_eta(bar), refresh=False)
        bar.refresh()
        if bar.total and bar.n >= bar.total:
            bar.close()

    def on_test_end(self, trainer, pl_module) -> None:
        self.test_progress_bar.close()
        self.reset_dataloader_idx_tracker()


def step_plan(dm) -> str:
    """How the cases are edited ("one edit per step, sequentially", ...), from the edit batch size."""
    size = getattr(getattr(dm, "hparams", None), "edit_batch_size", None) if dm is not None else None
    if size == 1:
        return "one edit per step, sequentially"
    if size == -1:
        return "all in one step"
    return f"consecutive steps of {size} edits" if size else "edit steps"
