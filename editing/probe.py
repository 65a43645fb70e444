"""The contrast-based probe of JEEP (docs/specification.md §4.6, the paper's §4.1): a logit lens.

For every record (a bare edit prompt with its subject, no prefix, no target) the hidden state after
the embedding and after every block is read at two positions, the subject's last token (SL) and the
prediction position (PL, the prompt's last token), and mapped to the vocabulary:

    P^l_i = softmax(W_lm · norm(h^l_i) + b_lm)        (`final_norm=True`, the default)
    P^l_i = softmax(W_lm · h^l_i + b_lm)              (`final_norm=False`, the paper's Eq. 5 and code)

At each (layer, position) it records the probability and the rank (the number of tokens with a
strictly higher probability; 0 = top) of the first token of the original answer (target_true) and of
the target answer (target_new), averaged over records. The answers' first tokens come from the joint
encoding of prompt + " " + answer (`editing.tokens`), so they are right for every tokenizer.

The last block's curve with the final norm is the model's own next-token distribution (the backbone
applies the final norm after the last block). Without the norm the raw residual stream of Llama-style
models has a large norm and the lens is much sharper but less faithful; both are offered.

    python -m editing.probe --model smollm2-135m --n 50 --out runs/probe [--no-final-norm]

writes `probe.json` (the curves and per-record values) and `probe.png` (the four panels).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from editing import hooks
from editing.data.records import EditRequest, Kind
from editing.layout import Layout
from editing.models import DType
from editing.tokens import encode

POSITIONS = ("subject_last", "prediction")
Answer = Literal["original", "target"]  # target_true, target_new
ANSWERS: tuple[str, ...] = get_args(Answer)


@dataclass
class ProbeResult:
    """Curves over layers: `layers` = ["emb", 0, 1, ..., N-1]; per position and answer, [n_layers]
    lists of the mean probability, mean rank and median rank; `per_record` holds [records, layers]
    probabilities and ranks for further analysis."""

    layers: list
    curves: dict
    per_record: dict
    num_records: int
    final_norm: bool
    model: str = ""

    def to_json(self) -> dict:
        return {"model": self.model, "num_records": self.num_records, "final_norm": self.final_norm,
                "layers": self.layers, "curves": self.curves, "per_record": self.per_record}


def first_tokens(tokenizer, requests: list[EditRequest], which: Answer) -> torch.Tensor:
    """The first token id of `target_true` ("original") or `target_new` ("target") after each
    bare prompt, from the joint encoding."""
    if which not in ANSWERS:
        raise ValueError(f"unknown answer {which!r}; expected one of {', '.join(ANSWERS)}")
    answers = [r.target_true if which == "original" else r.target_new for r in requests]
    missing = [r.case_id for r, a in zip(requests, answers) if not a]
    if missing:
        raise ValueError(f"the probe needs target_true and target_new; records {missing[:5]} lack the "
                         f"{'original' if which == 'original' else 'target'} answer")
    batch = encode(tokenizer, [r.text for r in requests], answers)
    return batch.target_ids[:, 0]


@torch.no_grad()
def lens(model, tokenizer, requests: list[EditRequest], final_norm: bool = True,
         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Probability and rank of the answers' first tokens at every layer and both positions.

    Returns tensors [records, layers + 1, 2 positions] named "{answer}_prob" / "{answer}_rank"
    (layer index 0 is the embedding output, index l + 1 block l's output)."""
    lay = Layout(model)
    n_layers = lay.num_layers
    device = next(model.parameters()).device
    ids = {a: first_tokens(tokenizer, requests, a) for a in ANSWERS}
    out = {f"{a}_{m}": torch.zeros(len(requests), n_layers + 1, 2) for a in ANSWERS for m in ("prob", "rank")}
    modules = {"emb": lay.embedding, **{str(l): lay.block(l) for l in range(n_layers)}}
    for s in range(0, len(requests), batch_size):
        part = requests[s:s + batch_size]
        spans = []
        for r in part:
            before = r.prompt.split("{}", 1)[0]
            spans.append((len(before), len(before) + len(r.subject)))
        batch = encode(tokenizer, [r.text for r in part], spans=spans).to(device)
        pos = torch.stack([batch.subject_last, batch.prompt_last], 1)  # [B, 2]
        with hooks.capture(modules, "output", positions=pos) as cap:
            lay.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        for j, name in enumerate(modules):
            h = cap[name]                                   # [B, 2, d]
            if name == "emb" and lay.family.position_embed is not None:  # GPT-2: the residual stream h^0
                h = h + lay.model.get_submodule(lay.family.position_embed)(pos)
            if final_norm:
                h = lay.final_norm(h)
            logits = lay.lm_head(h).float()                 # [B, 2, V]
            for a in ANSWERS:
                t = ids[a][s:s + len(part)].to(device)[:, None].expand(-1, 2)
                own = logits.gather(-1, t[..., None])       # [B, 2, 1]
                out[f"{a}_prob"][s:s + len(part), j] = torch.softmax(logits, -1).gather(-1, t[..., None])[..., 0].cpu()
                out[f"{a}_rank"][s:s + len(part), j] = (logits > own).sum(-1).float().cpu()
    return out


def probe(model, tokenizer, requests: list[EditRequest], final_norm: bool = True, batch_size: int = 16,
          name: str = "") -> ProbeResult:
    """The probe's curves over `requests` (see the module docstring)."""
    if not requests:
        raise ValueError("the probe needs at least one record")
    raw = lens(model, tokenizer, requests, final_norm=final_norm, batch_size=batch_size)
    n_layers = raw["original_prob"].shape[1] - 1
    curves, per_record = {}, {}
    for p, pos in enumerate(POSITIONS):
        curves[pos], per_record[pos] = {}, {}
        for a in ANSWERS:
            prob, rank = raw[f"{a}_prob"][:, :, p], raw[f"{a}_rank"][:, :, p]
            curves[pos][a] = {"prob": prob.mean(0).tolist(), "rank": rank.mean(0).tolist(),
                              "median_rank": rank.median(0).values.tolist()}
            per_record[pos][a] = {"prob": prob.tolist(), "rank": rank.int().tolist()}
    return ProbeResult(layers=["emb"] + list(range(n_layers)), curves=curves, per_record=per_record,
                       num_records=len(requests), final_norm=final_norm, model=name)


def plot(result: ProbeResult, path: str | Path, title: str | None = None) -> Path:
    """Four panels: rows = positions (subject last, prediction), columns = mean rank (log scale)
    and mean probability; one line per answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(-1, len(result.layers) - 1))
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for r, pos in enumerate(POSITIONS):
        for c, metric in enumerate(("rank", "prob")):
            ax = axes[r, c]
            for a, style in zip(ANSWERS, ("-o", "-s")):
                ax.plot(x, result.curves[pos][a][metric], style, ms=3, label=a)
            if metric == "rank":
                ax.set_yscale("log")
                ax.invert_yaxis()  # up = closer to the top of the distribution
            ax.set_ylabel(f"mean {metric}")
            ax.set_title(f"{pos.replace('_', ' ')} position: {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("layer (-1 = embedding)")
    fig.suptitle(title or f"logit lens ({'with' if result.final_norm else 'without'} final norm), "
                          f"{result.model} on {result.num_records} records")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m editing.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="hub id, local directory or embedded name")
    ap.add_argument("--data", default=None, help="benchmark file (default: the shipped ParaRel set)")
    ap.add_argument("--kind", default="counterfactual", choices=get_args(Kind), help="shipped set")
    ap.add_argument("--n", type=int, default=50, help="number of records (the first n)")
    ap.add_argument("--out", default="runs/probe", help="output directory (probe.json, probe.png)")
    ap.add_argument("--no-final-norm", action="store_true", help="the paper's lens: no final norm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=get_args(DType))
    args = ap.parse_args(argv)
    from editing.data import load_benchmark
    from editing.models import load

    bench = load_benchmark(args.data, kind=args.kind)
    requests = [r for r in bench.requests if r.target_true][: args.n]
    model, tok = load(args.model, args.dtype)
    result = probe(model, tok, requests, final_norm=not args.no_final_norm, batch_size=args.batch_size,
                   name=args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result.to_json()))
    plot(result, out / "probe.png")
    c = result.curves
    print("layer  SL rank orig/target   PL rank orig/target   PL prob orig/target")
    for i, l in enumerate(result.layers):
        print(f"{str(l):>5}  {c['subject_last']['original']['rank'][i]:9.0f} {c['subject_last']['target']['rank'][i]:9.0f}"
              f"   {c['prediction']['original']['rank'][i]:9.0f} {c['prediction']['target']['rank'][i]:9.0f}"
              f"   {c['prediction']['original']['prob'][i]:.4f} {c['prediction']['target']['prob'][i]:.4f}")
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return result.to_json()


if __name__ == "__main__":
    main()
