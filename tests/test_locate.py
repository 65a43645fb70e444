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
