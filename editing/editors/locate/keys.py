"""Keys k and current values of the locate-then-edit core (docs/specification.md §2.2)."""
from __future__ import annotations

from typing import Literal, get_args

import torch

from editing import hooks
from editing.data.records import EditRequest
from editing.editors.locate.templates import fill, filled
from editing.layout import Layout
from editing.tokens import encode, length_chunks
from editing.validation import check_choice

Position = Literal["subject_last", "prompt_last"]
POSITIONS: tuple[str, ...] = get_args(Position)
Part = Literal["block", "mlp", "attn_out"]


def check_position(position: str) -> None:
    check_choice("position", position, Position)


@torch.no_grad()
def compute_keys(layout: Layout, tokenizer, requests: list[EditRequest], layer: int, groups: list[list[str]],
                 position: Position = "subject_last", chunk_tokens: int = 8192) -> torch.Tensor:
    """k [u, d_ff]: the input of the MLP output projection of `layer` at the subject's last token (or
    the prompt's last token), mean within each template group, then mean over groups. Forwards
    stopping after `layer`, each row cut after its key position (nothing later reaches it), rows in
    chunks of similar length of at most `chunk_tokens` positions."""
    check_position(position)
    texts, spans, owner, group_of = filled(requests, groups)
    batch = encode(tokenizer, texts, spans=spans).to(layout.device)
    pos = batch.subject_last if position == "subject_last" else batch.prompt_last
    k = None
    for rows in length_chunks(pos + 1, chunk_tokens):
        width = int(pos[rows].max()) + 1
        with hooks.capture({"k": layout.mlp_out(layer)}, "input", positions=pos[rows]) as cap:
            hooks.run_until(layout.backbone, layout.block(layer), input_ids=batch.input_ids[rows, :width],
                            attention_mask=batch.attention_mask[rows, :width], use_cache=False)
        if k is None:
            k = torch.empty(len(texts), cap["k"].shape[-1], device=cap["k"].device)
        k[rows] = cap["k"].float()
    owner_t, group_t = torch.tensor(owner, device=k.device), torch.tensor(group_of, device=k.device)
    out = torch.zeros(len(requests), k.shape[1], device=k.device)
    for g in range(len(groups)):
        sel = group_t == g
        sums = torch.zeros_like(out).index_add_(0, owner_t[sel], k[sel])
        counts = torch.bincount(owner_t[sel], minlength=len(requests)).clamp(min=1)
        out += sums / counts[:, None]
    return out / len(groups)


@torch.no_grad()
def current_values(layout: Layout, tokenizer, requests: list[EditRequest], part: Part, layer: int,
                   position: Position = "subject_last") -> torch.Tensor:
    """The output of `part` at `layer` at the subject's last token (or the prompt's last token) of
    each bare prompt [u, d]."""
    check_position(position)
    texts, spans = zip(*(fill("{}", r) for r in requests))
    batch = encode(tokenizer, list(texts), spans=list(spans)).to(layout.device)
    pos = batch.subject_last if position == "subject_last" else batch.prompt_last
    with hooks.capture({"v": layout.part(layer, part)}, "output", positions=pos) as cap:
        hooks.run_until(layout.backbone, layout.block(layer), input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask, use_cache=False)
    return cap["v"].float()
