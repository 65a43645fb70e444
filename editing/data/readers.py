"""Readers: benchmark files in the standard layouts -> `Benchmark`.

Layouts: COUNTERFACT / Multi-COUNTERFACT JSON, zsRE JSON, the toolkit's own JSONL, ParaRel raw (a
folder with `patterns/` and `tuples/`, built by `editing.data.pararel`), and Hugging Face datasets.
`load_benchmark` is the single entry point and detects the layout. Every record is validated; bad
input raises `DataError` naming the file, the record index and the field.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable

from editing.data.records import Benchmark, DataError, EditRequest

FORMATS = ("counterfact", "zsre", "jsonl", "pararel", "hf")
KINDS = ("counterfactual", "factual")
SHIPPED = Path(__file__).parent / "benchmarks"
_FIELDS = {f.name for f in fields(EditRequest)}


# --- per-record converters (shared by the file readers and the Hugging Face path) -----------------
def _get(rec: dict, key: str, ctx: dict, typ: type | tuple = str) -> Any:
    if not isinstance(rec, dict):
        raise DataError(f"a record must be an object, got {type(rec).__name__}", **ctx)
    if key not in rec:
        raise DataError("missing required field", field=key, **ctx)
    value = rec[key]
    if not isinstance(value, typ):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise DataError(f"expected {want}, got {type(value).__name__}", field=key, **ctx)
    return value


def _str_list(rec: dict, key: str, ctx: dict) -> list[str]:
    value = rec.get(key, [])
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError("expected a list of strings", field=key, **ctx)
    return [v for v in value if v.strip()]


def _target(value: Any, key: str, ctx: dict) -> str:
    if isinstance(value, dict):
        value = value.get("str")
    if not isinstance(value, str):
        raise DataError("expected a string (or an object with a 'str' field)", field=key, **ctx)
    return value.strip()


def counterfact_requests(rec: dict, ctx: dict) -> list[EditRequest]:
    """One record of the COUNTERFACT layout (Multi-COUNTERFACT: a list of rewrites) -> requests."""
    rewrites = _get(rec, "requested_rewrite", ctx, (dict, list))
    many = isinstance(rewrites, list)
    out = []
    for j, rw in enumerate(rewrites if many else [rewrites]):
        if not isinstance(rw, dict):
            raise DataError("a rewrite must be an object", field="requested_rewrite", **ctx)
        case_id = str(rec.get("case_id", ctx.get("record")))
        req = EditRequest(
            case_id=f"{case_id}:{j}" if many else case_id,
            prompt=_get(rw, "prompt", ctx), subject=_get(rw, "subject", ctx),
            target_new=_target(_get(rw, "target_new", ctx, (dict, str)), "target_new", ctx),
            target_true=_target(rw["target_true"], "target_true", ctx) if rw.get("target_true") else None,
            paraphrase_prompts=_str_list(rec, "paraphrase_prompts", ctx),
            neighborhood_prompts=_str_list(rec, "neighborhood_prompts", ctx),
            generation_prompts=_str_list(rec, "generation_prompts", ctx),
            relation_id=rw.get("relation_id"))
        out.append(_validate(req, ctx))
    return out


def zsre_requests(rec: dict, ctx: dict) -> list[EditRequest]:
    """One record of the zsRE layout: the prompt is a full question with the subject inside it."""
    src = _get(rec, "src", ctx)
    subject = _get(rec, "subject", ctx)
    start = src.find(subject)
    if start < 0:
        start = src.lower().find(subject.lower())
    if start < 0 or not subject.strip():
        raise DataError(f"the subject {subject!r} does not occur in the prompt {src!r}", field="subject", **ctx)
    prompt = src[:start] + "{}" + src[start + len(subject):]
    answers = rec.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError("expected a list of strings", field="answers", **ctx)
    loc, loc_ans = rec.get("loc"), rec.get("loc_ans")
    if loc is not None and not isinstance(loc, str):
        raise DataError("expected a string", field="loc", **ctx)
    if loc_ans is not None and not isinstance(loc_ans, str):
        raise DataError("expected a string", field="loc_ans", **ctx)
    req = EditRequest(
        case_id=str(rec.get("case_id", ctx.get("record"))), prompt=prompt, subject=src[start:start + len(subject)],
        target_new=_get(rec, "alt", ctx).strip(),
        target_true=answers[0].strip() if answers and answers[0].strip() else None,
        paraphrase_prompts=_str_list(rec, "rephrase", ctx),
        locality_prompt=loc if loc else None, locality_answer=loc_ans.strip() if loc and loc_ans else None)
    if loc and not (loc_ans and loc_ans.strip()):
        raise DataError("a locality prompt needs its answer", field="loc_ans", **ctx)
    return [_validate(req, ctx)]


def jsonl_requests(rec: dict, ctx: dict) -> list[EditRequest]:
    """One record of the toolkit's own layout (the fields of `EditRequest`)."""
    if not isinstance(rec, dict):
        raise DataError(f"a record must be an object, got {type(rec).__name__}", **ctx)
    unknown = sorted(set(rec) - _FIELDS)
    if unknown:
        raise DataError(f"unknown field (known: {', '.join(sorted(_FIELDS))})", field=unknown[0], **ctx)
    for key in ("case_id", "prompt", "subject", "target_new"):
        _get(rec, key, ctx, (str, int) if key == "case_id" else str)
    try:
        req = EditRequest.from_dict({**rec, "case_id": str(rec["case_id"])})
    except TypeError as e:
        raise DataError(str(e), **ctx) from e
    return [_validate(req, ctx)]


def _validate(req: EditRequest, ctx: dict) -> EditRequest:
    return req.validate(file=ctx.get("file"), record=ctx.get("record"))


CONVERTERS: dict[str, Callable[[dict, dict], list[EditRequest]]] = {
    "counterfact": counterfact_requests, "zsre": zsre_requests, "jsonl": jsonl_requests}
STYLE = {"counterfact": "counterfact", "zsre": "zsre"}


def _convert(rows: Iterable[Any], layout: str, file: str, offset: int = 0) -> list[EditRequest]:
    out = []
    for i, rec in enumerate(rows):
        out += CONVERTERS[layout](rec, {"file": file, "record": i + offset})
    return out


def _infer_style(requests: list[EditRequest]) -> str:
    cf = requests and all(r.target_true is not None and r.neighborhood_prompts for r in requests)
    return "counterfact" if cf else "zsre"


def _layout_of_record(rec: Any, file: str) -> str:
    if isinstance(rec, dict):
        if "requested_rewrite" in rec:
            return "counterfact"
        if "src" in rec and "alt" in rec:
            return "zsre"
        if "prompt" in rec and "target_new" in rec:
            return "jsonl"
    raise DataError("cannot tell the layout of the first record: expected COUNTERFACT ('requested_rewrite'), "
                    "zsRE ('src' and 'alt') or the toolkit's JSONL ('prompt', 'subject', 'target_new')",
                    file=file, record=0)


# --- files --------------------------------------------------------------------------------------
def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", file=str(path)) from e
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", file=str(path)) from e
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", file=str(path))
    return data


def read_counterfact(path: str | Path) -> Benchmark:
    path = Path(path)
    reqs = _convert(_read_json_list(path), "counterfact", str(path))
    return Benchmark(path.stem, "counterfact", reqs, str(path))


def read_zsre(path: str | Path) -> Benchmark:
    path = Path(path)
    reqs = _convert(_read_json_list(path), "zsre", str(path))
    return Benchmark(path.stem, "zsre", reqs, str(path))


def read_jsonl(path: str | Path) -> Benchmark:
    """The toolkit's own layout: an optional header line {"benchmark": {"name", "style"}}, then one
    EditRequest object per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", file=str(path)) from e
    header: dict = {}
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {n + 1} is not valid JSON ({e.msg})", file=str(path), record=len(rows)) from e
        if not rows and not header and isinstance(obj, dict) and set(obj) == {"benchmark"}:
            header = obj["benchmark"] if isinstance(obj["benchmark"], dict) else {}
            continue
        rows.append(obj)
    reqs = _convert(rows, "jsonl", str(path))
    style = header.get("style") or _infer_style(reqs)
    return Benchmark(header.get("name") or path.stem, style, reqs, str(path))


def write_jsonl(benchmark: Benchmark, path: str | Path) -> Path:
    """Write a benchmark in the toolkit's layout, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"benchmark": {"name": benchmark.name, "style": benchmark.style}}) + "\n")
            for r in benchmark.requests:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_hf(name_or_path: str, split: str = "train") -> Benchmark:
    """A Hugging Face dataset (hub name, or a folder saved with `save_to_disk`) in any known layout."""
    import datasets

    try:
        if Path(name_or_path).is_dir():
            ds = datasets.load_from_disk(name_or_path)
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"no split {split!r} (has: {', '.join(ds)})", file=name_or_path)
            ds = ds[split]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not load this dataset ({type(e).__name__}: {e}); dataset names on the hub "
                        "need network access, a local file or folder does not", file=name_or_path) from e
    rows = list(ds)
    if not rows:
        raise DataError("the dataset is empty", file=name_or_path)
    layout = _layout_of_record(rows[0], name_or_path)
    reqs = _convert(rows, layout, name_or_path)
    style = STYLE.get(layout) or _infer_style(reqs)
    return Benchmark(Path(name_or_path).name or name_or_path, style, reqs, name_or_path)


# --- the entry point ----------------------------------------------------------------------------
def load_benchmark(path: str | None = None, format: str | None = None, kind: str = "counterfactual",
                   split: str = "train", seed: int = 0) -> Benchmark:
    """Read a benchmark. `path=None`: the shipped ParaRel benchmark of `kind`. `format` forces a
    layout (counterfact, zsre, jsonl, pararel, hf); otherwise it is detected."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if path is None:
        return read_jsonl(SHIPPED / f"pararel_{kind}.jsonl")
    p = Path(path)
    if format is None:
        if p.is_dir() and (p / "patterns").is_dir() and (p / "tuples").is_dir():
            format = "pararel"
        elif p.is_file() and p.suffix == ".jsonl":
            format = "jsonl"
        elif p.is_file():
            format = _layout_of_record((_read_json_list(p) or [None])[0], str(p))
        else:
            format = "hf"
    if format == "pararel":
        from editing.data.pararel import build_pararel
        return build_pararel(p, kind=kind, seed=seed)
    if format == "hf":
        return read_hf(str(path), split=split)
    if format == "jsonl" and p.suffix == ".json":
        reqs = _convert(_read_json_list(p), "jsonl", str(p))
        return Benchmark(p.stem, _infer_style(reqs), reqs, str(p))
    return {"counterfact": read_counterfact, "zsre": read_zsre, "jsonl": read_jsonl}[format](p)
