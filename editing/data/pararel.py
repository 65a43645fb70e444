"""Benchmarks built from ParaRel (Elazar et al. 2021, MIT License; see benchmarks/NOTICE).

ParaRel gives, per Wikidata relation, paraphrase patterns ("The mother tongue of [X] is [Y].") and
T-REx facts (subject, object). Two benchmarks are built from it, deterministically given a seed:

- "counterfactual" (COUNTERFACT-style, as COUNTERFACT itself was built from ParaRel): the prompt from
  one pattern, target_true the object, target_new another object of the same relation, paraphrases
  from two other patterns, neighbourhood prompts about other subjects sharing the relation and the
  true object, and a locality prompt from an unrelated fact;
- "factual" (iReVa's PARAREL style): insert the true object, with one paraphrase and a locality
  prompt from an unrelated fact.

Only patterns whose object slot ends the sentence can serve as next-token prompts. Relations are
interleaved round-robin so that the first N records span many relations.

Regenerate the shipped files with
    python -m editing.data.pararel --root ../shared/data/pararel --out editing/data/benchmarks
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from editing.data.records import Benchmark, DataError, EditRequest

SHIPPED_SIZE = 1500


def usable_template(pattern: str) -> str | None:
    """"[X] works in the field of [Y]." -> "{} works in the field of"; None if [Y] is not last."""
    p = pattern.strip()
    while p and p[-1] in ". ":
        p = p[:-1]
    if not p.endswith("[Y]") or p.count("[X]") != 1 or p.count("[Y]") != 1:
        return None
    head = p[:-3].strip()
    if not head or "{" in head or "}" in head:
        return None
    return head.replace("[X]", "{}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", file=str(path), record=i) from e
    return rows


def read_relations(root: str | Path) -> dict[str, tuple[list[str], list[tuple[str, str, str]]]]:
    """relation id -> (usable templates, facts (subject, object, uuid)) for relations with >= 2 templates."""
    root = Path(root)
    out = {}
    for pfile in sorted((root / "patterns").glob("*.jsonl")):
        rel = pfile.stem
        tfile = root / "tuples" / pfile.name
        if not tfile.exists():
            continue
        templates = []
        for i, row in enumerate(_read_jsonl(pfile)):
            if "pattern" not in row:
                raise DataError("missing required field", file=str(pfile), record=i, field="pattern")
            t = usable_template(row["pattern"])
            if t is not None and t not in templates:
                templates.append(t)
        facts = []
        for i, row in enumerate(_read_jsonl(tfile)):
            for key in ("sub_label", "obj_label"):
                if key not in row:
                    raise DataError("missing required field", file=str(tfile), record=i, field=key)
            s, o = str(row["sub_label"]).strip(), str(row["obj_label"]).strip()
            if s and o and "{" not in s and "}" not in s:
                facts.append((s, o, str(row.get("uuid", i))))
        if len(templates) >= 2 and facts:
            out[rel] = (templates, facts)
    if not out:
        raise DataError("no relation with at least two usable patterns and facts", file=str(root))
    return out


def build_pararel(root: str | Path, kind: str = "counterfactual", seed: int = 0,
                  max_per_relation: int | None = None, limit: int | None = None) -> Benchmark:
    if kind not in ("counterfactual", "factual"):
        raise ValueError(f"unknown kind {kind!r}; expected counterfactual or factual")
    relations = read_relations(root)
    rels = sorted(relations)
    rng = random.Random(seed)

    def unrelated_fact(rel: str) -> tuple[str, str]:
        other = rng.choice([r for r in rels if r != rel] or rels)
        templates, facts = relations[other]
        s, o, _ = rng.choice(facts)
        return rng.choice(templates).replace("{}", s), o

    per_relation: dict[str, list[EditRequest]] = {}
    for rel in rels:
        templates, facts = relations[rel]
        objects = sorted({o for _, o, _ in facts})
        by_object: dict[str, list[str]] = {}
        for s, o, _ in facts:
            by_object.setdefault(o, []).append(s)
        order = list(range(len(facts)))
        rng.shuffle(order)
        reqs = []
        for i in order:
            if max_per_relation is not None and len(reqs) >= max_per_relation:
                break
            s, o, uid = facts[i]
            t = rng.randrange(len(templates))
            others = [x for j, x in enumerate(templates) if j != t]
            loc_prompt, loc_answer = unrelated_fact(rel)
            if kind == "counterfactual":
                neighbours = sorted({n for n in by_object[o] if n != s})
                alternatives = [x for x in objects if x != o]
                if not neighbours or not alternatives:
                    continue
                neighbours = rng.sample(neighbours, min(5, len(neighbours)))
                req = EditRequest(
                    case_id=f"{rel}:{uid}", prompt=templates[t], subject=s,
                    target_new=rng.choice(alternatives), target_true=o,
                    paraphrase_prompts=[x.replace("{}", s) for x in rng.sample(others, min(2, len(others)))],
                    neighborhood_prompts=[rng.choice(templates).replace("{}", n) for n in neighbours],
                    locality_prompt=loc_prompt, locality_answer=loc_answer,
                    generation_prompts=[x.replace("{}", s) for x in rng.sample(templates, min(2, len(templates)))],
                    relation_id=rel)
            else:
                req = EditRequest(
                    case_id=f"{rel}:{uid}", prompt=templates[t], subject=s, target_new=o,
                    paraphrase_prompts=[rng.choice(others).replace("{}", s)],
                    locality_prompt=loc_prompt, locality_answer=loc_answer,
                    generation_prompts=[templates[t].replace("{}", s)], relation_id=rel)
            reqs.append(req.validate(file=str(root), record=len(reqs)))
        per_relation[rel] = reqs
    # Round-robin over relations in a seeded order.
    order = list(rels)
    rng.shuffle(order)
    out: list[EditRequest] = []
    depth = max(len(v) for v in per_relation.values())
    for j in range(depth):
        for rel in order:
            if j < len(per_relation[rel]):
                out.append(per_relation[rel][j])
    if limit is not None:
        out = out[:limit]
    style = "counterfact" if kind == "counterfactual" else "zsre"
    return Benchmark(f"pararel_{kind}", style, out, str(root))


def main(argv: list[str] | None = None) -> None:
    from editing.data.readers import write_jsonl

    ap = argparse.ArgumentParser(description="Build the shipped ParaRel benchmarks.")
    ap.add_argument("--root", default="../shared/data/pararel", help="ParaRel folder with patterns/ and tuples/")
    ap.add_argument("--out", default=str(Path(__file__).parent / "benchmarks"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=SHIPPED_SIZE)
    args = ap.parse_args(argv)
    for kind in ("counterfactual", "factual"):
        bench = build_pararel(args.root, kind=kind, seed=args.seed, limit=args.size)
        path = write_jsonl(bench, Path(args.out) / f"pararel_{kind}.jsonl")
        print(f"{path}: {len(bench)} records, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
