"""iReVa with calibrated margins (`IReVa(calibration=...)`; a variant, not in the paper; docs/ireva.md):
after each edit step every new neuron j's margin is raised to

    b_j = max(θ‖k̂_j‖², max_m k̂_jᵀx̂_m + c‖k̂_j‖²)

over standardised MLP inputs x̂_m of the unedited model that the neuron must not fire on
(c = `calibration_margin`), and the adaptor's activation is gated (`KeyValueAdaptor(gate=True)`: a
neuron whose shifted activation is not positive adds nothing; SiLU and GELU are not zero below 0).
The inputs come from one of two sources:

- "corpus": every real position of the first `calibration_texts` texts of `calibration_corpus`
  (64 tokens each), shared by all neurons;
- "template": the neuron's own input with another subject, i.e. the edit's prompt template filled with
  `calibration_texts` other subjects (seeded sample of the subjects of the step's pool, else of the
  requests edited so far), followed by the same target prefix, at the position the neuron acts on.
  These are the inputs closest to an edit's key that are out of its scope: SmolLM2's late-layer states
  at a prompt's last token are dominated by the template, not the subject (docs/ireva.md).

The initial margins are raised before retrofitting (so the values are trained at the margins they
keep: raising a margin afterwards would also shrink the neuron's output on its own input), and again
after it, since retrofitting moves the keys. So no neuron adds anything on any of its calibration
inputs; margins are part of the bank, so withdrawal and disabling are unchanged.
"""
from __future__ import annotations

import random
from dataclasses import replace

import torch

from editing import hooks
from editing.corpus import load_corpus
from editing.data.records import EditRequest
from editing.tuners.kv_adaptor import standardize


@torch.no_grad()
def calibration_states(editor) -> torch.Tensor:
    """The standardised MLP inputs [M, d] of the unedited model at every real position of the
    calibration texts (computed once per editor)."""
    if editor._calibration is None:
        h, lay = editor.hparams, editor.layout
        texts = load_corpus(h.calibration_corpus, h.calibration_texts)
        states = []
        for s in range(0, len(texts), 16):
            enc = editor.tokenizer(texts[s:s + 16], truncation=True, max_length=64, padding=True,
                                   return_tensors="pt").to(editor.device)
            with editor.disabled(), hooks.capture({"x": lay.mlp(editor.layer)}, "input") as cap:
                hooks.run_until(lay.backbone, lay.mlp(editor.layer), input_ids=enc["input_ids"],
                                attention_mask=enc["attention_mask"], use_cache=False)
            states.append(standardize(cap["x"][enc["attention_mask"].bool()]))
        editor._calibration = torch.cat(states)
    return editor._calibration


def other_subjects(request: EditRequest, pool: list[EditRequest], n: int, seed: int) -> list[str]:
    """`n` subjects of `pool` other than the request's own (distinct, seeded by the case id)."""
    subjects = sorted({r.subject for r in pool} - {request.subject})
    return random.Random(f"{seed}:{request.case_id}:calibration").sample(subjects, min(n, len(subjects)))


@torch.no_grad()
def template_tops(editor, requests: list[EditRequest], pool: list[EditRequest], keys: torch.Tensor) -> torch.Tensor:
    """Per new neuron (the step's pairs in order, `keys` [d, n_new]), the largest activation k̂ᵀx̂ over
    its pair rebuilt with other subjects; −inf where there is none."""
    h = editor.hparams
    rows, owner = [], []
    first = 0
    for r in requests:
        n_pairs = len(editor.pairs(r))
        for s in other_subjects(r, pool, h.calibration_texts, h.seed):
            for j, p in enumerate(editor.pairs(replace(r, subject=s))[:n_pairs]):
                rows.append(p.input_ids)
                owner.append(first + j)
        first += n_pairs
    top = torch.full((keys.shape[1],), float("-inf"), device=keys.device)
    for s in range(0, len(rows), 32):
        ids, mask, last = editor._pad(rows[s:s + 32])
        x, _ = editor._states(ids, mask, last)
        act = (standardize(x).to(keys) * keys[:, owner[s:s + 32]].T).sum(-1)
        top.scatter_reduce_(0, torch.tensor(owner[s:s + 32], device=keys.device), act, "amax")
    return top


@torch.no_grad()
def floors(editor, keys: torch.Tensor, requests: list[EditRequest] | None, pool: list[EditRequest] | None) -> torch.Tensor:
    """max_m k̂_jᵀx̂_m + c‖k̂_j‖² for the keys [d, n] of the step's new neurons (the step's pairs in order)."""
    if editor.hparams.calibration == "template":
        top = template_tops(editor, requests, pool, keys)
    else:
        top = (calibration_states(editor).to(keys) @ keys).max(0).values
    return top + editor.hparams.calibration_margin * (keys * keys).sum(0)


@torch.no_grad()
def calibrate(editor, first: int, requests: list[EditRequest] | None = None,
              pool: list[EditRequest] | None = None) -> int:
    """Raise the margins of the editor's neurons `first`.. above every one of their calibration inputs
    (`requests`: the step's, whose pairs the new neurons serve in order; `pool`: where other subjects
    come from); returns how many were raised. (`IReVa` also raises the initial margins the same way
    before retrofitting, so the values are trained at the margins they keep.)"""
    kv = editor.kv
    keys = kv.keys[:, first:]
    if keys.shape[1] == 0:
        return 0
    floor = floors(editor, keys, requests, pool)
    raised = floor > kv.shifts[first:]
    kv.shifts = torch.cat([kv.shifts[:first], torch.maximum(kv.shifts[first:], floor)])
    return int(raised.sum())
