"""COMEBA-HK on tiny models: the consecutive update is recursive least squares (equal to the one-shot
solution on the union of the keys), a step is the direct solve with the accumulated keys, the
validated hook swaps exactly the outlier positions (padding and BOS ignored), α = ∞ is the base model
bit for bit, the dynamic α rule, exact undo / rollback / checkpoint, generation with a KV cache, and
GPT-2 (Conv1D) and Llama layouts."""
import math
import statistics

import pytest
import torch

from editing import hooks
from editing.data.records import EditRequest
from editing.editors import COMEBA, MEMIT, EditError
from editing.editors.locate import EditHistory, Targets, closed_form, compute_keys, current_values, fill
from editing.editors.comeba import max_zscore_bound, select, zscores
from editing.layout import weight_out_in
from editing.tokens import encode

REQS = [
    EditRequest("0", "The capital of {} is", "France", "Tamil", "Paris"),
    EditRequest("1", "{} speaks", "Danielle Darrieux", "Logic Man", "French"),
    EditRequest("2", "{} works in the field of", "Alan Turing", "guitar"),
    EditRequest("3", "{} is located in", "The Eiffel Tower", "Germany"),
]
PROMPTS = ["The capital of France is", "Iron Man is a superhero created by Marvel.", "Apple was",
           "Numbers like 1984, 2001 and 42 appear too."]
FAST = dict(template_spec=[[3, 2]], v_steps=4, mom2_update_weight=1.0, clamp_norm_factor=50.0,
            v_weight_decay=1e-4)


def make(path, layers=(0, 1), **kw):
    """A COMEBA editor with identity-like statistics instead of a corpus pass."""
    ed = COMEBA(base_model=str(path), layers=list(layers), **{**FAST, **kw})
    for l in ed.layers:
        ed._stats[l] = torch.eye(ed.layout.mlp_key_size(l)) * 1e-3
    return ed


def logits(ed, prompts=PROMPTS):
    b = encode(ed.tokenizer, prompts).to(ed.device)
    with torch.no_grad():
        return ed.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits


# --- the math ------------------------------------------------------------------------------------------------
def test_zscores_by_hand():
    m = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, 7.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [3.0] * 6])
    real = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1] * 6]).bool()
    z = zscores(m, real)
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
    torch.testing.assert_close(z[0, :5], torch.tensor([(v - mu) / sd for v in vals]))
    assert torch.isnan(z[0, 5]) and torch.isnan(z[2]).all()        # padding; zero deviation
    # padding never counts: another value at the pad position changes nothing
    m2 = m.clone()
    m2[0, 5] = -1e6
    torch.testing.assert_close(zscores(m2, real), z, equal_nan=True)
    # a lone outlier among n positions reaches exactly √(n−1): 5 positions never pass α = 2.2
    assert z[1, 4].item() == pytest.approx(max_zscore_bound(5)) == pytest.approx(2.0)
    assert not select(z, 2.2).any() and select(z, 1.99)[1, 4] and select(z, 1.99).sum() == 2
    zs = zscores(m, real, ddof=1)
    assert zs[1, 4].item() == pytest.approx(max_zscore_bound(5, ddof=1)) == pytest.approx(4 / math.sqrt(5))
    assert torch.isnan(zscores(torch.tensor([[5.0, 1.0]]), torch.tensor([[True, False]]))).all()  # one position


def test_consecutive_update_equals_one_shot_on_the_union():
    """The exact condition. With W₁(λC + K₁K₁ᵀ) = λW₀C + V₁K₁ᵀ (step 1's normal equations), step 2's
    Δ = (V₂ − W₁K₂)K₂ᵀ(λC + K₁K₁ᵀ + K₂K₂ᵀ)⁻¹ gives
    W₂(λC + K₁K₁ᵀ + K₂K₂ᵀ) = W₁(λC + K₁K₁ᵀ) + V₂K₂ᵀ = λW₀C + V₁K₁ᵀ + V₂K₂ᵀ,
    the normal equations of the one-shot update on [K₁ K₂] → [V₁ V₂]. So the two agree exactly whenever
    both steps use the same λC and the accumulated term is exactly the earlier keys' K₁K₁ᵀ, with the
    keys and values fixed (one layer whose keys do not depend on the edit; R measured on W₁) — for any
    λ, not only λ → 0 (the paper's derivation assumes W₁K₁K₁ᵀ = V₁K₁ᵀ, which holds only then)."""
    g = torch.Generator().manual_seed(0)
    d, dff = 5, 12
    W0 = torch.randn(d, dff, generator=g, dtype=torch.float64)
    K1, K2 = torch.randn(3, dff, generator=g, dtype=torch.float64), torch.randn(4, dff, generator=g, dtype=torch.float64)
    V1, V2 = torch.randn(3, d, generator=g, dtype=torch.float64), torch.randn(4, d, generator=g, dtype=torch.float64)
    A = torch.randn(dff, dff, generator=g, dtype=torch.float64)
    C = A @ A.T / dff + 0.1 * torch.eye(dff, dtype=torch.float64)
    for lam in (0.3, 50.0):
        l1, r1 = closed_form(K1, V1 - K1 @ W0.T, lam * C, 1.0)
        W1 = W0 + l1 @ r1.T
        l2, r2 = closed_form(K2, V2 - K2 @ W1.T, lam * C + K1.T @ K1, 1.0)
        W2 = W1 + l2 @ r2.T
        K, V = torch.cat([K1, K2]), torch.cat([V1, V2])
        lu, ru = closed_form(K, V - K @ W0.T, lam * C, 1.0)
        torch.testing.assert_close(W2, W0 + lu @ ru.T, atol=1e-10, rtol=1e-10)
        # without the accumulated keys (plain MEMIT on the edited weights) step 2 forgets part of step 1
        lm, rm = closed_form(K2, V2 - K2 @ W1.T, lam * C, 1.0)
        assert (W1 + lm @ rm.T - (W0 + lu @ ru.T)).abs().max() > 1e-3


@pytest.mark.parametrize("update", ["consecutive", "memit"])
def test_step_is_the_direct_solve_with_accumulated_keys(tiny_llama, monkeypatch, update):
    ed = make(tiny_llama, layers=[1], update_rule=update, mom2_update_weight=0.5)
    groups = ed.template_groups()
    offsets = torch.randn(2, ed.layout.hidden_size, generator=torch.Generator().manual_seed(1))

    def fixed_targets(requests, templates):  # known targets instead of an optimisation
        z = current_values(ed.layout, ed.tokenizer, requests, "block", 1) + offsets[: len(requests)]
        return Targets(z={"block": z}, init={"block": z}, loss=torch.zeros(len(requests)))
    monkeypatch.setattr(ed, "targets", fixed_targets)
    ed.edit(REQS[:2])
    z2 = current_values(ed.layout, ed.tokenizer, REQS[2:], "block", 1) + offsets       # what step 2's targets will be
    ed.hook(1).mode = "temporary"                                       # step 2 measures R on W_h everywhere
    cur2 = current_values(ed.layout, ed.tokenizer, REQS[2:], "block", 1)
    ed.hook(1).mode = "validated"
    ed.edit(REQS[2:])
    with ed.disabled():  # layer 1's keys do not depend on layer 1's own weights
        K1 = compute_keys(ed.layout, ed.tokenizer, REQS[:2], 1, groups).double()
        K2 = compute_keys(ed.layout, ed.tokenizer, REQS[2:], 1, groups).double()
    R = (z2 - cur2).double()
    M = 0.5 * ed._stats[1].double() + K2.T @ K2 + (K1.T @ K1 if update == "consecutive" else 0)
    expected = torch.linalg.solve(M, (R.T @ K2).T).T                # Rᵀ K₂ M⁻¹ (M symmetric)
    got = EditHistory.dense(ed.history.steps[1][1], expected.shape, "cpu")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ed.accumulated_keys(1), K1.T @ K1 + K2.T @ K2, atol=1e-8, rtol=1e-6)
    # the model's own weights never changed; the hook layer holds W₀ + ΣΔ
    w = weight_out_in(ed.layout.mlp_out(1))
    total = sum(EditHistory.dense(s[1], expected.shape, "cpu") for s in ed.history.steps)
    torch.testing.assert_close(ed.hook_layer(1), w.double() + total)


# --- the hook layers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["gpt2", "llama"])
def edited(request, tiny_dirs):
    ed = make(tiny_dirs[request.param])
    w0 = {l: weight_out_in(ed.layout.mlp_out(l)).detach().clone() for l in ed.layers}
    base = logits(ed)
    ed.edit(REQS[:2])
    ed.edit(REQS[2:])
    return ed, w0, base


def test_alpha_infinite_is_the_base_model_exactly(edited):
    ed, w0, base = edited
    for l in ed.layers:  # the weights stay W₀: the edits live in the hook layers
        assert torch.equal(weight_out_in(ed.layout.mlp_out(l)), w0[l])
    ed._alpha_override = math.inf
    try:
        assert torch.equal(logits(ed), base)
        assert ed.generate(PROMPTS[:2], max_new_tokens=4) == _base_generate(ed, PROMPTS[:2])
    finally:
        ed._alpha_override = None
    assert not torch.equal(logits(ed), base)          # the edit is there at the real α
    with ed.disabled():
        assert torch.equal(logits(ed), base)


def _base_generate(ed, prompts):
    with ed.disabled():
        return ed.generate(prompts, max_new_tokens=4)


def test_validated_hook_swaps_exactly_the_outliers(edited):
    ed, w0, _ = edited
    layer = ed.layers[0]  # the lowest hook layer: its input does not depend on the edit
    module = ed.layout.mlp_out(layer)
    b = encode(ed.tokenizer, PROMPTS).to(ed.device)              # right-padded
    wh = ed.hook_layer(layer).float()

    def run():
        with hooks.capture({"x": module}, "input") as cin, hooks.capture({"y": module}, "output") as cout:
            ed.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return cin["x"], cout["y"]
    with ed.disabled():
        x, P = run()
    real = b.attention_mask.bool()
    first = ed.tokenizer("x")["input_ids"][0] == ed.tokenizer.bos_token_id
    assert ed.exclude_first == first                               # Llama's tokenizer adds a BOS, GPT-2's not
    if first:
        real[:, 0] = False
    O = x @ wh.T + (module.bias if getattr(module, "bias", None) is not None else 0)
    m = (x @ (wh - w0[layer]).T).norm(dim=-1)
    for alpha in (-1e9, 0.5, 1.2):
        ed._alpha_override = alpha
        try:
            _, y = run()
        finally:
            ed._alpha_override = None
        # z-scores by hand over each row's real positions
        swap = torch.zeros_like(real)
        for i in range(len(PROMPTS)):
            idx = real[i].nonzero().squeeze(1).tolist()
            vals = [m[i, j].item() for j in idx]
            mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
            for j, v in zip(idx, vals):
                swap[i, j] = sd > 0 and (v - mu) / sd >= alpha - 1e-5
        if alpha == -1e9:
            assert torch.equal(swap, real)                        # every real position, never pad or BOS
        assert 0 < swap.sum() < real.sum() or alpha == -1e9
        assert torch.equal(y[~swap], P[~swap])                    # P elsewhere, bit for bit
        torch.testing.assert_close(y[swap], O[swap], atol=1e-5, rtol=1e-5)
    # a prompt alone and inside a padded batch gets the same outputs at its real positions
    alone = encode(ed.tokenizer, PROMPTS[2:3]).to(ed.device)
    with hooks.capture({"y": module}, "output") as c:
        ed.model(input_ids=alone.input_ids, attention_mask=alone.attention_mask, use_cache=False)
    _, y = run()
    n = int(alone.attention_mask.sum())
    torch.testing.assert_close(c["y"][0, :n], y[2, :n], atol=1e-5, rtol=1e-5)


def test_temporary_hook_is_the_hook_weight_everywhere(edited):
    ed, w0, _ = edited
    ed.hooks_mode("temporary")
    try:
        hooked = logits(ed)
    finally:
        ed.hooks_mode("validated")
    with ed.disabled(), torch.no_grad():
        for l in ed.layers:
            weight_out_in(ed.layout.mlp_out(l)).copy_(ed.hook_layer(l).float())
        try:
            written = logits(ed)
        finally:
            for l in ed.layers:
                weight_out_in(ed.layout.mlp_out(l)).copy_(w0[l])
    torch.testing.assert_close(hooked, written, atol=1e-4, rtol=1e-4)


def test_generation_with_kv_cache(edited):
    """Left-padded cached generation: the prompt is scored in the prefill (the same decisions as a
    full forward), decode steps keep P; a prompt decodes the same alone and in a padded batch."""
    ed, _, _ = edited
    batch = ed.generate(PROMPTS[:3], max_new_tokens=4)
    assert batch == [ed.generate(p, max_new_tokens=4) for p in PROMPTS[:3]]
    b = encode(ed.tokenizer, PROMPTS[:1]).to(ed.device)
    first = ed.tokenizer.decode([int(logits(ed, PROMPTS[:1])[0, int(b.prompt_last[0])].argmax())])
    assert batch[0].startswith(first) and ed.generate(PROMPTS[0], max_new_tokens=1, use_cache=False) == first


# --- α ---------------------------------------------------------------------------------------------------------
def _max_z_by_hand(ed, texts, alpha):
    """min over prompts of max over real positions of the z-score, per layer, computed from captured
    keys with the hooks at threshold `alpha`."""
    b = encode(ed.tokenizer, texts).to(ed.device)
    ed._alpha_override = alpha
    try:
        with hooks.capture({l: ed.layout.mlp_out(l) for l in ed.layers}, "input") as cap, torch.no_grad():
            ed.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    finally:
        ed._alpha_override = None
    out = []
    for l in ed.layers:
        d = (ed.hook_layer(l) - weight_out_in(ed.layout.mlp_out(l)).double()).float()
        m = (cap[l] @ d.T).norm(dim=-1)
        best = []
        for i in range(len(texts)):
            idx = b.attention_mask[i].nonzero().squeeze(1).tolist()[int(ed.exclude_first):]
            vals = [m[i, j].item() for j in idx]
            mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
            best.append(max((v - mu) / sd for v in vals))
        out.append(min(best))
    return out


def test_dynamic_alpha_rule(tiny_llama):
    ed = make(tiny_llama, alpha_z=10.0)
    ed.edit(REQS[:2])
    assert ed.alphas.steps == [[10.0, 10.0]]                      # α₁ = α_z, whatever the candidate
    ed.edit(REQS[2:])
    expected = _max_z_by_hand(ed, [fill("{}", r)[0] for r in REQS[2:]], 10.0)
    assert all(e < 10 for e in expected)
    assert ed.alphas.steps[1] == pytest.approx(expected, abs=1e-4)   # α₂ = min(α_c, α₁) = α_c
    a2 = ed.alphas.steps[1]
    ed.edit(REQS[:1])
    assert all(a3 <= b for a3, b in zip(ed.alphas.steps[2], a2))  # never grows

    fixed = make(tiny_llama, alpha_z=3.0, alpha_mode="fixed", v_steps=1)
    fixed.edit(REQS[:2])
    fixed.edit(REQS[2:])
    assert fixed.alphas.steps == [[3.0, 3.0], [3.0, 3.0]]
    glob = make(tiny_llama, alpha_z=10.0, alpha_scope="global", v_steps=1)
    glob.edit(REQS[:2])
    glob.edit(REQS[2:])
    by_layer = _max_z_by_hand(glob, [fill("{}", r)[0] for r in REQS[2:]], 10.0)
    assert glob.alphas.steps[1] == [pytest.approx(min(by_layer), abs=1e-4)] * 2
    # "skip": no edit prompt can reach α_z = 10 (that needs ≥ 102 positions), so α stays
    skip = make(tiny_llama, alpha_z=10.0, short_prompts="skip", v_steps=1)
    skip.edit(REQS[:2])
    info = skip.edit(REQS[2:])
    assert skip.alphas.steps[1] == [10.0, 10.0] and info["short_prompts"] == 2


# --- state: undo, rollback, checkpoints, ablations, errors ----------------------------------------------------
def _state(ed):
    deltas = {l: ed.hook(l).delta for l in ed.layers}
    return ({l: d.clone() for l, d in deltas.items() if d is not None}, {l: ed.accumulated_keys(l) for l in ed.layers},
            [list(a) for a in ed.alphas.steps])


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][l], b[0][l]) for l in a[0])
    assert all(torch.equal(a[1][l], b[1][l]) for l in a[1])
    assert a[2] == b[2]


def test_undo_failed_step_and_checkpoint_are_exact(tiny_dirs, tmp_path, fail_closed_form):
    ed = make(tiny_dirs["gpt2"], alpha_z=10.0)
    ed.edit(REQS[:2])
    s1, out1 = _state(ed), logits(ed)
    ed.edit(REQS[2:])
    s2, out2 = _state(ed), logits(ed)
    assert s2[2][1] != s1[2][0]
    path = ed.save_edit(tmp_path / "comeba.ckpt")
    ed.undo()
    _same(_state(ed), s1)
    assert torch.equal(logits(ed), out1)
    # a step that fails after its first layer leaves everything as it was
    fail_closed_form(2)
    with pytest.raises(EditError, match="restored"):
        ed.edit(REQS[2:])
    _same(_state(ed), s1)
    assert {ed.hook(l).mode for l in ed.layers} == {"validated"} and torch.equal(logits(ed), out1)
    # checkpoint round trip onto a fresh editor
    fresh = make(tiny_dirs["gpt2"], alpha_z=10.0)
    fresh.load_edit(path)
    _same(_state(fresh), s2)
    assert torch.equal(logits(fresh), out2)
    with pytest.raises(RuntimeError, match="COMEBA"):  # a MEMIT edit is not a COMEBA-HK edit
        memit = MEMIT(base_model=str(tiny_dirs["gpt2"]), layers=[0, 1], **FAST)
        memit._stats = fresh._stats
        memit.edit(REQS[:1])
        fresh.load_edit(memit.save_edit(tmp_path / "memit.ckpt"))


def test_without_hooks_the_update_is_written_into_the_weights(tiny_gpt2):
    ed = make(tiny_gpt2, hook=False)
    w0 = {l: weight_out_in(ed.layout.mlp_out(l)).detach().clone() for l in ed.layers}
    ed.edit(REQS[:2])
    ed.edit(REQS[2:])
    assert ed.alphas.steps == [] and not ed.edit_layers()
    for l in ed.layers:
        torch.testing.assert_close(weight_out_in(ed.layout.mlp_out(l)).double(), ed.hook_layer(l))
        assert not torch.equal(weight_out_in(ed.layout.mlp_out(l)), w0[l])
    with ed.disabled():
        for l in ed.layers:
            assert torch.equal(weight_out_in(ed.layout.mlp_out(l)), w0[l])
    assert ed.accumulated_keys(1).abs().sum() > 0


def test_options_and_errors(tiny_gpt2):
    assert make(tiny_gpt2, layers=[0, 1, 2], last_layers=1).layers == [2]
    for bad in (dict(last_layers=4), dict(update_rule="x"), dict(alpha_mode="x"), dict(short_prompts="x"),
                dict(zscore_ddof=2), dict(alpha_z=0.0), dict(exclude_first="x")):
        with pytest.raises(ValueError):
            make(tiny_gpt2, layers=[0, 1, 2], **bad)
    with pytest.raises(RuntimeError, match="hook"):
        make(tiny_gpt2, hook=False).max_zscores(PROMPTS)
