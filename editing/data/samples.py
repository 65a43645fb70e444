"""What editors derive from edit requests: per-token pairs and out-of-scope samples."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from editing.data.records import EditRequest
from editing.tokens import encode


@dataclass
class TokenPair:
    """One next-token edit: `input_ids` (the prompt plus the target's first `position` tokens)
    should continue with `label`."""

    case_id: str
    position: int
    input_ids: list[int]
    label: int


def per_token_pairs(request: EditRequest, tokenizer, prompt: str | None = None) -> list[TokenPair]:
    """prompt + target[:i] -> target[i] for every token i of `target_new` (tokenised jointly)."""
    text = request.text if prompt is None else prompt
    batch = encode(tokenizer, [text], [request.target_new])
    n_prompt = int(batch.prompt_last[0]) + 1
    ids = batch.input_ids[0, : int(batch.lengths[0])].tolist()
    targets = batch.target_ids[0, batch.target_mask[0]].tolist()
    return [TokenPair(request.case_id, i, ids[: n_prompt + i], t) for i, t in enumerate(targets)]


@torch.no_grad()
def _sample(model, tokenizer, prefixes: list[list[int]], length: int, generator: torch.Generator) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    for ids in prefixes:
        x = torch.tensor([ids], device=device)
        step_in, past = x, None
        for _ in range(length):  # incremental decoding with a KV cache
            out = model(input_ids=step_in, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = torch.multinomial(torch.softmax(out.logits[0, -1].float(), -1).cpu(), 1, generator=generator)
            step_in = nxt.to(device)[None]
            x = torch.cat([x, step_in], dim=1)
        texts.append(tokenizer.decode(x[0], skip_special_tokens=True))
    return texts


def out_of_scope_samples(request: EditRequest, others: list[EditRequest], model, tokenizer,
                         n_other: int = 6, n_bos: int = 2, n_subject: int = 2, length: int = 10,
                         seed: int = 0) -> list[str]:
    """Texts an edit must not fire on (iReVa's L_irr, App. 10.7): prompts of other records, texts the
    model samples from the start token, and texts it samples from the edit's subject."""
    rng = random.Random(f"{seed}:{request.case_id}")
    pool = [r.text for r in others if r.case_id != request.case_id]
    picked = rng.sample(pool, min(n_other, len(pool)))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefixes = [[start]] * n_bos
    subject_ids = tokenizer(request.subject, add_special_tokens=False)["input_ids"]
    prefixes += [subject_ids] * n_subject
    return picked + _sample(model, tokenizer, prefixes, length, gen)
