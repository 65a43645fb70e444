"""What every reported number means: one home for the metric definitions, read by the metrics
(`editing.metrics`), results.json, the console table and `editing.report` (which imports no torch).

The papers use the same words for different things (docs/specification.md §7), so every number is
reported under its own name (`DEFINITIONS`), and the headline ``reliability`` / ``generality`` /
``locality`` name the underlying metric they take for the benchmark's style (`HEADLINES`). `SHORT`
holds the one-line readings the console table prints beside the headline numbers, per style.
"""
from __future__ import annotations

HEADLINE_KEYS: tuple[str, ...] = ("reliability", "generality", "locality")
GEN_HEADLINE_KEYS: tuple[str, ...] = ("gen_reliability", "gen_generality", "gen_locality")
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
    "portability_acc": "teacher-forced token accuracy of the answer on multi-hop prompts about the edited fact (EasyEdit portability, MQuAKE-style two-hop questions)",
    "portability_gen": "generation-based: share of multi-hop prompts about the edited fact whose greedy continuation starts with their answer",
    "rewrite_gen": "generation-based: share of edit prompts whose greedy continuation (target tokens + a few, no teacher forcing) starts with target_new, case, punctuation and spacing ignored",
    "paraphrase_gen": "generation-based: share of paraphrases whose greedy continuation starts with target_new (as rewrite_gen)",
    "neighborhood_gen": "generation-based: share of neighbourhood prompts whose greedy continuation is token for token the unedited model's",
    "locality_gen": "generation-based: share of locality prompts whose greedy continuation is token for token the unedited model's",
    "gen_reliability": "generation-based headline reliability: rewrite_gen",
    "gen_generality": "generation-based headline generality: paraphrase_gen",
    "gen_locality": "generation-based headline locality: neighborhood_gen (counterfact) or locality_gen, else neighborhood_gen (zsre)",
    "gen_score": "harmonic mean of gen_reliability, gen_generality and gen_locality",
    "ppl_ratio": "general-ability drift: perplexity of the edited model on held-out texts (never used for statistics) over the unedited model's; 1 = no drift, not a percentage",
    "reliability": "headline reliability: rewrite_win (counterfact) or rewrite_acc (zsre)",
    "generality": "headline generality: paraphrase_win (counterfact) or paraphrase_acc (zsre)",
    "locality": "headline locality: neighborhood_win (counterfact) or locality_unchanged, else neighborhood_unchanged (zsre)",
    "score": "harmonic mean of reliability, generality and locality (JEEP, AdaPLE, iReVa published version); 0 if any is 0",
    "score_mean": "arithmetic mean of reliability, generality and locality (iReVa draft and code, COMEBA-HK)",
}

# Headline key -> underlying metric, per benchmark style.
HEADLINES: dict[str, dict[str, str]] = {
    "counterfact": {"reliability": "rewrite_win", "generality": "paraphrase_win", "locality": "neighborhood_win",
                    "gen_reliability": "rewrite_gen", "gen_generality": "paraphrase_gen",
                    "gen_locality": "neighborhood_gen"},
    "zsre": {"reliability": "rewrite_acc", "generality": "paraphrase_acc", "locality": "locality_unchanged",
             "gen_reliability": "rewrite_gen", "gen_generality": "paraphrase_gen", "gen_locality": "locality_gen"},
}
# Used, in order, when the headline's own metric has no data.
HEADLINE_FALLBACKS: dict[str, dict[str, tuple[str, ...]]] = {
    "counterfact": {},
    "zsre": {"locality": ("neighborhood_unchanged",), "gen_locality": ("neighborhood_gen",)},
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
        "reliability": "teacher-forced: new target outscores the true one on edit prompts",
        "generality": "teacher-forced: new target outscores the true one on paraphrases",
        "locality": "teacher-forced: other subjects keep the true answer more likely",
        "score": "harmonic mean of reliability, generality and locality",
    },
    "zsre": {
        "reliability": "teacher-forced: new target's tokens predicted on the edit prompt",
        "generality": "teacher-forced: new target's tokens predicted on paraphrases",
        "locality": "teacher-forced: unrelated prompts' predicted tokens unchanged",
        "score": "harmonic mean of reliability, generality and locality",
    },
}
_GENERATED = {
    "gen_reliability": "generated: edit prompts answered with the new target",
    "gen_generality": "generated: paraphrases answered with the new target",
    "gen_locality": "generated: unrelated prompts' greedy answers unchanged",
    "gen_score": "generated: harmonic mean of the three above",
    "ppl_ratio": "perplexity on held-out text over the unedited model's (1 = none)",
}
for _readings in SHORT.values():
    _readings.update(_GENERATED)
SUMMARY_KEYS: tuple[str, ...] = ("reliability", "generality", "locality", "score", "gen_reliability",
                                 "gen_generality", "gen_locality", "gen_score", "ppl_ratio")
