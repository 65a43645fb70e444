"""iReVa with calibrated margins (`IReVa(calibration="corpus")`; a variant, not in the paper;
docs/ireva.md): after each edit step every new neuron's margin is raised to

    b_j = max(θ‖k̂_j‖², max_m k̂_jᵀx̂_m + c‖k̂_j‖²)

over the standardised MLP inputs x̂_m of the unedited model at every real position of the first
`calibration_texts` texts of `calibration_corpus` (64 tokens each; c = `calibration_margin`), and the
adaptor's activation is gated (`KeyValueAdaptor(gate=True)`: a neuron whose shifted activation is not
positive adds nothing; SiLU and GELU are not zero below 0). So no neuron adds anything on any
calibration input; margins are part of the bank, so withdrawal and disabling are unchanged.
"""
from __future__ import annotations

import torch

from editing import hooks
from editing.corpus import load_corpus
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


@torch.no_grad()
def calibrate(editor, first: int) -> int:
    """Raise the margins of the editor's neurons `first`.. above every calibration input; returns
    how many were raised."""
    kv = editor.kv
    keys = kv.keys[:, first:]
    if keys.shape[1] == 0:
        return 0
    top = (calibration_states(editor).to(keys) @ keys).max(0).values                   # [n_new]
    floor = top + editor.hparams.calibration_margin * (keys * keys).sum(0)
    raised = floor > kv.shifts[first:]
    kv.shifts = torch.cat([kv.shifts[:first], torch.maximum(kv.shifts[first:], floor)])
    return int(raised.sum())
