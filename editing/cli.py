"""LightningCLI wiring: `python cli.py fit|test --config configs/<method>.yaml [--section.option value]`."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from editing.data.module import EditDataModule
from editing.editors.base import CheckpointMismatchError, EditError, Editor
from editing.layout import UnsupportedModelError

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "enable_model_summary": False,
    # Editors write their own checkpoint at the end of fit (Editor.on_train_end): edit.ckpt.
    "enable_checkpointing": False,
    "default_root_dir": "runs",
}

# Lightning warns about things that are deliberate here: no optimiser (editors optimise inside the
# edit step), small "datasets" of edit steps, and a CPU-only machine.
for pattern in (r".*configure_optimizers.*returned `None`.*", r".*does not have many workers.*",
                r".*GPU available but not used.*", r".*`training_step` returned `None`.*",
                r".*The number of training batches.*", r".*Total length of .* across ranks is zero.*"):
    warnings.filterwarnings("ignore", message=pattern)


class EditDDPStrategy(DDPStrategy):
    """DDP for editors. Closed-form editors (ROME, MEMIT, ...) have no parameter that takes gradients
    from the trainer (their target deltas live inside the edit step, and ranks share them with an
    explicit all-gather), and torch's DistributedDataParallel refuses such a module: they run
    unwrapped, with the process group and the samplers of DDP. Editors with trainable parameters are
    wrapped as usual (their gradient sync is switched off in `Editor.on_train_start`)."""

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


# The CLI's "ddp" names (and their start methods) use EditDDPStrategy.
for _name, _start in (("ddp", "popen"), ("ddp_spawn", "spawn"), ("ddp_fork", "fork"), ("ddp_notebook", "fork")):
    StrategyRegistry.register(_name, EditDDPStrategy, description=f"editing DDP, start_method {_start!r}",
                              start_method=_start, override=True)


class EditingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after `fit`, evaluate the edited model and print the metrics table")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_run_dir(self.trainer)
            raise

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


# Errors a user causes (bad data, bad options, a checkpoint of another model or method, a step that
# failed and was rolled back): one line on stderr and exit status 2; EDITING_TRACEBACK=1 shows the
# traceback too.
USER_ERRORS = (ValueError, IndexError, FileNotFoundError, EditError, CheckpointMismatchError, UnsupportedModelError)


def remove_empty_run_dir(trainer) -> None:
    """A failed run leaves no run folder that holds only its own config."""
    log_dir = getattr(trainer, "log_dir", None) if trainer is not None else None
    if not log_dir or not Path(log_dir).is_dir():
        return
    files = [p for p in Path(log_dir).rglob("*") if p.is_file()]
    if all(p.name in ("config.yaml", "hparams.yaml") for p in files):
        shutil.rmtree(log_dir, ignore_errors=True)


def main(args=None, run: bool = True) -> EditingCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return EditingCLI(Editor, EditDataModule, subclass_mode_model=True, trainer_defaults=TRAINER_DEFAULTS,
                          seed_everything_default=0,
                          save_config_kwargs={"overwrite": True}, args=args, run=run)
    except SIGTERMException:  # Lightning ends a SIGTERM'd run with SystemExit(None), i.e. status 0
        sys.exit(128 + signal.SIGTERM)
    except USER_ERRORS as e:
        if os.environ.get("EDITING_TRACEBACK") == "1" or not run:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
