"""Readers on the real format samples, on broken inputs (errors name file, record and field), the
ParaRel builder and the shipped benchmarks."""
import json
from pathlib import Path

import pytest

from editing.data import DataError, EditRequest, load_benchmark, read_counterfact, read_jsonl, read_zsre, write_jsonl
from editing.data.pararel import build_pararel, usable_template
from editing.data.records import Benchmark

from conftest import SHARED

FORMATS = SHARED / "data" / "formats"
PARAREL = SHARED / "data" / "pararel"
needs_shared = pytest.mark.skipif(not FORMATS.exists(), reason="../shared/data is not beside the checkout")


@needs_shared
def test_counterfact_sample():
    b = read_counterfact(FORMATS / "counterfact_sample.json")
    raw = json.loads((FORMATS / "counterfact_sample.json").read_text())
    assert b.style == "counterfact" and len(b) == len(raw)
    r, rec = b.requests[0], raw[0]
    assert r.prompt == rec["requested_rewrite"]["prompt"] and r.subject == rec["requested_rewrite"]["subject"]
    assert r.target_new == rec["requested_rewrite"]["target_new"]["str"].strip()
    assert r.target_true == rec["requested_rewrite"]["target_true"]["str"].strip()
    assert r.paraphrase_prompts == rec["paraphrase_prompts"]
    assert r.neighborhood_prompts == rec["neighborhood_prompts"]
    assert r.text == r.prompt.replace("{}", r.subject)
    assert load_benchmark(str(FORMATS / "counterfact_sample.json")).requests == b.requests


@needs_shared
def test_zsre_sample():
    b = read_zsre(FORMATS / "zsre_sample.json")
    raw = json.loads((FORMATS / "zsre_sample.json").read_text())
    assert b.style == "zsre" and len(b) == len(raw)
    for r, rec in zip(b.requests, raw):
        assert r.text == rec["src"]
        assert r.target_new == rec["alt"].strip() and r.target_true == rec["answers"][0].strip()
        assert r.paraphrase_prompts == [rec["rephrase"]]
        assert r.locality_prompt == rec["loc"] and r.locality_answer == rec["loc_ans"].strip()
    assert load_benchmark(str(FORMATS / "zsre_sample.json")).style == "zsre"


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


CF = {"case_id": 7, "requested_rewrite": {"prompt": "{} speaks", "subject": "Danielle Darrieux",
                                          "target_new": {"str": "English"}, "target_true": {"str": "French"}},
      "paraphrase_prompts": ["Danielle Darrieux talks"], "neighborhood_prompts": ["Jean Gabin speaks"]}
ZS = {"subject": "Arlon", "src": "Arlon is the capital of", "rephrase": "Arlon is the capital city of",
      "alt": "Bahrain", "answers": ["Luxembourg"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}


@pytest.mark.parametrize("reader,records,index,field", [
    (read_counterfact, [CF, {**CF, "requested_rewrite": {**CF["requested_rewrite"], "subject": ""}}], 1, "subject"),
    (read_counterfact, [CF, CF, {**CF, "requested_rewrite": {**CF["requested_rewrite"], "target_new": {"str": " "}}}],
     2, "target_new"),
    (read_counterfact, [{k: v for k, v in CF.items() if k != "requested_rewrite"}], 0, "requested_rewrite"),
    (read_counterfact, [{**CF, "requested_rewrite": {**CF["requested_rewrite"], "prompt": "Speaks"}}], 0, "prompt"),
    (read_counterfact, [{**CF, "paraphrase_prompts": [3]}], 0, "paraphrase_prompts"),
    (read_zsre, [ZS, {**ZS, "subject": "Paris"}], 1, "subject"),
    (read_zsre, [ZS, {k: v for k, v in ZS.items() if k != "alt"}], 1, "alt"),
    (read_zsre, [{**ZS, "alt": ""}], 0, "target_new"),
    (read_zsre, [{**ZS, "answers": 5}], 0, "answers"),
])
def test_broken_records_name_file_record_field(tmp_path, reader, records, index, field):
    p = write(tmp_path, "bad.json", records)
    with pytest.raises(DataError) as e:
        reader(p)
    msg = str(e.value)
    assert str(p) in msg and f"record {index}" in msg and repr(field) in msg
    assert e.value.record == index and e.value.field == field


def test_malformed_files(tmp_path):
    p = write(tmp_path, "broken.json", '[{"src": "x"')
    with pytest.raises(DataError, match="not valid JSON") as e:
        read_zsre(p)
    assert str(p) in str(e.value)
    with pytest.raises(DataError, match="JSON list"):
        read_counterfact(write(tmp_path, "obj.json", {"a": 1}))
    with pytest.raises(DataError, match="record 1"):
        read_counterfact(write(tmp_path, "notdict.json", [CF, "text"]))
    with pytest.raises(DataError, match="cannot tell the layout"):
        load_benchmark(str(write(tmp_path, "other.json", [{"question": "q"}])))


def test_jsonl_round_trip_and_errors(tmp_path):
    reqs = [EditRequest("a", "{} speaks", "Danielle Darrieux", "English", "French", ["Danielle Darrieux talks"],
                        ["Jean Gabin speaks"], "nq question: x", "y", ["Danielle Darrieux is"], "P103")]
    path = write_jsonl(Benchmark("mine", "counterfact", reqs), tmp_path / "mine.jsonl")
    back = read_jsonl(path)
    assert back.requests == reqs and back.style == "counterfact" and back.name == "mine"
    assert load_benchmark(str(path)).requests == reqs
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["colour"] = "red"
    p = write(tmp_path, "bad.jsonl", lines[0] + "\n" + lines[1] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert "record 1" in str(e.value) and "'colour'" in str(e.value)
    p = write(tmp_path, "nohead.jsonl", lines[1] + "\n{not json\n")
    with pytest.raises(DataError, match="record 1"):
        read_jsonl(p)


def test_hf_dataset_from_disk(tmp_path, monkeypatch):
    import datasets
    datasets.Dataset.from_list([ZS, {**ZS, "subject": "Luxembourg", "src": "Luxembourg borders"}]).save_to_disk(
        str(tmp_path / "ds"))
    b = load_benchmark(str(tmp_path / "ds"))
    assert b.style == "zsre" and len(b) == 2 and b.requests[1].text == "Luxembourg borders"
    def offline(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(datasets, "load_dataset", offline)  # what a hub name gives on a machine offline
    with pytest.raises(DataError, match="network") as e:
        load_benchmark("no-such-user/no-such-dataset-xyz")
    assert "no-such-user/no-such-dataset-xyz" in str(e.value)


def test_unknown_kind_and_format():
    with pytest.raises(ValueError, match="counterfactual"):
        load_benchmark(kind="imaginary")
    with pytest.raises(ValueError, match="zsre"):
        load_benchmark("x.json", format="csv")


def test_usable_templates():
    assert usable_template("[X] works in the field of [Y].") == "{} works in the field of"
    assert usable_template("[X] is located in [Y] .") == "{} is located in"
    assert usable_template("[Y] is the specialization of [X].") is None


def test_shipped_benchmarks_load_and_validate():
    for kind, style in (("counterfactual", "counterfact"), ("factual", "zsre")):
        b = load_benchmark(kind=kind)
        assert b.style == style and len(b) >= 1000
        assert len({r.relation_id for r in b.requests[:50]}) >= 20  # the first edits span many relations
        for r in b.requests:
            r.validate()
            if kind == "counterfactual":
                assert r.target_new != r.target_true and r.neighborhood_prompts and r.paraphrase_prompts
            else:
                assert r.target_true is None and r.locality_prompt


@pytest.mark.skipif(not PARAREL.exists(), reason="../shared/data/pararel is not beside the checkout")
def test_pararel_builder_deterministic_and_sound():
    a = build_pararel(PARAREL, "counterfactual", seed=0, max_per_relation=20)
    b = build_pararel(PARAREL, "counterfactual", seed=0, max_per_relation=20)
    c = build_pararel(PARAREL, "counterfactual", seed=1, max_per_relation=20)
    assert a.requests == b.requests and a.requests != c.requests
    facts = {}
    for f in (PARAREL / "tuples").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            facts.setdefault(f.stem, {}).setdefault(row["obj_label"], set()).add(row["sub_label"])
    for r in a.requests:
        objects = facts[r.relation_id]
        assert r.target_new in objects and r.target_true in objects and r.target_new != r.target_true
        assert r.subject in objects[r.target_true]
        # every neighbour is another subject with the same relation and true object
        for n in r.neighborhood_prompts:
            assert any(s in n for s in objects[r.target_true] - {r.subject})
    # the shipped files are exactly what the builder makes from ParaRel with seed 0
    for kind in ("counterfactual", "factual"):
        assert load_benchmark(kind=kind).requests == build_pararel(PARAREL, kind, seed=0, limit=1500).requests
        assert load_benchmark(str(PARAREL), kind=kind).requests[:1500] == load_benchmark(kind=kind).requests
