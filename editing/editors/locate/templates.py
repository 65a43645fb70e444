"""Context templates (docs/specification.md §2.1): prefixes the model writes itself, prepended to
edit prompts, so that an edit generalises beyond the bare prompt."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import torch

from editing.data.records import EditRequest
from editing.io import write_json_atomic
from editing.models import cache_dir

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_templates(model, tokenizer, length: int, count: int, seed: int = 0, top_k: int = 5) -> list[str]:
    """`count` texts of `length` tokens (the seed word included) sampled top-k from the model, one seed
    word after another, as "<text>. {}" templates (braces in the text become spaces)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    words = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(count)]
    enc = tokenizer(words, add_special_tokens=True)["input_ids"]
    out = []
    for ids in enc:
        x = torch.tensor([ids], device=device)
        while x.shape[1] < length + (len(ids) - 1):
            logits = model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
            top = torch.topk(logits, top_k)
            nxt = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
            x = torch.cat([x, nxt.to(device)[None]], dim=1)
        text = unicodedata.normalize("NFKD", tokenizer.decode(x[0], skip_special_tokens=True))
        text = text.replace("\n\n", " ").replace("{", " ").replace("}", " ")
        out.append(text + ". {}")
    return out


def templates_path(digest: str, spec: list[list[int]], seed: int = 0) -> Path:
    """Where the template groups of a model (by weight digest), spec and seed are cached."""
    return cache_dir() / "templates" / f"{digest}-{'_'.join(f'{l}x{n}' for l, n in spec)}-s{seed}.json"


def context_templates(model, tokenizer, spec: list[list[int]], seed: int = 0,
                      cache: Path | None = None) -> list[list[str]]:
    """Template groups: ["{}"] then, for each [length, count] in `spec`, one group of generated
    templates; read from / written to `cache` when given."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    groups = [["{}"]] + [generate_templates(model, tokenizer, length, count, seed=seed + i)
                         for i, (length, count) in enumerate(spec)]
    if cache is not None:
        write_json_atomic(groups, cache, indent=None)
    return groups


def flatten(groups: list[list[str]]) -> list[str]:
    """All templates of all groups, in order ("{}" first)."""
    return [t for g in groups for t in g]


def fill(template: str, request: EditRequest) -> tuple[str, tuple[int, int]]:
    """The template with the request's prompt and subject filled in, and the subject's character span."""
    before, after = template.split("{}", 1)
    p_before, p_after = request.prompt.split("{}", 1)
    start = len(before) + len(p_before)
    text = before + p_before + request.subject + p_after + after
    return text, (start, start + len(request.subject))


def filled(requests: list[EditRequest], groups: list[list[str]]) -> tuple[list[str], list[tuple[int, int]], list[int], list[int]]:
    """Every request in every template of every group: (texts, subject spans, request index, group index)."""
    texts, spans, owner, group_of = [], [], [], []
    for i, r in enumerate(requests):
        for g, group in enumerate(groups):
            for t in group:
                text, span = fill(t, r)
                texts.append(text)
                spans.append(span)
                owner.append(i)
                group_of.append(g)
    return texts, spans, owner, group_of
