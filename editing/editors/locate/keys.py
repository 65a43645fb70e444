"""Keys k and current values of the locate-then-edit core (docs/specification.md §2.2)."""
from __future__ import annotations

from typing import Literal, get_args

import torch

from editing import hooks
from editing.data.records import EditRequest
from editing.editors.locate.templates import fill, filled
from editing.layout import Layout
from editing.tokens import encode, length_chunks
from editing.tuners.base import position_wise
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
    chunks of similar length of at most `chunk_tokens` positions (`_at_position`)."""
    check_position(position)
    texts, spans, owner, group_of = filled(requests, groups)
    k = _at_position(layout, tokenizer, texts, spans, position, layer, layout.mlp_out(layer), "input", chunk_tokens)
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
                   position: Position = "subject_last", chunk_tokens: int = 8192) -> torch.Tensor:
    """The output of `part` at `layer` at the subject's last token (or the prompt's last token) of
    each bare prompt [u, d], computed as the keys are (rows cut after the position, in chunks)."""
    check_position(position)
    texts, spans = zip(*(fill("{}", r) for r in requests))
    return _at_position(layout, tokenizer, list(texts), list(spans), position, layer, layout.part(layer, part),
                        "output", chunk_tokens)


def _at_position(layout: Layout, tokenizer, texts: list[str], spans: list[tuple[int, int]], position: Position,
                 layer: int, module: torch.nn.Module, kind: hooks.Where, chunk_tokens: int
                 ) -> torch.Tensor:
    """The `kind` of `module` (inside block `layer` or below) at `position` of each text [n, d]:
    forwards stopping after block `layer`, each row cut after its position (a causal model's later
    tokens do not reach it; whole rows where an edit layer up to `layer` looks at whole sequences),
    rows in chunks of similar length of at most `chunk_tokens` positions."""
    batch = encode(tokenizer, texts, spans=spans).to(layout.device)
    pos = batch.subject_last if position == "subject_last" else batch.prompt_last
    cut = position_wise(*(layout.block(l) for l in range(layout.layer_index(layer) + 1)))
    lengths = pos + 1 if cut else batch.attention_mask.sum(1)
    out = None
    for rows in length_chunks(lengths, chunk_tokens):
        width = int(lengths[rows].max())
        with hooks.capture({"x": module}, kind, positions=pos[rows]) as cap:
            hooks.run_until(layout.backbone, layout.block(layer), input_ids=batch.input_ids[rows, :width],
                            attention_mask=batch.attention_mask[rows, :width], use_cache=False)
        if out is None:
            out = torch.empty(len(texts), cap["x"].shape[-1], device=cap["x"].device)
        out[rows] = cap["x"].float()
    return out
