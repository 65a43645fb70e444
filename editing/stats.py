"""Second-moment statistics E[k kᵀ] of the MLP key, per layer, cached on disk.

k is the input of a layer's MLP output projection (`layout.mlp_out(l)`), at every non-pad token of
every text (BOS tokens included, as the official code does: they are ordinary positions of its
batches). The moment is uncentred: Σ k kᵀ / n, accumulated in float64. All requested layers come
from one pass over the corpus, and the forward stops after the highest of them.

Cache: one safetensors file per layer under `cache_dir()/stats/<model digest>/<corpus id>/`, named by
layer, sample count, maximum length and forward dtype; written atomically; a hit does not touch the
corpus or the model.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editing import hooks
from editing.corpus import DEFAULT_CORPUS, corpus_id, load_corpus
from editing.layout import Layout
from editing.models import cache_dir, fingerprint


def _path(root: Path, layer: int, n_samples: int | None, max_length: int, forward_dtype: str) -> Path:
    n = "all" if n_samples is None else str(n_samples)
    return root / f"layer{layer}_n{n}_len{max_length}_{forward_dtype}.safetensors"


def _resolve_dtype(model, forward_dtype: str) -> str:
    if forward_dtype != "auto":
        return forward_dtype
    param = next(model.parameters())
    if param.dtype == torch.float32 and param.device.type == "cpu":
        return "bfloat16"  # bf16 matmuls are several times faster on CPUs that have them
    return str(param.dtype).replace("torch.", "")


@torch.no_grad()
def second_moments(model, tokenizer, layers: list[int], corpus: str = DEFAULT_CORPUS,
                   n_samples: int | None = None, max_length: int = 256, batch_tokens: int = 8192,
                   forward_dtype: str = "auto", cache: bool = True, progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: E[kkᵀ]} (float32, CPU, (d_ff, d_ff)) over the first `n_samples` texts of the corpus."""
    lay = Layout(model)
    layers = sorted({lay.layer_index(l) for l in layers})
    dtype_name = _resolve_dtype(model, forward_dtype)
    root = cache_dir() / "stats" / fingerprint(model)["digest"] / corpus_id(corpus)
    out: dict[int, torch.Tensor] = {}
    if cache:
        for l in layers:
            p = _path(root, l, n_samples, max_length, dtype_name)
            if p.exists():
                out[l] = load_file(p)["moment"]
    missing = [l for l in layers if l not in out]
    if not missing:
        return out
    texts = load_corpus(corpus, n_samples)
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    device = next(model.parameters()).device
    sums = {l: None for l in missing}
    count = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype_name)) \
        if dtype_name != str(next(model.parameters()).dtype).replace("torch.", "") else None
    bar = tqdm(total=len(order), desc=f"statistics layers {missing}", disable=not progress)
    start = 0
    while start < len(order):
        width = len(enc[order[start]])
        end = start
        while end < len(order) and (end - start + 1) * max(width, len(enc[order[end]])) <= batch_tokens:
            width = max(width, len(enc[order[end]]))
            end += 1
        end = max(end, start + 1)
        rows = [enc[i] for i in order[start:end]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with hooks.capture({l: lay.mlp_out(l) for l in missing}, "input") as cap, hooks.stop_after(lay.block(missing[-1])):
            try:
                if autocast is not None:
                    with autocast:
                        lay.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                else:
                    lay.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
            except hooks.StopForward:
                pass
        keep = mask.bool()
        for l in missing:
            k = cap[l][keep].float()
            kk = (k.T @ k).double().cpu()
            sums[l] = kk if sums[l] is None else sums[l] + kk
        count += int(keep.sum())
        bar.update(end - start)
        start = end
    bar.close()
    for l in missing:
        moment = (sums[l] / count).float()
        out[l] = moment
        if cache:
            _save_atomic({"moment": moment, "count": torch.tensor(count)}, _path(root, l, n_samples, max_length, dtype_name))
    return out


def _save_atomic(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
