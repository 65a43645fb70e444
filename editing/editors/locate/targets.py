"""Target values z (docs/specification.md §2.3): the value a hidden state should take so that every
context-prefixed prompt predicts target_new, one delta per request optimised in one batched,
truncated forward (one Adam, requests independent)."""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from editing import hooks
from editing.console import progress
from editing.data.records import EditRequest
from editing.editors.locate.keys import POSITIONS, Part, Position
from editing.editors.locate.templates import fill
from editing.layout import Layout
from editing.precision import usable_autocast
from editing.tokens import encode, length_chunks
from editing.tuners.base import position_wise
from editing.validation import check_choice


@dataclass(frozen=True)
class DeltaSite:
    """One delta of a joint optimisation (JEEP, §4.2): added to the output of `part` ("block", "mlp",
    "attn_out") of `layer` at the subject's last token or at the prompt's last token (the prediction
    position, without the appended target) of every row. `clamp` / `weight_decay`: this delta's
    clamp factor and weight decay (None: the config's)."""

    name: str
    part: Part
    layer: int
    position: Position = "subject_last"
    clamp: float | None = None
    weight_decay: float | None = None

    def __post_init__(self):
        check_choice("delta site part", self.part, Part)
        check_choice("delta site position", self.position, Position)


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
    chunk_tokens: int = 1024     # positions per forward/backward (rows sorted by length, gradients accumulated)
    # Optional, for joint optimisations (JEEP): several deltas at different layers and positions,
    # optimised together (one Adam, one loss); None = one delta per part of `parts` at `layer` at the
    # subject's last token. Targets are then keyed by site name.
    sites: tuple[DeltaSite, ...] | None = None
    # Optional: stop a request when the mean target probability over its rows, exp(-NLL) per row,
    # reaches this (the JEEP code's `min_loss` rule) instead of when its loss < `early_stop_loss`.
    early_stop_prob: float | None = None
    # Cache what the delta cannot change: every position before a row's first delta position has the
    # same states in every step, so their keys and values (blocks `layer`..end) are computed once and
    # each step runs only the positions from the delta on (`Layout.prefix`). Falls back to whole rows
    # where an injected edit module looks at whole sequences (`EditLayer.position_wise`).
    prefix_cache: bool = True
    request_batch: int = 32      # requests optimised together (bounds memory; requests are independent)

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


def compute_targets(layout: Layout, tokenizer, requests: list[EditRequest], cfg: TargetConfig,
                    templates: list[str], truncated: bool = True) -> Targets:
    """Optimise one delta per request (and per part) so that every template-prefixed prompt predicts
    target_new, `cfg.request_batch` requests at a time. The forward starts at block `cfg.layer` from
    cached lower states, runs only the positions from each row's delta on (the earlier ones' keys and
    values cached, `cfg.prefix_cache`) up to its last scored position, and the LM head runs only at
    the target positions and the KL positions.

    Requests are independent: Adam acts elementwise, each request stops early on its own, and a
    stopped request's delta is frozen, so the result equals one optimisation per request.
    `truncated=False` runs the whole model over whole rows and projects every position to the
    vocabulary, as the official code does (the reference path of tests and benchmarks)."""
    if templates[0] != "{}":
        raise ValueError("the first template must be the bare '{}' (its row defines the initial value)")
    size = max(1, cfg.request_batch)
    groups = [requests[i:i + size] for i in range(0, len(requests), size)]
    bar = progress(cfg.steps * len(groups), f"target vectors for {len(requests)} request(s)")
    with layout.attention("eager"):
        parts = [_optimise(layout, tokenizer, g, cfg, templates, truncated, bar) for g in groups]
    bar.close()
    if len(parts) == 1:
        return parts[0]
    names = parts[0].z.keys()
    return Targets(z={n: torch.cat([p.z[n] for p in parts]) for n in names},
                   init={n: torch.cat([p.init[n] for p in parts]) for n in names},
                   loss=torch.cat([p.loss for p in parts]), steps=max(p.steps for p in parts))


def position_wise_from(layout: Layout, layer: int) -> bool:
    """Whether every injected edit module in blocks `layer`..end computes each position from that
    position alone (a row's prefix can then be cached and left out of the forward)."""
    return position_wise(*(layout.block(l) for l in range(layout.layer_index(layer), layout.num_layers)))


def _optimise(lay: Layout, tokenizer, requests: list[EditRequest], cfg: TargetConfig, templates: list[str],
              truncated: bool, bar) -> Targets:
    sites = cfg.delta_sites()
    L = min(lay.layer_index(s.layer) for s in sites)      # the truncated forward starts here
    top = max(lay.layer_index(s.layer) for s in sites)
    u = len(requests)
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
    batch = encode(tokenizer, texts, targets, spans=spans).to(lay.device)
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
    # Each row runs from its first delta position `first` (when the prefix is cached; else from 0)
    # to its last scored or delta position: later positions cannot change what is scored.
    first = torch.stack([at[s.name] for s in sites]).min(0).values
    end = torch.stack([torch.where(score_mask, positions, 0).max(1).values] + [at[s.name] for s in sites]).max(0).values + 1

    modules = {s.name: lay.part(s.layer, s.part) for s in sites}
    by_pos = {pos: {s.name: modules[s.name] for s in sites if s.position == pos} for pos in POSITIONS}
    with torch.no_grad(), hooks.capture({"h": lay.block(L)}, "input") as cap, \
            hooks.capture(by_pos["subject_last"], "output", positions=sl) as init_cap, \
            hooks.capture(by_pos["prompt_last"], "output", positions=batch.prompt_last) as init_pl:
        hooks.run_until(lay.backbone, lay.block(top), input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask, use_cache=False)
    h_in = cap["h"]
    init_cap.update(init_pl)
    # float32 (float64 for a float64 model: the tests that compare paths exactly)
    work = torch.float64 if h_in.dtype == torch.float64 else torch.float32
    init = {s.name: init_cap[s.name][bare_rows].to(work) for s in sites}
    autocast = usable_autocast(cfg.autocast, device)

    def precision():
        return torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast is not None else nullcontext()

    cached = truncated and cfg.prefix_cache and int(first.max()) > 0 and position_wise_from(lay, L)
    if not cached:
        first = torch.zeros_like(first)
    prefix = None
    if cached:
        width = int(first.max())
        with precision():
            prefix = lay.prefix(L, h_in[:, :width], batch.attention_mask[:, :width], first)
    # Each row's part that runs: its hidden states from `first` on (the truncated path), the
    # positions of its deltas and scores inside it.
    span = end - first
    cols = torch.arange(int(span.max()), device=device)
    run_mask = (cols[None] < span[:, None]).long()
    if truncated:
        idx = (first[:, None] + cols[None]).clamp(max=h_in.shape[1] - 1)
        run_h = h_in.gather(1, idx[..., None].expand(-1, -1, h_in.shape[-1]))
    local_at = {n: p - first for n, p in at.items()}
    local_pos = (positions - first[:, None]).clamp(min=0)

    d = h_in.shape[-1]
    delta = torch.zeros(u, len(sites), d, device=device, dtype=work, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    active = torch.ones(u, dtype=torch.bool, device=device)
    init_kl_logp = None
    loss_r = torch.zeros(u, device=device, dtype=work)
    step = 0
    is_rewrite = torch.arange(len(texts), device=device) < n_rw
    for step in range(cfg.steps):
        # Only the rows of requests still optimising run (a stopped request's delta is frozen), in
        # chunks of similar length so that little is spent on padding; gradients accumulate.
        rows = active[owner_t].nonzero().squeeze(1)
        opt.zero_grad(set_to_none=True)
        nll = torch.zeros(u, device=device, dtype=work)
        kl = torch.zeros(u, device=device, dtype=work)
        prob = torch.zeros(u, device=device, dtype=work)  # mean over rows of exp(-mean token NLL)
        for chunk in length_chunks(span, cfg.chunk_tokens, rows):
            own, rw = owner_t[chunk], is_rewrite[chunk]
            width = int(span[chunk].max())
            ctx = [hooks.add_at(modules[s.name], local_at[s.name][chunk], delta[own, j]) for j, s in enumerate(sites)]
            with ExitStack() as stack:
                for c in ctx:
                    stack.enter_context(c)
                stack.enter_context(precision())
                if truncated:
                    hidden = lay.run_from(L, run_h[chunk, :width], run_mask[chunk, :width],
                                          prefix=None if prefix is None else prefix.rows(chunk))
                    logits = lay.lm_head(hooks.gather_at(hidden, local_pos[chunk])).to(work)
                else:
                    full = lay.model(input_ids=batch.input_ids[chunk, :width], attention_mask=run_mask[chunk, :width],
                                     use_cache=False).logits
                    logits = hooks.gather_at(full, positions[chunk]).to(work)
            logp = F.log_softmax(logits, -1)
            t_ids, t_mask = batch.target_ids[chunk][rw], batch.target_mask[chunk][rw]
            tok = logp[rw].gather(-1, t_ids[..., None]).squeeze(-1) * t_mask
            row_nll = -tok.sum(1) / t_mask.sum(1)
            nll_c = torch.zeros(u, device=device, dtype=work).index_add_(0, own[rw], row_nll) / len(templates)
            prob.index_add_(0, own[rw], (-row_nll.detach()).exp() / len(templates))
            kl_own, kl_logp = own[~rw], logp[~rw, 0]
            if step == 0:  # every request is active: record the unedited distribution
                if init_kl_logp is None:
                    init_kl_logp = torch.zeros(u, kl_logp.shape[-1], device=device, dtype=work)
                init_kl_logp[kl_own] = kl_logp.detach()
            kl_c = torch.zeros(u, device=device, dtype=work).index_add_(
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
        bar.set_postfix_str(f"loss {float(loss_r.mean()):.3f}, {int(active.sum())}/{u} still optimising", refresh=False)
        bar.update()
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
    bar.update(cfg.steps - step - 1)   # the steps an early stop left out
    z = {s.name: init[s.name] + delta.detach()[:, j] for j, s in enumerate(sites)}
    return Targets(z=z, init=init, loss=loss_r.detach(), steps=step + 1)
