"""Positions from character offsets, on byte-level BPE and SentencePiece-style tokenizers."""
import pytest
import torch
from transformers import AutoTokenizer

from editing.tokens import encode, join, subject_last_positions


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tok(request, tiny_dirs):
    t = AutoTokenizer.from_pretrained(tiny_dirs[request.param])
    t.pad_token = t.eos_token
    return t


def test_join():
    assert join("The capital is", "Paris") == "The capital is Paris"
    assert join("Q: x?\nA:", " y") == "Q: x?\nA: y"
    assert join("line\n", "y") == "line\ny"


def test_targets_are_the_joint_suffix(tok):
    prompts = ["The capital of France is", "Danielle Darrieux speaks"]
    targets = ["Paris", "French or Tamil"]
    b = encode(tok, prompts, targets)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        full = tok(join(p, t))["input_ids"]
        prompt_ids = tok(p)["input_ids"]
        n = len(prompt_ids)
        assert full[:n] == prompt_ids
        tgt = b.target_ids[i, b.target_mask[i]].tolist()
        assert tgt == full[n:]
        assert tok.decode(tgt).strip() == t
        assert int(b.prompt_last[i]) == n - 1
        # logits at target_positions predict the target tokens: the token right after each position
        pos = b.target_positions[i, b.target_mask[i]]
        assert b.input_ids[i, pos + 1].tolist() == tgt
    assert b.attention_mask.sum(1).tolist() == [len(tok(join(p, t))["input_ids"]) for p, t in zip(prompts, targets)]
    # right padding
    assert b.attention_mask[:, 0].all()


def test_prompts_without_targets(tok):
    b = encode(tok, ["Alan Turing works in", "Paris"])
    assert not b.target_mask.any()
    assert b.prompt_last.tolist() == [len(tok("Alan Turing works in")["input_ids"]) - 1, len(tok("Paris")["input_ids"]) - 1]


@pytest.mark.parametrize("text,subject,last_piece", [
    ("Danielle Darrieux speaks", "Danielle Darrieux", "rrieux"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "rrieux"),
    ("Münster is a city in", "Münster", "ster"),
    ("In 1984, Iron Man was", "Iron Man", "Man"),
])
def test_subject_last_position(tok, text, subject, last_piece):
    pos = int(subject_last_positions(tok, [text], [subject])[0])
    ids = tok(text)["input_ids"]
    piece = tok.decode(ids[pos])
    assert piece.strip().endswith(last_piece[-len(piece.strip()):]) and piece.strip() != ""
    # the next token is not part of the subject
    upto = tok.decode(ids[: pos + 1], skip_special_tokens=True)
    assert upto.rstrip().endswith(subject)


def test_subject_missing_is_an_error(tok):
    with pytest.raises(ValueError, match="not found"):
        subject_last_positions(tok, ["The capital is"], ["France"])


def test_length_chunks_cover_rows_once_within_budget():
    from editing.tokens import length_chunks

    lengths = torch.tensor([5, 1, 9, 3, 3, 20, 2, 7])
    chunks = length_chunks(lengths, budget=12)
    flat = torch.cat(chunks).tolist()
    assert sorted(flat) == list(range(8))                                  # every row once
    assert [lengths[i] for i in flat] == sorted(lengths.tolist())          # shortest first
    for c in chunks:
        assert len(c) == 1 or len(c) * int(lengths[c].max()) <= 12         # the budget (a longer row alone)
    sub = length_chunks(lengths, budget=100, rows=torch.tensor([5, 0, 2]))
    assert [c.tolist() for c in sub] == [[0, 2, 5]]
