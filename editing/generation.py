"""Generation-based scoring (no teacher forcing): greedy continuations by the edited model (batched,
left-padded, KV-cached `generate`) and the rules that score them against a target or against the
unedited model's continuation. `editing.evaluation` runs them beside the teacher-forced statistics."""
from __future__ import annotations

import unicodedata

import torch

from editing.metrics import UNCHANGED_KINDS
from editing.tokens import encode


@torch.no_grad()
def generate_ids(editor, prompts: list[str], max_new_tokens: int = 30, **kwargs) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation by the edited model (left-padded, one
    batched, KV-cached `generate`), cut after the first end-of-sequence token."""
    tok = editor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([editor.prepare_prompt(p) for p in prompts], return_tensors="pt", padding=True).to(editor.device)
    finally:
        tok.padding_side = side
    kwargs.setdefault("do_sample", False)
    out = editor.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
    eos = editor.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def generate(editor, prompts: list[str], max_new_tokens: int = 30, **kwargs) -> list[str]:
    """Greedy continuations of the prompts by the edited model (left-padded, one batch)."""
    ids = generate_ids(editor, prompts, max_new_tokens, **kwargs)
    return editor.tokenizer.batch_decode(ids, skip_special_tokens=True)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation (any Unicode P* character) as spaces, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(text.split())


def starts_with_answer(continuation: str, target: str) -> bool:
    """Whether the normalised continuation is the normalised target or starts with it as whole words
    ("Paris, the capital" counts for "Paris"; "Parisian" does not)."""
    c, t = normalize_answer(continuation), normalize_answer(target)
    return bool(t) and (c == t or c.startswith(t + " "))


HIT_KINDS = ("rewrite", "paraphrase", "portability")   # generation: does the continuation give the target?


@torch.no_grad()
def generation_values(editor, prompts: list, extra_tokens: int = 3, batch_size: int = 64,
                      unedited: bool = False) -> dict:
    """Generation-based scores of EvalPrompts (no teacher forcing): each prompt's greedy continuation
    of (its target's token count + `extra_tokens`) tokens. "value" [N]: for rewrite, paraphrase and
    portability prompts 1 if it starts with the target (`starts_with_answer`), for neighbourhood and locality
    prompts 1 if it is token for token the unedited model's; "text": the continuations. With
    `unedited`, "unedited_value" [N]: the same scores of the unedited model (1 on the unchanged kinds)."""
    tok = editor.tokenizer
    out = {"value": [], "text": [], "unedited_value": []}
    no_edit = not editor.edit_log
    for s in range(0, len(prompts), max(1, batch_size)):
        part = prompts[s:s + batch_size]
        texts = [p.prompt for p in part]
        lengths = encode(tok, [editor.prepare_prompt(t) for t in texts], [p.target for p in part]).target_mask.sum(1)
        budget = [int(n) + extra_tokens for n in lengths]
        ids = [row[:b] for row, b in zip(generate_ids(editor, texts, max(budget)), budget)]
        need = [i for i, p in enumerate(part) if unedited or p.kind in UNCHANGED_KINDS]
        base = {}
        if need and no_edit:
            base = {i: ids[i] for i in need}
        elif need:
            with editor.disabled():
                got = generate_ids(editor, [texts[i] for i in need], max(budget[i] for i in need))
            base = {i: row[:budget[i]] for i, row in zip(need, got)}
        decoded = tok.batch_decode(ids, skip_special_tokens=True)
        for i, p in enumerate(part):
            if p.kind in HIT_KINDS:
                out["value"].append(float(starts_with_answer(decoded[i], p.target)))
                if unedited:
                    out["unedited_value"].append(float(starts_with_answer(
                        tok.decode(base[i], skip_special_tokens=True), p.target)))
            else:
                out["value"].append(float(ids[i] == base[i]))
                out["unedited_value"].append(1.0)
        out["text"] += decoded
    out["value"] = torch.tensor(out["value"], dtype=torch.float64)
    out["unedited_value"] = torch.tensor(out["unedited_value"], dtype=torch.float64) if unedited else None
    return out
