"""Safe edit files: an edit as safetensors tensors plus JSON metadata, never unpickled on load.

`write_edit_file(ckpt, path)` stores an edit checkpoint dictionary (what `Editor.edit_checkpoint`
gives: the edit state, hyperparameters, base model identity, edit log, method, edit shape) as one
safetensors file: every tensor under a generated key, the rest as a JSON skeleton in the header
metadata with references to those keys, plus the toolkit version and a SHA-256 checksum of the
tensors. The file is written atomically. `read_edit_file(path)` rebuilds the dictionary with
safetensors only; a pickle (or any other file), a truncated file or a checksum mismatch raises
`EditFileError` naming the file and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editing.io import atomic_path

FORMAT = "editing-edit/1"


class EditFileError(ValueError):
    """An edit file that cannot be used (not ours, damaged, or tampered with)."""


def _version() -> str:
    try:
        return version("editing")
    except PackageNotFoundError:
        return "unknown"


def pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able skeleton of `obj` whose tensors are moved into `tensors` (tuples are marked)."""
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().flatten().clone().reshape(obj.shape)  # standard strides
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__dict__": [[pack(k, tensors), pack(v, tensors)] for k, v in obj.items()]}
        return {k: pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in an edit file")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__dict__"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_edit_file(ckpt: dict, path: str | Path) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(ckpt, tensors)
    meta = {"format": FORMAT, "toolkit_version": _version(), "checksum": checksum(tensors),
            "checkpoint": json.dumps(skeleton)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_edit_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EditFileError(f"{path}: no such edit file")
    if path.stat().st_size == 0:
        raise EditFileError(f"{path}: the file is empty")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not safetensors (e.g. a pickle), or truncated
        head = path.read_bytes()[:2]
        kind = "a pickle, which edit files never are (it was not opened)" if head[:1] == b"\x80" or \
            head == b"PK" else f"not a complete safetensors file ({type(e).__name__}: {e})"
        raise EditFileError(f"{path}: not an edit file of this toolkit: {kind}") from None
    if meta.get("format") != FORMAT:
        raise EditFileError(f"{path}: not an edit file of this toolkit (format {meta.get('format')!r})")
    if checksum(tensors) != meta.get("checksum"):
        raise EditFileError(f"{path}: the tensors do not match the file's checksum (damaged or altered)")
    try:
        return unpack(json.loads(meta["checkpoint"]), tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise EditFileError(f"{path}: unreadable edit metadata ({e})") from None
