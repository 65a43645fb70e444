"""Training data of the trained editors (MEND): a deterministic train / validation / test split and
the meta-training instances built from edit records (BASELINES.md §0.3).

The split (`split_of`), given a seed:
- records that all carry a relation id (the shipped ParaRel benchmarks, COUNTERFACT files) are split
  **by relation**: the relation ids, sorted and shuffled with `random.Random(seed)`, give the first
  `round(0.2 n)` relations to test, the next `max(1, round(0.1 n))` to validation, the rest to
  training (27 shipped relations: 19 / 3 / 5), so no relation is in two parts;
- other records (zsRE files have no relation) are split **by subject**: sha256(f"{seed}:{subject}")
  modulo 10 is 0 for validation, 1 for test, otherwise training (80 / 10 / 10), so no subject is in
  two parts.
The shipped counterfactual and factual sets hold the same relations, so one seed splits both alike.

A training instance (`MetaInstance`) is `edits_per_instance` edit requests (MEND's n_edits) with,
per request, one equivalence sample (a paraphrase prompt with the new target; the edit prompt
itself when the record has no paraphrase) and its locality samples (prompt + answer texts, KL only):
the record's locality prompt (a fact of another relation) and, where the record has neighbourhood
prompts, one of them with the true object (same relation, other subject: the hard case). The
choices are drawn with a generator seeded by (seed, instance index), so an instance is the same in
every process and every epoch.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Literal

from torch.utils.data import Dataset

from editing.data.records import EditRequest

Part = Literal["train", "val", "test"]


def split_of(requests: list[EditRequest], seed: int = 0) -> dict[str, Part]:
    """case id -> the part its record belongs to (see the module docstring)."""
    relations = sorted({r.relation_id for r in requests if r.relation_id})
    if len(relations) >= 3 and all(r.relation_id for r in requests):
        random.Random(seed).shuffle(relations)
        n_test = max(1, round(0.2 * len(relations)))
        n_val = max(1, round(0.1 * len(relations)))
        part = {rel: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                for i, rel in enumerate(relations)}
        return {r.case_id: part[r.relation_id] for r in requests}

    def by_subject(subject: str) -> Part:
        h = int(hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest(), 16) % 10
        return "val" if h == 0 else "test" if h == 1 else "train"
    return {r.case_id: by_subject(r.subject) for r in requests}


def select(requests: list[EditRequest], part: Part, seed: int = 0) -> list[EditRequest]:
    """The requests of one part of the split, in their order."""
    parts = split_of(requests, seed)
    return [r for r in requests if parts[r.case_id] == part]


@dataclass
class MetaInstance:
    """One meta-training instance: edits applied together, then scored on equivalence samples
    (prompt, target) and locality texts (prompt + answer, KL against the unedited model)."""

    edits: list[EditRequest]
    equivalence: list[tuple[str, str]] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.edits)


def instance(edits: list[EditRequest], rng: random.Random) -> MetaInstance:
    inst = MetaInstance(list(edits))
    for r in edits:
        inst.equivalence.append((rng.choice(r.paraphrase_prompts) if r.paraphrase_prompts else r.text, r.target_new))
        if r.locality_prompt is not None:
            inst.locality.append((r.locality_prompt, r.locality_answer))
        if r.neighborhood_prompts and r.target_true is not None:
            inst.locality.append((rng.choice(r.neighborhood_prompts), r.target_true))
    if not inst.locality:  # a record set without locality prompts: another instance's edit prompt
        raise ValueError(f"records {[r.case_id for r in edits]} have no locality or neighbourhood prompt; "
                         "a trained editor needs one per training edit")
    return inst


class MetaDataset(Dataset):
    """Training (or validation) instances: the requests shuffled with the seed, in groups of
    `edits_per_instance` (the last incomplete group dropped)."""

    def __init__(self, requests: list[EditRequest], edits_per_instance: int = 1, seed: int = 0,
                 limit: int | None = None):
        if edits_per_instance < 1:
            raise ValueError(f"edits per training instance must be at least 1, got {edits_per_instance}")
        order = list(requests)
        random.Random(seed).shuffle(order)
        k = edits_per_instance
        self.groups = [order[i:i + k] for i in range(0, len(order) - k + 1, k)][:limit]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> MetaInstance:
        return instance(self.groups[i], random.Random(f"{self.seed}:{i}"))
