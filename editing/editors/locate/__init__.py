"""The locate-then-edit core, shared by ROME, MEMIT, PMET, JEEP, COMEBA-HK and AdaPLE
(docs/specification.md §2; names follow the MEMIT code and paper). One concept per module:

- `templates`: context templates (§2.1) and filling requests into them;
- `keys`: k, the MLP key at the subject's last token averaged over templates (§2.2), and the current
  value of a hidden state;
- `targets`: z, the value a hidden state should take so that every context-prefixed prompt predicts
  target_new (§2.3), one delta per request optimised in one batched, truncated forward;
- `statistics`: access to C = E[kkᵀ] (computed and cached by `editing.stats`);
- `spread`: the closed form Δ = R Kᵀ (λC + KKᵀ)⁻¹ (§2.5) and `spread_update`, the one layer loop;
- `fusion`: how a Δ enters the weights (add, drop-and-rescale, top-k);
- `history`: `EditHistory`, every step's Δ as low-rank factors;
- `editor`: `LocateEditor`, which wires these to a model and keeps its weights exact.
The math modules take a `Layout`, a tokenizer and tensors, never an Editor.
"""
from editing.editors.locate.editor import LocateEditor
from editing.editors.locate.fusion import FUSIONS, drop_mask, fuse, fusion_spec
from editing.editors.locate.history import EditHistory
from editing.editors.locate.keys import POSITIONS, compute_keys, current_values
from editing.editors.locate.spread import closed_form, divisor, spread_update
from editing.editors.locate.statistics import KeyStatistics
from editing.editors.locate.targets import DeltaSite, TargetConfig, Targets, compute_targets
from editing.editors.locate.templates import context_templates, fill, flatten, generate_templates

__all__ = ["LocateEditor", "FUSIONS", "drop_mask", "fuse", "fusion_spec", "EditHistory", "POSITIONS",
           "compute_keys", "current_values", "closed_form", "divisor", "spread_update", "KeyStatistics",
           "DeltaSite", "TargetConfig", "Targets", "compute_targets", "context_templates", "fill", "flatten",
           "generate_templates"]
