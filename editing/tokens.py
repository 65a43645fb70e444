"""Tokenisation with the positions editors and metrics need, from character offsets.

Target ids are tokens(prompt + " " + target) minus tokens(prompt), found by character offsets on
one joint encoding (never by encoding pieces separately, which breaks on SentencePiece/Llama
tokenizers). Batches are right-padded; every position is per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def join(prompt: str, target: str) -> str:
    """prompt + target with one separating space unless either side already has whitespace."""
    if not target or prompt == "" or prompt[-1].isspace() or target[0].isspace():
        return prompt + target
    return prompt + " " + target


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; the toolkit needs character offsets "
            "(load the tokenizer with use_fast=True)")


@dataclass
class TargetBatch:
    """A right-padded batch of prompt (+ target) sequences.

    input_ids/attention_mask: [B, S]. prompt_last: [B], the last prompt token (PL).
    target_ids/target_mask: [B, T] (T = longest target; padded with 0/False).
    target_positions: [B, T], the positions whose *logits* predict each target token
    (= the target token's own position - 1). Rows without a target have an empty mask.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_last: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_positions: torch.Tensor
    subject_last: torch.Tensor | None = None

    def to(self, device) -> "TargetBatch":
        return TargetBatch(*(None if getattr(self, f) is None else getattr(self, f).to(device)
                             for f in self.__dataclass_fields__))

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


def last_token_in_span(offsets, span: tuple[int, int]) -> int:
    """Index of the last token whose character span overlaps `span` (special tokens never do)."""
    s0, s1 = span
    last = None
    for j, (a, b) in enumerate(offsets):
        if b > a and a < s1 and b > s0:
            last = j
    if last is None:
        raise ValueError(f"no token covers characters {s0}..{s1}")
    return last


def encode(tokenizer, prompts: list[str], targets: list[str | None] | None = None,
           max_length: int | None = None, spans: list[tuple[int, int]] | None = None) -> TargetBatch:
    """Encode prompts, each optionally followed by a target, right-padded, with target positions.
    With `spans` (character spans inside each prompt, e.g. the subject), also the position of the
    last token of each span (`subject_last`), from the same encoding."""
    _require_fast(tokenizer)
    if targets is None:
        targets = [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ValueError("prompts and targets must have the same length")
    texts = [p if t is None else join(p, t) for p, t in zip(prompts, targets)]
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    rows_ids, prompt_last, tgt, span_last = [], [], [], []
    for i, (p, ids, offs) in enumerate(zip(prompts, enc["input_ids"], enc["offset_mapping"])):
        if max_length is not None:
            ids, offs = ids[-max_length:], offs[-max_length:]
        # Prompt tokens: those whose span ends within the prompt (special tokens have (0, 0)).
        n_prompt = 0
        for j, (s, e) in enumerate(offs):
            if e <= len(p) and not (targets[i] is not None and s >= len(p) and e > s):
                n_prompt = j + 1
            else:
                break
        if n_prompt == 0:
            raise ValueError(f"prompt {p!r} produced no tokens")
        tgt_ids = ids[n_prompt:] if targets[i] is not None else []
        if targets[i] is not None and not tgt_ids:
            raise ValueError(f"target {targets[i]!r} produced no tokens after prompt {p!r}")
        if spans is not None:
            span_last.append(last_token_in_span(offs, spans[i]))
        rows_ids.append(ids)
        prompt_last.append(n_prompt - 1)
        tgt.append((n_prompt, tgt_ids))
    B = len(rows_ids)
    T = max([len(t) for _, t in tgt] + [1])
    input_ids, attention_mask = pad_right(tokenizer, rows_ids)
    target_ids = torch.zeros((B, T), dtype=torch.long)
    target_mask = torch.zeros((B, T), dtype=torch.bool)
    target_positions = torch.zeros((B, T), dtype=torch.long)
    for i in range(B):
        start, t_ids = tgt[i]
        if t_ids:
            target_ids[i, : len(t_ids)] = torch.tensor(t_ids)
            target_mask[i, : len(t_ids)] = True
            target_positions[i, : len(t_ids)] = torch.arange(start - 1, start - 1 + len(t_ids))
    return TargetBatch(input_ids, attention_mask, torch.tensor(prompt_last), target_ids, target_mask,
                       target_positions, torch.tensor(span_last) if spans is not None else None)


def length_chunks(lengths: torch.Tensor, budget: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`rows` (default: all) sorted by `lengths` in consecutive chunks of at most `budget` positions
    once padded to the chunk's longest row (at least one row each): little is spent on padding and
    the memory of one forward is bounded."""
    rows = torch.arange(len(lengths), device=lengths.device) if rows is None else rows
    rows = rows[torch.argsort(lengths[rows], stable=True)]
    chunks, begin = [], 0
    widths = lengths[rows].tolist()
    for i, w in enumerate(widths):
        if i > begin and (i - begin + 1) * w > budget:
            chunks.append(rows[begin:i])
            begin = i
    if begin < len(widths):
        chunks.append(rows[begin:])
    return chunks


def pad_right(tokenizer, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] and attention mask [B, S] of token id lists (`tokenizer.pad`; a
    tokenizer without a pad token gets id 0 there, which the mask hides)."""
    if tokenizer.pad_token_id is not None:
        enc = tokenizer.pad({"input_ids": seqs}, padding_side="right", return_attention_mask=True,
                            return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()
    S = max(len(s) for s in seqs)
    return (torch.tensor([list(s) + [0] * (S - len(s)) for s in seqs], dtype=torch.long),
            torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs], dtype=torch.long))


def find_subject(text: str, subject: str) -> tuple[int, int]:
    """Character span of the last occurrence of `subject` in `text` (exact, then case-insensitive)."""
    start = text.rfind(subject)
    if start < 0:
        start = text.lower().rfind(subject.lower())
    if start < 0:
        raise ValueError(f"subject {subject!r} not found in {text!r}")
    return start, start + len(subject)


def subject_last_positions(tokenizer, texts: list[str], subjects: list[str]) -> torch.Tensor:
    """Position of the subject's last token (SL) in each text, from character offsets: the last
    token whose span overlaps the subject's character span."""
    _require_fast(tokenizer)
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    return torch.tensor([last_token_in_span(offs, find_subject(text, subject))
                         for text, subject, offs in zip(texts, subjects, enc["offset_mapping"])], dtype=torch.long)
