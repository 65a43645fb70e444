"""The ParaRel builder (on a tiny synthetic ParaRel and on the real one) and the shipped benchmarks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editing.data import DataError, EditRequest, build_pararel, load_benchmark
from editing.data.pararel import main, read_relations, usable_template
from editing.data.readers import SHIPPED_DIR

PARAREL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pararel"
needs_pararel = pytest.mark.skipif(not PARAREL.is_dir(), reason=f"ParaRel is not at {PARAREL}")


@pytest.mark.parametrize("pattern,template", [
    ("[X] works in the field of [Y].", "{} works in the field of"),
    ("The mother tongue of [X] is [Y]", "The mother tongue of {} is"),
    ("[X] is located in [Y] .", "{} is located in"),
    ("[X],  a type of [Y].", "{}, a type of"),
    ("[Y] is the specialization of [X].", None),
    ("[X] and [Y] are twins.", None),
    ("[X] [Y].", None),
    ("The [Y] of [X].", None),
])
def test_usable_template(pattern, template):
    assert usable_template(pattern) == template


def write_pararel(root: Path, relations: dict[str, tuple[list[str], list[tuple[str, str]]]]) -> Path:
    for rel, (patterns, facts) in relations.items():
        for sub, rows in (("patterns", [{"pattern": p} for p in patterns]),
                          ("tuples", [{"sub_label": s, "obj_label": o, "uuid": f"{rel}-{i}"}
                                      for i, (s, o) in enumerate(facts)])):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"{rel}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


TINY = {
    "P1": (["[X] speaks [Y].", "The language of [X] is [Y].", "[Y] is spoken by [X]."],
           [("Anna", "French"), ("Bert", "French"), ("Cleo", "French"), ("Anna", "German"), ("Dora", "German"),
            ("Emil", "Dutch"), ("", "French"), ("Fay", ""), ("Gil {x}", "French")]),
    "P2": (["[X] lives in [Y].", "[X] resides in [Y]."], [("Hana", "Paris"), ("Ivan", "Paris"), ("Jon", "Rome")]),
    "P3": (["[X] plays [Y].", "[Y] is played by [X]."], [("Kai", "piano"), ("Lea", "piano")]),  # one usable pattern
}


def test_tiny_pararel(tmp_path):
    root = write_pararel(tmp_path, TINY)
    assert [r.id for r in read_relations(root)] == ["P1", "P2"]  # P3 has one usable pattern
    cf = build_pararel(root, "counterfactual", seed=0)
    assert cf.style == "counterfact" and cf.name == "pararel_counterfactual"
    # Emil and Jon have no neighbour with their object; empty labels and braces are skipped
    assert sorted(r.subject for r in cf.requests) == ["Anna", "Anna", "Bert", "Cleo", "Dora", "Hana", "Ivan"]
    for r in cf.requests:
        assert r.target_new not in {o for s, o in TINY[r.relation_id][1] if s == r.subject}  # not a true object
        assert r.paraphrase_prompts and r.text not in r.paraphrase_prompts
    anna = [r for r in cf.requests if r.subject == "Anna"]
    assert {r.target_true for r in anna} == {"French", "German"} and {r.target_new for r in anna} == {"Dutch"}
    fact = build_pararel(root, "factual", seed=0)
    assert fact.style == "zsre" and len(fact) == 9
    assert all(r.target_true is None and not r.neighborhood_prompts and len(r.paraphrase_prompts) == 1
               for r in fact.requests)
    assert [r.relation_id for r in fact.requests[:2]] in (["P1", "P2"], ["P2", "P1"])  # round-robin
    assert len(build_pararel(root, "factual", max_per_relation=2)) == 4
    assert len(build_pararel(root, "factual", limit=3)) == 3
    with pytest.raises(ValueError, match="counterfactual, factual"):
        build_pararel(root, "imaginary")


def test_bad_pararel_folders(tmp_path):
    with pytest.raises(DataError, match="patterns/"):
        build_pararel(tmp_path)
    root = write_pararel(tmp_path, TINY)
    (root / "tuples" / "P2.jsonl").write_text('{"sub_label": "Hana", "obj_label": "Paris"}\n{"sub_label": 3}\n')
    with pytest.raises(DataError) as err:
        build_pararel(root)
    assert err.value.file == str(root / "tuples" / "P2.jsonl") and err.value.record == 1
    assert err.value.field == "sub_label"


def real_facts() -> dict[str, dict[str, set[str]]]:
    """relation -> subject -> its objects, read straight from the tuples files."""
    facts: dict[str, dict[str, set[str]]] = {}
    for f in (PARAREL / "tuples").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            facts.setdefault(f.stem, {}).setdefault(row["sub_label"], set()).add(row["obj_label"])
    return facts


def check_counterfactual(r: EditRequest, facts: dict[str, dict[str, set[str]]], templates: dict[str, list[str]]):
    rel = facts[r.relation_id]
    objects = {o for objs in rel.values() for o in objs}
    assert r.case_id.startswith(f"{r.relation_id}:") and r.prompt in templates[r.relation_id]
    assert r.target_true in rel[r.subject] and r.target_new in objects and r.target_new not in rel[r.subject]
    filled = {t: {t.replace("{}", s) for s in rel} for t in templates[r.relation_id]}
    assert 1 <= len(r.paraphrase_prompts) <= 2 and len(set(r.paraphrase_prompts)) == len(r.paraphrase_prompts)
    assert all(p != r.text and p in {t.replace("{}", r.subject) for t in filled} for p in r.paraphrase_prompts)
    neighbours = {s for s, objs in rel.items() if r.target_true in objs and s != r.subject}
    assert 1 <= len(r.neighborhood_prompts) <= 5
    for p in r.neighborhood_prompts:  # another subject of the same relation with the same true object
        assert any(p == t.replace("{}", n) for t in templates[r.relation_id] for n in neighbours)
    assert len(r.generation_prompts) == 2
    others = {o for rid, subs in facts.items() if rid != r.relation_id for objs in subs.values() for o in objs}
    assert r.locality_prompt and r.locality_answer in others and r.subject not in r.locality_prompt


@needs_pararel
def test_real_pararel_deterministic_and_sound():
    a = build_pararel(PARAREL, "counterfactual", seed=0, max_per_relation=15)
    assert a.requests == build_pararel(PARAREL, "counterfactual", seed=0, max_per_relation=15).requests
    assert a.requests != build_pararel(PARAREL, "counterfactual", seed=1, max_per_relation=15).requests
    relations = read_relations(PARAREL)
    templates = {rel.id: rel.templates for rel in relations}
    assert len(a) == 15 * len(relations) and len({r.case_id for r in a.requests}) == len(a)
    assert len({r.relation_id for r in a.requests[:len(relations)]}) == len(relations)  # round-robin
    facts = real_facts()
    for r in a.requests:
        r.validate()
        check_counterfactual(r, facts, templates)
    f = build_pararel(PARAREL, "factual", seed=0, max_per_relation=15)
    for r in f.requests:
        r.validate()
        assert r.target_new in facts[r.relation_id][r.subject] and r.target_true is None
        assert not r.neighborhood_prompts and len(r.paraphrase_prompts) == 1 and r.locality_answer


def test_shipped_benchmarks_load_and_validate():
    for kind, style in (("counterfactual", "counterfact"), ("factual", "zsre")):
        path = SHIPPED_DIR / f"pararel_{kind}.jsonl"
        assert path.stat().st_size < 1.5e6
        bench = load_benchmark(kind=kind)
        assert bench.style == style and bench.name == f"pararel_{kind}" and len(bench) == 1500
        assert len({r.relation_id for r in bench.requests[:30]}) >= 25  # the first edits span many relations
        assert len({r.case_id for r in bench.requests}) == len(bench)
        for i, r in enumerate(bench.requests):
            r.validate(file=str(path), record=i)
            if kind == "counterfactual":
                assert r.target_new != r.target_true and r.neighborhood_prompts and r.paraphrase_prompts
            else:
                assert r.target_true is None and r.locality_prompt and r.paraphrase_prompts
    notice = (SHIPPED_DIR / "NOTICE").read_text()
    assert "MIT License" in notice and "Copyright (c) 2021 Yanai Elazar" in notice


@needs_pararel
def test_shipped_benchmarks_equal_a_fresh_build(tmp_path, capsys):
    main(["--root", str(PARAREL), "--out", str(tmp_path)])
    for kind in ("counterfactual", "factual"):
        assert (tmp_path / f"pararel_{kind}.jsonl").read_bytes() == (SHIPPED_DIR / f"pararel_{kind}.jsonl").read_bytes()
    assert "1500 records" in capsys.readouterr().out
    assert load_benchmark(PARAREL, kind="factual").requests[:1500] == load_benchmark(kind="factual").requests


def test_two_hop_portability_from_two_relations(tmp_path):
    """P27 (citizenship) objects are P30 (continent) subjects: editing a citizenship asks for the new
    country's continent through the person; a new country on the same continent asks nothing."""
    root = write_pararel(tmp_path, {
        "P27": (["[X] has a citizenship of [Y].", "[X] is a citizen of [Y]."],
                [("Anna", "France"), ("Bert", "France"), ("Cleo", "Japan"), ("Dora", "Japan"), ("Emil", "Spain"),
                 ("Fay", "Spain")]),
        "P30": (["[X] belongs to the continent of [Y].", "[X] is a part of the continent of [Y]."],
                [("France", "Europe"), ("Japan", "Asia"), ("Spain", "Europe"), ("Peru", "South America")]),
    })
    cf = build_pararel(root, "counterfactual", seed=0)
    for r in (r for r in cf.requests if r.relation_id == "P27"):
        continent = {"France": "Europe", "Japan": "Asia", "Spain": "Europe"}
        if continent[r.target_new] == continent[r.target_true]:
            assert r.portability_prompts == []
        else:
            assert r.portability_prompts == [f"The country of citizenship of {r.subject} belongs to the continent of"]
            assert r.portability_answers == [continent[r.target_new]]
    assert any(r.portability_prompts for r in cf.requests)
    factual = build_pararel(root, "factual", seed=0)
    anna = next(r for r in factual.requests if r.subject == "Anna")
    assert anna.portability_answers == ["Europe"]
    # the prompts become evaluation prompts of their own kind
    from editing.data.records import EvalCase
    kinds = [p.kind for p in EvalCase.from_request(anna, 0).prompts]
    assert kinds.count("portability") == 1


def test_easyedit_portability_entries_are_read(tmp_path):
    zsre = [{"subject": "Anna", "src": "What is Anna's citizenship?", "alt": "Japan", "answers": ["France"],
             "rephrase": "Which country is Anna a citizen of?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
             "portability": {"New Question": "Which continent is Anna's country in?", "New Answer": "Asia"}}]
    (tmp_path / "z.json").write_text(json.dumps(zsre))
    [r] = load_benchmark(tmp_path / "z.json").requests
    assert r.portability_prompts == ["Which continent is Anna's country in?"] and r.portability_answers == ["Asia"]
    know = [{**zsre[0], "portability": {"Reasoning": [{"prompt": "Anna lives on the continent of",
                                                         "ground_truth": [["Asia", "Asian continent"]]}]}}]
    (tmp_path / "k.json").write_text(json.dumps(know))
    [r] = load_benchmark(tmp_path / "k.json").requests
    assert r.portability_prompts == ["Anna lives on the continent of"] and r.portability_answers == ["Asia"]
    (tmp_path / "bad.json").write_text(json.dumps([{**zsre[0], "portability": [{"prompt": "x"}]}]))
    with pytest.raises(DataError, match="portability"):
        load_benchmark(tmp_path / "bad.json")
