"""Edits as modules injected into the model (PEFT's tuners are the model): each wraps the module
it changes, owns its tensors and its on/off switch, and merges into the base weight where the edit
is linear. LoRA-style adaptors, GRACE codebooks and MELO's LoRA blocks belong here too.

- `base.EditLayer`: the wrapper protocol; `edit_layers(model)` finds them.
- `delta.DeltaLinear`: a dense weight delta (FT-L, FT-M, FT-WD).
- `kv_adaptor.KeyValueAdaptor`: iReVa's key-value neuron bank on an MLP.
- `hook_layer.HookLayer`: COMEBA-HK's z-score–gated hook layer on an MLP output projection.
"""
from editing.tuners.base import EditLayer, edit_layers
from editing.tuners.delta import DeltaLinear
from editing.tuners.hook_layer import HookLayer
from editing.tuners.kv_adaptor import KeyValueAdaptor

__all__ = ["EditLayer", "edit_layers", "DeltaLinear", "HookLayer", "KeyValueAdaptor"]
