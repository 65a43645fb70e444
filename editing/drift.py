"""General-ability drift: perplexity of the edited model on held-out text over the unedited model's
(`ppl_ratio`), the unedited value cached on disk per base model and texts."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from editing.io import write_json_atomic


DRIFT_LENGTH = 64   # tokens per drift text


def unedited_perplexity(editor, texts: list[str], max_length: int = DRIFT_LENGTH) -> float:
    """`perplexity` of the unedited model, cached under $EDITING_CACHE/drift/<base digest>/ by the
    texts and length (a fixed model on fixed texts gives a fixed number)."""
    from editing.models import cache_dir

    key = hashlib.sha256(json.dumps([max_length, texts]).encode()).hexdigest()[:16]
    with editor.disabled():   # the base model's identity, whatever the edit writes into the weights
        digest = editor.base_identity["digest"]
    path = cache_dir() / "drift" / digest / f"{key}.json"
    if path.exists():
        try:
            return float(json.loads(path.read_text())["perplexity"])
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable entry is recomputed
    with editor.disabled():
        value = perplexity(editor, texts, max_length, batch_size=max(1, editor.hparams.forward_batch_size // 4))
    write_json_atomic({"perplexity": value, "texts": len(texts), "max_length": max_length}, path)
    return value


def drift_texts(path: str | None = None, n: int = 64) -> list[str]:
    """The texts general-ability drift is measured on: the first `n` of a file (one text per line, or
    a .jsonl/.json of strings or {"text": ...}), default the offline corpus's held-out texts
    (`editing.corpus.held_out`, never used for statistics)."""
    from editing.corpus import held_out, read_texts
    if path is None:
        return held_out(n=n)
    if not Path(path).is_file():
        raise FileNotFoundError(f"drift texts: no file {path}")
    texts = read_texts(Path(path))[:n]
    if not texts:
        raise ValueError(f"drift texts: {path} holds no text")
    return texts


@torch.no_grad()
def perplexity(editor, texts: list[str], max_length: int = 128, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) of the edited model over `texts` (each truncated to `max_length`
    tokens; the LM head through `editor.logits_at`, so the edit acts as when scoring)."""
    tok = editor.tokenizer
    enc = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    side, tok.padding_side = tok.padding_side, "right"
    nll, count = 0.0, 0
    try:
        for s in range(0, len(order), batch_size):
            batch = tok.pad({"input_ids": [enc[i] for i in order[s:s + batch_size]]}, return_tensors="pt").to(editor.device)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            positions = torch.arange(ids.shape[1] - 1, device=ids.device).expand(ids.shape[0], -1)
            logp = F.log_softmax(editor.logits_at(ids, mask, positions).float(), -1)
            m = mask[:, 1:].bool()
            nll -= float(logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[m].sum())
            count += int(m.sum())
    finally:
        tok.padding_side = side
    return float(torch.tensor(nll / max(count, 1)).exp())
