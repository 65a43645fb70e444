"""Shared pieces of the benchmark scripts (run as `python benchmarks/<script>.py` from the repo root,
so this module is importable as `_common`)."""
from __future__ import annotations

import argparse


def sequence_parser(n: int = 200, batch: int = 10, description: str | None = None) -> argparse.ArgumentParser:
    """The arguments of a sequential-editing study: --n edits in steps of --batch requests."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--n", type=int, default=n, help="edits in all")
    ap.add_argument("--batch", type=int, default=batch, help="requests per edit step")
    return ap
