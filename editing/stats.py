"""Second-moment statistics E[k kᵀ] of the MLP key, per layer, cached on disk (docs/specification.md §2.4).

Definition. k^l is the input of block l's MLP output projection (`Layout.mlp_out(l)`: `c_proj`,
`fc_out`, `dense_4h_to_h`, `down_proj`; for gated MLPs act(gate(x)) * up(x)). For a corpus,

    E[k kᵀ]^l = Σ_t k_t kᵀ_t / n        (uncentred; a (d_ff, d_ff) matrix)

over every non-pad token t of the first `n_samples` texts of `load_corpus(corpus)` (n of them),
each text tokenised as the tokenizer does by default (its special tokens included: a BOS the
tokenizer adds is an ordinary position, as in the MEMIT/ROME code, where the BOS is part of every
batch row; SmolLM2 and GPT-2 tokenizers add none) and truncated to `max_length` tokens. Positions
are independent of batching: texts are right-padded and the pad positions dropped by the attention
mask.

Computation. One pass over the corpus serves every requested layer, and the forward stops right
after the highest of them (`hooks.run_until`): upper blocks and the LM head never run. Texts are
sorted by length and packed into batches of at most `batch_tokens` padded tokens. Per batch, the
selected keys K (tokens × d_ff) give KᵀK, added to a float64 accumulator; the token count is an
int. KᵀK is a float32 matmul, except after a bfloat16 forward on a CPU, where the keys already are
bf16 values and a bf16 matmul (float32 accumulation, output rounded to bf16: relative error
<= 2^-9 per entry and batch, unbiased) is ~3.5x faster; see `_products_dtype`.

Precision. `forward_dtype="auto"` runs a float32 model's forward on a CPU in bfloat16 through
autocast where bf16 matmuls are fast (`editing.precision`; elsewhere float32): the weights stay float32 and untouched, the matmuls run in bf16 (3-4x faster on CPUs with
bf16 units), norms and the residual stream stay float32. On SmolLM2-135M (layers 3-7, 300-500
wiki-offline texts) the result differs from a float32 forward by ~0.5-0.7% in Frobenius norm and
~0.3% of the largest entry (benchmarks/stats_speed.py prints it). Elsewhere "auto" keeps the
model's dtype. A forward dtype wider than the model's (e.g. "float32" for a bf16 model) casts the
parameters temporarily and puts the original tensors back afterwards, also on error.

Cache. One safetensors file per layer:

    cache_dir()/stats/<model digest>/<corpus id>/layer{l}_n{n_samples|all}_len{max_length}_{dtype}.safetensors

holding `moment` (float32) and metadata (token count, text count, ...). The model digest is
`models.fingerprint(model)["digest"]` (a sample of every weight), so another model, or an edited
one, never reuses a file; the corpus id names local files by their content. Files are written to a
temporary name and renamed (atomic). A hit neither loads the corpus nor runs the model; when only
some layers are cached, the missing ones are computed together in one pass.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from editing import hooks
from editing.io import atomic_path
from editing.tokens import pad_right
from editing.corpus import DEFAULT_CORPUS, corpus_id, load_corpus
from editing.layout import Layout
from editing.models import cache_dir, fingerprint
from editing.precision import fast_dtype

log = logging.getLogger(__name__)

FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WIDTH = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}


def key_dim(model: nn.Module, layer: int) -> int:
    """The size of the MLP key of `layer` (d_ff): the input size of its MLP output projection."""
    return Layout(model).mlp_key_size(layer)


def resolve_forward_dtype(model: nn.Module, forward_dtype: str = "auto") -> str:
    """The dtype name the forward runs in: "auto" is bfloat16 for a float32 model on a CPU with fast
    bf16 matmuls (`editing.precision`), else the model's own dtype."""
    param = next(model.parameters())
    if forward_dtype == "auto":
        if param.dtype == torch.float32 and param.device.type == "cpu" and fast_dtype("cpu", torch.bfloat16):
            return "bfloat16"
        forward_dtype = str(param.dtype).removeprefix("torch.")
    if forward_dtype not in FORWARD_DTYPES:
        raise ValueError(f"unknown forward dtype {forward_dtype!r}; expected auto, {', '.join(FORWARD_DTYPES)}")
    return forward_dtype


def cache_path(digest: str, corpus: str, layer: int, n_samples: int | None, max_length: int,
               forward_dtype: str) -> Path:
    """The cache file of one layer's statistics (`forward_dtype` resolved, not "auto")."""
    n = "all" if n_samples is None else str(n_samples)
    return _cache_file(digest, corpus_id(corpus), layer, n, max_length, forward_dtype)


def _key(model: nn.Module, max_length: int, forward_dtype: str = "auto") -> tuple[str, int, str]:
    """The model's part of the cache key: (weights digest, max_length clamped to the model's positions,
    forward dtype resolved)."""
    limit = _max_positions(model)
    return (fingerprint(model)["digest"], max_length if limit is None else min(max_length, limit),
            resolve_forward_dtype(model, forward_dtype))


def cache_paths(model: nn.Module, layers: list[int], corpus: str = DEFAULT_CORPUS, n_samples: int | None = None,
                max_length: int = 256, forward_dtype: str = "auto") -> dict[int, Path]:
    """The cache file `second_moments` reads and writes for each layer of `model` with these settings."""
    digest, length, dtype_name = _key(model, max_length, forward_dtype)
    return {l: cache_path(digest, corpus, l, n_samples, length, dtype_name) for l in layers}


def _cache_file(digest: str, corpus: str, layer: int | str, n: str, max_length: int | str, forward_dtype: str) -> Path:
    """The cache file named by the key fields as the metadata stores them (corpus: its id)."""
    for part in (digest, corpus, str(layer), n, str(max_length), forward_dtype):
        if not part or "/" in part or "\\" in part or part in (".", ".."):
            raise ValueError(f"not a statistics key field: {part!r}")
    return cache_dir() / "stats" / digest / corpus / f"layer{layer}_n{n}_len{max_length}_{forward_dtype}.safetensors"


def load_cached(path: Path) -> tuple[torch.Tensor, dict] | None:
    """(moment, metadata) from a cache file, or None when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("moment"), dict(f.metadata() or {})
    except Exception as e:  # a corrupt file is recomputed, never trusted
        log.warning("ignoring unreadable statistics cache %s (%s)", path, e)
        return None


def _save_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextlib.contextmanager
def forward_precision(model: nn.Module, dtype: torch.dtype, mode: str = "autocast"):
    """Run the forwards inside in `dtype` without lasting changes to the model.

    mode "autocast" (for a dtype narrower than the model's): torch.autocast, the weights untouched;
    matmuls run in `dtype`, norms and the residual stream stay in the model's dtype.
    mode "cast", and always for a dtype as wide as the model's or wider (float32 for a bf16 model,
    bf16 for a float16 model): the parameters are cast for the
    duration and the original tensors put back afterwards (exactly the same objects, also on
    error); buffers (rotary frequencies) keep their dtype."""
    model_dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if dtype == model_dtype:
        yield
        return
    if mode == "autocast" and _WIDTH[dtype] < _WIDTH.get(model_dtype, 32):
        with torch.autocast(device.type, dtype=dtype):
            yield
        return
    if mode not in ("autocast", "cast"):
        raise ValueError(f"mode must be 'autocast' or 'cast', got {mode!r}")
    saved = [(p, p.data) for p in model.parameters() if torch.is_floating_point(p)]
    try:
        for p, data in saved:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of texts packed into batches of at most `batch_tokens` padded tokens (longest first;
    a text longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # the first (longest) text sets the width
        if cur and (len(cur) + 1) * width > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.no_grad()
def second_moments(model, tokenizer, layers: list[int], corpus: str = DEFAULT_CORPUS,
                   n_samples: int | None = None, max_length: int = 256, batch_tokens: int = 8192,
                   forward_dtype: str = "auto", cache: bool = True,
                   progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: E[k kᵀ]} for each requested layer: float32 (d_ff, d_ff) tensors on the CPU.

    k is the MLP key (the input of `layout.mlp_out(layer)`) at every non-pad token of the first
    `n_samples` texts of `corpus` (None: all), each tokenised with the tokenizer's own special tokens
    (a BOS it adds counts as a token) and truncated to `max_length` tokens (and to the model's
    position limit). One pass for all layers not yet cached, stopped after the highest of them.

    forward_dtype: "auto" (bfloat16 autocast for a float32 model on a CPU; else the model's dtype),
    "float32", "bfloat16" or "float16"; it is part of the cache key. The model is left as it was
    (weights, dtypes, train/eval mode). Per-batch KᵀK products are summed in float64.
    cache: read and write `cache_path(...)` files (see the module docstring)."""
    lay = Layout(model)
    layers = sorted({lay.layer_index(l) for l in layers})
    if not layers:
        return {}
    if batch_tokens < 1:
        raise ValueError("batch_tokens must be positive")
    digest, max_length, dtype_name = _key(model, max_length, forward_dtype)
    paths = {l: cache_path(digest, corpus, l, n_samples, max_length, dtype_name) for l in layers}

    out: dict[int, torch.Tensor] = {}
    if cache:
        for l in layers:
            hit = load_cached(paths[l])
            if hit is not None and hit[0].shape == (lay.mlp_key_size(l),) * 2:
                out[l] = hit[0]
    missing = [l for l in layers if l not in out]
    if not missing:
        return out

    sums, count, n_texts = _accumulate(model, lay, tokenizer, missing, load_corpus(corpus, n_samples),
                                       max_length, batch_tokens, FORWARD_DTYPES[dtype_name], progress)
    if count == 0:
        raise ValueError(f"corpus {corpus!r} gave no tokens")
    for l in missing:
        moment = (sums[l] / count).float().cpu()
        out[l] = moment
        if cache:
            meta = {"count": str(count), "texts": str(n_texts), "layer": str(l), "model_digest": digest,
                    "corpus": corpus_id(corpus), "n_samples": "all" if n_samples is None else str(n_samples),
                    "max_length": str(max_length), "forward_dtype": dtype_name,
                    "products_dtype": str(_products_dtype(FORWARD_DTYPES[dtype_name], _device(model))),
                    "definition": json.dumps("sum_t k_t k_t^T / count over non-pad tokens")}
            _save_atomic({"moment": moment}, meta, paths[l])
    return {l: out[l] for l in layers}


def _products_dtype(forward: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the per-batch KᵀK. bfloat16 for a bf16 forward on a CPU: the keys are already
    bf16 values, the matmul accumulates in float32 and rounds only its output (relative error
    <= 2^-9 per entry and batch, unbiased, so ~0.1%/sqrt(batches) on the mean, well below the
    ~0.5% the bf16 forward itself changes; measured 9e-4 on 300 SmolLM2 texts), and it runs ~3.5x
    faster than a float32 KᵀK, which would otherwise take ~30% of the time (SmolLM2, 5 layers:
    4500 instead of 3200 tokens/s). float32 otherwise (float16 could overflow)."""
    return torch.bfloat16 if forward == torch.bfloat16 and device.type == "cpu" else torch.float32


def _accumulate(model, lay: Layout, tokenizer, layers: list[int], texts: list[str], max_length: int,
                batch_tokens: int, dtype: torch.dtype, progress: bool, mode: str = "autocast",
                products: torch.dtype | None = None):
    """(float64 Σ KᵀK per layer, token count, text count) in one truncated pass.

    products: the dtype of the per-batch KᵀK (default `_products_dtype`)."""
    from editing.console import progress as bar_of

    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    enc = [e for e in enc if len(e) > 0]
    device = next(model.parameters()).device
    products = products or _products_dtype(dtype, device)
    sums = {l: torch.zeros(lay.mlp_key_size(l), lay.mlp_key_size(l), dtype=torch.float64, device=device)
            for l in layers}
    count = 0
    was_training = model.training
    model.eval()
    bar = bar_of(len(texts), f"statistics E[kkᵀ] of layers {layers} (cached once per model)", "text", progress)
    try:
        with forward_precision(model, dtype, mode), \
                hooks.capture({l: lay.mlp_out(l) for l in layers}, "input") as cap:
            for batch in _batches([len(e) for e in enc], batch_tokens):
                ids, mask = pad_right(tokenizer, [enc[i] for i in batch])
                ids, mask = ids.to(device), mask.to(device)
                cap.clear()
                hooks.run_until(lay.backbone, lay.block(layers[-1]), input_ids=ids, attention_mask=mask,
                                use_cache=False)
                keep = mask.bool()
                with torch.autocast(device.type, enabled=False):  # products in `products` exactly
                    for l in layers:
                        k = cap.pop(l)[keep].to(products)
                        sums[l] += (k.T @ k).double()
                count += int(keep.sum())
                bar.update(len(batch))
            bar.update(len(texts) - bar.n)
    finally:
        bar.close()
        model.train(was_training)
    return sums, count, len(texts)


# --- sharing statistics (`python cli.py stats --config C --action compute|export|import`) --------------
KEY_FIELDS = ("model_digest", "corpus", "layer", "n_samples", "max_length", "forward_dtype")


def export_statistics(files: dict[int, Path], out: str | Path) -> Path:
    """One safetensors file holding each layer's moment and its cache key (metadata), atomically."""
    tensors, meta = {}, {}
    for l, path in files.items():
        hit = load_cached(path)
        if hit is None:
            raise FileNotFoundError(f"no statistics cached at {path}")
        tensors[f"layer{l}"] = hit[0]
        meta[str(l)] = hit[1]
    out = Path(out)
    _save_atomic(tensors, {"statistics": json.dumps(meta)}, out)
    return out


def import_statistics(path: str | Path, model_digest: str | None = None) -> list[Path]:
    """Write an exported file's layers into the cache under their own keys (model digest, corpus,
    layer, texts, length, dtype), so they are found exactly where that model and setting look and
    nowhere else. With `model_digest`, refuse a file made for another model."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["statistics"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SystemExit(f"error: {path}: not an exported statistics file ({e})")
    targets = []
    for layer, m in meta.items():   # check every layer before writing any
        missing = [k for k in KEY_FIELDS if k not in m]
        if missing or f"layer{layer}" not in tensors:
            raise SystemExit(f"error: {path}: layer {layer} lacks {missing or ['its moment']}")
        if model_digest is not None and m["model_digest"] != model_digest:
            raise SystemExit(f"error: {path}: statistics of model {m['model_digest']}, not of this model ({model_digest})")
        moment = tensors[f"layer{layer}"]
        if moment.dim() != 2 or moment.shape[0] != moment.shape[1] or not torch.isfinite(moment).all():
            raise SystemExit(f"error: {path}: layer {layer} is not a finite square moment")
        try:
            target = _cache_file(m["model_digest"], m["corpus"], m["layer"], m["n_samples"], m["max_length"],
                                 m["forward_dtype"])
        except ValueError as e:
            raise ValueError(f"{path}: layer {layer}: {e}") from None
        targets.append((target, moment, m))
    for target, moment, m in targets:
        _save_atomic({"moment": moment.float().contiguous()}, m, target)
    return [t for t, _, _ in targets]
