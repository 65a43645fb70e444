"""Tables and plots from `results.json` files.

    python -m editing.report runs/ft/lightning_logs/version_0 runs/noedit/... --out report.md --plot report.png
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

HEADLINE = ("reliability", "generality", "locality", "score")
FIXED = ("method", "model", "data", "num_edits", "edit_batch_size")


def load_results(paths) -> list[dict]:
    """Results from files, run directories (holding results.json, searched recursively) or globs."""
    out = []
    for spec in [paths] if isinstance(paths, (str, Path)) else paths:
        matches = sorted(glob.glob(str(spec))) or [str(spec)]
        for m in matches:
            p = Path(m)
            files = [p] if p.is_file() else sorted(p.rglob("results.json")) if p.is_dir() else []
            if not files:
                raise SystemExit(f"no results.json at {m}")
            for f in files:
                try:
                    res = json.loads(f.read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise SystemExit(f"{f}: not a readable results file ({e})")
                if not isinstance(res, dict) or not isinstance(res.get("metrics"), dict):
                    raise SystemExit(f"{f}: not a results file (no 'metrics' object)")
                res.setdefault("_path", str(f))
                out.append(res)
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def markdown_table(results: list[dict], columns: list[str] | None = None) -> str:
    """One row per result: identity, the headline metrics, other metrics, then edit/eval seconds."""
    if columns is None:
        extra = sorted({k for r in results for k in r["metrics"]} - set(HEADLINE) - {"score_mean"})
        columns = list(HEADLINE) + extra
    header = list(FIXED) + columns + ["edit_s", "eval_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        timing = r.get("timing") or {}
        row = [_fmt(r.get(k)) for k in FIXED] + [_fmt(r["metrics"].get(c)) for c in columns]
        row += [_fmt(timing.get("edit")), _fmt(timing.get("evaluate"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def bar_chart(results: list[dict], path: str | Path, metrics=HEADLINE) -> Path:
    """Grouped bars: one group per metric, one bar per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {r.get("num_edits") for r in results}
    labels = [f"{r.get('method')}" + (f" ({r.get('num_edits')})" if len(counts) > 1 else "") for r in results]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.6))
    for i, (r, label) in enumerate(zip(results, labels)):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, [r["metrics"].get(m, 0.0) for m in metrics], width, label=label)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.set_title(", ".join(sorted({str(r.get('model')) for r in results})), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Merge results.json files into a table and a bar chart.")
    ap.add_argument("paths", nargs="+", help="results.json files, run directories or globs")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--plot", help="write a bar chart PNG here")
    ap.add_argument("--columns", help="comma-separated metric columns (default: all)")
    args = ap.parse_args(argv)
    results = load_results(args.paths)
    table = markdown_table(results, args.columns.split(",") if args.columns else None)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.plot:
        bar_chart(results, args.plot)


if __name__ == "__main__":
    main()
