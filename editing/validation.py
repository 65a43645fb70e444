"""Runtime checks of choices declared as `typing.Literal`s: jsonargparse validates and lists them on
the command line; `check_choice` gives the same one-line error to Python callers."""
from __future__ import annotations

from typing import Any, get_args


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise ValueError unless `value` is one of `choices` (a Literal type or a tuple)."""
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
