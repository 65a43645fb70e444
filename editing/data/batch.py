"""`EditBatch`: one edit step as the DataModule hands it to an editor."""
from __future__ import annotations

from dataclasses import dataclass, field

from editing.data.records import EditRequest


@dataclass
class EditBatch:
    """The requests of one edit step and what an editor may need besides them.

    `style`: the benchmark's style ("counterfact", "zsre"); `pool`: the out-of-scope pool, every
    request of the benchmark (iReVa samples "other edits' prompts" from it); empty when the step
    comes from the Python API, and editors then fall back to the requests they have seen."""

    requests: list[EditRequest]
    style: str = "counterfact"
    pool: list[EditRequest] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    @property
    def case_ids(self) -> list[str]:
        return [r.case_id for r in self.requests]

    @classmethod
    def of(cls, step: "EditBatch | list[EditRequest]") -> "EditBatch":
        return step if isinstance(step, EditBatch) else cls(list(step))
