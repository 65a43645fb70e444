"""JSON and JSONL files of the data package: reading with errors that name the file and record, and
the toolkit's own JSONL layout written atomically. Imports only the records module, so every reader
(readers, pararel) can use it without importing each other."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from editing.data.records import Benchmark, DataError
from editing.io import write_text_atomic


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the file ({e})", file=str(path)) from e


def read_json_list(path: str | Path) -> list[Any]:
    """A JSON file holding a list of records."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", file=str(path)) from e
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", file=str(path))
    return data


def read_json_lines(path: str | Path) -> list[Any]:
    """One JSON value per non-empty line; a bad line names its record index and line number."""
    path = Path(path)
    rows: list[Any] = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            record = len(rows) - (1 if rows and is_header(rows[0]) else 0)
            raise DataError(f"line {n} is not valid JSON ({e.msg})", file=str(path), record=record) from e
    return rows


def is_header(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"benchmark"}


def write_jsonl(benchmark: Benchmark, path: str | Path) -> Path:
    """Write a benchmark in the toolkit's layout (a header line, then one request per line), atomically."""
    lines = [json.dumps({"benchmark": {"name": benchmark.name, "style": benchmark.style}})]
    lines += [json.dumps(r.to_dict(), ensure_ascii=False) for r in benchmark.requests]
    return write_text_atomic("\n".join(lines) + "\n", path)
