"""Readers: benchmark files in the standard layouts -> `Benchmark`.

Layouts: COUNTERFACT / Multi-COUNTERFACT JSON, zsRE JSON, the toolkit's own JSONL, ParaRel raw (a
folder with `patterns/` and `tuples/`, built by `editing.data.pararel`) and Hugging Face datasets,
whose rows go through the same per-record converters as the files. `load_benchmark` is the single
entry point and detects the layout. Every request is validated; bad input raises `DataError` naming
the file, the record index and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, get_args

from editing.data.jsonio import is_header, read_json_lines, read_json_list, write_jsonl
from editing.data.records import STYLES, Benchmark, DataError, EditRequest, Kind, Style

__all__ = ["load_benchmark", "read_counterfact", "read_zsre", "read_jsonl", "read_json", "read_hf", "read_json_lines",
           "read_json_list", "write_jsonl", "detect_format", "convert", "FORMATS"]

Format = Literal["counterfact", "zsre", "jsonl", "pararel", "hf"]
FORMATS: tuple[str, ...] = get_args(Format)
KINDS: tuple[str, ...] = get_args(Kind)
SHIPPED_DIR = Path(__file__).parent / "benchmarks"

_FIELDS = {f.name for f in fields(EditRequest)}
_REQUIRED = ("case_id", "prompt", "subject", "target_new")
_OPTIONAL_STR = ("target_true", "locality_prompt", "locality_answer", "relation_id")
_LISTS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")
_PORTABILITY = ("portability_prompts", "portability_answers")
_LAYOUT_HINT = ("expected COUNTERFACT (a 'requested_rewrite' field), zsRE ('src' and 'alt') or the toolkit's "
                "own layout ('prompt', 'subject', 'target_new')")


@dataclass(frozen=True)
class Where:
    """The file and record being read, for error messages."""

    file: str
    record: int | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, record=self.record, field=field)


# --- field helpers --------------------------------------------------------------------------------
def _type_name(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _require(rec: dict, key: str, at: Where, types: type | tuple[type, ...] = str) -> Any:
    """`rec[key]`, which must exist and have one of `types`."""
    if key not in rec:
        raise at.error("missing required field", key)
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise at.error(f"expected {_type_name(types)}, got {type(value).__name__}", key)
    return value


def _optional_str(rec: dict, key: str, at: Where) -> str | None:
    value = rec.get(key)
    if value is not None and not isinstance(value, str):
        raise at.error(f"expected a string, got {type(value).__name__}", key)
    return value


def _str_list(rec: dict, key: str, at: Where) -> list[str]:
    """A list of strings (a single string counts as a list of one; missing or null as empty)."""
    value = rec.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise at.error("expected a list of strings", key)
    return [v for v in value if v.strip()]


def _target(rec: dict, key: str, at: Where, required: bool) -> str | None:
    """A COUNTERFACT target: {"str": ...} or a plain string, stripped of its leading space."""
    value = rec.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise at.error("missing required field", key)
    if isinstance(value, dict):
        value = value.get("str")
    if not isinstance(value, str):
        raise at.error("expected a string or an object with a 'str' string", key)
    return value.strip()


def _first_answer(value, at: Where) -> str:
    """An answer: a string, or the first string of a (nested) list of aliases, as EasyEdit stores them."""
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise at.error("expected an answer string (or a list of aliases)", "portability")
    return value.strip()


def _portability(rec: dict, at: Where) -> dict[str, list[str]]:
    """EasyEdit-style `portability` entries -> portability_prompts / portability_answers. Accepted: the
    zsRE portability files' {"New Question": q, "New Answer": a}; KnowEdit's {category: [{"prompt": q,
    "ground_truth": a}, ...], ...}; or a list of {"prompt": q, "ground_truth" | "answer": a}."""
    value = rec.get("portability")
    if value is None:
        return {}
    if isinstance(value, dict) and "New Question" in value:
        items = [{"prompt": value["New Question"], "answer": value.get("New Answer")}]
    elif isinstance(value, dict):
        items = []
        for category, entries in value.items():
            if not isinstance(entries, list):
                raise at.error(f"portability category {category!r} must be a list of prompts", "portability")
            items += entries
    elif isinstance(value, list):
        items = value
    else:
        raise at.error(f"expected an object or a list, got {type(value).__name__}", "portability")
    prompts, answers = [], []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise at.error("each portability entry needs a 'prompt' string", "portability")
        prompts.append(item["prompt"].strip())
        answers.append(_first_answer(item.get("ground_truth", item.get("answer")), at))
    return {"portability_prompts": prompts, "portability_answers": answers}


def _case_id(rec: dict, at: Where) -> str:
    value = rec.get("case_id")
    return str(at.record if value is None else value)


# --- per-record converters (shared by the JSON files and the Hugging Face rows) -------------------
def counterfact_requests(rec: dict, at: Where) -> list[EditRequest]:
    """One COUNTERFACT record; Multi-COUNTERFACT's list of rewrites gives one request each."""
    rewrites = _require(rec, "requested_rewrite", at, (dict, list))
    many = isinstance(rewrites, list)
    case_id = _case_id(rec, at)
    shared = {key: _str_list(rec, key, at) for key in _LISTS}
    out = []
    for j, rw in enumerate(rewrites if many else [rewrites]):
        if not isinstance(rw, dict):
            raise at.error(f"rewrite {j} must be an object, got {type(rw).__name__}", "requested_rewrite")
        req = EditRequest(
            case_id=f"{case_id}:{j}" if many else case_id,
            prompt=_require(rw, "prompt", at), subject=_require(rw, "subject", at),
            target_new=_target(rw, "target_new", at, required=True),
            target_true=_target(rw, "target_true", at, required=False),
            relation_id=_optional_str(rw, "relation_id", at), **shared, **_portability(rec, at))
        out.append(req.validate(file=at.file, record=at.record))
    return out


def zsre_requests(rec: dict, at: Where) -> list[EditRequest]:
    """One zsRE record: `src` is the full question, the subject is located inside it."""
    src, subject = _require(rec, "src", at), _require(rec, "subject", at)
    start = src.find(subject) if subject.strip() else -1
    if start < 0 and subject.strip():
        start = src.lower().find(subject.lower())
    if start < 0:
        raise at.error(f"the subject {subject!r} is empty or does not occur in the prompt {src!r}", "subject")
    answers = _str_list(rec, "answers", at)
    loc, loc_ans = _optional_str(rec, "loc", at) or None, _optional_str(rec, "loc_ans", at)
    if loc is not None and not (loc_ans and loc_ans.strip()):
        raise at.error("a locality prompt ('loc') needs its answer", "loc_ans")
    req = EditRequest(
        case_id=_case_id(rec, at), prompt=src[:start] + "{}" + src[start + len(subject):],
        subject=src[start:start + len(subject)], target_new=_require(rec, "alt", at).strip(),
        target_true=answers[0].strip() if answers else None,
        paraphrase_prompts=_str_list(rec, "rephrase", at),
        locality_prompt=loc, locality_answer=loc_ans.strip() if loc is not None else None, **_portability(rec, at))
    return [req.validate(file=at.file, record=at.record)]


def jsonl_requests(rec: dict, at: Where) -> list[EditRequest]:
    """One record of the toolkit's own layout: the fields of `EditRequest`."""
    unknown = sorted(set(rec) - _FIELDS)
    if unknown:
        raise at.error(f"unknown field (known: {', '.join(sorted(_FIELDS))})", unknown[0])
    values = {key: _require(rec, key, at) for key in _REQUIRED if key != "case_id"}
    values["case_id"] = str(_require(rec, "case_id", at, (str, int)))
    values.update({key: _optional_str(rec, key, at) for key in _OPTIONAL_STR})
    # Lists pass through unchanged (null = empty) so that `validate` reports a wrong type.
    values.update({key: [] if rec.get(key) is None else rec[key] for key in _LISTS + _PORTABILITY})
    return [EditRequest(**values).validate(file=at.file, record=at.record)]


CONVERTERS: dict[str, Callable[[dict, Where], list[EditRequest]]] = {
    "counterfact": counterfact_requests, "zsre": zsre_requests, "jsonl": jsonl_requests}


def convert(rows: list[Any], layout: str, file: str) -> list[EditRequest]:
    """Every row of one layout -> validated requests."""
    out: list[EditRequest] = []
    for i, rec in enumerate(rows):
        at = Where(file, i)
        if not isinstance(rec, dict):
            raise at.error(f"a record must be an object, got {type(rec).__name__}")
        out += CONVERTERS[layout](rec, at)
    return out


def layout_of(rec: Any, file: str) -> str:
    """The layout a record follows, from its fields."""
    if isinstance(rec, dict):
        if "requested_rewrite" in rec:
            return "counterfact"
        if "src" in rec and "alt" in rec:
            return "zsre"
        if {"prompt", "subject", "target_new"} <= set(rec):
            return "jsonl"
    raise DataError(f"cannot tell the layout of the first record: {_LAYOUT_HINT}", file=file, record=0)


def _benchmark(name: str, layout: str, requests: list[EditRequest], source: str) -> Benchmark:
    style = layout if layout in STYLES else infer_style(requests)
    return Benchmark(name, style, requests, source)


def infer_style(requests: list[EditRequest]) -> Style:
    """"counterfact" when every request has a true target and neighbourhood prompts, else "zsre"."""
    cf = bool(requests) and all(r.target_true is not None and r.neighborhood_prompts for r in requests)
    return "counterfact" if cf else "zsre"


def read_json(path: str | Path, layout: str | None = None) -> Benchmark:
    """A JSON list of records in `layout` (None: detected from the first record)."""
    path = Path(path)
    rows = read_json_list(path)
    layout = layout or (layout_of(rows[0], str(path)) if rows else "jsonl")
    return _benchmark(path.stem, layout, convert(rows, layout, str(path)), str(path))


def read_counterfact(path: str | Path) -> Benchmark:
    """A COUNTERFACT or Multi-COUNTERFACT JSON file."""
    return read_json(path, "counterfact")


def read_zsre(path: str | Path) -> Benchmark:
    """A zsRE JSON file (MEND / ROME / MEMIT / EasyEdit layout)."""
    return read_json(path, "zsre")


def read_jsonl(path: str | Path) -> Benchmark:
    """The toolkit's own layout: an optional header {"benchmark": {"name", "style"}}, then one
    `EditRequest.to_dict()` per line. Without a header the style is inferred."""
    path = Path(path)
    rows = read_json_lines(path)
    header: dict[str, Any] = {}
    if rows and is_header(rows[0]):
        header = rows.pop(0)["benchmark"]
        at = Where(str(path))
        if not isinstance(header, dict):
            raise at.error("the header must be an object", "benchmark")
        if header.get("style") is not None and header["style"] not in STYLES:
            raise at.error(f"unknown style {header['style']!r}; expected one of {', '.join(STYLES)}", "style")
        if header.get("name") is not None and not isinstance(header["name"], str):
            raise at.error("expected a string", "name")
    requests = convert(rows, "jsonl", str(path))
    style = header.get("style") or infer_style(requests)
    return Benchmark(header.get("name") or path.stem, style, requests, str(path))


# --- Hugging Face datasets --------------------------------------------------------------------------
def read_hf(name_or_path: str, split: str = "train") -> Benchmark:
    """A Hugging Face dataset: a folder saved with `save_to_disk`, or a hub name (needs network)."""
    import datasets

    try:
        if Path(name_or_path).is_dir():
            ds = datasets.load_from_disk(name_or_path)
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
    except Exception as e:
        raise DataError(f"could not load this dataset ({type(e).__name__}: {e}); dataset names on the "
                        "Hugging Face hub need network access, local files and folders do not",
                        file=name_or_path) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split {split!r} (has: {', '.join(ds)})", file=name_or_path)
        ds = ds[split]
    rows = list(ds)
    if not rows:
        raise DataError("the dataset is empty", file=name_or_path)
    layout = layout_of(rows[0], name_or_path)
    name = Path(name_or_path).name or name_or_path
    return _benchmark(name, layout, convert(rows, layout, name_or_path), name_or_path)


# --- the entry point --------------------------------------------------------------------------------
def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".json", ".jsonl")


def detect_format(path: str | Path) -> str:
    """The format of `path`: pararel, jsonl, json (layout read from its first record) or hf."""
    p = Path(path)
    if p.is_dir():
        if (p / "patterns").is_dir() and (p / "tuples").is_dir():
            return "pararel"
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        raise DataError("a folder is read as raw ParaRel (it needs patterns/ and tuples/ subfolders) or as a "
                        "Hugging Face dataset saved with save_to_disk (dataset_info.json and state.json, or "
                        "dataset_dict.json); this one is neither", file=str(p))
    if p.is_file():
        if p.suffix == ".jsonl":
            return "jsonl"
        if p.suffix == ".json":
            return "json"
        raise DataError(f"unknown file type {p.suffix!r}: expected .json or .jsonl, or pass format= "
                        f"(one of {', '.join(FORMATS)})", file=str(p))
    if _looks_local(str(path)):
        raise DataError("no such file or folder", file=str(path))
    return "hf"


def load_benchmark(path: str | Path | None = None, format: Format | None = None, kind: Kind = "counterfactual",
                   split: str = "train", seed: int = 0) -> Benchmark:
    """Read a benchmark.

    path: a benchmark file, a ParaRel folder, a `save_to_disk` folder or a hub dataset name; None =
        the shipped ParaRel benchmark of `kind` (built with seed 0).
    format: force a layout (counterfact, zsre, jsonl, pararel, hf) instead of detecting it.
    kind: "counterfactual" (COUNTERFACT-style) or "factual" (iReVa-style), for ParaRel.
    split: the split of a Hugging Face dataset. seed: the ParaRel builder's seed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if path is None:
        return read_jsonl(SHIPPED_DIR / f"pararel_{kind}.jsonl")
    path = Path(path).expanduser() if str(path).startswith("~") else path
    fmt = format or detect_format(path)
    if fmt == "pararel":
        from editing.data.pararel import build_pararel
        return build_pararel(path, kind=kind, seed=seed)
    if fmt == "hf":
        return read_hf(str(path), split=split)
    if fmt == "jsonl" and Path(path).suffix != ".json":
        return read_jsonl(path)
    return read_json(path, None if fmt == "json" else fmt)
