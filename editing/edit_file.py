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


# --- edit directories (PEFT-style: the edit alone, applied to the base model later) ----------------
WEIGHTS_NAME = "edit.safetensors"
CONFIG_NAME = "edit_config.json"


def editor_classes(root: type) -> dict[str, type]:
    """The subclasses of `root` (the Editor: importing it runs the `editing.editors` package, which
    defines every editor) by class path (`module.QualName`). An edit directory names one of these;
    nothing is ever imported because a file says so."""
    found, stack = {}, [root]
    while stack:
        for sub in stack.pop().__subclasses__():
            found[f"{sub.__module__}.{sub.__qualname__}"] = sub
            stack.append(sub)
    return found


def save_pretrained(editor, directory: str | Path) -> Path:
    """Write `directory/edit.safetensors` (the safe edit file) and `directory/edit_config.json` (which
    editor, its hyperparameters, the base model it was made on)."""
    from editing.io import write_json_atomic
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_edit_file(editor.edit_checkpoint(), directory / WEIGHTS_NAME)
    ident = editor.base_identity
    config = {"format": FORMAT, "toolkit_version": _version(), "method": editor.method,
              "class_path": f"{type(editor).__module__}.{type(editor).__qualname__}",
              "hyper_parameters": dict(editor.hparams),
              "base_model": {k: ident.get(k) for k in ("name", "model_type", "num_parameters", "digest")},
              "edits": sum(len(e["cases"]) for e in editor.edit_log)}
    write_json_atomic(config, directory / CONFIG_NAME)
    return directory


def from_pretrained(directory: str | Path, root: type, base_model: str | None = None, **overrides):
    """The editor (a subclass of `root`) of an edit directory with its edit applied, on `base_model`
    (default: the one the edit was made on); another base model than the edit's is refused. `overrides` replace hyperparameters
    that do not shape the edit (e.g. forward_batch_size)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise EditFileError(f"{directory}: not an edit directory (no {CONFIG_NAME}; write one with save_pretrained)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        class_path, hparams = config["class_path"], dict(config["hyper_parameters"])
    except (ValueError, KeyError, TypeError) as e:
        raise EditFileError(f"{path}: unreadable edit config ({type(e).__name__}: {e})") from None
    cls = editor_classes(root).get(class_path)
    if cls is None:
        raise EditFileError(f"{path}: class_path {class_path!r} is not an editor of this toolkit")
    if base_model is not None:
        hparams["base_model"] = base_model
    editor = cls(**{**hparams, **overrides})
    editor.load_edit(directory / WEIGHTS_NAME)
    return editor
