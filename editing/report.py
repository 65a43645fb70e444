"""Tables and plots from `results.json` files.

    python -m editing.report runs/ft runs/noedit/lightning_logs/version_0 'runs/*/lightning_logs/*' \\
        --out report.md --plot report.png [--columns rewrite_acc,locality_acc] [--cases 10]

A path may be a results.json file, a run directory (searched recursively for results.json) or a glob.
Runs of the same method are told apart by the settings that differ between them, else by their run
folder. The markdown file holds the metric definitions under the table. `summary_table` is the compact
table the CLI prints after an evaluation: the headline metrics as rows, the edited model beside the
unedited one on the same cases, with a one-line reading of each. `--cases N` prints each run's N worst
cases (lowest mean headline score) from the cases.jsonl beside its results.json.

This module imports neither torch nor the metrics, so the command starts quickly.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from editing.definitions import DEFINITIONS, HEADLINE_FALLBACKS, HEADLINES, SHORT, SUMMARY_KEYS

HEADLINE: tuple[str, ...] = ("reliability", "generality", "locality", "score")
FIXED: tuple[str, ...] = ("method", "model", "data", "num_edits", "edit_batch_size")
TIMING: tuple[tuple[str, str], ...] = (("edit_s", "edit"), ("eval_s", "evaluate"))
# Report order of the other metric keys (editing.metrics); unknown keys follow alphabetically.
_KINDS = ("rewrite", "paraphrase", "neighborhood", "locality", "portability")
# the generation-based headline right after the teacher-forced one, so tables show them side by side
ORDER: tuple[str, ...] = ("gen_reliability", "gen_generality", "gen_locality", "gen_score", "ppl_ratio", "score_mean") \
    + tuple(f"{k}_{s}" for s in ("acc", "win", "unchanged", "gen") for k in _KINDS) + ("fluency",)
MISSING = "–"


def _files_at(spec: str) -> list[Path]:
    matches = [spec] if Path(spec).exists() else sorted(glob.glob(spec))
    files: list[Path] = []
    for m in matches:
        p = Path(m)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("results.json"))
    return files


def _read(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: not a readable results file ({e})")
    if not isinstance(res, dict):
        raise SystemExit(f"error: {path}: not a results file (expected a JSON object, got {type(res).__name__})")
    if not isinstance(res.get("metrics"), dict):
        raise SystemExit(f"error: {path}: not a results file (no 'metrics' object)")
    bad = [k for k, v in res["metrics"].items() if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
    if bad:
        raise SystemExit(f"error: {path}: non-numeric metric value(s) for {bad}")
    if res.get("timing") is not None and not isinstance(res["timing"], dict):
        raise SystemExit(f"error: {path}: 'timing' must be an object of seconds")
    return res


def load_results(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """Results from results.json files, run directories (searched recursively) or globs, in the order
    given (each file once). Each result gets ``_path``, the file it came from. Raises SystemExit naming
    the path when there is no results.json, or the file when it is not valid results JSON. Of several
    paths, an existing run folder without results.json (a `predict` or `export` run, which
    `runs/*/lightning_logs/version_*/` also matches) is skipped with a note."""
    specs = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found = {str(spec): _files_at(str(spec)) for spec in specs}
    for spec, files in found.items():
        if not files and (len(specs) == 1 or not Path(spec).is_dir() or not any(found.values())):
            raise SystemExit(f"error: no results.json at {spec}")
    out, seen = [], set()
    for spec, files in found.items():
        if not files:
            print(f"skipped {spec}: no results.json (a run that did not evaluate)", file=sys.stderr)
        for f in files:
            key = f.resolve()
            if key in seen:
                continue
            seen.add(key)
            res = _read(f)
            res.setdefault("_path", str(f))
            out.append(res)
    return out


RATIOS = frozenset({"ppl_ratio"})  # ratios near 1: three decimals


def _number(v, key: str | None = None) -> str:
    """A number with 1 decimal (3 for a ratio key); None, NaN and infinities are missing."""
    if v is None:
        return MISSING
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _cell(v)
    return (f"{v:.3f}" if key in RATIOS else f"{v:.1f}") if math.isfinite(v) else MISSING


def _cell(v) -> str:
    if v is None or isinstance(v, float):
        return _number(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def default_columns(results: Sequence[dict]) -> list[str]:
    """The headline metrics, then every other metric present, in report order."""
    present = {k for r in results for k in r.get("metrics", {})} - set(HEADLINE)
    known = [k for k in ORDER if k in present]
    return list(HEADLINE) + known + sorted(present - set(known))


def _editor_settings(result: dict) -> dict:
    config = result.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, dict) else {}


def _run_labels(results: Sequence[dict]) -> list[str]:
    """The shortest trailing part of each result's run folder that tells the results apart."""
    dirs = [Path(r.get("_path", "")).parent.parts for r in results]
    for n in range(1, max((len(d) for d in dirs), default=0) + 1):
        labels = ["/".join(d[-n:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    return ["/".join(d) for d in dirs]


# Settings of how a run was evaluated, not of its edit: never what tells two editors apart.
EVALUATION_SETTINGS = frozenset({"eval_unedited", "forward_batch_size", "results_name", "fluency",
                                 "fluency_tokens", "predict_tokens", "gen_eval", "gen_extra_tokens", "drift",
                                 "drift_texts", "drift_samples"})


def method_names(results: Sequence[dict]) -> list[str]:
    """The method of each result; where several results share a method, the editor settings (the
    saved config's model section) that differ between them are appended, e.g. "memit [layers=[6, 7]]",
    and where that and the table's other columns still leave two alike, the run folder, e.g.
    "ft (version_1)"."""
    names = []
    for r in results:
        name = str(r.get("method"))
        same = [o for o in results if str(o.get("method")) == name]
        if len(same) > 1:
            configs = [_editor_settings(o) for o in same]
            mine = _editor_settings(r)
            keys = sorted({k for c in configs for k in c if not k.startswith("_") and k not in EVALUATION_SETTINGS})
            diff = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
            if diff:
                name += " [" + ", ".join(f"{k}={mine.get(k)}" for k in diff) + "]"
        names.append(name)
    keys = [(n, *(str(r.get(k)) for k in FIXED[1:])) for n, r in zip(names, results)]
    alike = [i for i, k in enumerate(keys) if keys.count(k) > 1]  # nothing in the table tells them apart
    if alike:
        runs = _run_labels([results[i] for i in alike])
        for i, run in zip(alike, runs):
            names[i] += f" ({run})"
    return names


def definitions_block(results: Sequence[dict], columns: Sequence[str]) -> str:
    """The definition of every column, as the results files give them (a headline key's definition
    depends on the data's style: each one is listed with the data it belongs to)."""
    lines = ["Definitions (all percentages of cases, except fluency):", ""]
    for c in columns:
        seen: dict[str, list[str]] = {}
        for r in results:
            d = (r.get("definitions") or {}).get(c) or DEFINITIONS.get(c)
            if d:
                seen.setdefault(d, []).append(str(r.get("data")))
        if len(seen) == 1:
            lines.append(f"- `{c}`: {next(iter(seen))}")
        for d, data in (seen.items() if len(seen) > 1 else ()):
            lines.append(f"- `{c}` ({', '.join(sorted(set(data)))}): {d}")
    return "\n".join(lines)


def _fmt_seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return "?"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def side_by_side(edited: dict, unedited: dict | None = None, style: str = "counterfact",
                 keys: list[str] | None = None, definitions: dict | None = None, verbose: bool = False) -> str:
    """A markdown table of metrics, one row per metric (`keys`; default the headline metrics): the
    edited value beside the unedited model's on the same cases, and a one-line reading for `style`
    (the long definition with `verbose`). The Python API's before/after:
    `print(side_by_side(editor.evaluate(cases), unedited_metrics))`."""
    defs, short = definitions or {}, SHORT.get(style, {})
    keys = keys if keys is not None else [k for k in SUMMARY_KEYS if k in edited]
    rows = [[k, _number(edited.get(k), k), _number(unedited.get(k), k) if unedited else MISSING,
             (defs.get(k) or DEFINITIONS.get(k, "")) if verbose else short.get(k) or DEFINITIONS.get(k, "")]
            for k in keys]
    header = ["metric", "edited", "unedited", "what it measures (% of cases)"]
    width = [max(len(x) for x in col) for col in zip(header, *rows)]
    right = (False, True, True, False)

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, width, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(width, right)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def summary_table(result: dict, verbose: bool = False) -> str:
    """The compact table of one results document: one row per headline metric (every metric with
    `verbose`), the edited value beside the unedited model's on the same cases, and what it means."""
    metrics = result.get("metrics") or {}
    keys = default_columns([result]) if verbose else None
    table = side_by_side(metrics, result.get("unedited"), result.get("style") or "counterfact", keys,
                         result.get("definitions"), verbose)
    timing = result.get("timing") or {}
    steps = result.get("edit_batch_size")
    steps = "sequentially" if steps == 1 else ("in one step" if steps == -1 else f"in steps of {steps}")
    title = (f"{result.get('method')} · {result.get('num_edits')} edits {steps} · {result.get('data')} · "
             f"{result.get('model')} · edit {_fmt_seconds(timing.get('edit'))}, "
             f"evaluation {_fmt_seconds(timing.get('evaluate'))}")
    out = [title, "", table]
    if not verbose:
        out.append("(every metric: --verbose_metrics true, or results.json)")
    return "\n".join(out)


def markdown_table(results: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """One row per result: method (with the settings that tell same-method runs apart, see
    `method_names`), model, data, num_edits, edit_batch_size, the metric columns
    (default: `default_columns`), then edit and evaluation seconds. Numbers with 1 decimal; missing "–"."""
    columns = default_columns(results) if columns is None else list(columns)
    header = list(FIXED) + columns + [name for name, _ in TIMING]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, name in zip(results, method_names(results)):
        timing = r.get("timing") or {}
        metrics = r.get("metrics") or {}
        row = [_cell(name)] + [_cell(r.get(k)) for k in FIXED[1:]]
        row += [_number(metrics.get(c), c) for c in columns]
        row += [_number(timing.get(key)) for _, key in TIMING]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _labels(results: Sequence[dict]) -> list[str]:
    """Method, plus num_edits where they differ (and model / data where still needed to tell bars apart)."""
    def differs(key):
        return len({str(r.get(key)) for r in results}) > 1

    extra = [k for k in ("num_edits",) if differs(k)]
    labels = [" ".join([name] + [f"({r.get(k)})" for k in extra]) for r, name in zip(results, method_names(results))]
    if len(set(labels)) < len(labels):
        more = [k for k in ("model", "data", "edit_batch_size") if differs(k)]
        labels = [lab + "".join(f" [{r.get(k)}]" for k in more) for lab, r in zip(labels, results)]
    return labels


def bar_chart(results: Sequence[dict], path: str | Path, metrics: Sequence[str] = HEADLINE) -> Path:
    """Grouped bar chart PNG: one group per metric, one bar per result (a missing value draws no bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("bar_chart: no results")
    metrics = list(metrics)
    labels = _labels(results)
    width = 0.8 / len(results)
    fig = Figure(figsize=(2.0 + 1.2 * len(metrics) + 0.25 * len(results) * len(metrics), 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = 0.0
    for i, (r, label) in enumerate(zip(results, labels)):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(metrics))]
        ys = [r.get("metrics", {}).get(m) for m in metrics]
        ys = [float("nan") if v is None else float(v) for v in ys]
        top = max([top] + [v for v in ys if not math.isnan(v)])
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 110 if top <= 100 else top * 1.1)  # room for the value labels
    ax.set_ylabel("%" if top <= 100 else "value")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    models = sorted({str(r.get("model")) for r in results})
    data = sorted({str(r.get("data")) for r in results})
    ax.set_title(", ".join(models) + " — " + ", ".join(data), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def cases_file(result: dict) -> Path:
    """The cases.jsonl written beside a results file (`editing.evaluation.cases_path`)."""
    path = Path(result.get("_path", "results.json"))
    return path.with_name("cases.jsonl" if path.name == "results.json" else f"{path.stem}.cases.jsonl")


def worst_cases(result: dict, n: int = 10) -> str:
    """A markdown table of the `n` cases of one run with the lowest mean headline score (teacher-forced
    and generated, each per case as the metrics average it), with the edit prompt's continuation."""
    path = cases_file(result)
    if not path.exists():
        raise SystemExit(f"error: no {path.name} beside {result.get('_path')} (a run from before per-case results)")
    style = result.get("style") or "counterfact"
    heads = {**HEADLINES.get(style, {})}
    fallbacks = HEADLINE_FALLBACKS.get(style, {})
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            case = json.loads(line)
            scores = case["scores"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {path}: line {line_no} is not a case record ({e})")
        values = {}
        for head, metric in heads.items():
            for candidate in (metric, *fallbacks.get(head, ())):
                if candidate in scores:
                    values[head] = scores[candidate]
                    break
        rewrite = next((p for p in case.get("prompts", []) if p.get("kind") == "rewrite"), {})
        mean = sum(values.values()) / len(values) if values else math.nan
        rows.append((mean, case, values, rewrite.get("generated")))
    rows.sort(key=lambda r: (math.isnan(r[0]), r[0]))
    cols = [h for h in heads if any(h in v for _, _, v, _ in rows)]
    lines = [f"Worst {min(n, len(rows))} of {len(rows)} cases of {result.get('method')} ({path}):", "",
             "| case | subject | target_new | " + " | ".join(cols) + " | continuation of the edit prompt |",
             "|---" * (len(cols) + 4) + "|"]
    for mean, case, values, generated in rows[:n]:
        cont = MISSING if generated is None else _cell(generated.strip()[:40])
        lines.append(f"| {_cell(case.get('case_id'))} | {_cell(case.get('subject'))} | {_cell(case.get('target_new'))} | "
                     + " | ".join(_number(values.get(c)) for c in cols) + f" | {cont} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m editing.report",
                                 description="Merge results.json files into a markdown table and a bar chart.")
    ap.add_argument("paths", nargs="+", help="results.json files, run directories or globs")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--plot", help="write a bar chart PNG here")
    ap.add_argument("--columns", help="comma-separated metric columns (default: headline, then all others)")
    ap.add_argument("--cases", type=int, metavar="N", help="also print each run's N worst cases (from cases.jsonl)")
    args = ap.parse_args(argv)
    results = load_results(args.paths)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    table = markdown_table(results, columns)
    print(table)
    if args.out:
        shown = columns or default_columns(results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n\n" + definitions_block(results, shown) + "\n")
    if args.plot:
        bar_chart(results, args.plot)
    for r in results if args.cases else ():
        print("\n" + worst_cases(r, args.cases))


if __name__ == "__main__":
    main()
