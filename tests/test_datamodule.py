"""EditDataModule: selection, edit steps, evaluation cases, rank sharding; per-token pairs and
out-of-scope samples."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing.data.module import EditDataModule, ShardSampler
from editing.data.records import EditRequest
from editing.data.samples import out_of_scope_samples, per_token_pairs


def test_edit_steps_and_cases():
    dm = EditDataModule(num_edits=7, edit_batch_size=3)
    steps = dm.edit_steps()
    assert [len(s) for s in steps] == [3, 3, 1]
    assert [r.case_id for s in steps for r in s] == [r.case_id for r in dm.requests]
    assert dm.style == "counterfact"
    assert len(dm.eval_cases()) == 7
    assert [len(b) for b in dm.train_dataloader()] == [3, 3, 1]
    # an edit step carries what an editor needs: the style and the out-of-scope pool
    from editing.data.batch import EditBatch
    assert all(isinstance(b, EditBatch) and b.style == "counterfact" and b.pool == dm.requests
               for b in dm.train_dataloader())
    one = EditDataModule(num_edits=7, edit_batch_size=-1)
    assert [len(s) for s in one.edit_steps()] == [7]
    seq = EditDataModule(num_edits=4, edit_batch_size=1)
    assert [len(s) for s in seq.edit_steps()] == [1, 1, 1, 1]


def test_selection_is_seeded():
    a = EditDataModule(num_edits=5, shuffle=True, seed=1).requests
    b = EditDataModule(num_edits=5, shuffle=True, seed=1).requests
    c = EditDataModule(num_edits=5, shuffle=True, seed=2).requests
    assert [r.case_id for r in a] == [r.case_id for r in b] != [r.case_id for r in c]
    first = EditDataModule(num_edits=5).requests
    assert [r.case_id for r in first] == [r.case_id for r in EditDataModule(num_edits=-1).requests[:5]]


def test_prompt_suffix_reaches_every_scored_prompt(tmp_path):
    rec = {"subject": "Arlon", "src": "What country is Arlon the capital of?", "alt": "France",
           "answers": ["Belgium"], "rephrase": "Arlon is the capital of which country?",
           "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([rec, {**rec, "subject": "Paris", "src": "What country is Paris the capital of?"}]))
    plain = EditDataModule(path=str(path), num_edits=2)
    dm = EditDataModule(path=str(path), num_edits=2, prompt_suffix=" Answer:")
    for a, b in zip(plain.requests, dm.requests):
        assert b.prompt == a.prompt + " Answer:" and b.text == a.text + " Answer:"
        assert b.paraphrase_prompts == [p + " Answer:" for p in a.paraphrase_prompts]
        assert b.locality_prompt == a.locality_prompt + " Answer:"
        assert (b.subject, b.target_new, b.target_true) == (a.subject, a.target_new, a.target_true)
    case = dm.eval_cases()[0]
    assert len(case.prompts) == 3 and all(p.prompt.endswith(" Answer:") for p in case.prompts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_edits"):
        EditDataModule(num_edits=0)
    with pytest.raises(ValueError, match="edit_batch_size"):
        EditDataModule(edit_batch_size=-3)


def test_shards_cover_every_case_once():
    dm = EditDataModule(num_edits=11)
    cases = dm.eval_cases()
    seen = []
    for rank in range(3):
        seen += list(ShardSampler(cases, 3, rank))
    assert sorted(seen) == list(range(11))


def test_per_token_pairs(tiny_dirs):
    for family in ("gpt2", "llama"):
        tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
        req = EditRequest("x", "The capital of {} is", "France", "Paris Tamil", "Paris")
        pairs = per_token_pairs(req, tok)
        full = tok("The capital of France is Paris Tamil")["input_ids"]
        prompt = tok("The capital of France is")["input_ids"]
        assert len(pairs) == len(full) - len(prompt) >= 2
        for i, p in enumerate(pairs):
            assert p.position == i
            assert p.input_ids == full[: len(prompt) + i]
            assert p.label == full[len(prompt) + i]


def test_out_of_scope_samples(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    reqs = [EditRequest(str(i), "{} works in", f"Person {i}", "logic") for i in range(10)]
    out = out_of_scope_samples(reqs[0], reqs, model, tok, n_other=6, n_bos=2, n_subject=2, length=4, seed=0)
    assert len(out) == 10
    others = out[:6]
    assert all(o in {r.text for r in reqs[1:]} for o in others)
    assert out[8].startswith("Person 0") and out[9].startswith("Person 0")
    again = out_of_scope_samples(reqs[0], reqs, model, tok, n_other=6, n_bos=2, n_subject=2, length=4, seed=0)
    assert again == out
