"""Edits as modules injected into the model (PEFT's tuners are the model): each wraps the module
it changes, owns its tensors and its on/off switch, and merges into the base weight where the edit
is linear (PEFT's own LoRA layers, `editing.editors.lora`, are used as PEFT makes them).

- `base.EditLayer`: the wrapper protocol; `edit_layers(model)` finds them.
- `delta.DeltaLinear`: a dense weight delta (FT-L, FT-M, FT-WD).
- `grace.Codebook`: GRACE's retrieval codebook (keys, values, radii) around one module.
- `melo.Router`: MELO's vector database choosing a LoRA block (a PEFT adapter) per input.
- `kv_adaptor.KeyValueAdaptor`: iReVa's key-value neuron bank on an MLP.
- `hook_layer.HookLayer`: COMEBA-HK's z-score–gated hook layer on an MLP output projection.
"""
from editing.tuners.base import EditLayer, edit_layers
from editing.tuners.delta import DeltaLinear
from editing.tuners.grace import Codebook
from editing.tuners.hook_layer import HookLayer
from editing.tuners.kv_adaptor import KeyValueAdaptor
from editing.tuners.melo import Router

__all__ = ["EditLayer", "edit_layers", "DeltaLinear", "Codebook", "HookLayer", "KeyValueAdaptor", "Router"]
