"""The one place that reads or changes activations.

Everything is a forward hook (output) or forward pre-hook (input) on a module, given a function
`fn(tensor) -> tensor | None` that sees the module's hidden-state tensor (the first element when
the module returns or takes a tuple) and may return a replacement. On top of that:

- `capture(...)`: record a module's input or output, whole or at chosen (row, position) entries;
- `capture_io(...)`: record (input, output) of modules in the autograd graph, for gradients with
  respect to a module's output (MEND's δ = ∂L/∂y) even in a frozen model;
- `add_at(...)` / `replace_at(...)`: add a vector to, or overwrite, chosen (row, position) entries;
- `attach(...)`: a persistent hook for edits that live with the model (adaptors, weight deltas),
  returning a handle whose `remove()` detaches it;
- `run_until(model, module, **inputs)`: a forward that stops right after `module` (run only the
  layers you need);
- `MaskTracker(backbone)`: the attention mask of the current forward, for persistent hooks that
  must ignore padding (e.g. statistics over a sequence's real positions).

Positions are per row: a LongTensor [B] (one position per row) or [B, K]; rows are the batch rows.
Callers derive positions from the attention mask (see `editing.tokens`), so right and left padding
both work. Context managers always remove their hooks, even when the forward raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Where = Literal["input", "output"]
TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def first(x):
    return x[0] if isinstance(x, tuple) else x


def with_first(x, new: torch.Tensor):
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


def attach(module: nn.Module, fn: TensorFn, where: Where = "output") -> RemovableHandle:
    """Call `fn` on the module's hidden-state input or output at every forward; a returned tensor
    replaces it. Returns the handle; `handle.remove()` detaches."""
    if where == "output":
        def hook(mod, args, output):
            new = fn(first(output))
            return None if new is None else with_first(output, new)
        return module.register_forward_hook(hook)
    if where == "input":
        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            name = next(iter(kwargs))  # the hidden state passed by keyword (e.g. hidden_states=)
            new = fn(kwargs[name])
            return None if new is None else (args, {**kwargs, name: new})
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    raise ValueError(f"where must be 'input' or 'output', got {where!r}")


def attach_io(module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]
              ) -> RemovableHandle:
    """Call `fn(input, output)` after every forward of the module (hidden-state input and output);
    a returned tensor replaces the output. For edits computed from a module's input, such as a
    weight delta (`output + input @ delta.T`)."""
    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        new = fn(x, first(output))
        return None if new is None else with_first(output, new)
    return module.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def attached(module: nn.Module, fn: TensorFn, where: Where = "output") -> Iterator[RemovableHandle]:
    handle = attach(module, fn, where)
    try:
        yield handle
    finally:
        handle.remove()


def _rows(positions: torch.Tensor, batch: int) -> torch.Tensor:
    rows = torch.arange(batch, device=positions.device)
    return rows if positions.dim() == 1 else rows[:, None].expand_as(positions)


def gather_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, S, ...] at per-row positions [B] -> [B, ...] or [B, K] -> [B, K, ...]."""
    positions = positions.to(x.device)
    return x[_rows(positions, x.shape[0]), positions]


class Captured(dict):
    """name -> captured tensor, filled when the forward runs inside `capture`."""


@contextmanager
def capture(modules: dict[str, nn.Module], where: Where = "output",
            positions: torch.Tensor | None = None, detach: bool = True) -> Iterator[Captured]:
    """Record each module's input or output (at `positions` if given, else whole) into a dict.

    With several forwards inside the context, the last one wins."""
    store = Captured()
    handles = []

    def make(name):
        def fn(x):
            val = x if positions is None else gather_at(x, positions)
            store[name] = val.detach() if detach else val
            return None
        return fn

    try:
        for name, mod in modules.items():
            handles.append(attach(mod, make(name), where))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_io(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Every forward's (input, output) of each module, by name, kept in the autograd graph. An output
    that does not require grad (a frozen model) is replaced by itself plus a zero leaf that does, so
    `torch.autograd.grad(loss, output)` is ∂loss/∂output through every later module, and no
    parameter's `.grad` is touched."""
    store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in modules}
    handles = []

    def make(name):
        def fn(x, out):
            new = None
            if not out.requires_grad:
                new = out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            store[name].append((x, out))
            return new
        return fn

    try:
        for name, mod in modules.items():
            handles.append(attach_io(mod, make(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _scatter(x: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, add: bool) -> torch.Tensor:
    positions = positions.to(x.device)
    rows = _rows(positions, x.shape[0])
    values = values.to(dtype=x.dtype, device=x.device)
    out = x.clone()
    if add:
        out[rows, positions] = out[rows, positions] + values
    else:
        out[rows, positions] = values.expand_as(out[rows, positions])
    return out


@contextmanager
def add_at(module: nn.Module, positions: torch.Tensor, values: torch.Tensor,
           where: Where = "output") -> Iterator[None]:
    """Add `values` ([B, d] for positions [B]; [B, K, d] for [B, K]) at (row, position) entries.
    Differentiable in `values`."""
    with attached(module, lambda x: _scatter(x, positions, values, add=True), where):
        yield


@contextmanager
def replace_at(module: nn.Module, positions: torch.Tensor, values: torch.Tensor,
               where: Where = "output") -> Iterator[None]:
    """Overwrite (row, position) entries with `values`. Differentiable in `values`."""
    with attached(module, lambda x: _scatter(x, positions, values, add=False), where):
        yield


@contextmanager
def edit(module: nn.Module, fn: TensorFn, where: Where = "output") -> Iterator[None]:
    """Apply an arbitrary function to the module's input or output for the duration."""
    with attached(module, fn, where):
        yield


class StopForward(Exception):
    """Raised by `stop_after` to end a forward pass early."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End the forward as soon as `module` has run (catch `StopForward` around the call): run only
    the layers you need."""
    def fn(x):
        raise StopForward
    with attached(module, fn, "output"):
        yield


def run_until(model: nn.Module, module: nn.Module, **inputs) -> None:
    """Run `model(**inputs)` and end the forward as soon as `module` has run: only the layers up to
    it execute. Hooks registered before the call (e.g. `capture` on `module` itself) still fire;
    read what they recorded afterwards."""
    with stop_after(module):
        try:
            model(**inputs)
        except StopForward:
            pass


class MaskTracker:
    """The 2-D attention mask of the latest forward of `module` (the backbone), for hooks on modules
    inside it that must tell real tokens from padding (whose hidden states are not zero). A forward
    pre-hook records the `attention_mask` argument ([B, past + S], 1 = real token); `positions`
    answers for the S positions of the current forward, so right padding, left padding and a KV
    cache (the mask then also covers the past tokens) all work. `remove()` detaches."""

    def __init__(self, module: nn.Module):
        import inspect

        self.mask: torch.Tensor | None = None
        signature = inspect.signature(module.forward)

        def pre_hook(mod, args, kwargs):
            try:
                given = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                given = kwargs
            m = given.get("attention_mask")
            self.mask = m if torch.is_tensor(m) and m.dim() == 2 else None
        self._handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def positions(self, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(real [B, S] bool, index [B, S] long) for the last `length` positions of the current
        forward: whether each is a real token, and its index among its row's real tokens (0 = the
        row's first token, e.g. a BOS). Without a usable mask every position is real and indexed
        from 0 (a forward given no mask)."""
        m = self.mask
        if m is None or m.shape[0] != batch or m.shape[1] < length:
            index = torch.arange(length, device=device).expand(batch, length)
            return torch.ones(batch, length, dtype=torch.bool, device=device), index
        m = m.to(device) != 0
        return m[:, -length:], (m.long().cumsum(1) - 1)[:, -length:]

    def remove(self) -> None:
        self._handle.remove()


class CacheTracker:
    """Whether the latest forward of `module` (the backbone) continues a KV cache, i.e. is an
    incremental decoding step of `generate`: a forward pre-hook reads the cache argument
    (`cache` or `past_key_values`) and records its length. Edits that route once per prompt and keep
    the route for the decoding steps (GRACE, MELO) ask `decoding` instead of guessing from the shape
    (a new one-token prompt right after a generate of the same batch size is not a decoding step).
    `remove()` detaches."""

    def __init__(self, module: nn.Module):
        self.past = 0

        def pre_hook(mod, args, kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            try:
                self.past = int(cache.get_seq_length()) if cache is not None else 0
            except (AttributeError, TypeError):   # a legacy tuple cache
                self.past = int(cache[0][0].shape[-2]) if cache else 0
        self._handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    @property
    def decoding(self) -> bool:
        return self.past > 0

    def remove(self) -> None:
        self._handle.remove()
