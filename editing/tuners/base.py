"""`EditLayer`: an edit injected into the model in place of the module it changes, in the manner of
PEFT's tuner layers. It wraps the base layer (`self.base_layer`, the model's own module, frozen and
untouched), computes the base output and changes it in `edit(x, out)`; `active` is its on/off switch
(off: exactly the base layer's output); `merge()`/`unmerge()` write it into the base weight and take
it out again where the edit is linear. Attribute lookups it does not answer itself go to the base
layer, so the model's module paths (`mlp.down_proj.weight`, ...) keep working through it.

Editors put edit layers into the model through `Layout.inject` and find them with `edit_layers`;
`print(model)` shows them. An edit layer's own tensors (not its base layer's) are the edit state
an edit checkpoint holds.
"""
from __future__ import annotations

import torch
from torch import nn

from editing.hooks import first, with_first


class EditLayer(nn.Module):
    """Base of the injected edit modules: subclasses implement `edit(x, out) -> new out | None`."""

    mergeable = False
    # Whether each position's output depends on that position's input alone (what a cached prefix
    # needs, `editing.editors.locate.targets`); False for edits that look at whole sequences.
    position_wise = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active = True
        self.merged = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name == "base_layer" or modules is None or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if not self.active or self.merged:
            return out
        x = args[0] if args else next(iter(kwargs.values()))
        new = self.edit(x, first(out))
        return out if new is None else with_first(out, new)

    def edit(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The edited output for input x and base output `out` (None: `out` unchanged)."""
        raise NotImplementedError

    def merge(self) -> None:
        """Write the edit into the base layer's weight (the forward then is the base layer's own)."""
        raise TypeError(f"a {type(self).__name__} edit is not linear and cannot be merged into the base weight")

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before `merge`."""
        raise TypeError(f"a {type(self).__name__} edit cannot be merged or unmerged")

    def own_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The edit's own persistent tensors (the base layer's excluded)."""
        return {prefix + k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def extra_repr(self) -> str:
        return f"active={self.active}" + (", merged=True" if self.merged else "")


def position_wise(*roots: nn.Module) -> bool:
    """Whether every edit layer inside `roots` is `position_wise`: a forward through them may then
    leave out a row's positions after the one it reads, or cache the ones before the one it changes."""
    return all(m.position_wise for root in roots for m in root.modules() if isinstance(m, EditLayer))


def edit_layers(model: nn.Module) -> dict[str, EditLayer]:
    """Every edit layer in the model by module path (outermost first)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EditLayer)}
