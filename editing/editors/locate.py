"""The locate-then-edit core, shared by ROME, MEMIT, PMET (and JEEP, COMEBA-HK, AdaPLE).

../shared/METHODS.md §2 is the specification; the names follow the MEMIT code and paper:
- context templates: prefixes the model writes itself, prepended to edit prompts (§2.1);
- `compute_keys`: k, the MLP key at the subject's last token, averaged over templates (§2.2);
- `compute_targets`: z, the value a hidden state should take so that every context-prefixed prompt
  predicts target_new (§2.3), one delta per request optimised in one batched, truncated forward;
- `closed_form`: Δ = R Kᵀ (λC₀ + K Kᵀ)⁻¹, in float64 with a linear solve (§2.5);
- `LocateEditor`: the Editor that keeps every step's Δ as low-rank factors, writes W = W₀ + ΣΔ into the
  output projections (storage orientation from the module type), and can disable or undo edits
  exactly (the weights are recomputed from W₀ in a fixed order, so they are bit-for-bit the same).
"""
from __future__ import annotations

import json
import math
import random
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from editing import hooks
from editing.data.records import EditRequest
from editing.editors.base import Editor
from editing.layout import weight_out_in
from editing.models import cache_dir
from editing.tokens import encode

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


# --- context templates (§2.1) -----------------------------------------------------------------------
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


def context_templates(editor: Editor, spec: list[list[int]], seed: int = 0) -> list[list[str]]:
    """Template groups: ["{}"] then, for each [length, count] in `spec`, one group of generated
    templates. Cached per model, spec and seed under the cache directory."""
    key = f"{editor.base_identity['digest']}-{'_'.join(f'{l}x{n}' for l, n in spec)}-s{seed}.json"
    path = cache_dir() / "templates" / key
    if path.exists():
        return json.loads(path.read_text())
    groups = [["{}"]]
    with editor.disabled():
        for i, (length, count) in enumerate(spec):
            groups.append(generate_templates(editor.model, editor.tokenizer, length, count, seed=seed + i))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.random()}")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)
    return groups


def fill(template: str, request: EditRequest) -> tuple[str, tuple[int, int]]:
    """The template with the request's prompt and subject filled in, and the subject's character span."""
    before, after = template.split("{}", 1)
    p_before, p_after = request.prompt.split("{}", 1)
    start = len(before) + len(p_before)
    text = before + p_before + request.subject + p_after + after
    return text, (start, start + len(request.subject))


# --- keys (§2.2) --------------------------------------------------------------------------------------
@torch.no_grad()
def compute_keys(editor: Editor, requests: list[EditRequest], layer: int, groups: list[list[str]],
                 position: str = "subject_last") -> torch.Tensor:
    """k [u, d_ff]: the input of the MLP output projection of `layer` at the subject's last token (or
    the prompt's last token), mean within each template group, then mean over groups. One forward
    for all requests and templates, stopping after `layer`."""
    lay = editor.layout
    texts, spans, owner, group_of = [], [], [], []
    for i, r in enumerate(requests):
        for g, group in enumerate(groups):
            for t in group:
                text, span = fill(t, r)
                texts.append(text)
                spans.append(span)
                owner.append(i)
                group_of.append(g)
    batch = encode(editor.tokenizer, texts, spans=spans).to(editor.device)
    pos = batch.subject_last if position == "subject_last" else batch.prompt_last
    with hooks.capture({"k": lay.mlp_out(layer)}, "input", positions=pos) as cap, hooks.stop_after(lay.block(layer)):
        try:
            lay.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except hooks.StopForward:
            pass
    k = cap["k"].float()
    owner_t, group_t = torch.tensor(owner, device=k.device), torch.tensor(group_of, device=k.device)
    out = torch.zeros(len(requests), k.shape[1], device=k.device)
    for g in range(len(groups)):
        sel = group_t == g
        sums = torch.zeros_like(out).index_add_(0, owner_t[sel], k[sel])
        counts = torch.bincount(owner_t[sel], minlength=len(requests)).clamp(min=1)
        out += sums / counts[:, None]
    return out / len(groups)


# --- target values (§2.3) -------------------------------------------------------------------------------
POSITIONS = ("subject_last", "prompt_last")


@dataclass(frozen=True)
class DeltaSite:
    """One delta of a joint optimisation (JEEP, §4.2): added to the output of `part` ("block", "mlp",
    "attn_out") of `layer` at the subject's last token or at the prompt's last token (the prediction
    position, without the appended target) of every row. `clamp` / `weight_decay`: this delta's
    clamp factor and weight decay (None: the config's)."""

    name: str
    part: str
    layer: int
    position: str = "subject_last"
    clamp: float | None = None
    weight_decay: float | None = None

    def __post_init__(self):
        if self.part not in ("block", "mlp", "attn_out"):
            raise ValueError(f"delta site part must be block, mlp or attn_out, got {self.part!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"delta site position must be one of {POSITIONS}, got {self.position!r}")


@dataclass
class TargetConfig:
    """Where the delta is injected and how it is optimised.

    `parts`: modules of layer `layer` whose output gets a delta at the subject's last token: "block"
    (the residual stream h^L, MEMIT), "mlp" (m^L, ROME/PMET), "attn_out" (a^L, PMET).
    The weight decay is the official code's ‖δ‖ / ‖init‖² (the plain norm, not squared; the papers
    write β‖δ‖ or a squared norm). The clamp keeps ‖δ‖ ≤ clamp·‖init‖ after every step.
    """

    layer: int
    parts: tuple[str, ...] = ("block",)
    steps: int = 25
    lr: float = 0.5
    clamp: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    nll_factor: float = 1.0
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    autocast: str | None = None  # e.g. "bfloat16": the forward/backward under autocast (~3x faster on CPU)
    chunk_rows: int = 32         # rows per forward/backward (sorted by length, gradients accumulated)
    # Optional, for joint optimisations (JEEP): several deltas at different layers and positions,
    # optimised together (one Adam, one loss); None = one delta per part of `parts` at `layer` at the
    # subject's last token. Targets are then keyed by site name.
    sites: tuple[DeltaSite, ...] | None = None
    # Optional: stop a request when the mean target probability over its rows, exp(-NLL) per row,
    # reaches this (the JEEP code's `min_loss` rule) instead of when its loss < `early_stop_loss`.
    early_stop_prob: float | None = None

    def delta_sites(self) -> tuple[DeltaSite, ...]:
        if self.sites is None:
            return tuple(DeltaSite(p, p, self.layer) for p in self.parts)
        if not self.sites or len({s.name for s in self.sites}) != len(self.sites):
            raise ValueError("delta sites must be a non-empty list with distinct names")
        return tuple(self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        """The keys of the computed targets: the parts, or the site names."""
        return tuple(s.name for s in self.delta_sites())


@dataclass
class Targets:
    z: dict[str, torch.Tensor]       # part (or site name) -> [u, d]: init + delta
    init: dict[str, torch.Tensor]    # part (or site name) -> [u, d]: the clean value at the bare prompt's subject token (site position)
    loss: torch.Tensor               # [u] final loss per request
    steps: int = 0
    info: dict = field(default_factory=dict)


def _part_module(editor: Editor, part: str, layer: int) -> nn.Module:
    lay = editor.layout
    return {"block": lay.block, "mlp": lay.mlp, "attn_out": lay.attn_out}[part](layer)


def compute_targets(editor: Editor, requests: list[EditRequest], cfg: TargetConfig,
                    templates: list[str], truncated: bool = True) -> Targets:
    """Optimise one delta per request (and per part) so that every template-prefixed prompt predicts
    target_new, all requests in one batch. The forward starts at block `cfg.layer` from cached lower
    states and the LM head runs only at the target positions and the KL positions.

    Requests are independent: Adam acts elementwise, each request stops early on its own, and a
    stopped request's delta is frozen, so the result equals one optimisation per request.
    `truncated=False` runs the whole model and projects every position to the vocabulary, as the
    official code does (the reference path of tests and benchmarks)."""
    lay = editor.layout
    sites = cfg.delta_sites()
    L = min(lay.layer_index(s.layer) for s in sites)      # the truncated forward starts here
    top = max(lay.layer_index(s.layer) for s in sites)
    u = len(requests)
    if templates[0] != "{}":
        raise ValueError("the first template must be the bare '{}' (its row defines the initial value)")
    texts, spans, targets, owner = [], [], [], []
    for i, r in enumerate(requests):
        for t in templates:
            text, span = fill(t, r)
            texts.append(text)
            spans.append(span)
            targets.append(r.target_new)
            owner.append(i)
    n_rw = len(texts)
    for i, r in enumerate(requests):  # KL rows: "{subject} is a"
        text, span = fill(cfg.kl_prompt, EditRequest("kl", "{}", r.subject, "x"))
        texts.append(text)
        spans.append(span)
        targets.append(None)
        owner.append(i)
    batch = encode(editor.tokenizer, texts, targets, spans=spans).to(editor.device)
    device = batch.input_ids.device
    owner_t = torch.tensor(owner, device=device)
    sl = batch.subject_last
    at = {s.name: sl if s.position == "subject_last" else batch.prompt_last for s in sites}
    bare_rows = torch.arange(u, device=device) * len(templates)
    # Score at the target positions (rewrite rows) and at the subject's last token (KL rows).
    positions = batch.target_positions.clone()
    score_mask = batch.target_mask.clone()
    positions[n_rw:, 0] = sl[n_rw:]
    score_mask[n_rw:, 0] = True

    modules = {s.name: _part_module(editor, s.part, s.layer) for s in sites}
    by_pos = {pos: {s.name: modules[s.name] for s in sites if s.position == pos} for pos in POSITIONS}
    with torch.no_grad(), hooks.capture({"h": lay.block(L)}, "input") as cap, \
            hooks.capture(by_pos["subject_last"], "output", positions=sl) as init_cap, \
            hooks.capture(by_pos["prompt_last"], "output", positions=batch.prompt_last) as init_pl, \
            hooks.stop_after(lay.block(top)):  # registered last: runs after the captures
        try:
            lay.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except hooks.StopForward:
            pass
    h_in = cap["h"]
    init_cap.update(init_pl)
    init = {s.name: init_cap[s.name][bare_rows].float() for s in sites}
    d = h_in.shape[-1]
    delta = torch.zeros(u, len(sites), d, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    active = torch.ones(u, dtype=torch.bool, device=device)
    init_kl_logp = None
    loss_r = torch.zeros(u, device=device)
    step = 0
    is_rewrite = torch.arange(len(texts), device=device) < n_rw
    lengths = batch.attention_mask.sum(1)
    for step in range(cfg.steps):
        # Only the rows of requests still optimising run (a stopped request's delta is frozen), in
        # chunks of similar length so that little is spent on padding; gradients accumulate.
        rows = active[owner_t].nonzero().squeeze(1)
        rows = rows[torch.argsort(lengths[rows], stable=True)]
        opt.zero_grad(set_to_none=True)
        nll = torch.zeros(u, device=device)
        kl = torch.zeros(u, device=device)
        prob = torch.zeros(u, device=device)  # mean over rows of exp(-mean token NLL)
        for chunk in rows.split(cfg.chunk_rows):
            own, rw = owner_t[chunk], is_rewrite[chunk]
            width = int(lengths[chunk].max())
            mask = batch.attention_mask[chunk, :width]
            ctx = [hooks.add_at(modules[s.name], at[s.name][chunk], delta[own, j]) for j, s in enumerate(sites)]
            if cfg.autocast is not None:
                ctx.append(torch.autocast(device.type, dtype=getattr(torch, cfg.autocast)))
            with _all(ctx):
                if truncated:
                    hidden = lay.run_from(L, h_in[chunk, :width], mask)
                    logits = lay.lm_head(hooks.gather_at(hidden, positions[chunk])).float()
                else:
                    full = editor.model(input_ids=batch.input_ids[chunk, :width], attention_mask=mask,
                                        use_cache=False).logits
                    logits = hooks.gather_at(full, positions[chunk]).float()
            logp = F.log_softmax(logits, -1)
            t_ids, t_mask = batch.target_ids[chunk][rw], batch.target_mask[chunk][rw]
            tok = logp[rw].gather(-1, t_ids[..., None]).squeeze(-1) * t_mask
            row_nll = -tok.sum(1) / t_mask.sum(1)
            nll_c = torch.zeros(u, device=device).index_add_(0, own[rw], row_nll) / len(templates)
            prob.index_add_(0, own[rw], (-row_nll.detach()).exp() / len(templates))
            kl_own, kl_logp = own[~rw], logp[~rw, 0]
            if step == 0:  # every request is active: record the unedited distribution
                if init_kl_logp is None:
                    init_kl_logp = torch.zeros(u, kl_logp.shape[-1], device=device)
                init_kl_logp[kl_own] = kl_logp.detach()
            kl_c = torch.zeros(u, device=device).index_add_(
                0, kl_own, (kl_logp.exp() * (kl_logp - init_kl_logp[kl_own])).sum(-1))  # KL(P_current ‖ P_init)
            ((cfg.nll_factor * nll_c + cfg.kl_factor * kl_c) * active).sum().backward()
            nll += nll_c.detach()
            kl += kl_c.detach()
        terms = [delta[:, j].norm(dim=-1) / init[s.name].norm(dim=-1) ** 2 for j, s in enumerate(sites)]
        if all(s.weight_decay is None for s in sites):
            wd = cfg.weight_decay * sum(terms)
        else:  # a weight decay per site
            wd = sum((cfg.weight_decay if s.weight_decay is None else s.weight_decay) * t for s, t in zip(sites, terms))
        (wd * active).sum().backward()
        new_loss = cfg.nll_factor * nll + cfg.kl_factor * kl + wd.detach()
        loss_r = torch.where(active, new_loss, loss_r)
        if not torch.isfinite(loss_r).all():
            raise FloatingPointError(f"non-finite target loss {loss_r.tolist()}")
        if cfg.early_stop_prob is None:
            active &= loss_r >= cfg.early_stop_loss
        else:
            active &= prob < cfg.early_stop_prob
        if not active.any() or step == cfg.steps - 1:
            break
        frozen = delta.detach()[~active].clone()
        opt.step()
        with torch.no_grad():
            delta[~active] = frozen
            for j, s in enumerate(sites):  # project onto the ball ‖δ‖ ≤ clamp·‖init‖
                limit = (cfg.clamp if s.clamp is None else s.clamp) * init[s.name].norm(dim=-1)
                norm = delta[:, j].norm(dim=-1)
                scale = torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm))
                delta[:, j] *= scale[:, None]
    z = {s.name: init[s.name] + delta.detach()[:, j] for j, s in enumerate(sites)}
    return Targets(z=z, init=init, loss=loss_r.detach(), steps=step + 1)


@contextmanager
def _all(contexts) -> Iterator[None]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


@torch.no_grad()
def current_values(editor: Editor, requests: list[EditRequest], part: str, layer: int,
                   position: str = "subject_last") -> torch.Tensor:
    """The output of `part` at `layer` at the subject's last token (or the prompt's last token) of
    each bare prompt [u, d]."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    lay = editor.layout
    texts, spans = zip(*(fill("{}", r) for r in requests))
    batch = encode(editor.tokenizer, list(texts), spans=list(spans)).to(editor.device)
    pos = batch.subject_last if position == "subject_last" else batch.prompt_last
    with hooks.capture({"v": _part_module(editor, part, layer)}, "output", positions=pos) as cap, \
            hooks.stop_after(lay.block(layer)):
        try:
            lay.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except hooks.StopForward:
            pass
    return cap["v"].float()


# --- the closed form (§2.5) -------------------------------------------------------------------------------
def closed_form(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float,
                key_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = R Kᵀ (λC + w K Kᵀ)⁻¹ with keys and residuals as rows (K [u, d_ff], R [u, d]), in float64 by
    a linear solve. Returns the factors (left [d, u], right [d_ff, u]) with Δ = left @ rightᵀ, the
    minimiser of w‖Δ Kᵀ − Rᵀ/w‖² + λ tr(Δ C Δᵀ) (w = `key_weight`: 1 for MEMIT, 2 for AdaPLE)."""
    K64, R64, C64 = K.double(), R.double(), C.double().to(K.device)
    A = lam * C64 + key_weight * (K64.T @ K64)
    right = torch.linalg.solve(A, K64.T)          # (λC + KᵀK)⁻¹ Kᵀ, [d_ff, u]
    return R64.T.contiguous(), right


# --- the editor -------------------------------------------------------------------------------------------
# --- fusion of an update into the weights (AdaPLE §6.4, usable by every closed-form editor) -------------
FUSIONS = ("add", "dr", "topk")


def fusion_spec(kind: str = "add", drop_rate: float = 0.8, keep: float = 0.2, seed: int = 0) -> dict | None:
    """How an update Δ is fused into the weights: "add" (vanilla: Δ as is, returns None), "dr"
    (drop-and-rescale: each entry dropped with probability `drop_rate`, the rest divided by
    1 − drop_rate, so E[Δ̂] = Δ; the mask is drawn on the CPU from `seed`, the same on every device),
    "topk" (top-k% retain: only the `keep` share of entries with the largest magnitude is kept)."""
    if kind not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {kind!r}")
    if kind == "add" or (kind == "dr" and drop_rate == 0) or (kind == "topk" and keep >= 1):
        return None
    if kind == "dr" and not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if kind == "topk" and not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return {"kind": kind, "p": float(drop_rate), "keep": float(keep), "seed": int(seed)}


def drop_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The keep-mask of drop-and-rescale: True with probability 1 − p, from a CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=g) >= p


def fuse(delta: torch.Tensor, spec: dict | None) -> torch.Tensor:
    """Δ̂ of a dense Δ under a fusion spec (None: Δ itself)."""
    if spec is None:
        return delta
    if spec["kind"] == "dr":
        keep = drop_mask(delta.shape, spec["p"], spec["seed"]).to(delta.device)
        return delta * keep / (1 - spec["p"])
    k = max(1, int(round(spec["keep"] * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)


class EditHistory(nn.Module):
    """Every applied step's Δ per layer, saved in checkpoints as extra state. An entry is the low-rank
    factors (left [d, r], right [d_ff, r]) with Δ = left @ rightᵀ, optionally with a fusion spec as
    a third element (the dense Δ is then fused, e.g. drop-and-rescale with a stored seed, so the
    history stays low-rank and exactly reproducible).

    `delta` sums the steps in order in float64; the sum over all but the last step is cached per
    layer, so appending a step costs one Δ, not one per earlier step. Mutate earlier steps only
    through `truncate` / `set_extra_state`, which drop the cache."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict[int, tuple]] = []
        self._prefix: dict[int, tuple[int, torch.Tensor]] = {}

    def get_extra_state(self):
        cpu = lambda e: [cpu(x) for x in e] if isinstance(e, list) else \
            tuple(x.cpu() if torch.is_tensor(x) else x for x in e)
        return [{str(l): cpu(e) for l, e in s.items()} for s in self.steps]

    def set_extra_state(self, state) -> None:
        self.steps = [{int(l): (e if isinstance(e, list) else tuple(e)) for l, e in s.items()} for s in state]
        self._prefix = {}

    def truncate(self, n: int) -> None:
        """Keep the first `n` steps."""
        del self.steps[n:]
        self._prefix = {}

    @staticmethod
    def dense(entry: tuple | list, shape, device) -> torch.Tensor:
        """The Δ of one entry (or the sum of a list of entries, e.g. sequential ROME with fusion)."""
        if isinstance(entry, list):
            return sum(EditHistory.dense(e, shape, device) for e in entry)
        a, b = entry[0].to(device, torch.float64), entry[1].to(device, torch.float64)
        d = a @ b.T
        return fuse(d, entry[2]) if len(entry) > 2 else d

    def delta(self, layer: int, shape, device) -> torch.Tensor:
        """ΣΔ of a layer, summed in step order in float64 (deterministic)."""
        n = len(self.steps) - 1
        cached = self._prefix.get(layer)
        if cached is not None and cached[0] <= n and cached[1].device == torch.device(device):
            start, total = cached[0], cached[1].clone()
        else:
            start, total = 0, torch.zeros(shape, dtype=torch.float64, device=device)
        for i in range(start, max(n, 0)):
            if layer in self.steps[i]:
                total += self.dense(self.steps[i][layer], shape, device)
        if n >= 0:
            self._prefix[layer] = (n, total.clone())
            if layer in self.steps[-1]:
                total += self.dense(self.steps[-1][layer], shape, device)
        return total


class LocateEditor(Editor):
    """Base of the closed-form editors: statistics, templates, targets, and exact weight bookkeeping.

    Args:
        layers: the MLP output projections edited (lowest first).
        mom2_update_weight: λ, the weight of the key covariance in the closed form.
        corpus, stats_samples, stats_max_length: where E[kkᵀ] comes from (cached on disk).
        template_spec: [[length, count], ...] of generated context templates after "{}".
        template_seed: seed of the template generation.
        key_position: "subject_last" or "prompt_last".
        v_steps, v_lr, clamp_norm_factor, v_weight_decay, kl_factor: target optimisation (§2.3).
        v_autocast: run the target optimisation under autocast in this dtype ("bfloat16": about 3x
            faster on CPUs with bf16 units; the targets differ by a few percent); None = exact.
        fusion: how each layer's Δ enters the weights: "add" (plain), "dr" (AdaPLE's drop-and-rescale,
            each entry dropped with probability `drop_rate` and the rest scaled by 1/(1 − drop_rate),
            a fresh seeded mask per step and layer), "topk" (keep the `fusion_keep` share of entries
            with the largest magnitude). Applied inside the layer loop: later layers see the fused Δ.
    """

    method = "locate"
    target_parts: tuple[str, ...] = ("block",)

    def __init__(self, layers: list[int] = [3, 4, 5, 6, 7], mom2_update_weight: float = 15000.0,
                 corpus: str = "wiki-offline", stats_samples: int | None = None, stats_max_length: int = 256,
                 template_spec: list[list[int]] = [[10, 5]], template_seed: int = 0,
                 key_position: str = "subject_last", v_steps: int = 25, v_lr: float = 0.5,
                 clamp_norm_factor: float = 0.75, v_weight_decay: float = 0.5, kl_factor: float = 0.0625,
                 v_autocast: str | None = None, fusion: str = "add", drop_rate: float = 0.8,
                 fusion_keep: float = 0.2, fusion_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        fusion_spec(fusion, drop_rate, fusion_keep, fusion_seed)  # validates
        if not layers:
            raise ValueError("at least one layer must be edited")
        self.layers = sorted({self.layout.layer_index(l) for l in layers})
        self.history = EditHistory()
        self._w0: dict[int, torch.Tensor] = {}
        self._stats: dict[int, torch.Tensor] = {}

    # --- exact weight bookkeeping ---------------------------------------------------------------
    def _weight(self, layer: int) -> torch.Tensor:
        return weight_out_in(self.layout.mlp_out(layer))

    def _original(self, layer: int) -> torch.Tensor:
        if layer not in self._w0:
            self._w0[layer] = self._weight(layer).detach().clone()
        return self._w0[layer]

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """W = W₀ + ΣΔ (or W₀ when disabled) for every edited layer, recomputed from scratch."""
        edited = {l for s in self.history.steps for l in s} | set(self._w0)
        for layer in edited:
            w0 = self._original(layer)
            if self.enabled:
                w = (w0.double() + self.history.delta(layer, w0.shape, w0.device)).to(w0.dtype)
            else:
                w = w0
            self._weight(layer).copy_(w)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        before = self.enabled
        self.enabled = False
        self.refresh_weights()
        try:
            yield
        finally:
            self.enabled = before
            self.refresh_weights()

    def fused(self, layer: int, factors: tuple[torch.Tensor, torch.Tensor], index: int = 0) -> tuple:
        """A history entry for this step's Δ = left @ rightᵀ at `layer` under the configured fusion.
        The drop mask's seed depends on the fusion seed, the step number, the layer and `index` (the
        request within a sequential step), so every step and layer gets a fresh, reproducible mask."""
        h = self.hparams
        seed = (h.fusion_seed * 1_000_003 + len(self.history.steps) * 10_007 + layer * 101 + index) % (2 ** 62)
        spec = fusion_spec(h.fusion, h.drop_rate, h.fusion_keep, seed)
        return tuple(factors) if spec is None else (factors[0], factors[1], spec)

    def add_step(self, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer in factors:
            self._original(layer)
        self.history.steps.append(factors)
        self.refresh_weights()

    def undo(self, steps: int = 1) -> None:
        """Withdraw the last `steps` edit steps; the weights return to their exact previous values."""
        if steps > len(self.history.steps):
            raise ValueError(f"only {len(self.history.steps)} steps to undo")
        self.history.truncate(len(self.history.steps) - steps)
        del self.edit_log[max(0, len(self.edit_log) - steps):]
        self.refresh_weights()

    def snapshot(self):
        return len(self.history.steps)

    def restore(self, snap) -> None:
        self.history.truncate(snap)
        self.refresh_weights()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        extra = state_dict.get("history._extra_state")
        if extra is None:
            raise RuntimeError("this checkpoint holds no edit history")
        self.history.set_extra_state(extra)
        self.refresh_weights()
        return nn.modules.module._IncompatibleKeys([], [])

    def check_finite(self) -> None:
        for s in self.history.steps[-1:]:
            for layer, e in s.items():
                if not all(torch.isfinite(x).all() for f in (e if isinstance(e, list) else [e]) for x in f[:2]):
                    raise FloatingPointError(f"non-finite update at layer {layer}")

    # --- shared pieces ---------------------------------------------------------------------------
    def covariance(self, layer: int) -> torch.Tensor:
        """E[kkᵀ] of the original model at `layer` (cached on disk and in memory)."""
        missing = [l for l in self.layers if l not in self._stats]
        if layer not in self._stats:
            from editing.stats import second_moments

            with self.disabled():
                self._stats.update(second_moments(self.model, self.tokenizer, missing, corpus=self.hparams.corpus,
                                                  n_samples=self.hparams.stats_samples,
                                                  max_length=self.hparams.stats_max_length))
        return self._stats[layer].to(self.device)

    def template_groups(self) -> list[list[str]]:
        return context_templates(self, self.hparams.template_spec, self.hparams.template_seed)

    def target_config(self) -> TargetConfig:
        h = self.hparams
        return TargetConfig(layer=self.layers[-1], parts=self.target_parts, steps=h.v_steps, lr=h.v_lr,
                            clamp=h.clamp_norm_factor, weight_decay=h.v_weight_decay, kl_factor=h.kl_factor,
                            autocast=h.v_autocast)

    def targets(self, requests: list[EditRequest], templates: list[str], cfg: TargetConfig | None = None) -> Targets:
        """`compute_targets` (with `cfg`, default `target_config()`), shared across ranks under DDP:
        rank r optimises requests r, r+W, ... and every rank gathers all targets, so all ranks apply
        the same update."""
        cfg = self.target_config() if cfg is None else cfg
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return compute_targets(self, requests, cfg, templates)
        world, rank = dist.get_world_size(), dist.get_rank()
        mine = requests[rank::world]
        local = compute_targets(self, mine, cfg, templates) if mine else None
        payload = None if local is None else (
            {p: v.cpu() for p, v in local.z.items()}, {p: v.cpu() for p, v in local.init.items()},
            local.loss.cpu(), local.steps)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, payload)
        order = [(i % world, i // world) for i in range(len(requests))]
        pick = lambda which, p: torch.stack([gathered[r][which][p][j] for r, j in order]).to(self.device)
        parts = cfg.names
        return Targets(z={p: pick(0, p) for p in parts}, init={p: pick(1, p) for p in parts},
                       loss=torch.stack([gathered[r][2][j] for r, j in order]).to(self.device),
                       steps=max(g[3] for g in gathered if g is not None))

    def keys(self, requests: list[EditRequest], layer: int) -> torch.Tensor:
        return compute_keys(self, requests, layer, self.template_groups(), self.hparams.key_position)
