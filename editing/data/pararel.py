"""Benchmarks built from ParaRel (Elazar et al. 2021, MIT License; see benchmarks/NOTICE).

ParaRel gives, per Wikidata relation, paraphrase patterns ("The mother tongue of [X] is [Y].") and
T-REx facts (subject, object). Two benchmarks are built from it, deterministically given a seed:

- "counterfactual" (style "counterfact", built the way COUNTERFACT was built from ParaRel): the prompt
  from one pattern, target_true the object, target_new another object of the same relation that the
  subject does not have, paraphrases from two other patterns, neighbourhood prompts about up to five
  other subjects sharing the relation and the true object, generation prompts, and a locality prompt
  from a fact of another relation;
- "factual" (style "zsre", iReVa's PARAREL): insert the true object, with one paraphrase from another
  pattern and a locality prompt from a fact of another relation.

Records of relations in `FIRST_HOP_PHRASES` also get two-hop portability prompts (`two_hop`): the
edited object named through the subject inside a second relation's prompt, answered by that
relation's object of the new (counterfactual) or inserted (factual) object.

Only patterns whose object slot ends the sentence can serve as next-token prompts; relations with
fewer than two such patterns are skipped. Relations are interleaved round-robin in a seeded order so
that the first N records span many relations.

Regenerate the shipped files from a copy of ParaRel's data (the `patterns/` and `tuples/` folders
made from `data/pattern_data/graphs_json/` and `data/trex_lms_vocab/` of github.com/yanaiela/pararel):
    python -m editing.data.pararel --root path/to/pararel --out editing/data/benchmarks
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from editing.data.jsonio import read_json_lines, write_jsonl
from editing.data.records import Benchmark, DataError, EditRequest, Kind, Style

KIND_STYLE: dict[Kind, Style] = {"counterfactual": "counterfact", "factual": "zsre"}
# Two-hop portability (MQuAKE-style): a first-hop relation whose object is the subject of a second-hop
# relation gets a noun phrase naming that object through the subject; the second hop's first
# template, filled with the phrase, asks about the edited object ("The country of citizenship of X
# belongs to the continent of" -> the continent of the new country). Second hops are single-valued.
FIRST_HOP_PHRASES: dict[str, str] = {
    "P27": "the country of citizenship of {}",
    "P17": "the country where {} is located",
    "P495": "the country where {} was formed",
    "P1376": "the country whose capital is {}",
    "P20": "the city where {} died",
    "P937": "the city where {} worked",
    "P159": "the city where {} is headquartered",
}
SECOND_HOPS: tuple[str, ...] = ("P30", "P1376")   # continent; the country a city is the capital of
NUM_PORTABILITY = 2
SHIPPED_SIZE = 1500
NUM_PARAPHRASES, NUM_NEIGHBOURS, NUM_GENERATION = 2, 5, 2


class Fact(NamedTuple):
    subject: str
    object: str
    uuid: str
    line: int  # record index in the tuples file


@dataclass
class Relation:
    """One ParaRel relation: its usable prompt templates and its facts, both sorted."""

    id: str
    templates: list[str]
    facts: list[Fact]
    source: str  # the tuples file


def usable_template(pattern: str) -> str | None:
    """"[X] works in the field of [Y]." -> "{} works in the field of"; None unless [Y] ends it."""
    p = " ".join(pattern.split())
    if p.endswith("."):
        p = p[:-1].rstrip()
    if not p.endswith("[Y]") or p.count("[Y]") != 1 or p.count("[X]") != 1:
        return None
    head = p[:-3].strip()
    if head == "[X]" or "{" in head or "}" in head:
        return None
    return head.replace("[X]", "{}")


def _rows(path: Path) -> list[dict]:
    rows = read_json_lines(path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"a record must be an object, got {type(row).__name__}", file=str(path), record=i)
    return rows


def _field(row: dict, key: str, path: Path, i: int) -> str:
    if not isinstance(row.get(key), str):
        raise DataError("missing or not a string", file=str(path), record=i, field=key)
    return row[key].strip()


def read_relation(patterns: Path, tuples: Path) -> Relation:
    """A relation's usable templates and its usable facts (deduplicated, sorted)."""
    templates = {usable_template(_field(row, "pattern", patterns, i)) for i, row in enumerate(_rows(patterns))}
    facts: dict[tuple[str, str], Fact] = {}
    for i, row in enumerate(_rows(tuples)):
        s, o = _field(row, "sub_label", tuples, i), _field(row, "obj_label", tuples, i)
        if s and o and "{" not in s and "}" not in s and (s, o) not in facts:
            facts[s, o] = Fact(s, o, str(row.get("uuid") or i), i)
    return Relation(patterns.stem, sorted(t for t in templates if t), sorted(facts.values()), str(tuples))


def read_relations(root: str | Path) -> list[Relation]:
    """Every relation of a ParaRel folder with at least two usable templates and one fact, by id."""
    root = Path(root)
    if not (root / "patterns").is_dir() or not (root / "tuples").is_dir():
        raise DataError("a ParaRel folder needs 'patterns/' and 'tuples/' subfolders", file=str(root))
    relations = []
    for patterns in sorted((root / "patterns").glob("*.jsonl")):
        tuples = root / "tuples" / patterns.name
        if tuples.is_file():
            rel = read_relation(patterns, tuples)
            if len(rel.templates) >= 2 and rel.facts:
                relations.append(rel)
    if len(relations) < 2:
        raise DataError("need at least two relations with two usable patterns and some facts", file=str(root))
    return relations


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def _unrelated_fact(rng: random.Random, others: list[Relation], subject: str) -> tuple[str, str]:
    """A filled prompt and its object from another relation, not mentioning `subject`."""
    for _ in range(100):
        rel = rng.choice(others)
        fact = rng.choice(rel.facts)
        prompt = _fill(rng.choice(rel.templates), fact.subject)
        if subject not in prompt:
            break
    return prompt, fact.object


def single_objects(rel: Relation) -> dict[str, str]:
    """subject -> object, for the subjects with exactly one object in `rel`."""
    objects: dict[str, set[str]] = {}
    for f in rel.facts:
        objects.setdefault(f.subject, set()).add(f.object)
    return {s: next(iter(o)) for s, o in objects.items() if len(o) == 1}


def two_hop(rel: Relation, subject: str, new_object: str, old_object: str | None,
            second: list[tuple[Relation, dict[str, str]]]) -> tuple[list[str], list[str]]:
    """Portability prompts and answers for "rel(subject) = new_object": for each second-hop relation
    that knows new_object's single object (and, if old_object is given, gives it a different answer, so
    that the prompt tells the edit apart), its first template filled with the first hop's phrase."""
    phrase = FIRST_HOP_PHRASES.get(rel.id)
    prompts, answers = [], []
    if phrase is None:
        return prompts, answers
    for rel2, objects in second:
        answer = objects.get(new_object)
        if rel2.id == rel.id or answer is None or (old_object is not None and objects.get(old_object) == answer):
            continue
        text = _fill(rel2.templates[0], phrase.format(subject))
        prompts.append(text[0].upper() + text[1:])
        answers.append(answer)
        if len(prompts) == NUM_PORTABILITY:
            break
    return prompts, answers


def relation_requests(rel: Relation, others: list[Relation], kind: Kind, rng: random.Random,
                      max_requests: int | None = None) -> list[EditRequest]:
    """The requests of one relation, in a seeded order."""
    objects = sorted({f.object for f in rel.facts})
    subjects_of: dict[str, set[str]] = {}  # object -> its subjects
    objects_of: dict[str, set[str]] = {}  # subject -> its objects
    for f in rel.facts:
        subjects_of.setdefault(f.object, set()).add(f.subject)
        objects_of.setdefault(f.subject, set()).add(f.object)
    second = [(r, single_objects(r)) for r in sorted(others, key=lambda r: r.id) if r.id in SECOND_HOPS]
    facts = list(rel.facts)
    rng.shuffle(facts)
    out: list[EditRequest] = []
    for f in facts:
        if max_requests is not None and len(out) >= max_requests:
            break
        template = rng.choice(rel.templates)
        other_templates = [t for t in rel.templates if t != template]
        locality_prompt, locality_answer = _unrelated_fact(rng, others, f.subject)
        generation = [_fill(t, f.subject) for t in rng.sample(rel.templates, min(NUM_GENERATION, len(rel.templates)))]
        common = dict(case_id=f"{rel.id}:{f.uuid}", prompt=template, subject=f.subject, relation_id=rel.id,
                      locality_prompt=locality_prompt, locality_answer=locality_answer,
                      generation_prompts=generation)
        if kind == "counterfactual":
            neighbours = sorted(subjects_of[f.object] - {f.subject})
            alternatives = [o for o in objects if o not in objects_of[f.subject]]
            if not neighbours or not alternatives:
                continue
            neighbours = rng.sample(neighbours, min(NUM_NEIGHBOURS, len(neighbours)))
            paraphrases = rng.sample(other_templates, min(NUM_PARAPHRASES, len(other_templates)))
            target_new = rng.choice(alternatives)
            req = EditRequest(target_new=target_new, target_true=f.object,
                              paraphrase_prompts=[_fill(t, f.subject) for t in paraphrases],
                              neighborhood_prompts=[_fill(rng.choice(rel.templates), n) for n in neighbours],
                              **common)
            req.portability_prompts, req.portability_answers = two_hop(rel, f.subject, target_new, f.object, second)
        else:
            req = EditRequest(target_new=f.object, paraphrase_prompts=[_fill(rng.choice(other_templates), f.subject)],
                              **common)
            req.portability_prompts, req.portability_answers = two_hop(rel, f.subject, f.object, None, second)
        out.append(req.validate(file=rel.source, record=f.line))
    return out


def build_pararel(root: str | Path, kind: Kind = "counterfactual", seed: int = 0,
                  max_per_relation: int | None = None, limit: int | None = None) -> Benchmark:
    """Build the `kind` benchmark ("counterfactual" or "factual") from a ParaRel folder.

    Each relation draws from its own `random.Random(f"{seed}:{relation}")`, so the output depends only
    on the data and the seed. `max_per_relation` caps each relation; `limit` keeps the first records.
    """
    if kind not in KIND_STYLE:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KIND_STYLE)}")
    relations = read_relations(root)
    per_relation = {
        rel.id: relation_requests(rel, [r for r in relations if r is not rel], kind,
                                  random.Random(f"{seed}:{rel.id}"), max_per_relation)
        for rel in relations}
    order = sorted(per_relation)
    random.Random(seed).shuffle(order)
    out: list[EditRequest] = []
    for depth in range(max(len(v) for v in per_relation.values())):  # round-robin over relations
        out += [per_relation[r][depth] for r in order if depth < len(per_relation[r])]
    return Benchmark(f"pararel_{kind}", KIND_STYLE[kind], out[:limit], str(root))


def main(argv: list[str] | None = None) -> None:
    """Write pararel_counterfactual.jsonl and pararel_factual.jsonl."""
    ap = argparse.ArgumentParser(prog="python -m editing.data.pararel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True,
                    help="ParaRel folder with patterns/P*.jsonl and tuples/P*.jsonl (from github.com/yanaiela/pararel)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "benchmarks"), help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=SHIPPED_SIZE, help="records per benchmark")
    args = ap.parse_args(argv)
    for kind in KIND_STYLE:
        bench = build_pararel(args.root, kind=kind, seed=args.seed, limit=args.size)
        path = write_jsonl(bench, Path(args.out) / f"pararel_{kind}.jsonl")
        print(f"{path}: {len(bench)} records, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
