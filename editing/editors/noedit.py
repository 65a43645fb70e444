"""The unedited baseline: evaluation of the base model as it is."""
from __future__ import annotations

from editing.data.batch import EditBatch
from editing.editors.base import Editor


class NoEdit(Editor):
    """Leaves the model untouched; its test run is the baseline row of every table."""

    method = "noedit"

    def apply_edit(self, batch: EditBatch) -> dict:
        return {}
