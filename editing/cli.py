"""LightningCLI wiring: `python cli.py fit|test|predict|export|stats --config configs/<method>.yaml [--section.option value]`
(installed: the `editing` command, with the configs shipped in the package: `--config memit`).

Subcommands: `fit` edits (writes <run dir>/checkpoints/edit.safetensors), `test` evaluates, `predict`
prints the edited and unedited continuations of prompts (predictions.jsonl), `export` writes a plain
Hugging Face model directory, `stats` computes, exports or imports a config's key statistics. `--ckpt_path` is always a safe edit file (`editing.edit_file`): it is
read without unpickling, refused when its method is not the config's or its base model is not the
config's (the config is what runs; the checkpoint's hyperparameters never replace it), and loaded
into the editor before the subcommand runs.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from editing.console import EditProgressBar, quiet
from editing.data.module import EditDataModule
from editing.edit_file import read_edit_file
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
    "log_every_n_steps": 1,  # every edit step is logged (metrics.csv)
}
CONFIGS = Path(__file__).resolve().parent / "configs"

# Lightning warns about things that are deliberate here: no optimiser (editors optimise inside the
# edit step), small "datasets" of edit steps, a CPU-only machine, and the data module's validation
# loader (used by trained editors only; editors that edit have no validation loop).
for pattern in (r".*configure_optimizers.*returned `None`.*", r".*does not have many workers.*",
                r".*GPU available but not used.*", r".*`training_step` returned `None`.*",
                r".*The number of training batches.*", r".*Total length of .* across ranks is zero.*",
                r".*You passed in a `val_dataloader` but have no `validation_step`.*"):
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


class EditTrainer(pl.Trainer):
    """Lightning's Trainer with the toolkit's `export` verb."""

    def export(self, model: Editor, out: str, datamodule=None, ckpt_path: str | None = None,
               push_to_hub: str | None = None) -> None:
        """Write the edited model as a plain Hugging Face model directory (edit merged) with a model card.

        Args:
            out: the directory to write.
            ckpt_path: the edit file to export (its results.json, when beside it, goes in the card).
            push_to_hub: also upload the directory to this Hub repository (needs a network).
        """
        from editing.export import export_model, push
        scores = None
        if ckpt_path:
            results = Path(ckpt_path).resolve().parent.parent / model.hparams.results_name
            if results.is_file():
                import json
                scores = json.loads(results.read_text(encoding="utf-8")).get("metrics")
        if self.is_global_zero:
            path = export_model(model, out, scores=scores)
            print(f"exported: {path}")
            if push_to_hub:
                print(f"pushed: {push(path, push_to_hub)}")


    def stats(self, model: Editor, action: Literal["compute", "export", "import"] = "compute",
              file: str | None = None, datamodule=None) -> None:
        """The key statistics E[kkᵀ] of the config's closed-form editor, computed once and shared.

        Args:
            action: "compute" (compute and cache what is missing, print the files), "export" (that,
                then write every edited layer into `file`), "import" (put `file` into the cache under
                its own keys; refused when it was made for another model than the config's).
            file: the statistics file to write or read.
        """
        from editing.stats import export_statistics, import_statistics
        if not hasattr(model, "statistics_files"):
            raise SystemExit(f"error: {type(model).__name__} uses no key statistics")
        if action in ("export", "import") and not file:
            raise SystemExit(f"error: stats --action {action} needs --file")
        if action == "import":
            with model.disabled():
                digest = model.base_identity["digest"]
            for path in import_statistics(file, digest):
                print(f"imported {path}")
            return
        files = model.statistics_files()
        if action == "compute":
            for layer, path in files.items():
                print(f"layer {layer}: {path}")
        else:
            print(f"exported layers {sorted(files)} to {export_statistics(files, file)}")


class EditingCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `verbose` of trainer.test/validate is this CLI's own --verbose (below), for every subcommand.
        subs = {k: set(v) | ({"verbose"} if k in ("test", "validate") else set())
                for k, v in LightningCLI.subcommands().items()}
        return {**subs, "export": {"model", "datamodule"}, "stats": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after `fit`, evaluate the edited model and print the metrics table")
        parser.add_argument("--verbose_metrics", type=bool, default=False,
                            help="after an evaluation print every metric, not only the headline table")
        parser.add_argument("--verbose", type=bool, default=False,
                            help="show the notices and warnings that are expected in an editing run "
                                 "(hidden by default, see editing/console.py), and Lightning's own metric printout")

    def _parse_ckpt_path(self) -> None:
        """Read --ckpt_path as a safe edit file and refuse one of another method than the config's
        (instead of LightningCLI's default: replacing the config's model with the checkpoint's)."""
        self._edit = None
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path:
            return
        ckpt = read_edit_file(path)
        model = self.config[sub].get("model")
        class_path = getattr(model, "class_path", None) or Editor.__module__ + ".Editor"
        module, _, name = class_path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        if ckpt.get("method") != cls.method:
            made_on = (ckpt.get("base_model") or {}).get("name")
            raise CheckpointMismatchError(
                f"{path}: this edit was made by method {ckpt.get('method')!r} (on base model {made_on!r}) and the "
                f"config names method {cls.method!r} ({class_path}); use the config the edit was made with")
        self._edit = (path, ckpt)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        path = kwargs.pop("ckpt_path", None)
        if self._edit is not None:  # load the edit into the config's editor (refusing another base model)
            self.model.load_edit(*self._edit)
        if subcommand == "export":
            kwargs["ckpt_path"] = path
        if subcommand in ("test", "validate"):
            kwargs["verbose"] = self.config[subcommand].get("verbose", False)
        self.model.verbose_metrics = self.config[subcommand].get("verbose_metrics", False)
        return kwargs

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        if config.get("logger") in (None, True):  # explicit loggers: CSV, and TensorBoard when installed
            config["logger"] = default_loggers(config.get("default_root_dir") or "runs")
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, EditProgressBar()]  # counts cases, with an ETA (editing.console)
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_run_dir(self.trainer)
            raise

    def after_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=cfg.get("verbose", False))


# Errors a user causes (bad data, bad options, a checkpoint of another model or method, a step that
# failed and was rolled back): one line on stderr and exit status 2; EDITING_TRACEBACK=1 shows the
# traceback too.
USER_ERRORS = (ValueError, IndexError, FileNotFoundError, EditError, CheckpointMismatchError, UnsupportedModelError)


def default_loggers(root: str) -> list:
    """A CSVLogger (metrics.csv in the run directory) and, when `tensorboard` is installed, a
    TensorBoardLogger writing into the same run directory."""
    csv = CSVLogger(save_dir=root)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return [csv]
    from lightning.pytorch.loggers import TensorBoardLogger
    return [csv, TensorBoardLogger(save_dir=root, version=csv.version)]


def packaged_config(value: str) -> str:
    """A --config value: a file, or the name of a config shipped in the package (`memit`,
    `smollm2/memit`, `published/memit_gpt2-xl`)."""
    if Path(value).exists() or value.startswith("{"):
        return value
    name = value.removeprefix("smollm2/").removesuffix(".yaml")
    path = CONFIGS / f"{name}.yaml"
    return str(path) if path.is_file() else value


def resolve_configs(args: list[str]) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = packaged_config(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + packaged_config(a.split("=", 1)[1])
    return out


def remove_empty_run_dir(trainer) -> None:
    """A failed run leaves no run folder that holds only its own config."""
    log_dir = getattr(trainer, "log_dir", None) if trainer is not None else None
    if not log_dir or not Path(log_dir).is_dir():
        return
    files = [p for p in Path(log_dir).rglob("*") if p.is_file()]
    if all(p.name in ("config.yaml", "hparams.yaml") for p in files):
        shutil.rmtree(log_dir, ignore_errors=True)


def wants_verbose(args: list[str]) -> bool:
    """Whether the command line asks for --verbose (read before parsing: the filters must be in place
    before the model loads)."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--verbose=") else (
            args[i + 1] if a == "--verbose" and i + 1 < len(args) else None)
        if value is not None:
            return value.strip().lower() in ("true", "1", "yes", "on")
    return False


def main(args=None, run: bool = True) -> EditingCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args is None:
        sys.argv[1:] = resolve_configs(sys.argv[1:])
    elif isinstance(args, list):
        args = resolve_configs([str(a) for a in args])
    quiet(wants_verbose(sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, list) else []))
    try:
        return EditingCLI(Editor, EditDataModule, subclass_mode_model=True, trainer_defaults=TRAINER_DEFAULTS,
                          trainer_class=EditTrainer,
                          seed_everything_default=0,
                          save_config_kwargs={"overwrite": True}, args=args, run=run)
    except SIGTERMException:  # Lightning ends a SIGTERM'd run with SystemExit(None), i.e. status 0
        sys.exit(128 + signal.SIGTERM)
    except USER_ERRORS as e:
        if os.environ.get("EDITING_TRACEBACK") == "1" or not run:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
