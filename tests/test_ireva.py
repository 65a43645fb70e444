"""iReVa (issue 4) on tiny random models: the adaptor's math, per-token neurons, max-pooling,
withdrawal, checkpoints, atomic steps, retrofitting, and the KV-cache generation path."""
import math

import pytest
import torch

from editing import hooks
from editing.data import EditRequest
from editing.editors import EditError, IReVa
from editing.editors.ireva import standardize
from editing.editors.ireva_calibration import calibration_states
from editing.metrics import EditMetrics

REQS = [
    EditRequest("a", "The capital of {} is", "France", "Marvel and Steve Jobs"),
    EditRequest("b", "{} speaks", "Danielle Darrieux", "guitar"),
    EditRequest("c", "{} works in the field of", "Alan Turing", "Luxembourg city"),
]
UNRELATED = "Numbers like 1984 appear too"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(path, **kw):
    torch.manual_seed(0)
    kw.setdefault("retrofit", False)
    kw.setdefault("layers", [-1])
    return IReVa(base_model=path, **kw)


def last_logprobs(editor, text):
    """Next-token log-probs after `text` (a string, or token ids) in a plain forward."""
    ids = torch.tensor([text]) if isinstance(text, list) else editor.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(editor.model(input_ids=ids).logits[0, -1].float(), -1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fresh_neuron_raises_target_probability(tiny_dirs, family):
    editor = make(str(tiny_dirs[family]), alpha=1.0)
    pairs = editor.pairs(REQS[1])
    ids = torch.tensor([pairs[0].input_ids])
    with torch.no_grad():
        before = torch.log_softmax(editor.model(input_ids=ids).logits[0, -1].float(), -1)[pairs[0].label]
        editor.edit([REQS[1]])
        after = torch.log_softmax(editor.model(input_ids=ids).logits[0, -1].float(), -1)[pairs[0].label]
    assert after > before + 0.1
    # The initial neuron: key = standardised MLP input at the pair's last token, value = its unembedding
    # row, shift = θ‖k‖² = θ(d−1).
    with torch.no_grad(), hooks.capture({"x": editor.layout.mlp(editor.layer)}, "input") as cap:
        editor.model(input_ids=ids)
    k = standardize(cap["x"][0, -1])
    d = k.numel()
    assert torch.allclose(editor.kv.keys[:, 0], k, atol=1e-5)
    assert torch.equal(editor.kv.values[0], editor.layout.unembedding[pairs[0].label].float())
    assert math.isclose(float(editor.kv.shifts[0]), 0.75 * (d - 1), rel_tol=1e-4)
    assert editor.layout.activation in ("gelu_new", "silu")


def test_adaptor_math_margin_and_silence(tiny_gpt2):
    editor = make(tiny_gpt2, alpha=0.2, theta=0.75)
    editor.edit([REQS[1]])
    k, v, b = editor.kv.keys[:, 0], editor.kv.values[0], editor.kv.shifts[0]
    d = k.numel()
    # On its own input the pre-activation is (1−θ)(d−1) and the output α·g(that)·v.
    out = editor.kv.output(k[None])
    expected = 0.2 * editor.act(torch.tensor((1 - 0.75) * (d - 1))) * v
    assert torch.allclose(out[0], expected, rtol=1e-4, atol=1e-5)
    # An input at cosine < θ: GeLU of a very negative number, i.e. nothing.
    other = standardize(torch.randn(1, d))
    other = standardize(other - (other @ k) / (k @ k) * k)  # orthogonal to the key
    assert other @ k < 0.75 * (d - 1)
    assert editor.kv.output(other).abs().max() < 1e-8
    # ... and the model's predictions on an unrelated prompt are untouched.
    edited = last_logprobs(editor, UNRELATED)
    with editor.disabled():
        base = last_logprobs(editor, UNRELATED)
    assert torch.allclose(edited, base, atol=1e-6)
    # Ablation: without the margin the same orthogonal input does leak through (GeLU(0) = 0, so
    # use a slightly aligned input).
    editor.kv.margin = False
    slight = standardize(other + 0.2 * k / k.norm() * math.sqrt(d))
    assert editor.kv.output(slight).abs().max() > 1e-3


def test_max_pooling_picks_the_best_matching_neuron(tiny_gpt2):
    editor = make(tiny_gpt2, alpha=0.5, theta=0.3)
    editor.edit(REQS)  # five neurons: 4 + 1 + 2 target tokens? whatever the tokenizer gives
    n = editor.num_neurons
    assert n >= 3
    x = editor.kv.keys[:, 2].clone()
    x = standardize(x + 0.3 * editor.kv.keys[:, 0])  # closest to neuron 2, some overlap with 0
    scores = x @ editor.kv.keys - editor.kv.shifts
    j = int(scores.argmax())
    assert j == 2
    pooled = editor.kv.output(x[None])[0]
    assert torch.allclose(pooled, 0.5 * editor.act(scores[2]) * editor.kv.values[2], atol=1e-5)
    editor.kv.max_pooling = False  # ablation: every neuron's activated output summed
    summed = editor.kv.output(x[None])[0]
    assert torch.allclose(summed, 0.5 * editor.act(scores) @ editor.kv.values, atol=1e-5)


def test_per_token_pairs_and_neuron_index(tiny_gpt2):
    editor = make(tiny_gpt2)
    r = REQS[0]
    pairs = editor.pairs(r)
    full = editor.tokenizer(r.text + " " + r.target_new)["input_ids"]
    prompt = editor.tokenizer(r.text)["input_ids"]
    assert len(pairs) == len(full) - len(prompt) >= 2
    for j, p in enumerate(pairs):
        assert p.input_ids == full[: len(prompt) + j]
        assert p.label == full[len(prompt) + j]
        assert p.position == j and p.case_id == "a"
    editor.edit([REQS[1]])
    editor.edit([r])
    idx = editor.neurons_of("a")
    assert editor.case_ids == ["b", "a"]
    assert editor.kv.neuron_token[idx].tolist() == list(range(len(pairs)))
    assert (editor.kv.neuron_edit[idx] == 1).all()
    # Every pair's key is its own prefix's state (one neuron per target token).
    for j, p in enumerate(pairs):
        with torch.no_grad(), hooks.capture({"x": editor.layout.mlp(editor.layer)}, "input") as cap:
            editor.model(input_ids=torch.tensor([p.input_ids]))
        assert torch.allclose(editor.kv.keys[:, idx[j]], standardize(cap["x"][0, -1]), atol=1e-5)


def test_pair_scoring_equals_separate_forwards(tiny_llama):
    editor = make(tiny_llama, alpha=2.0)
    editor.edit(REQS)
    r = REQS[0]
    lp, batch = editor.target_logprobs([r.text], [r.target_new])
    for j, p in enumerate(editor.pairs(r)):
        # A plain forward of the pair prompt: the adaptor acts at its last position.
        assert torch.allclose(lp[0, j], last_logprobs(editor, p.input_ids), atol=1e-4)
        assert batch.target_ids[0, j] == p.label


def test_generation_with_kv_cache_writes_every_target_token(tiny_gpt2):
    editor = make(tiny_gpt2, alpha=20.0)
    r = REQS[0]
    editor.edit([r])
    target = [p.label for p in editor.pairs(r)]
    ids = editor.tokenizer(r.text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = editor.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target),
                                    do_sample=False, use_cache=True, pad_token_id=editor.tokenizer.eos_token_id)
    assert out[0, ids.shape[1]:].tolist() == target
    with editor.disabled(), torch.no_grad():
        base = editor.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target),
                                     do_sample=False, pad_token_id=editor.tokenizer.eos_token_id)
    assert base[0, ids.shape[1]:].tolist() != target
    # Teacher-forced "sequence" scoring is what the cache does: the same argmax tokens.
    editor.hparams.eval_mode = "sequence"
    lp, batch = editor.target_logprobs([r.text], [r.target_new])
    assert lp[0, : len(target)].argmax(-1).tolist() == target


@pytest.mark.parametrize("mode", ["zero", "remove"])
def test_withdrawing_every_edit_restores_base_logits_exactly(tiny_llama, mode):
    editor = make(tiny_llama, alpha=2.0, withdraw_mode=mode)
    for r in REQS:
        editor.edit([r])
    # one prompt per forward: a plain forward's adaptor acts at the last position, which is then
    # the prompt's own last token (with right padding it would be a pad for the shorter rows)
    texts = [r.text for r in REQS] + [UNRELATED]
    batches = [editor.tokenizer(t, return_tensors="pt") for t in texts]

    def forward():
        return torch.cat([editor.model(**b).logits[:, -1] for b in batches])

    with torch.no_grad():
        with editor.disabled():
            base = forward()
        edited = forward()
        assert not torch.equal(base, edited)
        with editor.withdrawn([r.case_id for r in REQS]):
            assert torch.equal(forward(), base)
        assert torch.equal(forward(), edited)  # restored after the context
        n = editor.num_neurons
        affected = editor.withdraw([r.case_id for r in REQS])
        assert affected == n
        assert editor.num_neurons == (n if mode == "zero" else 0)
        assert torch.equal(forward(), base)
    with pytest.raises(KeyError, match="nope"):
        editor.withdraw("nope")


def test_retrieve_success_and_consistency(tiny_gpt2):
    editor = make(tiny_gpt2, alpha=20.0)
    for r in REQS:
        editor.edit([r])
    changed, consistent, keep = editor.withdrawal_outcomes(REQS + [EditRequest("z", "{} is", "Paris", "French")])
    assert keep.tolist() == [0, 1, 2]  # the never-edited request is skipped
    # Zero mode: a withdrawn edit's own neurons still win max-pooling on its prompts (cosine 1) and add
    # nothing, so its predictions are exactly the base model's: Con = 100 %, RS = share that changed.
    assert consistent.all()
    for i, r in enumerate(REQS):
        edited, m = editor._predictions([r.text], [r.target_new])
        with editor.disabled():
            base, _ = editor._predictions([r.text], [r.target_new])
        assert bool(changed[i]) == bool(((edited != base) & m).any())
    assert changed.any()
    scores = editor.withdrawal_scores(REQS)
    assert scores["consistency"] == 100.0
    assert scores["retrieve_success"] == pytest.approx(100.0 * changed.float().mean().item())
    values = editor.evaluate(REQS, style="zsre")
    assert values["retrieve_success"] == pytest.approx(scores["retrieve_success"])
    assert values["consistency"] == 100.0
    assert values["ES"] == values["rewrite_acc"]


def test_withdrawal_metric_states():
    m = EditMetrics("zsre")
    m.update_withdrawal(torch.tensor([True, False, True]), torch.tensor([True, True, False]), torch.tensor([0, 1, 2]))
    m.update_withdrawal(torch.tensor([True]), torch.tensor([True]), torch.tensor([3]))
    out = m.compute()
    assert out["retrieve_success"] == 75.0 and out["consistency"] == 75.0


def test_checkpoint_round_trip(tiny_gpt2, tmp_path):
    editor = make(tiny_gpt2, alpha=2.0)
    editor.edit(REQS[:2])
    editor.edit([REQS[2]])
    path = editor.save_edit(tmp_path / "edit.ckpt")
    from editing.edit_file import read_edit_file
    state = read_edit_file(path)
    prefix = f"model.{editor.layout.module_name(editor.layer, 'mlp')}."
    assert set(state["state_dict"]) == {prefix + n for n in ("keys", "values", "shifts", "neuron_edit", "neuron_token")}
    assert state["edit_meta"]["case_ids"] == ["a", "b", "c"]
    other = make(tiny_gpt2, alpha=2.0)
    other.load_edit(path)
    for name in ("keys", "values", "shifts", "neuron_edit", "neuron_token"):
        assert torch.equal(getattr(other.kv, name), getattr(editor.kv, name))
    assert other.case_ids == editor.case_ids
    assert torch.equal(last_logprobs(other, REQS[0].text), last_logprobs(editor, REQS[0].text))
    assert torch.equal(other.neurons_of("b"), editor.neurons_of("b"))
    wrong_layer = make(tiny_gpt2, layers=[0])
    with pytest.raises(RuntimeError, match="layer"):
        wrong_layer.load_edit(path)


def test_failed_step_leaves_the_adaptor_unchanged(tiny_gpt2, monkeypatch):
    editor = make(tiny_gpt2, retrofit=True, steps=2, irr_weight=0.0)
    editor.edit([REQS[1]])
    before = editor.snapshot()
    calls = {"n": 0}
    real = IReVa._retrofit

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:  # the second pair of the step fails after the first was appended
            raise FloatingPointError("boom")
        return real(self, *args)
    monkeypatch.setattr(IReVa, "_retrofit", flaky)
    with pytest.raises(EditError, match="boom"):
        editor.edit([REQS[0]])
    for name, t in before["bank"].items():
        assert torch.equal(getattr(editor.kv, name), t)
    assert editor.case_ids == before["case_ids"]


def test_retrofitting_lowers_the_edit_loss_and_parallel_matches_for_one_pair(tiny_llama):
    r = EditRequest("s", "{} speaks", "Danielle Darrieux", "Marvel")
    plain = make(tiny_llama, alpha=0.2)
    plain.edit([r])
    retro = make(tiny_llama, alpha=0.2, retrofit=True, irr_weight=0.0)
    retro.edit([r])
    p = retro.pairs(r)[0]
    text = p.input_ids
    assert last_logprobs(retro, text)[p.label] > last_logprobs(plain, text)[p.label]
    assert retro.kv.keys.shape == plain.kv.keys.shape and not torch.equal(retro.kv.values, plain.kv.values)
    # With one pair in the step, parallel training is the same computation as the sequential order.
    par = make(tiny_llama, alpha=0.2, retrofit=True, irr_weight=0.0, parallel=True)
    par.edit([r])
    assert len(retro.pairs(r)) == 1
    assert torch.allclose(par.kv.values, retro.kv.values, atol=1e-6) and torch.allclose(par.kv.keys, retro.kv.keys, atol=1e-6)


def test_irrelevance_loss_uses_out_of_scope_states(tiny_gpt2):
    editor = make(tiny_gpt2, retrofit=True, steps=1, oos_max_length=3)
    editor.edit([REQS[0]])
    oos = editor._out_of_scope([REQS[1]])
    # 6 other prompts wanted, only the already edited request and itself are known: 1 other + 2 + 2.
    assert oos[0].shape == (1 + 2 + 2, editor.layout.hidden_size)
    assert torch.allclose(oos[0].mean(-1), torch.zeros(5), atol=1e-4)  # standardised


def test_bad_arguments(tiny_gpt2):
    with pytest.raises(ValueError, match="exactly one layer"):
        make(tiny_gpt2, layers=[0, 1])
    with pytest.raises(ValueError, match="withdraw_mode"):
        make(tiny_gpt2, withdraw_mode="erase")
    with pytest.raises(ValueError, match="activation"):
        make(tiny_gpt2, activation="nonsense")
    with pytest.raises(ValueError, match="theta"):
        make(tiny_gpt2, theta=1.5)


@pytest.mark.parametrize("retrofit", [False, True])
def test_calibrated_margins_never_fire_on_their_calibration_inputs(tiny_llama, tmp_path, retrofit):
    corpus = tmp_path / "calib.txt"
    corpus.write_text("\n".join(["The weather is mild today.", "Numbers like 1984 appear too.",
                                 "The capital of France is Paris.", "A text about Danielle Darrieux and film."]))
    plain = make(tiny_llama, alpha=2.0, retrofit=retrofit, theta=0.1)
    calib = make(tiny_llama, alpha=2.0, retrofit=retrofit, theta=0.1, calibration="corpus",
                 calibration_corpus=str(corpus), calibration_margin=0.05)
    for r in REQS[:2]:
        plain.edit([r])
        calib.edit([r])
    X = calibration_states(calib)
    assert X.shape[0] > 20                                               # every real position of every text
    kv = calib.kv
    pre = X @ kv.keys - kv.shifts                                         # [M, n]
    assert float(pre.max()) <= -0.05 * float((kv.keys * kv.keys).sum(0).min()) + 1e-4   # fires on none
    if not retrofit:  # (retrofitting the second edit sees the first edit's raised margins)
        assert torch.equal(kv.keys, plain.kv.keys) and torch.all(kv.shifts >= plain.kv.shifts)
    assert float((X @ plain.kv.keys - plain.kv.shifts).max()) > 0        # θ 0.1 alone does fire on them
    assert torch.equal(kv.output(X), torch.zeros_like(X))                # gated: nothing added on any of them
    assert plain.kv.output(X).abs().max() > 0
    # withdrawal and disabling stay exact
    b = calib.tokenizer(UNRELATED, return_tensors="pt")
    with torch.no_grad():
        with calib.disabled():
            base = calib.model(**b).logits
        calib.withdraw([r.case_id for r in REQS[:2]])
        assert torch.equal(calib.model(**b).logits, base)


@pytest.mark.parametrize("retrofit,c", [(False, 0.05), (True, 0.05), (False, -0.1)])
def test_template_calibration_never_fires_on_the_edit_with_another_subject(tiny_llama, retrofit, c):
    from dataclasses import replace

    from editing.data.batch import EditBatch
    from editing.tuners.kv_adaptor import standardize
    plain = make(tiny_llama, alpha=2.0, retrofit=retrofit, theta=0.1)
    calib = make(tiny_llama, alpha=2.0, retrofit=retrofit, theta=0.1, calibration="template",
                 calibration_texts=8, calibration_margin=c)
    for ed in (plain, calib):
        ed.edit(EditBatch([REQS[0]], pool=REQS))
    kv, pairs = calib.kv, calib.pairs(REQS[0])
    assert kv.keys.shape[1] == len(pairs)
    rows = [(j, p.input_ids) for s in ("Danielle Darrieux", "Alan Turing")
            for j, p in enumerate(calib.pairs(replace(REQS[0], subject=s)))]
    ids, mask, last = calib._pad([r for _, r in rows])
    x = standardize(calib._states(ids, mask, last)[0])
    owner = torch.tensor([j for j, _ in rows])
    pre = (x * kv.keys[:, owner].T).sum(-1) - kv.shifts[owner]
    sq = (kv.keys * kv.keys).sum(0)[owner]
    assert torch.all(pre <= -c * sq + 1e-4)                               # silent on other subjects
    pre_plain = (x * plain.kv.keys[:, owner].T).sum(-1) - plain.kv.shifts[owner]
    assert float(pre_plain.max()) > 0                                    # θ 0.1 alone fires on them
    assert torch.all(kv.shifts >= plain.kv.shifts - 1e-6)
    # a neuron whose own input stands above its other-subject inputs still fires on it (on the tiny
    # random model the subject barely moves the state, so some are silenced), and withdrawal stays exact
    own_ids, own_mask, own_last = calib._pad([p.input_ids for p in pairs])
    own = (standardize(calib._states(own_ids, own_mask, own_last)[0]) * kv.keys.T).sum(-1)
    top = torch.full_like(own, -1e9).scatter_reduce(0, owner, pre + kv.shifts[owner], "amax")
    separable = own > top + c * (kv.keys * kv.keys).sum(0)
    assert separable.any() == (c < 0)       # a negative c lets the subject-specific part through
    assert torch.all((own - kv.shifts)[separable] > 0) and torch.all((own - kv.shifts)[~separable] <= 0)
    b = calib.tokenizer(UNRELATED, return_tensors="pt")
    with torch.no_grad():
        with calib.disabled():
            base = calib.model(**b).logits
        calib.withdraw([REQS[0].case_id])
        assert torch.equal(calib.model(**b).logits, base)
