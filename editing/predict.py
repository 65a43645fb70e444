"""Ask the edited model: greedy continuations of prompts by the edited and the unedited model.

`compare(editor, prompts)` is the Python API (`editor.compare`). `cli.py predict` runs Lightning's
predict loop over the DataModule's prompts (`--data.prompts`, or the edit requests' prompts): each
rank answers its share (`Editor.predict_step`), and `PredictionReport` gathers the rows, prints them
as a table and writes `<run dir>/predictions.jsonl`.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist

from editing.evaluation import generate
from editing.io import write_text_atomic


def compare(editor, prompts: list[str], max_new_tokens: int = 20, batch_size: int | None = None) -> list[dict]:
    """One row per prompt: the prompt, the edited and the unedited continuation, and whether they differ."""
    n = batch_size or editor.hparams.forward_batch_size
    edited, unedited = [], []
    for s in range(0, len(prompts), n):
        part = prompts[s:s + n]
        edited += generate(editor, part, max_new_tokens)
        with editor.disabled():
            unedited += generate(editor, part, max_new_tokens)
    return [{"prompt": p, "edited": e, "unedited": u, "changed": e != u} for p, e, u in zip(prompts, edited, unedited)]


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[dict], width: int = 48) -> str:
    """The rows as a markdown table (continuations on one line, cut at `width` characters)."""
    lines = ["| prompt | edited model | unedited model |", "|---|---|---|"]
    lines += [f"| {_cell(r['prompt'], width)} | {_cell(r['edited'], width)} | {_cell(r['unedited'], width)} |"
              for r in rows]
    return "\n".join(lines)


class PredictionReport(pl.Callback):
    """Collects the rows of `trainer.predict`, gathers them from every rank, and on rank 0 prints the
    table and writes predictions.jsonl (atomically) in the run directory."""

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.rows: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.rows.extend(outputs or [])

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        rows = self.rows
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        rows = sorted(rows, key=lambda r: r["index"])
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank
        if trainer.is_global_zero:
            path = run_dir / "predictions.jsonl"
            write_text_atomic("".join(json.dumps({k: v for k, v in r.items() if k != "index"}) + "\n" for r in rows),
                              path)
            print(table(rows))
            print(f"predictions: {path}")
