"""iReVa: initialising and retrofitting key-value adaptors for traceable model editing.

(docs/specification.md §3.) One layer l's MLP gains a bank of "knowledge
neurons", one per edited *token*: MLP(x) + α · V̂ᵀ g(K̂ᵀ x̂ − b), the `KeyValueAdaptor` injected
around the MLP (`editing.tuners.kv_adaptor`; x̂ standardised per token, max-pooling at inference).
g is the base model's activation (gelu_new for GPT models; SiLU for Llama-style models, which the
paper does not specify: unverified); the margin b_j = θ‖k̂⁰_j‖² is the official code's (a neuron
fires roughly when cos(k̂_j, x̂) > θ; the paper's literal "x − θ" would fire on everything).

Per-token edits: a target of m tokens becomes m pairs prompt + target[:j] → target[j]
(`editing.data.samples.per_token_pairs`), each with its own neuron, initialised with the key k̂⁰ =
x̂ at the pair's last token and the value v̂⁰ = the unembedding row of the target token. The "+L"
variant (`retrofit=True`) then trains only the new neuron for `steps` AdamW steps with
L = −log P(y|x) + a·((k̂⁰ − k̂)ᵀx̂)² + b·mean_out max(k̂ᵀ x̂_out − b_j, 0) over out-of-scope inputs
(2 texts sampled from BOS, 2 from the subject, 6 prompts of other edits).

Where the adaptor acts: inside the editor's own forwards at the positions it scores (one pair per row:
`eval_mode="pairs"`, the paper's Algorithm 2; or every target-predicting position of one
teacher-forced row: `eval_mode="sequence"`, which is what incremental decoding gives). In any other
forward of the wrapped model (e.g. `generate`), at the last position of the input, and at the single
new position of every incremental decoding step with a KV cache; prompts must then be left-padded
(`Editor.generate` does that).

Traceability: every neuron records the edit (case id) and target-token index it serves. Withdrawing an
edit zeroes its neurons' values (official code: a withdrawn neuron that wins max-pooling contributes
nothing) or removes them (`withdraw_mode="remove"`: the next-best neuron may win).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from editing import hooks
from editing.data.batch import EditBatch
from editing.data.records import EditRequest, EvalCase
from editing.data.samples import TokenPair, out_of_scope_samples, per_token_pairs
from editing.editors.base import Editor
from editing.editors.ireva_calibration import calibrate, floors
from editing.metrics import EditMetrics, ireva_scores  # noqa: F401  (ireva_scores: also imported from here)
from editing.tokens import encode, pad_right
from editing.tuners import KeyValueAdaptor
from editing.tuners.kv_adaptor import WithdrawMode, standardize
from editing.validation import check_choice

EvalMode = Literal["pairs", "sequence"]
Calibration = Literal["none", "corpus", "template"]
_ACTIVATION_ALIASES = {"swish": "silu"}  # the model config's activation name -> the ACT2FN name used


class IReVa(Editor):
    """Key-value adaptor at the MLP of one layer, one neuron per edited target token.

    Args:
        layers: the one adapted layer, as a one-element list (negative counts from the end; the paper
            uses the second-to-last layer).
        alpha: scale α of the adaptor output.
        theta: margin θ: neuron j fires roughly when cos(k̂_j, x̂) > θ (shift b_j = θ‖k̂⁰_j‖²).
        activation: activation family g (an ACT2FN name); None = the base model's MLP activation.
        retrofit: train each new neuron ("iReVa+L"); False keeps the initialised neuron ("iReVa").
        steps, lr, betas, weight_decay: AdamW steps per neuron and its settings (official code).
        rec_weight: a, the weight of L_rec (ablation: 0).
        irr_weight: b, the weight of L_irr (ablation: 0).
        parallel: train all neurons of an edit step in one batch, each sample seeing only its own new
            neuron and the neurons of earlier steps; False = the exact sequential order of the paper.
        max_pooling: only the best-matching neuron contributes at inference (ablation: False sums all).
        margin: shift the activation by b_j (ablation: False = g(K̂ᵀx̂)).
        initialise: keys/values from the pair's state and the target's unembedding; False = random
            (the paper's "w/o L_rec" ablation also sets rec_weight 0).
        withdraw_mode: "zero" (zero the values; official) or "remove" (drop the neurons).
        eval_mode: "pairs" (one forward per token pair, adaptor at its last position) or "sequence".
        oos_other, oos_bos, oos_subject: out-of-scope inputs per edit for L_irr (App. 10.7).
        oos_max_length: sampled texts get 2..oos_max_length new tokens (uniform, seeded).
        seed: seed of the out-of-scope sampling and of random initialisation.
        calibration: "none" (the paper), "corpus" or "template": the calibrated-margin variants of
            `editing.editors.ireva_calibration` (`calibration_texts`, `calibration_margin`,
            `calibration_corpus`; docs/ireva.md).
    """

    method = "ireva"

    def __init__(self, layers: list[int] = [-2], alpha: float = 0.2, theta: float = 0.75,
                 activation: str | None = None, retrofit: bool = True, steps: int = 5, lr: float = 5e-2,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.01,
                 rec_weight: float = 1e-3, irr_weight: float = 1e-3, parallel: bool = False,
                 max_pooling: bool = True, margin: bool = True, initialise: bool = True,
                 withdraw_mode: WithdrawMode = "zero", eval_mode: EvalMode = "pairs", oos_other: int = 6,
                 oos_bos: int = 2, oos_subject: int = 2, oos_max_length: int = 10, seed: int = 0,
                 calibration: Calibration = "none", calibration_texts: int = 64, calibration_margin: float = 0.0,
                 calibration_corpus: str = "wiki-offline", **kwargs):
        super().__init__(**kwargs)
        if len(layers) != 1:
            raise ValueError(f"iReVa adapts exactly one layer; got layers={layers}")
        check_choice("withdraw_mode", withdraw_mode, WithdrawMode)
        check_choice("eval_mode", eval_mode, EvalMode)
        check_choice("calibration", calibration, Calibration)
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"theta is a cosine threshold in [0, 1), got {theta}")
        if retrofit and steps < 1:
            raise ValueError(f"retrofitting needs steps >= 1, got {steps}")
        if oos_max_length < 2:
            raise ValueError(f"oos_max_length must be >= 2, got {oos_max_length}")
        self.layer = self.layout.layer_index(layers[0])
        name = activation or self.layout.activation
        name = _ACTIVATION_ALIASES.get(name, name)
        if name not in ACT2FN:
            raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACT2FN)}")
        self.act = ACT2FN[name]
        self.case_ids: list[str] = []     # edit index -> case id
        self._seen: list[EditRequest] = []  # requests edited so far (pool of "other prompts" for L_irr)
        self._calibration: torch.Tensor | None = None  # calibration inputs (ireva_calibration)
        self.inject(self.layer, "mlp", lambda mlp: KeyValueAdaptor(
            mlp, self.layout.hidden_size, self.act, alpha, margin=margin, max_pooling=max_pooling,
            withdraw_mode=withdraw_mode, gate=calibration != "none"))

    # --- the adaptor (an injected `KeyValueAdaptor`) -----------------------------------------------
    @property
    def kv(self) -> KeyValueAdaptor:
        """The key-value adaptor wrapping the adapted layer's MLP."""
        return self.layout.mlp(self.layer)

    @property
    def num_neurons(self) -> int:
        return self.kv.num_neurons

    @staticmethod
    def _one_hot(positions: torch.Tensor, width: int) -> torch.Tensor:
        return F.one_hot(positions, width).bool()

    # --- states of the base model ----------------------------------------------------------------
    def _states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: torch.Tensor,
                block_input: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP input of the adapted layer at `last` [B] (raw, float32) and, if asked, the whole
        input of its block (for `layout.run_from`). Runs only the blocks up to the adapted one.
        The adaptor acts at a row's last position only, so these states do not depend on it."""
        lay = self.layout
        mods = {"block": lay.block(self.layer)} if block_input else {}
        with torch.no_grad(), self.disabled(), hooks.capture(mods, "input") as whole, \
                hooks.capture({"x": lay.mlp(self.layer)}, "input", positions=last) as at:
            hooks.run_until(lay.backbone, lay.mlp(self.layer), input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False)
        return at["x"].float(), whole.get("block")

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, attention mask and each row's last position."""
        ids, mask = pad_right(self.tokenizer, seqs)
        last = torch.tensor([len(s) - 1 for s in seqs])
        return ids.to(self.device), mask.to(self.device), last.to(self.device)

    # --- editing ---------------------------------------------------------------------------------
    def pairs(self, request: EditRequest) -> list[TokenPair]:
        """The per-token pairs of one request (prompt + target[:j] -> target[j])."""
        return per_token_pairs(request, self.tokenizer, self.prepare_prompt(request.text))

    def withdrawable_ids(self) -> set[str]:
        return set(self.case_ids)

    def _edit_index(self, case_id: str) -> int:
        if case_id not in self.case_ids:
            self.case_ids.append(case_id)
        return self.case_ids.index(case_id)

    def _initial(self, x_hat: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k̂⁰, v̂⁰, b for standardised inputs [P, d] and target tokens [P]."""
        if self.hparams.initialise:
            k = x_hat.clone()
            v = self.layout.unembedding[labels].detach().float()
        else:
            gen = torch.Generator().manual_seed(self.hparams.seed + self.num_neurons)
            k = standardize(torch.randn(x_hat.shape, generator=gen)).to(x_hat.device)
            scale = self.layout.unembedding.detach().float().norm(dim=1).mean() / x_hat.shape[1] ** 0.5
            v = (torch.randn(x_hat.shape, generator=gen) * scale).to(x_hat.device)
        b = self.hparams.theta * (k * k).sum(-1)
        return k, v, b

    def apply_edit(self, batch: EditBatch) -> dict:
        requests = batch.requests
        pairs = [p for r in requests for p in self.pairs(r)]
        ids, mask, last = self._pad([p.input_ids for p in pairs])
        labels = torch.tensor([p.label for p in pairs], device=self.device)
        x, h_in = self._states(ids, mask, last, block_input=self.hparams.retrofit)
        x_hat = standardize(x)
        k0, v0, b = self._initial(x_hat, labels)
        pool = list(batch.pool) or list(self._seen) + list(requests)  # other subjects: as L_irr's pool
        if self.hparams.calibration != "none":
            b = torch.maximum(b, floors(self, k0.T, requests, pool))
        edit, token = [self._edit_index(p.case_id) for p in pairs], [p.position for p in pairs]
        info = {"neurons_added": len(pairs)}
        if not self.hparams.retrofit:
            self.kv.append(k0, v0, b, edit, token)
        else:
            owner = {r.case_id: i for i, r in enumerate(requests)}
            oos = self._out_of_scope(requests, batch.pool) if self.hparams.irr_weight > 0 else None
            pair_oos = None if oos is None else [oos[owner[p.case_id]] for p in pairs]
            if self.hparams.parallel:
                k, v, losses = self._retrofit(torch.arange(len(pairs), device=self.device), ids, mask, last,
                                              h_in, x_hat, labels, k0, v0, b, pair_oos)
                self.kv.append(k, v, b, edit, token)
            else:
                losses = []
                for i in range(len(pairs)):  # exact order: each neuron sees all earlier ones
                    rows = torch.tensor([i], device=self.device)
                    k, v, loss = self._retrofit(rows, ids, mask, last, h_in, x_hat, labels, k0, v0, b, pair_oos)
                    self.kv.append(k, v, b[rows], edit[i:i + 1], token[i:i + 1])
                    losses.append(loss)
                losses = torch.cat(losses)
            info["loss"] = float(losses.mean())
        if self.hparams.calibration != "none":
            info["calibrated"] = calibrate(self, self.num_neurons - len(pairs), requests, pool)
        self._seen.extend(requests)
        return info

    def _retrofit(self, rows, ids, mask, last, h_in, x_hat, labels, k0, v0, b, pair_oos):
        """Train the new neurons of `rows` together (each row sees only its own new neuron and the
        bank); return the trained (k, v) and the final per-row loss."""
        h = self.hparams
        width = int(last[rows].max()) + 1
        k = torch.nn.Parameter(k0[rows].clone())
        v = torch.nn.Parameter(v0[rows].clone())
        opt = torch.optim.AdamW([k, v], lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        act_mask = self._one_hot(last[rows], width)
        xr, k0r, br = x_hat[rows], k0[rows], b[rows]
        oos = None
        if pair_oos is not None:
            oos = torch.stack([pair_oos[i] for i in rows.tolist()])          # [R, n_out, d]
        per_row = torch.zeros(len(rows), device=self.device)
        for _ in range(h.steps):
            opt.zero_grad(set_to_none=True)
            with self.kv.acting(act_mask, train=(k, v, br)):
                hidden = self.layout.run_from(self.layer, h_in[rows, :width], mask[rows, :width])
            logits = self.layout.lm_head(hooks.gather_at(hidden, last[rows])).float()
            per_row = F.cross_entropy(logits, labels[rows], reduction="none")
            if h.rec_weight:
                per_row = per_row + h.rec_weight * ((xr * (k0r - k)).sum(-1)) ** 2
            if oos is not None:
                per_row = per_row + h.irr_weight * F.relu(torch.einsum("rod,rd->ro", oos, k) - br[:, None]).mean(1)
            if not torch.isfinite(per_row).all():
                raise FloatingPointError(f"non-finite retrofitting loss {per_row.tolist()}")
            per_row.sum().backward()  # rows are independent: each neuron gets its own loss's gradient
            opt.step()
        return k.detach(), v.detach(), per_row.detach()

    def _out_of_scope(self, requests: list[EditRequest], pool: list[EditRequest] | None = None) -> list[torch.Tensor]:
        """Per request, the standardised MLP inputs [n_out, d] of its out-of-scope texts. Other edits'
        prompts come from `pool` (the benchmark's requests, `EditBatch.pool`), else from the requests
        edited so far and this step's."""
        h = self.hparams
        pool = list(pool) if pool else list(self._seen) + list(requests)
        texts, owner = [], []
        for i, r in enumerate(requests):
            length = random.Random(f"{h.seed}:{r.case_id}:length").randint(2, h.oos_max_length)
            with self.disabled():
                t = out_of_scope_samples(r, pool, self.model, self.tokenizer, n_other=h.oos_other,
                                         n_bos=h.oos_bos, n_subject=h.oos_subject, length=length, seed=h.seed)
            n_other = len(t) - h.oos_bos - h.oos_subject  # other edits' prompts come first
            texts += [self.prepare_prompt(x) if j < n_other else x for j, x in enumerate(t)]
            owner += [i] * len(t)
        batch = encode(self.tokenizer, texts).to(self.device)
        x, _ = self._states(batch.input_ids, batch.attention_mask, batch.prompt_last)
        x = standardize(x)
        owner_t = torch.tensor(owner, device=self.device)
        return [x[owner_t == i] for i in range(len(requests))]

    # --- state: snapshot, checkpoints ---------------------------------------------------------------
    def snapshot(self):
        return {"bank": self.kv.bank(), "case_ids": list(self.case_ids), "seen": len(self._seen)}

    def restore(self, snap) -> None:
        self.kv.load_bank(snap["bank"])
        self.case_ids = list(snap["case_ids"])
        del self._seen[snap["seen"]:]

    def edit_meta(self) -> dict:
        return {"num_neurons": self.num_neurons, "case_ids": list(self.case_ids), "layer": self.layer}

    def load_edit_meta(self, meta: dict) -> None:
        if "num_neurons" not in meta:
            raise RuntimeError("this checkpoint holds no iReVa adaptor")
        if meta.get("layer", self.layer) != self.layer:
            raise RuntimeError(f"this adaptor was made at layer {meta['layer']}, this editor adapts layer {self.layer}")
        self.kv.resize(int(meta["num_neurons"]))
        self.case_ids = list(meta["case_ids"])

    # --- traceability ----------------------------------------------------------------------------
    def neurons_of(self, case_id: str) -> torch.Tensor:
        """Indices of the neurons that serve the edit `case_id` (empty if it was never edited)."""
        if case_id not in self.case_ids:
            return torch.zeros(0, dtype=torch.long, device=self.kv.keys.device)
        return (self.kv.neuron_edit == self.case_ids.index(case_id)).nonzero().squeeze(1)

    def withdraw(self, case_ids: list[str] | str, mode: str | None = None) -> int:
        """Withdraw edits for good: zero their neurons' values ("zero") or remove the neurons
        ("remove"); returns the number of neurons affected. Unknown case ids are an error."""
        case_ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        mode = mode or self.hparams.withdraw_mode
        check_choice("withdraw mode", mode, WithdrawMode)
        if unknown := [c for c in case_ids if c not in self.case_ids]:
            raise KeyError(f"no edit with case id(s) {unknown}")
        return self.kv.withdraw(torch.tensor([self.case_ids.index(c) for c in case_ids]), mode)

    @contextmanager
    def withdrawn(self, case_ids: list[str] | str, mode: str | None = None) -> Iterator[None]:
        """Edits withdrawn for the duration, restored exactly afterwards."""
        snap = self.snapshot()
        try:
            self.withdraw(case_ids, mode)
            yield
        finally:
            self.restore(snap)

    # --- scoring -----------------------------------------------------------------------------------
    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor, withdraw: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K, V] at positions [B, K] with the adaptor acting at the scored positions:
        "pairs": each position in its own forward (the pair prompt + target[:k], adaptor at its last
        token); the blocks below the adapted layer run once per row. "sequence": all positions in one
        forward, as in incremental decoding."""
        if not self.enabled or self.num_neurons == 0:
            return super().logits_at(input_ids, attention_mask, positions)
        lay = self.layout
        B, K = positions.shape
        # Padded target entries repeat position 0 of their row's target positions; skip them.
        valid = torch.ones_like(positions, dtype=torch.bool)
        valid[:, 1:] = positions[:, 1:] > positions[:, :1]
        if self.hparams.eval_mode == "sequence":
            mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            r, c = valid.nonzero(as_tuple=True)
            mask[r, positions[r, c]] = True
            with self.kv.acting(mask, withdraw):
                hidden = lay.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            return lay.lm_head(hooks.gather_at(hidden, positions))
        width = int(positions.max()) + 1
        ids, am = input_ids[:, :width], attention_mask[:, :width]
        _, h_in = self._states(ids, am, positions[:, 0], block_input=True)
        r, c = valid.nonzero(as_tuple=True)
        pos = positions[r, c]
        logits = None
        chunk = max(1, self.hparams.forward_batch_size)
        for s in range(0, len(r), chunk):
            rr, pp = r[s:s + chunk], pos[s:s + chunk]
            w = int(pp.max()) + 1
            wd = None if withdraw is None else withdraw.to(rr.device)[rr]
            with self.kv.acting(self._one_hot(pp, w), wd):
                hidden = lay.run_from(self.layer, h_in[rr, :w], am[rr, :w])
            part = lay.lm_head(hooks.gather_at(hidden, pp))
            if logits is None:
                logits = part.new_zeros(B, K, part.shape[-1])
            logits[rr, c[s:s + chunk]] = part
        return logits

    @torch.no_grad()
    def _predictions(self, prompts: list[str], targets: list[str],
                     withdraw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced argmax ids [B, T] at the target positions and the target mask."""
        lp, batch = self.target_logprobs(prompts, targets, withdraw=withdraw)
        return lp.argmax(-1).cpu(), batch.target_mask.cpu()

    @torch.no_grad()
    def withdrawal_outcomes(self, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each edited request (others are skipped): whether the per-token predictions on its edit
        prompt change when that edit alone is withdrawn (RS), and whether they then equal the unedited
        model's (Con). Returns (changed [N] bool, consistent [N] bool, index into `requests` [N])."""
        keep = [i for i, r in enumerate(requests) if r.case_id in self.case_ids]
        if not keep:
            empty = torch.zeros(0, dtype=torch.bool)
            return empty, empty, torch.zeros(0, dtype=torch.long)
        prompts = [requests[i].text for i in keep]
        targets = [requests[i].target_new for i in keep]
        edited, m = self._predictions(prompts, targets)
        gone = torch.tensor([self.case_ids.index(requests[i].case_id) for i in keep], device=self.device)
        withdrawn, _ = self._predictions(prompts, targets, gone)
        with self.disabled():
            base, _ = self._predictions(prompts, targets)
        changed = ((edited != withdrawn) & m).any(1)
        consistent = ((base == withdrawn) | ~m).all(1)
        return changed, consistent, torch.tensor(keep)

    def withdrawal_scores(self, requests: list[EditRequest]) -> dict:
        """Retrieve Success and Consistency (percentages) over the edited requests."""
        changed, consistent, _ = self.withdrawal_outcomes(requests)
        if changed.numel() == 0:
            return {}
        return {"retrieve_success": 100.0 * changed.float().mean().item(),
                "consistency": 100.0 * consistent.float().mean().item()}

    def update_extra_metrics(self, cases: list[EvalCase], metrics: EditMetrics) -> None:
        changed, consistent, keep = self.withdrawal_outcomes([c.request for c in cases])
        if changed.numel():
            groups = torch.tensor([cases[i].index for i in keep.tolist()])
            metrics.update_withdrawal(changed, consistent, groups)

    def derived_scores(self, values: dict) -> dict:
        return ireva_scores(values)

    def report_extras(self, values: dict) -> dict:
        return {"ireva": {**ireva_scores(values), "neurons": self.num_neurons, "layer": self.layer}}
