"""The unedited baseline: evaluation of the base model as it is."""
from __future__ import annotations

from editing.data.records import EditRequest
from editing.editors.base import Editor


class NoEdit(Editor):
    """Leaves the model untouched; its test run is the baseline row of every table."""

    method = "noedit"

    def apply_edit(self, requests: list[EditRequest]) -> dict:
        return {}
