"""What every reported number means: one home for the metric definitions, read by the metrics
(`editing.metrics`), results.json, the console table and `editing.report` (which imports no torch).

The papers use the same words for different things (docs/specification.md §7), so every number is
reported under its own name (`DEFINITIONS`), and the headline ``reliability`` / ``generality`` /
``locality`` name the underlying metric they take for the benchmark's style (`HEADLINES`). `SHORT`
holds the one-line readings the console table prints beside the headline numbers, per style.
"""
from __future__ import annotations

HEADLINE_KEYS: tuple[str, ...] = ("reliability", "generality", "locality")
WITHDRAWAL_KEYS: tuple[str, ...] = ("retrieve_success", "consistency")

DEFINITIONS: dict[str, str] = {
    "rewrite_acc": "teacher-forced token accuracy of target_new on the edit prompt (zsRE ES of MEMIT/JEEP/iReVa/AdaPLE; EasyEdit/COMEBA-HK reliability)",
    "paraphrase_acc": "teacher-forced token accuracy of target_new on paraphrases (zsRE PS of MEMIT/JEEP/iReVa/AdaPLE; EasyEdit/COMEBA-HK generality)",
    "neighborhood_acc": "teacher-forced token accuracy of target_true on neighbourhood prompts (ground-truth accuracy)",
    "locality_acc": "teacher-forced token accuracy of the locality answer (zsRE NS of MEMIT/JEEP/iReVa/AdaPLE, NQ ground truth)",
    "rewrite_win": "share of edit prompts where target_new's mean token log-prob beats target_true's (COUNTERFACT efficacy score, ROME/MEMIT/JEEP/AdaPLE)",
    "paraphrase_win": "share of paraphrases where target_new's mean token log-prob beats target_true's (COUNTERFACT paraphrase/generalisation score)",
    "neighborhood_win": "share of neighbourhood prompts where target_true's mean token log-prob beats target_new's (COUNTERFACT neighbourhood score)",
    "neighborhood_unchanged": "share of teacher-forced argmax tokens on neighbourhood prompts unchanged against the unedited model (EasyEdit/COMEBA-HK style)",
    "locality_unchanged": "share of teacher-forced argmax tokens on the locality prompt unchanged against the unedited model (EasyEdit/COMEBA-HK locality)",
    "fluency": "ROME generation entropy: per text the mean of 2/3·H2 and 4/3·H3 (n-gram entropies in bits), mean over texts; not a percentage",
    "retrieve_success": "share of edits whose teacher-forced per-token predictions on the edit prompt change when that edit alone is withdrawn (iReVa RS)",
    "consistency": "share of edits whose teacher-forced per-token predictions on the edit prompt, with that edit alone withdrawn, equal the unedited model's (iReVa Con)",
    "reliability": "headline reliability: rewrite_win (counterfact) or rewrite_acc (zsre)",
    "generality": "headline generality: paraphrase_win (counterfact) or paraphrase_acc (zsre)",
    "locality": "headline locality: neighborhood_win (counterfact) or locality_unchanged, else neighborhood_unchanged (zsre)",
    "score": "harmonic mean of reliability, generality and locality (JEEP, AdaPLE, iReVa published version); 0 if any is 0",
    "score_mean": "arithmetic mean of reliability, generality and locality (iReVa draft and code, COMEBA-HK)",
}

# Headline key -> underlying metric, per benchmark style.
HEADLINES: dict[str, dict[str, str]] = {
    "counterfact": {"reliability": "rewrite_win", "generality": "paraphrase_win", "locality": "neighborhood_win"},
    "zsre": {"reliability": "rewrite_acc", "generality": "paraphrase_acc", "locality": "locality_unchanged"},
}
# Used, in order, when the headline's own metric has no data.
HEADLINE_FALLBACKS: dict[str, dict[str, tuple[str, ...]]] = {
    "counterfact": {},
    "zsre": {"locality": ("neighborhood_unchanged",)},
}


def headline_definitions(style: str) -> dict[str, str]:
    """Which underlying metric each headline key uses for a benchmark style (key -> metric key)."""
    if style not in HEADLINES:
        raise ValueError(f"unknown evaluation style {style!r}; expected one of {sorted(HEADLINES)}")
    return dict(HEADLINES[style])

# What the compact console table prints beside each headline number, per benchmark style (one line,
# short enough for an 100-column terminal; DEFINITIONS has the full one).
SHORT: dict[str, dict[str, str]] = {
    "counterfact": {
        "reliability": "edit prompts where the new target is more likely than the true one",
        "generality": "paraphrases of the edit prompt where the new target is more likely",
        "locality": "other subjects' prompts where the true answer stays more likely",
        "score": "harmonic mean of reliability, generality and locality",
    },
    "zsre": {
        "reliability": "tokens of the new target predicted on the edit prompt (teacher-forced)",
        "generality": "tokens of the new target predicted on paraphrases (teacher-forced)",
        "locality": "predicted tokens of unrelated prompts left unchanged by the edit",
        "score": "harmonic mean of reliability, generality and locality",
    },
}
SUMMARY_KEYS: tuple[str, ...] = ("reliability", "generality", "locality", "score")
