"""Per-architecture facts: the one place that knows where things live inside a model.

Editors ask a `Layout` for modules ("the MLP output projection of block 7") and never test model
class names. Every supported family is one `Family` entry below; to support a new architecture, add
an entry to `FAMILIES` (and a tiny-model test in tests/test_layout.py).

Vocabulary (see docs/specification.md §0-1):
- *MLP input*: what enters the MLP module (already normalised).
- *MLP key*: what enters the MLP output projection (`c_proj`, `fc_out`, `dense_4h_to_h`,
  `down_proj`); for gated MLPs that is act(gate(x)) * up(x).
- *MLP output weight*: the output projection's weight, always viewed as (out, in), whatever the
  storage (GPT-2's Conv1D stores (in, out)).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family (relative to the model or to a block)."""

    name: str
    model_types: tuple[str, ...]
    backbone: str          # the decoder stack whose first output is the final-normed hidden state
    blocks: str            # the ModuleList of blocks (relative to the model)
    mlp: str               # relative to a block
    mlp_out: str           # relative to a block: the MLP output projection
    attn: str              # relative to a block: the attention module
    attn_out: str          # relative to a block: the attention output projection
    final_norm: str        # relative to the model
    embed: str             # relative to the model: token embeddings
    parallel_attr: str | None = None   # config attribute that says the block is parallel
    parallel_default: bool = False
    activation_attr: str | None = None  # config attribute naming the MLP activation
    position_embed: str | None = None   # absolute position embeddings added to the token embeddings
    # relative to a block: the modules EasyEdit's LoRA baseline adapts (docs/baselines.md); GPT-NeoX
    # has no published setting, its fused query_key_value is the analogue of GPT-2's c_attn
    lora_targets: tuple[str, ...] = ()
    mlp_in: tuple[str, ...] = ()        # relative to a block: the MLP input projection(s) (MELO's LoRA)


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), backbone="transformer", blocks="transformer.h", mlp="mlp",
           mlp_out="mlp.c_proj", attn="attn", attn_out="attn.c_proj", final_norm="transformer.ln_f",
           embed="transformer.wte", activation_attr="activation_function", position_embed="transformer.wpe",
           lora_targets=("attn.c_attn",), mlp_in=("mlp.c_fc",)),
    Family("gptj", ("gptj",), backbone="transformer", blocks="transformer.h", mlp="mlp",
           mlp_out="mlp.fc_out", attn="attn", attn_out="attn.out_proj", final_norm="transformer.ln_f",
           embed="transformer.wte", parallel_default=True, activation_attr="activation_function",
           lora_targets=("mlp.fc_in", "mlp.fc_out"), mlp_in=("mlp.fc_in",)),
    Family("gpt_neox", ("gpt_neox",), backbone="gpt_neox", blocks="gpt_neox.layers", mlp="mlp",
           mlp_out="mlp.dense_4h_to_h", attn="attention", attn_out="attention.dense",
           final_norm="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in",
           parallel_attr="use_parallel_residual", activation_attr="hidden_act",
           lora_targets=("attention.query_key_value",), mlp_in=("mlp.dense_h_to_4h",)),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), backbone="model", blocks="model.layers",
           mlp="mlp", mlp_out="mlp.down_proj", attn="self_attn", attn_out="self_attn.o_proj",
           final_norm="model.norm", embed="model.embed_tokens", activation_attr="hidden_act",
           lora_targets=("self_attn.q_proj", "self_attn.v_proj"), mlp_in=("mlp.gate_proj", "mlp.up_proj")),
)


class UnsupportedModelError(ValueError):
    pass


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for fam in FAMILIES for t in fam.model_types)
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported)}. "
        "To add one, append a Family to FAMILIES in editing/layout.py and a tiny-model test to "
        "tests/test_layout.py.")


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class Layout:
    """The facts of one loaded model, answered from its `Family`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.family = family_for(model.config.model_type)

    # --- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(_get(self.model, self.family.blocks))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.embedding.weight.shape[1]

    @property
    def parallel(self) -> bool:
        """True when attention and MLP both read the block input (GPT-J, NeoX parallel residual)."""
        if self.family.parallel_attr is None:
            return self.family.parallel_default
        return bool(getattr(self.config, self.family.parallel_attr, self.family.parallel_default))

    @property
    def activation(self) -> str:
        """Name of the MLP activation ("gelu_new", "silu", ...)."""
        attr = self.family.activation_attr
        return str(getattr(self.config, attr)) if attr else "gelu"

    def layer_index(self, layer: int) -> int:
        """The layer as a non-negative index (negative counts from the end)."""
        n = self.num_layers
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range for a model with {n} layers")
        return layer % n

    def block_name(self, layer: int) -> str:
        return f"{self.family.blocks}.{self.layer_index(layer)}"

    def module_name(self, layer: int, part: str) -> str:
        """Full module path of `part` in {"block", "mlp", "mlp_out", "attn", "attn_out"}."""
        if part == "block":
            return self.block_name(layer)
        rel = {"mlp": self.family.mlp, "mlp_out": self.family.mlp_out, "attn": self.family.attn,
               "attn_out": self.family.attn_out}.get(part)
        if rel is None:
            raise ValueError(f"unknown part {part!r}; expected block, mlp, mlp_out, attn or attn_out")
        return f"{self.block_name(layer)}.{rel}"

    def module(self, layer: int, part: str) -> nn.Module:
        """The module at `part` of `layer`: an injected edit module if one wraps it (its forward is
        the edited one), else the model's own."""
        return _get(self.model, self.module_name(layer, part))

    def inject(self, layer: int, part: str, wrap) -> nn.Module:
        """Put `wrap(module)` (an edit module wrapping it, `editing.tuners`) in place of `part` of
        `layer`; returns the new module. `eject` puts the wrapped module back."""
        name = self.module_name(layer, part)
        new = wrap(_get(self.model, name))
        self.swap(name, new)
        return new

    def eject(self, layer: int, part: str) -> nn.Module:
        """Remove the edit module at `part` of `layer` (outermost first); returns it."""
        name = self.module_name(layer, part)
        current = _get(self.model, name)
        inner = current._modules.get("base_layer")
        if not isinstance(inner, nn.Module):
            raise ValueError(f"no edit module at {name}")
        self.swap(name, inner)
        return current

    def swap(self, name: str, module: nn.Module) -> None:
        """Put `module` at the module path `name` (inside any edit module wrapping its parent)."""
        parent_path, attr = name.rsplit(".", 1)
        setattr(base_layer(_get(self.model, parent_path)), attr, module)

    def block(self, layer: int) -> nn.Module:
        return self.module(layer, "block")

    def mlp(self, layer: int) -> nn.Module:
        """The MLP; its input is the normalised MLP input, its output the MLP's contribution m^l."""
        return self.module(layer, "mlp")

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP output projection; its input is the MLP key, its output m^l."""
        return self.module(layer, "mlp_out")

    def attn(self, layer: int) -> nn.Module:
        return self.module(layer, "attn")

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection; its output is the attention's contribution a^l."""
        return self.module(layer, "attn_out")

    def part(self, layer: int, part: str) -> nn.Module:
        """The module whose output is `part` of the residual stream at `layer`: "block" (h^l),
        "mlp" (m^l) or "attn_out" (a^l)."""
        if part not in ("block", "mlp", "attn_out"):
            raise ValueError(f"part must be block, mlp or attn_out, got {part!r}")
        return self.module(layer, part)

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack: its first output is the final-normed last hidden state."""
        return _get(self.model, self.family.backbone)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)

    @property
    def embedding(self) -> nn.Module:
        return _get(self.model, self.family.embed)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def unembedding(self) -> torch.Tensor:
        """The unembedding matrix, (vocab, hidden)."""
        return self.lm_head.weight

    # --- running part of the model ------------------------------------------------------------
    @contextmanager
    def blocks_from(self, start: int):
        """Within the context the backbone holds only blocks start..end (the same module objects,
        so hooks on them still fire)."""
        parent_path, attr = self.family.blocks.rsplit(".", 1)
        parent = _get(self.model, parent_path)
        full = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList(list(full)[self.layer_index(start):]))
        try:
            yield
        finally:
            setattr(parent, attr, full)

    @contextmanager
    def attention(self, implementation: str):
        """Within the context the model's attention runs as `implementation` ("eager", "sdpa", ...;
        where the installed transformers can switch it on a loaded model). Eager attention is the
        fast one for many short rows with gradients on a CPU: PyTorch's flash-attention backward
        under bfloat16 autocast there costs more than the matmuls of the whole block."""
        before = getattr(self.config, "_attn_implementation", None)
        switch = getattr(self.model, "set_attn_implementation", None)
        if switch is None or before is None or before == implementation:
            yield
            return
        try:
            switch(implementation)
        except (ValueError, ImportError):   # a model that cannot switch: as it is
            yield
            return
        try:
            yield
        finally:
            switch(before)

    def run_from(self, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
                 prefix: "Prefix | None" = None) -> torch.Tensor:
        """The final-normed hidden states [B, S, d] computed from the input of block `start` (the
        residual stream h^{start-1}), running only blocks start..end: the truncated forward of edits
        whose changes begin at block `start`. Positions are 0..S-1 (right padding); with `prefix`
        (`Layout.prefix`), `hidden` continues each row's cached prefix: its positions are
        prefix.lengths + 0..S-1, and it attends to the prefix's real positions through their cached
        keys and values (blocks start..end), so only these S positions are computed."""
        if prefix is None:
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
            cache, mask = None, attention_mask
        else:
            if prefix.start != self.layer_index(start):
                raise ValueError(f"the prefix was cached from block {prefix.start}, not {start}")
            pos = prefix.lengths[:, None] + torch.arange(hidden.shape[1], device=hidden.device)
            cache, mask = prefix.cache(self.num_layers), torch.cat([prefix.mask, attention_mask], 1)
        return self._backbone_from(start, hidden, mask, pos, cache)[0]

    def prefix(self, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
               lengths: torch.Tensor) -> "Prefix":
        """Keys and values of blocks start..end over positions 0..P-1 of `hidden` [B, P, d] (the input
        of block `start`, right padded as `attention_mask`), of which the first `lengths` [B] of each
        row are its prefix: what `run_from(start, ..., prefix=)` attends to. Computed once, without
        gradients; nothing at a later position can change them (causal attention)."""
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad():
            self._backbone_from(start, hidden, attention_mask, pos, cache, use_cache=True)
        i = self.layer_index(start)
        kv = [_layer_kv(cache, j) for j in range(i, self.num_layers)]
        return Prefix(i, kv, lengths.to(hidden.device))

    def _backbone_from(self, start: int, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                       cache, use_cache: bool = False):
        embeds = hidden
        if self.family.position_embed is not None:  # the backbone will add them again
            embeds = hidden - _get(self.model, self.family.position_embed)(pos).to(hidden.dtype)
        kw = {} if cache is None else {_cache_kwarg(self.backbone): cache}
        if cache is not None or pos.shape[0] > 1:
            kw["position_ids"] = pos.expand(hidden.shape[0], -1)
        with self.blocks_from(start):
            return self.backbone(inputs_embeds=embeds, attention_mask=mask,
                                 use_cache=use_cache or cache is not None, **kw)

    # --- weights -----------------------------------------------------------------------------
    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """The MLP output projection weight as an (out, in) view of the stored tensor."""
        return weight_out_in(self.mlp_out(layer))

    def mlp_key_size(self, layer: int) -> int:
        return self.mlp_out_weight(layer).shape[1]


@dataclass
class Prefix:
    """Cached keys and values of blocks `start`.. over each row's first `lengths` positions
    (`Layout.prefix`). `rows(idx)` selects rows (and trims the padding no selected row needs)."""

    start: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per block from `start`: [B, heads, P, head_dim] each
    lengths: torch.Tensor                          # [B]

    @property
    def mask(self) -> torch.Tensor:
        """[B, P]: 1 at each row's prefix positions."""
        width = self.kv[0][0].shape[-2]
        return (torch.arange(width, device=self.lengths.device)[None] < self.lengths[:, None]).long()

    def rows(self, idx: torch.Tensor) -> "Prefix":
        lengths = self.lengths[idx]
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        return Prefix(self.start, [(k[idx, :, :width], v[idx, :, :width]) for k, v in self.kv], lengths)

    def cache(self, num_layers: int):
        """A fresh `DynamicCache` holding the prefix (the blocks below `start` hold the first cached
        block's tensors as placeholders, so that the cache reports the prefix length to the mask
        and position logic; they never run). Updating it concatenates, so `kv` stays as it is."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for j in range(num_layers):
            k, v = self.kv[max(j - self.start, 0)]
            cache.update(k, v, j)
        return cache


def _layer_kv(cache, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):            # transformers >= 4.56
        return cache.layers[j].keys, cache.layers[j].values
    return cache.key_cache[j], cache.value_cache[j]


def _cache_kwarg(backbone: nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def base_layer(module: nn.Module) -> nn.Module:
    """The model's own module under any injected edit modules wrapping it (`editing.tuners`)."""
    while isinstance(module._modules.get("base_layer"), nn.Module):
        module = module._modules["base_layer"]
    return module


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as (in, out) (HF Conv1D)."""
    module = base_layer(module)
    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise TypeError(f"cannot tell the weight orientation of {type(module).__name__}")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight viewed as (out, in); writing into the view writes the weight."""
    w = base_layer(module).weight
    return w.t() if is_transposed(module) else w


def linear(module: nn.Module, x: torch.Tensor, weight_out_in_: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T with W given (out, in) (default: the module's own), without the bias."""
    w = weight_out_in(module) if weight_out_in_ is None else weight_out_in_
    return x @ w.t()


def layout_of(model: nn.Module) -> Layout:
    """The `Layout` of a loaded model."""
    return Layout(model)
