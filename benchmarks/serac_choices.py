"""The two SERAC choices of configs/serac.yaml, measured on the validation relations of the shipped
counterfactual set (never on the test ones); docs/trained.md quotes the output.

    python benchmarks/serac_choices.py

1. The context: with the gold edit in context (routing taken as perfect), the share of paraphrases
   of 40 validation records whose every target token is the base model's argmax, per format.
2. The classifier's features: a 256-d projection trained on cached frozen-model features (Adam,
   600 steps of 256 samples, the balanced loss of editing.editors.serac), validation recall and
   rejection at s > 0.5, for mean-pooled / last-token states of blocks 8, 15, 22.
"""
import time

import torch
import torch.nn.functional as F

from editing import hooks
from editing.data import meta
from editing.data.readers import load_benchmark
from editing.editors import NoEdit

torch.set_num_threads(1)
torch.manual_seed(0)
ed = NoEdit(base_model="smollm2-135m")
requests = load_benchmark(kind="counterfactual").requests

# --- 1. the context --------------------------------------------------------------------------------------
reqs = meta.select(requests, "val")[:40]
fmts = {"space": "{p} {t}. {x}", "newline": "{p} {t}.\n{x}", "fact": "New fact: {p} {t}.\n{x}",
        "twice": "{p} {t}. {p} {t}.\n{x}", "twice_nl": "{p} {t}.\n{p} {t}.\n{x}",
        "thrice": "{p} {t}. {p} {t}. {p} {t}.\n{x}", "none": "{x}"}
for name, f in fmts.items():
    prompts = [f.format(p=r.text, t=r.target_new, x=x) for r in reqs for x in r.paraphrase_prompts]
    targets = [r.target_new for r in reqs for x in r.paraphrase_prompts]
    with torch.no_grad():
        lp, b = ed.target_logprobs(prompts, targets)
    hit = ((lp.argmax(-1) == b.target_ids) | ~b.target_mask.bool()).all(-1).float().mean()
    print(f"context {name}: {100 * float(hit):.1f} %", flush=True)

# --- 2. the classifier's features ---------------------------------------------------------------------------
torch.manual_seed(0)
tr, va = meta.select(requests, "train"), meta.select(requests, "val")[:80]
LAYERS = [8, 15, 22]
def samples(rs):
    out = []
    for i, r in enumerate(rs):
        out += [(i, p, 1) for p in r.paraphrase_prompts] + [(i, p, 0) for p in r.neighborhood_prompts] + [(i, r.locality_prompt, 0)]
    return out
prompts = sorted({p for rs in (tr, va) for r in rs for p in [r.text, *r.paraphrase_prompts, *r.neighborhood_prompts, r.locality_prompt]})
feats = {}
t = time.time()
blocks = {l: ed.layout.block(l) for l in LAYERS}
for s in range(0, len(prompts), 64):
    part = prompts[s:s+64]
    enc = ed.tokenizer(part, return_tensors="pt", padding=True)
    with torch.no_grad(), hooks.capture({str(l): b for l, b in blocks.items()}) as got:
        hooks.run_until(ed.model, blocks[max(LAYERS)], input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
    m = enc.attention_mask[..., None].float(); last = enc.attention_mask.sum(1) - 1
    for l in LAYERS:
        h = got[str(l)]
        mean = F.layer_norm((h * m).sum(1) / m.sum(1), (h.shape[-1],))
        lt = F.layer_norm(h[torch.arange(len(part)), last], (h.shape[-1],))
        for p, a, b in zip(part, mean, lt):
            feats.setdefault(p, {})[(l, "mean")] = a; feats[p][(l, "last")] = b
print("features", time.time() - t, len(prompts))
def run(key, lr=1e-2, steps=600, dim=256):
    f = lambda ps: torch.stack([torch.cat([feats[p][k] for k in key]) for p in ps])
    hid = f([tr[0].text]).shape[1]
    W = (torch.randn(dim, hid) / (hid * dim) ** 0.5).requires_grad_()
    opt = torch.optim.Adam([W], lr=lr)
    S = samples(tr); Z = f([tr[i].text for i, _, _ in S]); X = f([p for _, p, _ in S]); Y = torch.tensor([y for *_, y in S]).bool()
    for it in range(steps):
        idx = torch.randint(0, len(S), (256,))
        d = ((Z[idx] - X[idx]) @ W.t()).square().sum(-1); y = Y[idx]
        loss = d[y].mean() + (-torch.log(-torch.expm1(-d[~y].clamp(min=1e-6)))).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    Sv = samples(va); Zv = f([va[i].text for i, _, _ in Sv]); Xv = f([p for _, p, _ in Sv]); Yv = torch.tensor([y for *_, y in Sv]).bool()
    with torch.no_grad():
        s = torch.exp(-((Zv - Xv) @ W.t()).square().sum(-1))
    print(key, lr, "recall", round(float((s[Yv] > .5).float().mean()), 3), "rejection", round(float((s[~Yv] <= .5).float().mean()), 3), flush=True)
for key in [[(15, "mean")], [(15, "last")], [(8, "mean")], [(22, "mean")], [(15, "mean"), (15, "last")], [(8, "mean"), (22, "mean")]]:
    run(key)
run([(15, "mean")], lr=1e-3, steps=600)
