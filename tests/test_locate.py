"""The locate-then-edit core on tiny models: the closed form solves its least-squares problem, ROME's
rank-one update maps its key to its value, batched and one-at-a-time targets agree, undo and disable
are exact, and GPT-2 (Conv1D) and Llama layouts are both edited."""
import pytest
import torch

from editing.data.records import EditRequest
from editing.editors import MEMIT, PMET, ROME
from editing.editors.locate import closed_form, compute_keys, compute_targets, current_values

REQS = [
    EditRequest("0", "The capital of {} is", "France", "Tamil", "Paris"),
    EditRequest("1", "{} speaks", "Danielle Darrieux", "Logic Man", "French"),
    EditRequest("2", "{} works in the field of", "Alan Turing", "guitar"),
]
FAST = dict(template_spec=[[3, 2]], v_steps=15, v_lr=0.5)


def with_stats(editor, scale=1e-3):
    """Identity-like statistics instead of a corpus pass (tests of the math, not of stats.py)."""
    for l in editor.layers:
        n = editor.layout.mlp_key_size(l)
        editor._stats[l] = torch.eye(n) * scale
    return editor


def test_closed_form_solves_least_squares():
    torch.manual_seed(0)
    d, dff, u = 6, 10, 3
    K, R = torch.randn(u, dff), torch.randn(u, d)
    A = torch.randn(dff, dff)
    C = A @ A.T / dff + torch.eye(dff) * 0.1
    for lam in (0.0, 0.5, 20.0):
        left, right = closed_form(K, R, C, lam)
        delta = left @ right.T
        # normal equations of min ‖Δ Kᵀ − Rᵀ‖² + λ tr(Δ C Δᵀ): Δ (KᵀK + λC) = Rᵀ K
        torch.testing.assert_close(delta @ (K.double().T @ K.double() + lam * C.double()), R.double().T @ K.double())
    left, right = closed_form(K, R, C, 1e-9)
    torch.testing.assert_close((left @ right.T) @ K.double().T, R.double().T, atol=1e-5, rtol=1e-5)
    big = closed_form(K, R, C, 1e6)
    assert (big[0] @ big[1].T).norm() < 1e-3 * delta.norm()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rome_maps_key_to_value(tiny_dirs, family):
    ed = with_stats(ROME(base_model=str(tiny_dirs[family]), layers=[1], **FAST))
    flat = ed.templates()
    req = REQS[0]
    v = compute_targets(ed.layout, ed.tokenizer, [req], ed.target_config(), flat).z["mlp"][0]
    w_before = ed._weight(1).detach().clone()
    ed.edit([req])
    # the bare prompt's MLP output at the subject's last token is now v*
    torch.testing.assert_close(current_values(ed.layout, ed.tokenizer, [req], "mlp", 1)[0], v, atol=1e-4, rtol=1e-4)
    delta = ed._weight(1).detach() - w_before
    assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) == 1
    with ed.disabled():
        torch.testing.assert_close(ed._weight(1), w_before, atol=0, rtol=0)


def test_batched_targets_equal_one_at_a_time(tiny_llama):
    ed = MEMIT(base_model=tiny_llama, layers=[0, 1], **FAST)
    flat = ed.templates()
    cfg = ed.target_config()
    batched = compute_targets(ed.layout, ed.tokenizer, REQS, cfg, flat)
    for i, r in enumerate(REQS):
        single = compute_targets(ed.layout, ed.tokenizer, [r], cfg, flat)
        torch.testing.assert_close(batched.z["block"][i], single.z["block"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.loss[i], single.loss[0], atol=1e-4, rtol=1e-4)
    # the truncated forward (from block L, LM head at scored positions only) equals the full one
    full = compute_targets(ed.layout, ed.tokenizer, REQS, cfg, flat, truncated=False)
    torch.testing.assert_close(batched.z["block"], full.z["block"], atol=1e-4, rtol=1e-4)
    # the clamp holds
    delta = batched.z["block"] - batched.init["block"]
    assert (delta.norm(dim=-1) <= cfg.clamp * batched.init["block"].norm(dim=-1) + 1e-4).all()


def test_keys_are_group_means(tiny_gpt2):
    ed = MEMIT(base_model=tiny_gpt2, layers=[1], **FAST)
    groups = ed.template_groups()
    k = compute_keys(ed.layout, ed.tokenizer, REQS[:1], 1, groups)
    per_group = [compute_keys(ed.layout, ed.tokenizer, REQS[:1], 1, [g]) for g in groups]
    torch.testing.assert_close(k, sum(per_group) / len(per_group))


@pytest.mark.parametrize("cls,family", [(MEMIT, "gpt2"), (MEMIT, "llama"), (PMET, "llama"), (PMET, "gptj")])
def test_edit_writes_target_undo_and_disable_are_exact(tiny_dirs, cls, family):
    # A loose clamp and little decay: tiny random models need large deltas to move their predictions
    # (the subject's token reaches the target positions only through one or two random attentions).
    ed = with_stats(cls(base_model=str(tiny_dirs[family]), layers=[0, 1], mom2_update_weight=1.0,
                        **{**FAST, "clamp_norm_factor": 50.0, "v_weight_decay": 1e-4}))

    def nll():
        with torch.no_grad():
            lp, b = ed.target_logprobs([r.text for r in REQS], [r.target_new for r in REQS])
        return float(-(lp.gather(-1, b.target_ids[..., None]).squeeze(-1) * b.target_mask).sum())

    weights = {l: ed._weight(l).detach().clone() for l in ed.layers}
    before = nll()
    part = "mlp" if cls is PMET else "block"
    cur0 = current_values(ed.layout, ed.tokenizer, REQS[:2], part, 1)
    ed.edit(REQS[:2])
    # the update writes most of the target into the model
    flat = ed.templates()
    with ed.disabled():
        z = compute_targets(ed.layout, ed.tokenizer, REQS[:2], ed.target_config(), flat).z[part]
    cur1 = current_values(ed.layout, ed.tokenizer, REQS[:2], part, 1)
    assert ((z - cur1).norm(dim=-1) < 0.5 * (z - cur0).norm(dim=-1)).all()
    mid_weights = {l: ed._weight(l).detach().clone() for l in ed.layers}
    ed.edit(REQS[2:])
    with ed.disabled():
        for l in ed.layers:
            assert torch.equal(ed._weight(l), weights[l])
    ed.undo()
    for l in ed.layers:
        assert torch.equal(ed._weight(l), mid_weights[l])
    ed.undo()
    for l in ed.layers:
        assert torch.equal(ed._weight(l), weights[l])
    assert nll() == pytest.approx(before)


def test_checkpoint_and_failed_step(tiny_llama, tmp_path, fail_closed_form):
    ed = with_stats(MEMIT(base_model=tiny_llama, layers=[0, 1], **FAST))
    ed.edit(REQS[:2])
    path = ed.save_edit(tmp_path / "memit.ckpt")
    edited = {l: ed._weight(l).detach().clone() for l in ed.layers}
    fresh = MEMIT(base_model=tiny_llama, layers=[0, 1], **FAST)
    fresh.load_edit(path)
    for l in ed.layers:
        assert torch.equal(fresh._weight(l), edited[l])
    # a step that fails half-way (after the first layer was written) leaves the weights as they were
    fail_closed_form(2)
    from editing.editors import EditError
    with pytest.raises(EditError, match="restored"):
        ed.edit(REQS[2:])
    for l in ed.layers:
        assert torch.equal(ed._weight(l), edited[l])
    assert len(ed.history.steps) == 1


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "gpt_neox_seq", "llama"])
def test_cached_prefix_forward_equals_whole_rows(tiny_dirs, family):
    """Layout.prefix + run_from(prefix=) over each row's positions from s on gives the states the
    whole-row forward gives there, on every family (rotary and absolute positions, GQA, parallel)."""
    from editing import hooks
    from editing.models import load

    model, _ = load(str(tiny_dirs[family]))
    from editing.layout import Layout
    lay = Layout(model)
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (3, 12))
    lens = torch.tensor([12, 9, 7])
    mask = (torch.arange(12)[None] < lens[:, None]).long()
    start = 1
    with torch.no_grad(), hooks.capture({"h": lay.block(start)}, "input") as cap:
        whole = lay.backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    h = cap["h"]
    s = torch.tensor([5, 0, 4])          # a row with an empty prefix too
    P = int(s.max())
    prefix = lay.prefix(start, h[:, :P], mask[:, :P], s)
    width = int((lens - s).max())
    idx = (s[:, None] + torch.arange(width)[None]).clamp(max=11)
    x = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
    sub = (torch.arange(width)[None] < (lens - s)[:, None]).long()
    with torch.no_grad():
        out = lay.run_from(start, x, sub, prefix=prefix)
        picked = lay.run_from(start, x[[0, 2]], sub[[0, 2]], prefix=prefix.rows(torch.tensor([0, 2])))
    for r in range(3):
        n = int(lens[r] - s[r])
        torch.testing.assert_close(out[r, :n], whole[r, s[r]:lens[r]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(picked[1, :3], whole[2, 4:7], atol=1e-5, rtol=1e-5)
    assert prefix.kv[0][0].shape[-2] == P   # the cache itself is never extended by a step


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_targets_with_cached_prefix_equal_whole_rows(tiny_dirs, family):
    """The prefix-cached optimisation equals the whole-row truncated one and the full reference path
    to 1e-5, and optimising requests in groups of one equals optimising them together. In float64:
    Adam's first step is lr·sign(g), so float32 rounding in a near-zero gradient component can flip
    it and grow past 1e-5 between any two orders of summation (the whole-row and full paths too)."""
    ed = MEMIT(base_model=str(tiny_dirs[family]), layers=[0, 1], **FAST)   # block 2 above the delta
    ed.model.double()
    flat = ed.templates()
    cfg = ed.target_config()
    cached = compute_targets(ed.layout, ed.tokenizer, REQS, cfg, flat)
    cfg_whole = ed.target_config()
    cfg_whole.prefix_cache = False
    whole = compute_targets(ed.layout, ed.tokenizer, REQS, cfg_whole, flat)
    full = compute_targets(ed.layout, ed.tokenizer, REQS, cfg, flat, truncated=False)
    for other in (whole, full):
        torch.testing.assert_close(cached.z["block"], other.z["block"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.loss, other.loss, atol=1e-5, rtol=1e-5)
        assert cached.steps == other.steps
    assert ed.model.config._attn_implementation == "sdpa"   # eager only inside the optimisation
    cfg.request_batch = 1
    one_by_one = compute_targets(ed.layout, ed.tokenizer, REQS, cfg, flat)
    torch.testing.assert_close(cached.z["block"], one_by_one.z["block"], atol=1e-5, rtol=1e-5)


def test_prefix_cache_skipped_under_whole_sequence_edit_modules(tiny_llama, monkeypatch):
    """An injected edit module that looks at whole sequences above the delta's layer turns the prefix
    cache off (the rows then run whole); a position-wise one does not."""
    from editing.editors.locate import targets as T
    from editing.tuners import DeltaLinear, HookLayer

    ed = MEMIT(base_model=tiny_llama, layers=[1], **FAST)
    calls = []
    real = ed.layout.prefix
    monkeypatch.setattr(ed.layout, "prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert T.position_wise_from(ed.layout, 1)
    ed.layout.inject(2, "mlp_out", lambda base: DeltaLinear(base))
    assert T.position_wise_from(ed.layout, 1)
    compute_targets(ed.layout, ed.tokenizer, REQS[:1], ed.target_config(), ed.templates())
    assert calls == [1]
    monkeypatch.setattr(DeltaLinear, "position_wise", False)
    assert not T.position_wise_from(ed.layout, 1) and not T.position_wise_from(ed.layout, 2)
    compute_targets(ed.layout, ed.tokenizer, REQS[:1], ed.target_config(), ed.templates())
    assert calls == [1]
    assert HookLayer.position_wise is False


def test_scoring_in_length_order_returns_case_order(tiny_llama):
    """score_prompts runs its chunks sorted by length and gives every statistic back in case order:
    chunks of 3 prompts equal one chunk of all of them."""
    from editing.data.records import EvalCase
    from editing.editors import NoEdit
    from editing.evaluation import score_prompts

    reqs = [EditRequest(r.case_id, r.prompt, r.subject, r.target_new, r.target_true,
                        paraphrase_prompts=[f"Long ago, in short, {r.prompt.format(r.subject)}"],
                        neighborhood_prompts=["Paris is a", "The Eiffel Tower is located in the city of"])
            for r in REQS]
    cases = [EvalCase.from_request(r, i) for i, r in enumerate(reqs)]
    ed = NoEdit(base_model=tiny_llama)
    one = score_prompts(ed, cases, batch_size=1000)
    small = score_prompts(ed, cases, batch_size=3)
    assert small.kinds == one.kinds == [p.kind for c in cases for p in c.prompts]
    assert small.groups.tolist() == one.groups.tolist() == [c.index for c in cases for p in c.prompts]
    assert torch.equal(small.mask, one.mask)
    for key in ("correct", "pred", "base_pred"):   # at the target positions (the padding is the chunk's)
        assert torch.equal(getattr(small, key)[one.mask], getattr(one, key)[one.mask]), key
    torch.testing.assert_close(small.target_logprob, one.target_logprob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.contrast_logprob, one.contrast_logprob, atol=1e-5, rtol=1e-5, equal_nan=True)


def whole_rows(ed, texts, spans, module, kind, layer):
    """The old path: one forward over the padded batch of whole rows, captured at the subject."""
    from editing import hooks
    from editing.tokens import encode
    b = encode(ed.tokenizer, texts, spans=spans)
    with hooks.capture({"x": module}, kind, positions=b.subject_last) as cap:
        hooks.run_until(ed.layout.backbone, ed.layout.block(layer), input_ids=b.input_ids,
                        attention_mask=b.attention_mask, use_cache=False)
    return cap["x"].float()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj", "gpt_neox"])
def test_keys_and_values_from_cut_rows_equal_whole_rows(tiny_dirs, family):
    """Rows cut after the subject and run in small length-sorted chunks give the whole rows' keys and
    values (causal: later tokens do not reach the subject's last one)."""
    from editing.editors.locate.templates import fill
    ed = MEMIT(base_model=str(tiny_dirs[family]), layers=[1])
    texts, spans = map(list, zip(*(fill("{} and a long tail of words after it", r) for r in REQS)))
    layer = 1
    ref_k = whole_rows(ed, texts, spans, ed.layout.mlp_out(layer), "input", layer)
    ref_v = whole_rows(ed, [fill("{}", r)[0] for r in REQS], [fill("{}", r)[1] for r in REQS],
                       ed.layout.block(layer), "output", layer)
    k = compute_keys(ed.layout, ed.tokenizer, REQS, layer, [["{} and a long tail of words after it"]],
                     chunk_tokens=8)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    v = current_values(ed.layout, ed.tokenizer, REQS, "block", layer, chunk_tokens=8)
    torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=1e-5)


def test_keys_take_whole_rows_where_an_edit_layer_sees_later_tokens(tiny_llama):
    """An edit layer below the key layer that looks at whole sequences (COMEBA-HK's z-scores, GRACE's
    and iReVa's last token) must see the rows' later tokens: no cut there, only the chunking."""
    from editing.tuners.base import EditLayer

    class SequenceMean(EditLayer):
        position_wise = False

        def edit(self, x, out):   # every position gets the mean of the whole row
            return out + out.mean(1, keepdim=True)

    ed = MEMIT(base_model=tiny_llama, layers=[1])
    ed.layout.inject(0, "mlp_out", SequenceMean)
    template = "{} and a long tail of words after it"
    from editing.editors.locate.templates import fill
    texts, spans = map(list, zip(*(fill(template, r) for r in REQS[:1])))
    ref = whole_rows(ed, texts, spans, ed.layout.mlp_out(1), "input", 1)
    torch.testing.assert_close(compute_keys(ed.layout, ed.tokenizer, REQS[:1], 1, [[template]]), ref,
                               atol=1e-5, rtol=1e-5)
    SequenceMean.position_wise = True   # claiming otherwise cuts the rows, and the keys change
    assert not torch.allclose(compute_keys(ed.layout, ed.tokenizer, REQS[:1], 1, [[template]]), ref, atol=1e-4)
