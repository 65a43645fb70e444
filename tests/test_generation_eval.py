"""Generation-based scoring: the answer rule (normalised, whole words), exact counts on a tiny model
whose greedy continuations are known, unchanged continuations against the unedited model, and the
per-case records and bootstrap intervals built from the same scores."""
import pytest
import torch

from editing.data.records import EditRequest, EvalCase, EvalPrompt
from editing.editors import FT, NoEdit
from editing.evaluation import case_records, generate_ids, generation_values, intervals, score_prompts, starts_with_answer
from editing.metrics import EditMetrics


def test_answer_rule():
    assert starts_with_answer(" Paris, the capital", "Paris")
    assert starts_with_answer("PARIS!", " paris")
    assert starts_with_answer("New-York is big", "New York")
    assert not starts_with_answer(" Parisian food", "Paris")
    assert not starts_with_answer(" the city of Paris", "Paris")
    assert not starts_with_answer("anything", "  ")


def test_rewrite_gen_counts_exactly(tiny_llama):
    ed = NoEdit(base_model=tiny_llama)
    prompts = ["The capital of France is", "Danielle Darrieux speaks", "Alan Turing works in the field of",
               "The mother tongue of Thomas Joannes Stieltjes is"]
    greedy = ed.generate(prompts, max_new_tokens=6)
    # targets: the model's own greedy words for the first two prompts, words it does not say for the rest
    first_word = [g.split()[0] if g.split() else "x" for g in greedy]
    targets = [first_word[0], first_word[1], "zzqx", "qqzv"]
    reqs = [EditRequest(str(i), p.replace("France", "{}").replace("Danielle Darrieux", "{}")
                        .replace("Alan Turing", "{}").replace("Thomas Joannes Stieltjes", "{}"),
                        s, t, "other")
            for i, (p, s, t) in enumerate(zip(prompts, ["France", "Danielle Darrieux", "Alan Turing",
                                                        "Thomas Joannes Stieltjes"], targets))]
    cases = [EvalCase(i, r, [EvalPrompt("rewrite", r.text, r.target_new, r.target_true)]) for i, r in enumerate(reqs)]
    expected = [float(starts_with_answer(g, t)) for g, t in zip(greedy, targets)]
    assert expected[:2] == [1.0, 1.0] and expected[2:] == [0.0, 0.0]
    gen = generation_values(ed, [c.prompts[0] for c in cases], extra_tokens=3)
    assert gen["value"].tolist() == expected
    m = EditMetrics("counterfact")
    stats = score_prompts(ed, cases)
    m.update_generation(stats.kinds, gen["value"], stats.groups)
    assert m.compute()["rewrite_gen"] == 50.0
    # records carry the continuation and the score; intervals come from the same per-case scores
    records = case_records(cases, stats, gen)
    assert [r["prompts"][0]["gen"] for r in records] == expected
    assert records[0]["prompts"][0]["generated"].strip().startswith(first_word[0])
    ci = intervals(records, {"gen_reliability": "rewrite_gen"})
    assert ci["gen_reliability"][0] <= 50.0 <= ci["gen_reliability"][1]


def test_unchanged_continuations_against_the_unedited_model(tiny_llama):
    ed = FT(base_model=tiny_llama, layers=[1], lr=0.5, steps=15, step_checks=False)
    r = EditRequest("0", "The capital of {} is", "France", "Tamil", "Paris",
                    neighborhood_prompts=["The capital of Spain is", "The capital of Italy is"])
    prompts = EvalCase.from_request(r, 0).prompts
    before = generation_values(ed, prompts)
    assert before["value"][1:].tolist() == [1.0, 1.0]        # no edit: every continuation is the unedited one
    ed.edit([r])
    after = generation_values(ed, prompts, unedited=True)
    # a neighbourhood prompt counts as unchanged exactly when its continuation (within the budget) is
    budget = [len(ed.tokenizer(" " + p.target, add_special_tokens=False)["input_ids"]) + 3 for p in prompts[1:]]
    edited = generate_ids(ed, [p.prompt for p in prompts[1:]], max(budget))
    with ed.disabled():
        base = generate_ids(ed, [p.prompt for p in prompts[1:]], max(budget))
        unedited_text = ed.generate([r.text], max_new_tokens=10)[0]
    assert after["value"][1:].tolist() == [float(e[:k] == b[:k]) for e, b, k in zip(edited, base, budget)]
    assert after["unedited_value"][1:].tolist() == [1.0, 1.0]
    assert after["unedited_value"][0] == float(starts_with_answer(unedited_text, "Tamil"))
    assert after["value"][0] == float(starts_with_answer(ed.generate([r.text], max_new_tokens=10)[0], "Tamil"))


def test_unchanged_rows_with_shorter_targets_than_their_chunk(tiny_llama):
    """The locality forward covers only the unchanged kinds; their longest target may be shorter than
    the chunk's (e.g. a long portability answer), and their predictions are padded to the chunk."""
    ed = NoEdit(base_model=tiny_llama)
    r = EditRequest("0", "The capital of {} is", "France", "Tamil Nadu and the Coromandel coast", "Paris",
                    locality_prompt="Danielle Darrieux speaks", locality_answer="French and German",
                    portability_prompts=["The country of citizenship of France belongs to the continent of"],
                    portability_answers=["South America and the Antarctic"])
    m = EditMetrics("zsre")
    m.update(score_prompts(ed, [EvalCase.from_request(r, 0)]))
    assert m.compute()["locality_unchanged"] == 100.0
