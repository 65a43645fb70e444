"""Atomic file writes: the one way this package writes a file another process (or a later run) reads.

`atomic_path(path)` yields a temporary path next to `path`; when the block ends without an exception
the file is flushed to disk and renamed over `path` (readers see the old file or the new one, never a
half-written one); on any exception (Ctrl-C included) the temporary file is removed and `path` is left
as it was. The helpers below write JSON and text through it; safetensors files use it directly.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s directory, renamed over `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def write_json_atomic(obj: Any, path: str | Path, indent: int | None = 2) -> Path:
    return write_text_atomic(json.dumps(obj, indent=indent, default=str), path)

