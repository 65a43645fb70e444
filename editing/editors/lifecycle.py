"""What happens to the edits of a `fit` that does not finish: Ctrl-C (SIGINT) or SIGTERM.

The step in flight is rolled back by `Editor.edit` (or, for SIGTERM, which Lightning turns into an
exception between steps, finishes first). `PartialCheckpoint` then writes the edit state of the steps
that completed to `<run dir>/checkpoints/edit.partial.safetensors` as a safe edit file (`editing.edit_file`; atomically; marked `partial` with its
step count and the reason; a name already taken gets a numbered suffix, so no earlier checkpoint is
overwritten) or says plainly that nothing was saved. The CLI exits non-zero (1 for Ctrl-C, 143 for
SIGTERM).
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from editing.edit_file import write_edit_file


def free_path(path: Path) -> Path:
    """`path`, or path with -1, -2, ... before the suffix when it is taken."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class PartialCheckpoint(pl.Callback):
    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or not isinstance(exception, (KeyboardInterrupt, SystemExit)):
            return
        if not trainer.is_global_zero:
            return
        reason = "SIGTERM" if type(exception).__name__ == "SIGTERMException" else type(exception).__name__
        steps = len(pl_module.edit_log)
        if steps == 0:
            print(f"interrupted ({reason}) before any edit step completed: nothing was saved", file=sys.stderr)
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = free_path(run_dir / "checkpoints" / "edit.partial.safetensors")
        ckpt = pl_module.edit_checkpoint()
        ckpt["partial"] = {"steps": steps, "edits": sum(len(e["cases"]) for e in pl_module.edit_log),
                           "reason": reason}
        write_edit_file(ckpt, path)
        print(f"interrupted ({reason}) after {steps} completed edit step(s); their edits are saved (partial) in "
              f"{path}", file=sys.stderr)
