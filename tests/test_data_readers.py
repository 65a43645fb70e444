"""Readers on the real format samples, on broken input (errors name file, record and field), the
toolkit's JSONL round trip, format detection and Hugging Face datasets saved to disk."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from editing.data import (Benchmark, DataError, EditRequest, load_benchmark, read_counterfact, read_hf, read_jsonl,
                          read_zsre, write_jsonl)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FORMATS = DATA / "formats"
needs_formats = pytest.mark.skipif(not FORMATS.is_dir(), reason=f"the format samples are not at {FORMATS}")

CF: dict[str, Any] = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": " English"}, "target_true": {"str": "French"},
                          "relation_id": "P103"},
    "paraphrase_prompts": ["Danielle Darrieux spoke"], "neighborhood_prompts": ["The mother tongue of Jean Gabin is"],
    "attribute_prompts": ["The mother tongue of Boris Johnson is"], "generation_prompts": ["Danielle Darrieux is"]}
ZS: dict[str, Any] = {
    "subject": "Arlon", "src": "Arlon is the capital of", "pred": "", "rephrase": "Arlon is the capital city of",
    "alt": "Bahrain", "answers": ["Luxembourg"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
    "cond": "Luxembourg >> Bahrain || Arlon is the capital of"}
REQ = EditRequest("a", "The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                  ["Danielle Darrieux spoke"], ["The mother tongue of Jean Gabin is"], "nq question: who wrote hamlet",
                  "Shakespeare", ["Danielle Darrieux is"], "P103")


def rewrite(**changes: Any) -> dict[str, Any]:
    return {**CF, "requested_rewrite": {**CF["requested_rewrite"], **changes}}


def without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def assert_names(err: pytest.ExceptionInfo, path: Path | str, record: int | None, field: str | None) -> None:
    msg = str(err.value)
    assert str(path) in msg and err.value.file == str(path)
    assert err.value.record == record and (record is None or f"record {record}" in msg)
    assert err.value.field == field and (field is None or repr(field) in msg)


# --- the real layouts ------------------------------------------------------------------------------
@needs_formats
def test_counterfact_sample():
    path = FORMATS / "counterfact_sample.json"
    bench, raw = read_counterfact(path), json.loads(path.read_text())
    assert bench.style == "counterfact" and bench.name == "counterfact_sample" and len(bench) == len(raw)
    for r, rec in zip(bench.requests, raw):
        rw = rec["requested_rewrite"]
        assert (r.case_id, r.prompt, r.subject, r.relation_id) == (str(rec["case_id"]), rw["prompt"], rw["subject"],
                                                                     rw["relation_id"])
        assert r.target_new == rw["target_new"]["str"].strip() and r.target_true == rw["target_true"]["str"].strip()
        assert r.paraphrase_prompts == rec["paraphrase_prompts"]
        assert r.neighborhood_prompts == rec["neighborhood_prompts"]
        assert r.generation_prompts == rec["generation_prompts"]
        assert r.text == rw["prompt"].replace("{}", rw["subject"])
    assert load_benchmark(path).requests == bench.requests


@needs_formats
def test_zsre_sample():
    path = FORMATS / "zsre_sample.json"
    bench, raw = read_zsre(path), json.loads(path.read_text())
    assert bench.style == "zsre" and len(bench) == len(raw)
    for i, (r, rec) in enumerate(zip(bench.requests, raw)):
        assert r.case_id == str(i) and r.text == rec["src"] and r.subject == rec["subject"]
        assert r.prompt.count("{}") == 1
        assert r.target_new == rec["alt"].strip() and r.target_true == rec["answers"][0].strip()
        assert r.paraphrase_prompts == [rec["rephrase"]] and r.neighborhood_prompts == []
        assert r.locality_prompt == rec["loc"] and r.locality_answer == rec["loc_ans"].strip()
    assert load_benchmark(str(path)).requests == bench.requests


def test_counterfact_targets_stripped_and_subject_anywhere(tmp_path):
    rec = rewrite(prompt="In {}'s home, people speak")
    r = read_counterfact(write(tmp_path / "cf.json", [rec])).requests[0]
    assert r.target_new == "English" and r.case_id == "7" and r.text == "In Danielle Darrieux's home, people speak"


def test_multi_counterfact_gives_one_request_per_rewrite(tmp_path):
    second = {"prompt": "{} is a citizen of", "subject": "Danielle Darrieux", "target_new": {"str": "Spain"},
              "target_true": {"str": "France"}, "relation_id": "P27"}
    rec = {**CF, "requested_rewrite": [CF["requested_rewrite"], second]}
    bench = read_counterfact(write(tmp_path / "mcf.json", [rec]))
    assert [r.case_id for r in bench.requests] == ["7:0", "7:1"]
    assert [r.target_new for r in bench.requests] == ["English", "Spain"]
    assert bench.requests[1].paraphrase_prompts == CF["paraphrase_prompts"]


def test_zsre_subject_found_case_insensitively(tmp_path):
    rec = {**ZS, "subject": "arlon", "src": "What country is Arlon the capital of?", "answers": []}
    r = read_zsre(write(tmp_path / "z.json", [rec])).requests[0]
    assert r.prompt == "What country is {} the capital of?" and r.subject == "Arlon" and r.target_true is None


# --- broken input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader,records,record,field", [
    (read_counterfact, [CF, rewrite(subject="")], 1, "subject"),
    (read_counterfact, [CF, CF, rewrite(target_new={"str": " "})], 2, "target_new"),
    (read_counterfact, [rewrite(target_true={"str": ""})], 0, "target_true"),
    (read_counterfact, [without(CF, "requested_rewrite")], 0, "requested_rewrite"),
    (read_counterfact, [{**CF, "requested_rewrite": [CF["requested_rewrite"], "x"]}], 0, "requested_rewrite"),
    (read_counterfact, [{**CF, "requested_rewrite": without(CF["requested_rewrite"], "subject")}], 0, "subject"),
    (read_counterfact, [rewrite(prompt="Danielle Darrieux speaks")], 0, "prompt"),
    (read_counterfact, [CF, rewrite(prompt="{} and {} speak")], 1, "prompt"),
    (read_counterfact, [rewrite(prompt=5)], 0, "prompt"),
    (read_counterfact, [rewrite(target_new=["English"])], 0, "target_new"),
    (read_counterfact, [rewrite(relation_id=103)], 0, "relation_id"),
    (read_counterfact, [{**CF, "paraphrase_prompts": [3]}], 0, "paraphrase_prompts"),
    (read_zsre, [ZS, {**ZS, "subject": "Paris"}], 1, "subject"),
    (read_zsre, [{**ZS, "subject": ""}], 0, "subject"),
    (read_zsre, [ZS, without(ZS, "alt")], 1, "alt"),
    (read_zsre, [without(ZS, "src")], 0, "src"),
    (read_zsre, [{**ZS, "alt": " "}], 0, "target_new"),
    (read_zsre, [{**ZS, "alt": 3}], 0, "alt"),
    (read_zsre, [{**ZS, "answers": 5}], 0, "answers"),
    (read_zsre, [{**ZS, "rephrase": {"a": 1}}], 0, "rephrase"),
    (read_zsre, [ZS, ZS, without(ZS, "loc_ans")], 2, "loc_ans"),
])
def test_broken_records_name_file_record_field(tmp_path, reader, records, record, field):
    path = write(tmp_path / "bad.json", records)
    with pytest.raises(DataError) as err:
        reader(path)
    assert_names(err, path, record, field)


@pytest.mark.parametrize("reader", [read_counterfact, read_zsre])
def test_malformed_files(tmp_path, reader):
    with pytest.raises(DataError, match="not valid JSON") as err:
        reader(write(tmp_path / "broken.json", '[{"src": "x"'))
    assert_names(err, tmp_path / "broken.json", None, None)
    with pytest.raises(DataError, match="JSON list") as err:
        reader(write(tmp_path / "obj.json", {"a": 1}))
    assert_names(err, tmp_path / "obj.json", None, None)
    with pytest.raises(DataError, match="must be an object") as err:
        reader(write(tmp_path / "notdict.json", [CF if reader is read_counterfact else ZS, "text"]))
    assert_names(err, tmp_path / "notdict.json", 1, None)
    with pytest.raises(DataError, match="cannot read") as err:
        reader(tmp_path / "missing.json")
    assert_names(err, tmp_path / "missing.json", None, None)


# --- the toolkit's own layout ------------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path):
    zs = EditRequest("b", "{} is the capital of", "Arlon", "Bahrain", paraphrase_prompts=["Arlon, capital of"])
    for bench in (Benchmark("mine", "counterfact", [REQ]), Benchmark("facts", "zsre", [zs, zs])):
        path = write_jsonl(bench, tmp_path / f"{bench.name}.jsonl")
        assert read_jsonl(path) == Benchmark(bench.name, bench.style, bench.requests, str(path))
        assert load_benchmark(path).requests == bench.requests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.jsonl", "mine.jsonl"]  # no temporary files left


def test_write_jsonl_is_atomic_and_honours_umask(tmp_path):
    path = write_jsonl(Benchmark("mine", "counterfact", [REQ]), tmp_path / "sub" / "mine.jsonl")
    write_jsonl(Benchmark("mine", "counterfact", [REQ, REQ]), path)  # replaces the old file
    assert len(read_jsonl(path)) == 2 and [p.name for p in path.parent.iterdir()] == ["mine.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_jsonl_without_header_infers_style(tmp_path):
    cf = write(tmp_path / "cf.jsonl", json.dumps(REQ.to_dict()) + "\n\n")
    assert read_jsonl(cf).style == "counterfact" and read_jsonl(cf).name == "cf"
    zs = {**REQ.to_dict(), "neighborhood_prompts": [], "target_true": None}
    assert read_jsonl(write(tmp_path / "zs.jsonl", json.dumps(zs))).style == "zsre"


def jsonl_with(tmp_path: Path, bad: dict[str, Any] | str, header: bool = True) -> Path:
    lines = ([json.dumps({"benchmark": {"name": "x", "style": "counterfact"}})] if header else [])
    lines += [json.dumps(REQ.to_dict()), bad if isinstance(bad, str) else json.dumps(bad)]
    return write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")


@pytest.mark.parametrize("bad,field", [
    ({**REQ.to_dict(), "colour": "red"}, "colour"),
    (without(REQ.to_dict(), "target_new"), "target_new"),
    ({**REQ.to_dict(), "target_new": ""}, "target_new"),
    ({**REQ.to_dict(), "target_true": 3}, "target_true"),
    ({**REQ.to_dict(), "locality_answer": 3}, "locality_answer"),
    ({**REQ.to_dict(), "locality_answer": None}, "locality_answer"),
    ({**REQ.to_dict(), "neighborhood_prompts": "x"}, "neighborhood_prompts"),
    ({**REQ.to_dict(), "subject": ["x"]}, "subject"),
    ({**REQ.to_dict(), "prompt": "no slot"}, "prompt"),
    ({**REQ.to_dict(), "case_id": None}, "case_id"),
])
@pytest.mark.parametrize("header", [True, False])
def test_jsonl_broken_records(tmp_path, bad, field, header):
    path = jsonl_with(tmp_path, bad, header)
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert_names(err, path, 1, field)


@pytest.mark.parametrize("header", [True, False])
def test_jsonl_bad_line(tmp_path, header):
    path = jsonl_with(tmp_path, "{not json", header)
    with pytest.raises(DataError, match=f"line {3 if header else 2} is not valid JSON") as err:
        read_jsonl(path)
    assert_names(err, path, 1, None)
    path = jsonl_with(tmp_path, "[1, 2]", header)
    with pytest.raises(DataError, match="must be an object") as err:
        read_jsonl(path)
    assert_names(err, path, 1, None)


def test_jsonl_bad_header(tmp_path):
    path = write(tmp_path / "h.jsonl", json.dumps({"benchmark": {"style": "imaginary"}}) + "\n")
    with pytest.raises(DataError, match="imaginary") as err:
        read_jsonl(path)
    assert_names(err, path, None, "style")


# --- format detection and the entry point --------------------------------------------------------------
def test_format_detection(tmp_path):
    cf, zs = write(tmp_path / "cf.json", [CF]), write(tmp_path / "zs.json", [ZS])
    own = write_jsonl(Benchmark("own", "counterfact", [REQ]), tmp_path / "own.jsonl")
    assert load_benchmark(cf).style == "counterfact" and load_benchmark(zs).style == "zsre"
    assert load_benchmark(own).requests == [REQ]
    as_list = write(tmp_path / "own_list.json", [REQ.to_dict()])  # own records in a JSON list
    assert load_benchmark(as_list).requests == [REQ] and load_benchmark(as_list).style == "counterfact"
    # a forced format wins over detection
    with pytest.raises(DataError) as err:
        load_benchmark(cf, format="zsre")
    assert_names(err, cf, 0, "src")
    with pytest.raises(DataError, match="cannot tell the layout") as err:
        load_benchmark(write(tmp_path / "other.json", [{"question": "q"}]))
    assert "requested_rewrite" in str(err.value) and "src" in str(err.value) and err.value.record == 0
    with pytest.raises(DataError, match="unknown file type"):
        load_benchmark(write(tmp_path / "data.csv", "a,b"))
    with pytest.raises(DataError, match="no such file"):
        load_benchmark(tmp_path / "missing.json")


def test_pararel_folder_detected(tmp_path):
    for rel, pats, facts in (("P1", ["[X] speaks [Y].", "[X] talks [Y]."], [("A", "x"), ("B", "x"), ("C", "y")]),
                             ("P2", ["[X] lives in [Y].", "[X] is in [Y]."], [("D", "z"), ("E", "z"), ("F", "w")])):
        for sub, rows in (("patterns", [{"pattern": p} for p in pats]),
                          ("tuples", [{"sub_label": s, "obj_label": o, "uuid": s} for s, o in facts])):
            (tmp_path / sub).mkdir(exist_ok=True)
            write(tmp_path / sub / f"{rel}.jsonl", "\n".join(json.dumps(r) for r in rows))
    bench = load_benchmark(tmp_path)
    assert bench.style == "counterfact" and {r.relation_id for r in bench.requests} == {"P1", "P2"}
    assert load_benchmark(str(tmp_path), kind="factual").style == "zsre"
    assert load_benchmark(tmp_path, seed=3).requests == load_benchmark(tmp_path, format="pararel", seed=3).requests


def test_unknown_kind_and_format():
    with pytest.raises(ValueError, match="counterfactual, factual"):
        load_benchmark(kind="imaginary")
    with pytest.raises(ValueError, match="counterfact, zsre, jsonl, pararel, hf"):
        load_benchmark("x.json", format="csv")


def test_shipped_defaults_need_no_path():
    assert load_benchmark().name == "pararel_counterfactual" and load_benchmark().style == "counterfact"
    assert load_benchmark(kind="factual").style == "zsre"


# --- Hugging Face datasets ---------------------------------------------------------------------------
def test_hf_datasets_saved_to_disk(tmp_path):
    import datasets

    zs_rows = [ZS, {**ZS, "subject": "Luxembourg", "src": "Luxembourg borders", "answers": []}]
    datasets.Dataset.from_list(zs_rows).save_to_disk(str(tmp_path / "zs"))
    bench = load_benchmark(tmp_path / "zs")
    zs_file = read_zsre(write(tmp_path / "zs.json", zs_rows))
    assert bench.style == "zsre" and bench.name == "zs" and bench.requests == zs_file.requests

    datasets.Dataset.from_list([CF, {**CF, "case_id": 8}]).save_to_disk(str(tmp_path / "cf"))
    bench = read_hf(str(tmp_path / "cf"))
    assert bench.style == "counterfact" and [r.case_id for r in bench.requests] == ["7", "8"]
    assert bench.requests[0] == read_counterfact(write(tmp_path / "cf.json", [CF])).requests[0]

    datasets.DatasetDict({"test": datasets.Dataset.from_list([REQ.to_dict()])}).save_to_disk(str(tmp_path / "own"))
    assert load_benchmark(tmp_path / "own", split="test").requests == [REQ]
    with pytest.raises(DataError, match="no split 'train'"):
        load_benchmark(tmp_path / "own")

    datasets.Dataset.from_list([ZS, {**ZS, "subject": "Paris"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError) as err:
        load_benchmark(tmp_path / "bad")
    assert_names(err, str(tmp_path / "bad"), 1, "subject")


def test_hf_hub_name_offline(monkeypatch):
    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # what a hub name gives on a machine offline
    with pytest.raises(DataError, match="network access") as err:
        load_benchmark("no-such-user/no-such-dataset")
    assert "no-such-user/no-such-dataset" in str(err.value) and "could not load" in str(err.value)


DATA_PKG = Path(__file__).resolve().parents[1] / "editing" / "data"


def _imported(path: Path, top_level_only: bool = False) -> set[str]:
    """The `editing.data` modules a file imports (lazy imports inside functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m.removeprefix("editing.data.") for m in out if m.startswith("editing.data.")}


def test_data_modules_import_alone_and_without_a_cycle():
    # Each module imports in a fresh interpreter (no hidden reliance on import order); run side by side,
    # as every one of them loads the package and with it Lightning (seconds each).
    names = sorted("editing.data" if p.stem == "__init__" else f"editing.data.{p.stem}" for p in DATA_PKG.glob("*.py"))
    runs = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], stderr=subprocess.PIPE, text=True)
            for n in names}
    # ... and the builder's command line runs without runpy finding its module already imported.
    cli = subprocess.Popen([sys.executable, "-W", "error::RuntimeWarning", "-m", "editing.data.pararel", "--help"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    failed = {n: r.communicate()[1][-2000:] for n, r in {**runs, "-m editing.data.pararel": cli}.items()
              if r.wait() != 0}
    assert not failed, failed
    # The JSON IO imports neither reader; the ParaRel builder does not import the readers; the readers
    # reach the builder only from inside `load_benchmark`, never at import time.
    assert not {"readers", "pararel"} & _imported(DATA_PKG / "jsonio.py")
    assert "readers" not in _imported(DATA_PKG / "pararel.py")
    assert "pararel" not in _imported(DATA_PKG / "readers.py", top_level_only=True)
