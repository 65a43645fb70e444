"""The `Editor` LightningModule: a frozen HF causal LM plus the state of its edits.

Contract (docs/architecture.md):
- The base model's own weights never receive gradients; the edit state lives in edit modules injected
  into the model (`editing.tuners`, through `Layout.inject`) or on the Editor (e.g. the closed-form
  editors' weight history) and is the only thing a checkpoint holds, together with the base model's
  identity, so an edit checkpoint is small and refuses to load onto another model.
- `training_step(batch)` applies one edit step (an `EditBatch`) atomically: if it fails, the edit
  state is restored exactly.
- `disabled()` is a context in which the model behaves as the unedited base model (every edit module
  switched off; editors that write weights override it).
- Scoring, generation and the evaluation loop live in `editing.evaluation`; its `EvaluationReport`
  callback writes results.json. The editor supplies `logits_at` (where its edit acts).

Subclasses implement `apply_edit(batch)`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from torch import nn

from editing import evaluation, hooks
import editing.editors.checks as checks
from editing.editors.checks import CheckpointMismatchError, deferred_signals
from editing.data.batch import EditBatch
from editing.data.records import EditRequest, EvalCase
from editing.layout import Layout, weight_out_in
from editing.metrics import EditMetrics, PromptStats
from editing.models import DEFAULT_MODEL, fingerprint, load_model, load_tokenizer
from editing.tuners import EditLayer, edit_layers

log = logging.getLogger(__name__)


class EditError(RuntimeError):
    """An edit step failed; the model was left exactly as it was before the step."""


class Editor(pl.LightningModule):
    """Base class of every editing method.

    Args:
        base_model: hub id, local directory, or an embedded name (default: the offline SmolLM2-135M).
        dtype: float32, bfloat16 or float16 for the base model.
        chat_template: wrap every prompt as a user turn of the tokenizer's chat template.
        forward_batch_size: prompts per forward pass in evaluation.
        fluency: also generate from the generation prompts and report n-gram entropy.
        fluency_tokens: tokens generated per generation prompt.
        results_name: file name of the evaluation report inside the run directory.
        max_length: the longest edit prompt + target in tokens (None: the model's context).
        step_checks: check every step before it commits (docs/reliability.md); False skips them.
        max_entropy_shift: how far (nats) the next-token entropy on fixed probe prompts may move
            from the unedited model's (None: unchecked).
        max_relative_change: the largest ‖edit‖ / ‖weights it changes‖ (None: unchecked).
        max_target_drop: how much a step may lower its own targets' mean token log-probability.
        predict_tokens: tokens generated per prompt by `predict` / `compare`.
        eval_unedited: `test` also scores the unedited model on the same cases (the table's column).
        gen_eval: also score greedy generations (no teacher forcing): rewrite_gen, paraphrase_gen,
            neighborhood_gen, locality_gen and the gen_* headline (`editing.evaluation.generation_values`).
        gen_extra_tokens: tokens generated beyond each target's token count.
        drift: report ppl_ratio, the perplexity on held-out text over the unedited model's.
        drift_texts: a file of texts for the drift (None: the offline corpus's held-out texts).
        drift_samples: how many texts the drift uses.
    """

    method = "editor"
    verbose_metrics = False  # the CLI's --verbose_metrics: print every metric after `test`, not the headline

    def __init__(self, base_model: str = DEFAULT_MODEL, dtype: str = "float32", chat_template: bool = False,
                 forward_batch_size: int = 64, fluency: bool = False, fluency_tokens: int = 50,
                 results_name: str = "results.json", max_length: int | None = None, step_checks: bool = True,
                 max_entropy_shift: float | None = 3.0, max_relative_change: float | None = 1000.0,
                 max_target_drop: float = 0.5, predict_tokens: int = 20, eval_unedited: bool = True,
                 gen_eval: bool = True, gen_extra_tokens: int = 3, drift: bool = True, drift_texts: str | None = None,
                 drift_samples: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False
        self.model = load_model(base_model, dtype)
        self.tokenizer = load_tokenizer(base_model)
        self.layout = Layout(self.model)
        self.enabled = True
        self.edit_log: list[dict] = []        # one entry per applied step: case ids, seconds
        self.evaluation: evaluation.Evaluation | None = None
        self._base_identity: dict | None = None
        self._probe_base: float | None = None
        self.edit_file: str | None = None     # the edit file loaded or written last (results.json names it)

    # --- identity and checkpoints --------------------------------------------------------------
    @property
    def base_identity(self) -> dict:
        if self._base_identity is None:
            self._base_identity = fingerprint(self.model)
        return self._base_identity

    def inject(self, layer: int, part: str, wrap) -> EditLayer:
        """Put an edit module (`editing.tuners`) around `part` of `layer` (see `Layout.inject`)."""
        return self.layout.inject(layer, part, wrap)

    def edit_layers(self) -> dict[str, EditLayer]:
        """The edit modules injected into the model, by module path."""
        return edit_layers(self.model)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the edit state: the editor's own tensors and those of the edit modules injected into
        the model (never the base model's)."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        own = tuple(f"{prefix}model.{name}." for name in self.edit_layers())
        base = tuple(f"{p}base_layer." for p in own)
        for key in [k for k in full if k.startswith(prefix + "model.")]:
            if not key.startswith(own) or key.startswith(base):
                del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith("model.")}
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise RuntimeError(f"edit state mismatch for {type(self).__name__}: missing {missing}, "
                               f"unexpected {unexpected}")
        with torch.no_grad():
            for name, value in state_dict.items():
                own[name].copy_(value)
        return nn.modules.module._IncompatibleKeys([], [])

    def edit_meta(self) -> dict:
        """What a subclass needs besides tensors to rebuild its edit state (see `load_edit_meta`)."""
        return {}

    def load_edit_meta(self, meta: dict) -> None:
        """Shape the edit state (e.g. the number of adaptor neurons) before tensors are loaded."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["base_model"] = self.base_identity
        checkpoint["edit_meta"] = self.edit_meta()
        checkpoint["edit_log"] = self.edit_log
        checkpoint["method"] = self.method
        checkpoint["edit_shape"] = self.edit_shape()

    def edit_shape(self) -> dict:
        """The hyperparameters that shape the edit state (e.g. the edited layers): a checkpoint made
        with others does not load."""
        return {}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checks.check_base(checkpoint.get("base_model"), self.base_identity)
        checks.check_identity(checkpoint, self.method, type(self).__name__, self.edit_shape())
        self.load_edit_meta(checkpoint.get("edit_meta", {}))
        self.edit_log = list(checkpoint.get("edit_log", []))

    def edit_checkpoint(self) -> dict:
        """The edit state alone as a checkpoint dictionary (what `save_edit` writes)."""
        ckpt = {"state_dict": self.state_dict(), "hyper_parameters": dict(self.hparams)}
        self.on_save_checkpoint(ckpt)
        return ckpt

    def save_edit(self, path: str | Path) -> Path:
        """Write the edit state alone as a safe edit file (safetensors + JSON, atomically) for
        `load_edit` (`editing.edit_file`)."""
        from editing.edit_file import write_edit_file
        return write_edit_file(self.edit_checkpoint(), path)

    def load_edit(self, path: str | Path, checkpoint: dict | None = None) -> None:
        """Load a safe edit file (never unpickled; `checkpoint`: its contents, already read); refuses
        another base model, method or edit shape, naming the file."""
        from editing.edit_file import read_edit_file
        ckpt = read_edit_file(path) if checkpoint is None else checkpoint
        try:
            self.on_load_checkpoint(ckpt)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{path}: {e}") from None
        self.load_state_dict(ckpt["state_dict"])
        self.edit_file = str(path)

    def save_pretrained(self, directory: str | Path) -> Path:
        """An edit directory (PEFT-style): the safe edit file and edit_config.json, no base weights."""
        from editing.edit_file import save_pretrained
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: str | None = None, **overrides) -> "Editor":
        """The editor saved by `save_pretrained`, with its edit, on `base_model` (default: the edit's)."""
        from editing.edit_file import from_pretrained
        editor = from_pretrained(directory, Editor, base_model, **overrides)
        if not isinstance(editor, cls):
            raise CheckpointMismatchError(f"{directory}: holds a {type(editor).__name__} edit, not a {cls.__name__} one")
        return editor

    def export(self, out: str | Path, scores: dict | None = None) -> Path:
        """A plain Hugging Face model directory of the edited model with a model card (`editing.export`)."""
        from editing.export import export_model
        return export_model(self, out, scores)

    # --- enabling / disabling ----------------------------------------------------------------------
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's behaviour for the duration (no second copy of the model): every injected
        edit module is switched off."""
        before = self.enabled
        layers = list(self.edit_layers().values())
        active = [m.active for m in layers]
        self.enabled = False
        for m in layers:
            m.active = False
        try:
            yield
        finally:
            self.enabled = before
            for m, a in zip(layers, active):
                m.active = a

    # --- editing ---------------------------------------------------------------------------------
    def apply_edit(self, batch: EditBatch) -> dict:
        """Apply one edit step (`batch.requests`) to the edit state; return numbers worth logging."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A copy of the edit state from which `restore` rebuilds it exactly."""
        return {k: v.detach().clone() for k, v in self.state_dict(keep_vars=True).items()}

    def restore(self, snap: Any) -> None:
        self.load_state_dict(snap)

    def edit(self, step: EditBatch | list[EditRequest]) -> dict:
        """Apply one edit step (an `EditBatch` or a list of requests) atomically: the requests are
        validated first (`check_requests`); on any failure, Ctrl-C included, the edit state is
        restored exactly before the exception propagates (an `Exception` becomes an `EditError`; a
        KeyboardInterrupt or SystemExit is re-raised as it is). After the step, `check_step` checks
        what it did before the step counts (see docs/reliability.md)."""
        batch = EditBatch.of(step)
        requests = batch.requests
        if not requests:
            return {}
        self.check_requests(requests)
        snap, logged = self.snapshot(), len(self.edit_log)
        start = time.perf_counter()
        try:
            before = self.step_probe(requests)
            with torch.enable_grad():
                info = self.apply_edit(batch) or {}
            self.check_finite()
            info.update(self.check_step(requests, before))
            seconds = time.perf_counter() - start
            self.edit_log.append({"cases": [r.case_id for r in requests], "seconds": seconds,
                                  "facts": [[r.text, r.target_new] for r in requests]})
        except BaseException as e:
            with deferred_signals():
                self.restore(snap)
                del self.edit_log[logged:]
            if not isinstance(e, Exception):
                raise
            ids = [r.case_id for r in requests]
            raise EditError(f"edit step with cases {ids} failed ({type(e).__name__}: {e}); "
                            "the model was restored to its state before the step") from e
        return {"seconds": seconds, **info}

    # --- what a step checks (editing.editors.checks) ---------------------------------------------
    def max_tokens(self) -> int | None:
        """The longest prompt + target a request may have: `max_length`, else the model's context."""
        if self.hparams.max_length is not None:
            return self.hparams.max_length
        cfg = self.model.config
        return next((getattr(cfg, a) for a in ("max_position_embeddings", "n_positions", "n_ctx")
                     if getattr(cfg, a, None)), None)

    def withdrawable_ids(self) -> set[str]:
        """Case ids already edited by an editor that withdraws edits per case (a new edit may not reuse
        one); empty for editors without per-case withdrawal."""
        return set()

    def check_requests(self, requests: list[EditRequest]) -> None:
        checks.check_requests(requests, self.tokenizer, self.max_tokens(), self.withdrawable_ids())

    def relative_change(self) -> float | None:
        """‖edit‖ / ‖weights it changes‖ now, the largest over edited modules (None: not defined)."""
        ratios = [float(m.delta.detach().norm() / weight_out_in(m).detach().norm()) for m in self.edit_layers().values()
                  if isinstance(getattr(m, "delta", None), nn.Parameter)]
        return max(ratios) if ratios else None

    def step_probe(self, requests: list[EditRequest]):
        if not self.hparams.step_checks:
            return None
        if self._probe_base is None:
            with self.disabled():
                self._probe_base = checks.probe_entropy(self)
        return checks.StepProbe(checks.target_logprob(self, requests))

    def check_step(self, requests: list[EditRequest], before) -> dict:
        if before is None:
            return {}
        return checks.check_step(self, requests, before, self._probe_base, self.relative_change())

    def check_finite(self) -> None:
        for name, value in self.state_dict().items():
            if torch.is_floating_point(value) and not torch.isfinite(value).all():
                raise FloatingPointError(f"edit state {name!r} holds non-finite values")

    def on_train_start(self) -> None:
        # Edits are replicated (or explicitly gathered) across ranks, never averaged by DDP: switch off
        # DDP's gradient reduction so an editor may run its own inner optimisation loops.
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def training_step(self, batch: EditBatch | list[EditRequest], batch_idx: int) -> None:
        info = self.edit(batch)
        numbers = {f"edit/{k}": float(v) for k, v in info.items() if isinstance(v, (int, float))}
        numbers["edit/num_edits"] = float(sum(len(e["cases"]) for e in self.edit_log))
        self.log_dict(numbers, prog_bar=False, on_step=True, batch_size=len(batch))
        return None

    def configure_optimizers(self):
        # Editors run their own inner optimisations inside `apply_edit` (manual optimisation).
        return None

    def on_train_end(self) -> None:
        """Write <run dir>/checkpoints/edit.safetensors: the safe edit file (rank 0, atomically)."""
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank
        path = run_dir / "checkpoints" / "edit.safetensors"
        if self.trainer.is_global_zero:
            self.save_edit(path)
            print(f"edit file: {path}")
        self.trainer.strategy.barrier("edit_file")
        self.edit_file = str(path)

    # --- scoring (the logic lives in editing.evaluation) ------------------------------------------
    def prepare_prompt(self, prompt: str) -> str:
        if self.hparams.chat_template:
            from editing.models import apply_chat_template
            return apply_chat_template(self.tokenizer, prompt)
        return prompt

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor, **scoring) -> torch.Tensor:
        """Logits [B, K, V] at positions [B, K] with the edit acting: the LM head runs only where we
        score. Editors whose edit depends on where it is scored override this (iReVa)."""
        hidden = self.layout.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return self.layout.lm_head(hooks.gather_at(hidden, positions))

    def target_logprobs(self, prompts: list[str], targets: list[str], **scoring):
        return evaluation.target_logprobs(self, prompts, targets, **scoring)

    def score_prompts(self, cases: list[EvalCase]) -> PromptStats:
        return evaluation.score_prompts(self, cases, self.hparams.forward_batch_size)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 30, **kwargs) -> str | list[str]:
        """Greedy continuation(s) of the prompt(s) by the edited model."""
        texts = evaluation.generate(self, [prompt] if isinstance(prompt, str) else list(prompt), max_new_tokens,
                                    **kwargs)
        return texts[0] if isinstance(prompt, str) else texts

    def evaluate(self, cases: list[EvalCase] | list[EditRequest], style: str = "counterfact") -> dict:
        """Python API: metrics (percentages) over the cases (EditRequests are turned into cases)."""
        return evaluation.evaluate(self, cases, style)

    def compare(self, prompts: str | list[str], max_new_tokens: int | None = None) -> list[dict]:
        """The edited model's greedy continuation of each prompt beside the unedited one's."""
        from editing.predict import compare
        return compare(self, [prompts] if isinstance(prompts, str) else list(prompts),
                       max_new_tokens or self.hparams.predict_tokens)

    # What an editor adds to an evaluation (iReVa: withdrawal metrics and the paper's scores).
    def update_extra_metrics(self, cases: list[EvalCase], metrics: EditMetrics) -> None:
        """Update editor-specific metrics of `metrics` for a batch of cases."""

    def derived_scores(self, values: dict) -> dict:
        """Scores computed from the metric values, returned by `evaluate` with them."""
        return {}

    def report_extras(self, values: dict) -> dict:
        """Editor-specific sections of results.json."""
        return {}

    # --- the Lightning test loop (driven by editing.evaluation.EvaluationReport) -----------------
    def configure_callbacks(self):
        from editing.editors.lifecycle import PartialCheckpoint
        from editing.predict import PredictionReport
        return [evaluation.EvaluationReport(), PartialCheckpoint(), PredictionReport()]

    def test_step(self, batch: list[EvalCase], batch_idx: int) -> None:
        self.evaluation.update(batch)

    def predict_step(self, batch: list[tuple[int, str]], batch_idx: int) -> list[dict]:
        """(index, prompt) pairs -> their `compare` rows, with the index (PredictionReport orders them)."""
        rows = self.compare([p for _, p in batch])
        return [{"index": i, **row} for (i, _), row in zip(batch, rows)]
