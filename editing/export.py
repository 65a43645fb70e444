"""Export an edited model as a plain Hugging Face model directory (loadable without this toolkit).

What `export` does, per editor (docs/export.md):
- weight-writing editors (ROME, MEMIT, PMET, JEEP, AdaPLE, COMEBA-HK without hooks): their edit is
  already in the weights; the model is saved as it is.
- FT-L / FT-M / FT-WD: the `DeltaLinear` edit modules are merged into the base weights for the save
  and taken out again afterwards (the editor is left exactly as it was).
- LoRA: PEFT's `merge_and_unload` on a copy of the adapted model (`LoRA.merged_copy`), which is saved.
- iReVa (key-value adaptor) and COMEBA-HK with hooks (z-score-gated hook layers): refused with the
  reason, since their edit is not linear and a plain model has no place for it; share those edits
  as edit files (`save_edit` / `save_pretrained`) and apply them with this toolkit.

A model card (README.md) lists the method, the base model, the edited facts and the scores of the
evaluation beside the edit file, when there is one.
"""
from __future__ import annotations

from pathlib import Path


class ExportError(ValueError):
    """The edit cannot be written into a plain model, or the export could not be uploaded."""


def edited_facts(editor) -> list[tuple[str, str, str]]:
    """(case id, prompt, new target) of every edit in the edit log."""
    return [(case, *fact) for step in editor.edit_log for case, fact in zip(step["cases"], step.get("facts", []))]


def model_card(editor, scores: dict | None = None) -> str:
    h = editor.hparams
    lines = ["---", "library_name: transformers", "tags: [knowledge-editing]", "---", "",
             f"# {h.base_model} edited with {editor.method}", "",
             f"- base model: `{h.base_model}` (digest {editor.base_identity['digest']})",
             f"- method: `{editor.method}` ({type(editor).__name__})",
             f"- edit steps: {len(editor.edit_log)}; edited cases: {sum(len(e['cases']) for e in editor.edit_log)}",
             "", "A plain Hugging Face model: load it with `transformers.AutoModelForCausalLM.from_pretrained`"
             " (no import of the editing toolkit that wrote it).", ""]
    facts = edited_facts(editor)
    if facts:
        lines += ["## Edited facts", "", "| case | prompt | target |", "|---|---|---|"]
        lines += [f"| {case} | {prompt} | {target} |" for case, prompt, target in facts] + [""]
    if scores:
        lines += ["## Scores (the evaluation beside the edit file)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in scores.items() if isinstance(v, (int, float))] + [""]
    return "\n".join(lines)


def export_model(editor, out: str | Path, scores: dict | None = None) -> Path:
    """Write the edited model, its tokenizer and a model card to `out` (see the module docstring)."""
    if not editor.edit_log:
        raise ExportError(f"{editor.method}: nothing to export, this editor holds no edit (load one: --ckpt_path, "
                          "load_edit or from_pretrained)")
    layers = editor.edit_layers()
    fixed = [n for n, m in layers.items() if not m.mergeable]
    if fixed:
        kind = type(layers[fixed[0]]).__name__
        raise ExportError(f"{editor.method}: the edit lives in a {kind} ({fixed[0]}), which is not linear and cannot "
                          "be merged into the weights of a plain model; share it as an edit file instead "
                          "(save_edit or save_pretrained; `cli.py test/predict --ckpt_path` use it)")
    out = Path(out)
    if hasattr(editor, "merged_copy"):  # an editor whose library merges (PEFT): save its plain copy
        plain = editor.merged_copy()
        plain.save_pretrained(out)
        editor.tokenizer.save_pretrained(out)
        (out / "README.md").write_text(model_card(editor, scores), encoding="utf-8")
        return out
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
    (out / "README.md").write_text(model_card(editor, scores), encoding="utf-8")
    return out


def push(directory: str | Path, repo: str) -> str:
    """Upload an exported directory to the Hugging Face Hub repository `repo` (created if missing)."""
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push_to_hub {repo}: the Hub is switched off here (HF_HUB_OFFLINE=1); the model is in "
                          f"{directory}: upload it later with `hf upload {repo} {directory}`")
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        return str(api.upload_folder(repo_id=repo, folder_path=str(directory)))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"--push_to_hub {repo}: the upload failed ({type(e).__name__}: {first}); the model is in "
                          f"{directory}: upload it later with `hf upload {repo} {directory}`") from None
