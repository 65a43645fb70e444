"""`EditDataModule`: benchmark files -> edit steps (training) and evaluation cases (testing)."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import editing.data.meta as meta
from editing.data.batch import EditBatch
from editing.data.readers import Format, Kind, load_benchmark
from editing.data.records import Benchmark, DataError, EditRequest, EvalCase


class _ListDataset(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _as_list(batch):
    return batch


class EveryRankSampler(DistributedSampler):
    """All edit steps, in order, on every rank: every rank applies the same edits, so the edited
    models stay identical (editors that shard work gather it themselves)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        pass


class ShardSampler(DistributedSampler):
    """Evaluation cases split across ranks without repeats (DistributedSampler pads by repeating
    samples, which would bias the metrics)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        pass


class EditDataModule(pl.LightningDataModule):
    """Reads a benchmark and serves it as edit steps and evaluation cases.

    Args:
        path: a benchmark file, a ParaRel folder, or a Hugging Face dataset name/folder; None = the
            shipped ParaRel benchmark of `kind`.
        format: force a layout (counterfact, zsre, jsonl, pararel, hf) instead of detecting it.
        kind: which ParaRel set: "counterfactual" (COUNTERFACT-style) or "factual" (iReVa-style).
        split: dataset split for Hugging Face datasets.
        num_edits: how many requests to edit (-1 = all).
        seed: seed of the ParaRel builder and of shuffling.
        shuffle: pick `num_edits` requests at random (seeded) instead of the first ones.
        edit_batch_size: requests per edit step: 1 = sequential editing, N = consecutive batches of N
            without rollback, -1 = all requests in one step.
        eval_batch_size: evaluation cases per test batch (their prompts are scored in chunks sorted by
            length: larger batches pad less, smaller ones update the progress bar more often).
        prompt_suffix: appended to every edit, paraphrase, neighbourhood and locality prompt, e.g.
            iReVa's zsRE trigger " Answer:" (None: the prompts as read).
        prompts: what `predict` asks the model: a prompt, a list of prompts, or a file (.txt: one
            prompt per line; .jsonl: a "prompt" field per line); None: the selected requests' prompts.
        relations: "all" requests, or only the "held_out" part of the split (`editing.data.meta`):
            relations (or subjects) a trained editor never saw in training or validation.
        train_path: what a trained editor (MEND) trains on: its train part for training, its val
            part for validation (None: the benchmark of `path` / `kind` itself).
        split_seed: seed of the train / validation / test split.
        meta_edits: edits per training instance (MEND's n_edits).
        meta_batch_size: training instances per batch and process (DDP: per rank).
        val_instances: validation instances (the first of the val part).
    """

    def __init__(self, path: str | None = None, format: Format | None = None, kind: Kind = "counterfactual",
                 split: str = "train", num_edits: int = 50, seed: int = 0, shuffle: bool = False,
                 edit_batch_size: int = 1, eval_batch_size: int = 32, prompt_suffix: str | None = None,
                 prompts: list[str] | str | None = None, relations: Literal["all", "held_out"] = "all",
                 train_path: str | None = None, split_seed: int = 0, meta_edits: int = 1, meta_batch_size: int = 1,
                 val_instances: int = 50):
        super().__init__()
        self.save_hyperparameters()
        if num_edits == 0 or num_edits < -1:
            raise ValueError(f"num_edits must be positive or -1 (all), got {num_edits}")
        if edit_batch_size == 0 or edit_batch_size < -1:
            raise ValueError(f"edit_batch_size must be positive or -1 (all), got {edit_batch_size}")
        self.benchmark: Benchmark | None = None
        self._requests: list[EditRequest] = []

    # --- what was read ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.benchmark is not None:
            return
        h = self.hparams
        self.benchmark = load_benchmark(h.path, format=h.format, kind=h.kind, split=h.split, seed=h.seed)
        requests = list(self.benchmark.requests)
        if h.relations == "held_out":
            requests = meta.select(requests, "test", h.split_seed)
        if h.shuffle:
            random.Random(h.seed).shuffle(requests)
        self._requests = requests if h.num_edits == -1 else requests[: h.num_edits]
        if h.prompt_suffix:
            self._requests = [r.with_suffix(h.prompt_suffix) for r in self._requests]
        if not self._requests:
            raise ValueError(f"{self.benchmark.source or self.benchmark.name} holds no edit requests")
        dups = sorted(c for c, n in Counter(r.case_id for r in self._requests).items() if n > 1)
        if dups:
            raise DataError(f"case ids {dups[:10]} appear more than once; every edit needs its own id",
                            file=self.benchmark.source or self.benchmark.name, field="case_id")

    @property
    def requests(self) -> list[EditRequest]:
        """The selected requests, in edit order."""
        self.setup()
        return self._requests

    @property
    def style(self) -> str:
        self.setup()
        return self.benchmark.style

    @property
    def num_selected(self) -> int:
        self.setup()
        return len(self.requests)

    @property
    def description(self) -> str:
        self.setup()
        return self.benchmark.name

    # --- edit steps ------------------------------------------------------------------------------
    def edit_steps(self) -> list[EditBatch]:
        """The edit steps in order, each an `EditBatch` with the benchmark's style and, as the
        out-of-scope pool, every selected request."""
        self.setup()
        n = self.hparams.edit_batch_size
        n = len(self.requests) if n == -1 else n
        return [EditBatch(self.requests[i:i + n], self.style, self.requests) for i in range(0, len(self.requests), n)]

    def eval_cases(self) -> list[EvalCase]:
        self.setup()
        return [EvalCase.from_request(r, i) for i, r in enumerate(self.requests)]

    def predict_prompts(self) -> list[str]:
        """The prompts of `predict` (see `prompts`)."""
        given = self.hparams.prompts
        if given is None:
            return [r.text for r in self.requests]
        if isinstance(given, str) and Path(given).is_file():
            return read_prompts(Path(given))
        prompts = [given] if isinstance(given, str) else list(given)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"--data.prompts: every prompt must be a non-empty string, got {given!r}")
        return prompts

    # --- training data of trained editors ---------------------------------------------------------------
    def _trains_editor(self) -> bool:
        return getattr(getattr(self.trainer, "lightning_module", None), "trained", False)

    def meta_parts(self) -> dict[str, list[EditRequest]]:
        """The train and val parts of the training source (`train_path`, else the benchmark)."""
        if getattr(self, "_meta", None) is not None:
            return self._meta
        h = self.hparams
        source = load_benchmark(h.train_path, kind=h.kind, seed=h.seed) if h.train_path else \
            load_benchmark(h.path, format=h.format, kind=h.kind, split=h.split, seed=h.seed)
        requests = [r.with_suffix(h.prompt_suffix) for r in source.requests] if h.prompt_suffix else source.requests
        parts = {p: meta.select(requests, p, h.split_seed) for p in ("train", "val")}
        for p, rs in parts.items():
            if not rs:
                raise ValueError(f"{source.source or source.name}: the {p} part of the split is empty")
        self._meta = parts
        return parts

    def _meta_loader(self, requests: list[EditRequest], shuffle: bool, limit: int | None) -> DataLoader:
        h = self.hparams
        ds = meta.MetaDataset(requests, h.meta_edits, h.split_seed, limit)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        # The same permutation in every process; rank r takes every world-th instance, so a DDP run
        # sees the global batches of one process with meta_batch_size * world.
        sampler = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=h.split_seed, drop_last=shuffle) \
            if shuffle else ShardSampler(ds, world, rank)
        return DataLoader(ds, batch_size=h.meta_batch_size if shuffle else 1, sampler=sampler, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        return self._meta_loader(self.meta_parts()["val"], False, self.hparams.val_instances)

    def train_dataloader(self) -> DataLoader:
        if self._trains_editor():
            return self._meta_loader(self.meta_parts()["train"], True, None)
        ds = _ListDataset(self.edit_steps())
        return DataLoader(ds, batch_size=None, sampler=EveryRankSampler(ds), collate_fn=_as_list)

    def _sharded(self, items: list) -> DataLoader:
        ds = _ListDataset(items)
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size, sampler=ShardSampler(ds, world, rank),
                          collate_fn=_as_list)

    def test_dataloader(self) -> DataLoader:
        return self._sharded(self.eval_cases())

    def predict_dataloader(self) -> DataLoader:
        """(index, prompt) pairs, split across ranks."""
        return self._sharded(list(enumerate(self.predict_prompts())))


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file (a "prompt" field per line)."""
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        prompts = [line.strip() for _, line in lines]
    else:
        prompts = []
        for n, line in lines:
            try:
                prompt = json.loads(line).get("prompt")
            except (ValueError, AttributeError):
                prompt = None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"line {n} has no \"prompt\" string", file=str(path), record=n - 1, field="prompt")
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: holds no prompts")
    return prompts
