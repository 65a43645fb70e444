"""The `Editor` LightningModule: a frozen HF causal LM plus the state of its edits.

Contract (../shared/DESIGN.md):
- The base model's own weights never receive gradients; the edit state (deltas, adaptors, ...) lives
  on the Editor as parameters/buffers and is the only thing a checkpoint holds, together with the
  base model's identity, so an edit checkpoint is small and refuses to load onto another model.
- `training_step(batch)` applies one edit step (a list of `EditRequest`s) atomically: if it fails,
  the edit state is restored exactly.
- `disabled()` is a context in which the model behaves as the unedited base model.
- `test_step` scores `EvalCase`s with the edit on (and off, for locality) and `on_test_epoch_end`
  writes `results.json`.

Subclasses implement `apply_edit(requests)` and act on the model only through `editing.hooks`
(checking `self.enabled` inside their hook functions), or override `disabled()`.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from editing import hooks
from editing.data.records import EditRequest, EvalCase
from editing.layout import Layout
from editing.metrics import EditMetrics, PromptStats
from editing.models import DEFAULT_MODEL, fingerprint, load_model, load_tokenizer, same_model
from editing.tokens import encode

log = logging.getLogger(__name__)


class EditError(RuntimeError):
    """An edit step failed; the model was left exactly as it was before the step."""


class CheckpointMismatchError(RuntimeError):
    """An edit checkpoint was made on a different base model."""


def _atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    """

    method = "editor"

    def __init__(self, base_model: str = DEFAULT_MODEL, dtype: str = "float32", chat_template: bool = False,
                 forward_batch_size: int = 64, fluency: bool = False, fluency_tokens: int = 50,
                 results_name: str = "results.json"):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False
        self.model = load_model(base_model, dtype)
        self.tokenizer = load_tokenizer(base_model)
        self.layout = Layout(self.model)
        self.enabled = True
        self.edit_log: list[dict] = []        # one entry per applied step: case ids, seconds
        self._metrics: EditMetrics | None = None
        self._eval_started: float | None = None
        self._base_identity: dict | None = None

    # --- identity and checkpoints --------------------------------------------------------------
    @property
    def base_identity(self) -> dict:
        if self._base_identity is None:
            self._base_identity = fingerprint(self.model)
        return self._base_identity

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the edit state: everything except the wrapped base model."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        skip = prefix + "model."
        for key in [k for k in full if k.startswith(skip)]:
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("model.")}
        own = self.state_dict()
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_base(checkpoint.get("base_model"))
        self.load_edit_meta(checkpoint.get("edit_meta", {}))
        self.edit_log = list(checkpoint.get("edit_log", []))

    def check_base(self, identity: dict | None) -> None:
        if identity is None:
            raise CheckpointMismatchError("this checkpoint records no base model identity")
        if not same_model(identity, self.base_identity):
            raise CheckpointMismatchError(
                f"this edit was made on base model {identity.get('name')!r} "
                f"({identity.get('model_type')}, {identity.get('num_parameters')} parameters, digest "
                f"{identity.get('digest')}) and cannot be applied to {self.base_identity['name']!r} "
                f"({self.base_identity['model_type']}, {self.base_identity['num_parameters']} parameters, "
                f"digest {self.base_identity['digest']})")

    def save_edit(self, path: str | Path) -> Path:
        """Write the edit state alone (atomically) for `load_edit`."""
        ckpt = {"state_dict": self.state_dict(), "hyper_parameters": dict(self.hparams)}
        self.on_save_checkpoint(ckpt)
        _atomic_torch_save(ckpt, path)
        return Path(path)

    def load_edit(self, path: str | Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        self.on_load_checkpoint(ckpt)
        self.load_state_dict(ckpt["state_dict"])

    # --- enabling / disabling ----------------------------------------------------------------------
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's behaviour for the duration (no second copy of the model)."""
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    # --- editing ---------------------------------------------------------------------------------
    def apply_edit(self, requests: list[EditRequest]) -> dict:
        """Apply one edit step to the edit state; return numbers worth logging."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A copy of the edit state from which `restore` rebuilds it exactly."""
        return {k: v.detach().clone() for k, v in self.state_dict(keep_vars=True).items()}

    def restore(self, snap: Any) -> None:
        self.load_state_dict(snap)

    def edit(self, requests: list[EditRequest]) -> dict:
        """Apply one edit step atomically: on any failure the edit state is restored and EditError
        is raised."""
        if not requests:
            return {}
        snap = self.snapshot()
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                info = self.apply_edit(list(requests)) or {}
            self.check_finite()
        except Exception as e:
            self.restore(snap)
            ids = [r.case_id for r in requests]
            raise EditError(f"edit step with cases {ids} failed ({type(e).__name__}: {e}); "
                            "the model was restored to its state before the step") from e
        seconds = time.perf_counter() - start
        self.edit_log.append({"cases": [r.case_id for r in requests], "seconds": seconds})
        return {"seconds": seconds, **info}

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

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        info = self.edit(batch)
        numbers = {f"edit/{k}": float(v) for k, v in info.items() if isinstance(v, (int, float))}
        numbers["edit/num_edits"] = float(sum(len(e["cases"]) for e in self.edit_log))
        self.log_dict(numbers, prog_bar=False, on_step=True, batch_size=len(batch))
        return None

    def configure_optimizers(self):
        # Editors run their own inner optimisations inside `apply_edit` (manual optimisation).
        return None

    def on_train_end(self) -> None:
        """Write <run dir>/checkpoints/edit.ckpt: the edit state and the base model's identity
        (Lightning writes it atomically; every rank calls this, rank 0 writes)."""
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = run_dir / "checkpoints" / "edit.ckpt"
        self.trainer.save_checkpoint(path)
        if self.trainer.is_global_zero:
            print(f"edit checkpoint: {path}")

    # --- scoring ---------------------------------------------------------------------------------
    def prepare_prompt(self, prompt: str) -> str:
        if self.hparams.chat_template:
            from editing.models import apply_chat_template
            return apply_chat_template(self.tokenizer, prompt)
        return prompt

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, V] at positions [B, K]: the LM head runs only where we score."""
        hidden = self.layout.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return self.layout.lm_head(hooks.gather_at(hidden, positions))

    def target_logprobs(self, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, Any]:
        """Log-probabilities [B, T, V] at the target positions of prompt+target, and the batch."""
        batch = encode(self.tokenizer, [self.prepare_prompt(p) for p in prompts], targets).to(self.device)
        logits = self.logits_at(batch.input_ids, batch.attention_mask, batch.target_positions)
        return F.log_softmax(logits.float(), dim=-1), batch

    @torch.no_grad()
    def score_prompts(self, cases: list[EvalCase]) -> PromptStats:
        """Teacher-forced statistics of every prompt of every case (see `editing.metrics`)."""
        items = [(c.index, p) for c in cases for p in c.prompts]
        chunk = max(1, self.hparams.forward_batch_size)
        kinds, groups, correct, mask, tgt_lp, con_lp, pred, base_pred = [], [], [], [], [], [], [], []
        for s in range(0, len(items), chunk):
            part = items[s:s + chunk]
            prompts = [p.prompt for _, p in part]
            with_contrast = [i for i, (_, p) in enumerate(part) if p.contrast is not None]
            # One forward for targets and contrasts together.
            all_prompts = prompts + [prompts[i] for i in with_contrast]
            all_targets = [p.target for _, p in part] + [part[i][1].contrast for i in with_contrast]
            lp, batch = self.target_logprobs(all_prompts, all_targets)
            n = len(part)
            tok_lp = lp.gather(-1, batch.target_ids[..., None]).squeeze(-1) * batch.target_mask
            mean_lp = tok_lp.sum(1) / batch.target_mask.sum(1).clamp(min=1)
            argmax = lp.argmax(-1)
            c_lp = torch.full((n,), float("nan"), device=lp.device)
            if with_contrast:
                c_lp[torch.tensor(with_contrast, device=lp.device)] = mean_lp[n:]
            T = batch.target_ids.shape[1]
            kinds += [p.kind for _, p in part]
            groups.append(torch.tensor([g for g, _ in part]))
            correct.append(_pad(argmax[:n] == batch.target_ids[:n], T))
            mask.append(_pad(batch.target_mask[:n], T))
            tgt_lp.append(mean_lp[:n].cpu())
            con_lp.append(c_lp.cpu())
            pred.append(_pad(argmax[:n], T))
            # The unedited model's predictions, only where locality is measured.
            base = torch.full((n, T), -1, dtype=torch.long)
            rows = [i for i, (_, p) in enumerate(part) if p.kind in UNCHANGED_KINDS]
            if rows:
                with self.disabled():
                    base_lp, _ = self.target_logprobs([prompts[i] for i in rows],
                                                      [part[i][1].target for i in rows])
                base[rows] = _pad(base_lp.argmax(-1), T)
            base_pred.append(base)
        T = max(x.shape[1] for x in correct)
        return PromptStats(kinds=kinds, groups=torch.cat(groups),
                           correct=torch.cat([_pad(x, T) for x in correct]),
                           mask=torch.cat([_pad(x, T) for x in mask]),
                           target_logprob=torch.cat(tgt_lp), contrast_logprob=torch.cat(con_lp),
                           pred=torch.cat([_pad(x, T) for x in pred]),
                           base_pred=torch.cat([_pad(x, T) for x in base_pred]))

    @torch.no_grad()
    def generate(self, prompt: str | list[str], max_new_tokens: int = 30, **kwargs) -> str | list[str]:
        """Greedy continuation(s) of the prompt(s) by the edited model."""
        single = isinstance(prompt, str)
        prompts = [self.prepare_prompt(p) for p in ([prompt] if single else prompt)]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        finally:
            self.tokenizer.padding_side = side
        kwargs.setdefault("do_sample", False)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts[0] if single else texts

    # --- evaluation ------------------------------------------------------------------------------
    @property
    def metrics(self) -> EditMetrics:
        if self._metrics is None:
            raise RuntimeError("evaluation has not been set up (call start_evaluation)")
        return self._metrics

    def start_evaluation(self, style: str) -> None:
        self._metrics = EditMetrics(style).to(self.device)
        self._eval_started = time.perf_counter()

    def update_metrics(self, cases: list[EvalCase]) -> None:
        self.metrics.update(self.score_prompts(cases))
        if self.hparams.fluency:
            prompts = [p for c in cases for p in c.request.generation_prompts]
            if prompts:
                texts = self.generate(prompts, max_new_tokens=self.hparams.fluency_tokens)
                self.metrics.update_fluency([self.tokenizer(t)["input_ids"] for t in texts])

    def evaluate(self, cases: list[EvalCase] | list[EditRequest], style: str = "counterfact") -> dict:
        """Python API: metrics (percentages) over the cases (EditRequests are turned into cases)."""
        cases = [c if isinstance(c, EvalCase) else EvalCase.from_request(c, i) for i, c in enumerate(cases)]
        self.start_evaluation(style)
        chunk = max(1, self.hparams.forward_batch_size // 8)
        for s in range(0, len(cases), chunk):
            self.update_metrics(cases[s:s + chunk])
        return self.metrics.compute()

    def on_test_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        self.start_evaluation(dm.style if dm is not None else "counterfact")

    def test_step(self, batch: list[EvalCase], batch_idx: int) -> None:
        self.update_metrics(batch)

    def on_test_epoch_end(self) -> None:
        values = self.metrics.compute()  # synchronised across ranks by torchmetrics
        seconds = time.perf_counter() - (self._eval_started or time.perf_counter())
        self.log_dict({f"test/{k}": float(v) for k, v in values.items()}, rank_zero_only=True)
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank
        if self.trainer.is_global_zero:
            report = self.results(values, seconds)
            path = run_dir / self.hparams.results_name
            write_json_atomic(report, path)
            from editing.report import markdown_table
            print(markdown_table([report]))
            print(f"results: {path}")

    def results(self, values: dict, eval_seconds: float) -> dict:
        dm = self.trainer.datamodule if self._trainer is not None else None
        edited = sum(len(e["cases"]) for e in self.edit_log)
        return {
            "method": self.method,
            "model": self.hparams.base_model,
            "data": dm.description if dm is not None else None,
            "num_edits": edited if edited else (dm.num_selected if dm is not None else 0),
            "edit_batch_size": dm.hparams.edit_batch_size if dm is not None else None,
            "timing": {"edit": float(sum(e["seconds"] for e in self.edit_log)), "evaluate": eval_seconds},
            "metrics": values,
            "definitions": self.metrics.definitions(),
            "config": {"model": dict(self.hparams), "data": dict(dm.hparams) if dm is not None else None},
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
        }


UNCHANGED_KINDS = ("neighborhood", "locality")


def _pad(x: torch.Tensor, T: int) -> torch.Tensor:
    """Right-pad dim 1 to T with zeros (False for bool), on the CPU."""
    x = x.cpu()
    if x.shape[1] >= T:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], T - x.shape[1]))], dim=1)


def write_json_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
