"""Export an edited model as a plain Hugging Face model directory (loadable without this toolkit).

Editors that write weights (ROME, MEMIT, PMET, JEEP, AdaPLE, COMEBA-HK without hooks) are exported as
they are; edit modules that are linear (FT's `DeltaLinear`) are merged into the base weights for the
save and taken out again afterwards (the editor is left exactly as it was). Edits that cannot be
merged (iReVa's key-value adaptor, COMEBA-HK's z-score-gated hook layers) are refused with the
reason: use `save_edit` / `load_edit` with this toolkit instead. A model card (README.md) lists the
method, the base model and the edited facts.
"""
from __future__ import annotations

from pathlib import Path


class ExportError(ValueError):
    """The edit cannot be written into a plain model."""


def model_card(editor, requests: dict | None = None) -> str:
    lines = [f"# {editor.hparams.base_model} edited with {editor.method}", "",
             f"- base model: `{editor.hparams.base_model}` (digest {editor.base_identity['digest']})",
             f"- method: `{editor.method}` ({type(editor).__name__})",
             f"- edit steps: {len(editor.edit_log)}; edited cases: "
             f"{sum(len(e['cases']) for e in editor.edit_log)}", "",
             "Exported by the `editing` toolkit; load with `transformers.AutoModelForCausalLM.from_pretrained`.", ""]
    if requests:
        lines += ["| case | prompt | target |", "|---|---|---|"]
        lines += [f"| {r.case_id} | {r.text} | {r.target_new} |" for r in requests.values()]
    return "\n".join(lines) + "\n"


def export_model(editor, out: str | Path, requests: list | None = None) -> Path:
    """Write the edited model and its tokenizer to `out` (see the module docstring)."""
    layers = editor.edit_layers()
    fixed = [n for n, m in layers.items() if not m.mergeable]
    if fixed:
        kind = type(layers[fixed[0]]).__name__
        raise ExportError(f"{editor.method}: the edit lives in a {kind} ({fixed[0]}), which is not linear and cannot "
                          "be merged into the weights of a plain model; share it with save_edit/load_edit instead")
    out = Path(out)
    merged = []
    try:
        for name, m in layers.items():
            m.merge()
            merged.append((name, m))
            editor.layout.swap(name, m.base_layer)
        editor.model.save_pretrained(out)
        editor.tokenizer.save_pretrained(out)
    finally:
        for name, m in merged:
            editor.layout.swap(name, m)
            m.unmerge()
    edited = {r.case_id: r for r in (requests or [])}
    (out / "README.md").write_text(model_card(editor, edited), encoding="utf-8")
    return out
