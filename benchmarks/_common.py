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


def editor_from_config(method: str, stats_samples: int | None = None, autocast: str | None = None,
                       base_model: str | None = None, **overrides):
    """The editor of the shipped SmolLM2 config `configs/<method>.yaml` (its model part) and the
    config's edit batch size; closed-form editors take `stats_samples` and the target optimisation's
    `autocast`. `base_model` swaps the model (a smoke test: every layer setting becomes layer 1)."""
    import importlib
    from pathlib import Path

    import yaml

    from editing.editors.locate import LocateEditor

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{method}.yaml").read_text())
    spec = config["model"]
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = dict(spec.get("init_args", {}))
    if issubclass(cls, LocateEditor):
        kwargs.update(stats_samples=stats_samples, v_autocast=autocast)
    if base_model:
        kwargs["base_model"] = base_model
        for key in ("layers", "high_layers", "lora_layers"):
            if key in kwargs:
                kwargs[key] = [1] if key != "high_layers" else [2]
        for key in ("layer", "router_layer"):
            if key in kwargs:
                kwargs[key] = 1 if key == "layer" else 0
    kwargs.update(overrides)
    return cls(**kwargs), (config.get("data") or {}).get("edit_batch_size", 1)


def report(lines: list[str], out, payload: dict) -> str:
    """Print a result table's lines and, with `out`, save them with `payload` (`save_results`)."""
    text = "\n".join(lines)
    print(text)
    if out:
        save_results(out, text, payload)
    return text


def save_results(out, text: str, payload: dict) -> None:
    """<out>.md (the table, then the command that made it, as run from the repository root) and
    <out>.json (`payload`)."""
    import json
    import shlex
    import sys
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *map(shlex.quote, sys.argv[1:])])
    out.with_suffix(".md").write_text(f"{text}\n\n`{cmd}`\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
