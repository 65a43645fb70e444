"""JEEP on tiny models: the joint optimisation reduces to the core's single-region path without the
high delta, the low-region-only ablation equals MEMIT bit for bit, an edit changes only the
configured layers, the high residual is 0 (paper mode) or a − m (code mode) when δ* = 0, and undo
and failed steps are exact."""
import pytest
import torch

from editing.editors import JEEP, MEMIT, EditError
from editing.editors.locate import DeltaSite, TargetConfig, compute_targets, current_values
from tests.test_locate import REQS, with_stats

FAST = dict(template_spec=[[3, 2]], v_steps=8, v_lr=0.5)


def params(ed):
    return {n: p.detach().clone() for n, p in ed.model.named_parameters()}


def test_joint_without_high_delta_is_the_single_region_path(tiny_llama):
    """δ* clamped to 0 (γ* = 0): the low target equals the one-delta optimisation at L′, and the
    high target stays at its initial value, at the prediction position."""
    ed = JEEP(base_model=tiny_llama, layers=[0], high_layers=[2], **FAST)
    flat = ed.templates()
    low = DeltaSite("low", "block", 0, "subject_last")
    high = DeltaSite("high", "block", 2, "prompt_last", clamp=0.0)
    base = dict(layer=0, steps=8, lr=0.5, clamp=0.75, weight_decay=0.5)
    joint = compute_targets(ed.layout, ed.tokenizer, REQS, TargetConfig(**base, sites=(low, high)), flat)
    single = compute_targets(ed.layout, ed.tokenizer, REQS, TargetConfig(**base, parts=("block",)), flat)
    torch.testing.assert_close(joint.z["low"], single.z["block"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(joint.loss, single.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(joint.z["high"], joint.init["high"], atol=0, rtol=0)
    # the high init is h^2 at the prompt's last token of the bare prompt
    torch.testing.assert_close(joint.init["high"], current_values(ed.layout, ed.tokenizer, REQS, "block", 2, "prompt_last"))
    assert not torch.allclose(joint.init["high"], current_values(ed.layout, ed.tokenizer, REQS, "block", 2))
    # with a free δ* both deltas move and the clamps hold
    free = compute_targets(ed.layout, ed.tokenizer, REQS, ed.joint_config(("low", "high")), flat)
    d_low, d_high = free.z["low"] - free.init["low"], free.z["high"] - free.init["high"]
    assert (d_high.norm(dim=-1) > 0).all() and (d_low.norm(dim=-1) > 0).all()
    assert (d_low.norm(dim=-1) <= 0.75 * free.init["low"].norm(dim=-1) + 1e-4).all()
    assert (d_high.norm(dim=-1) <= 0.25 * free.init["high"].norm(dim=-1) + 1e-4).all()
    # the truncated forward (from block L′) equals the full model's
    full = compute_targets(ed.layout, ed.tokenizer, REQS, ed.joint_config(("low", "high")), flat, truncated=False)
    for k in ("low", "high"):
        torch.testing.assert_close(free.z[k], full.z[k], atol=1e-4, rtol=1e-4)


def test_low_region_only_equals_memit(tiny_llama):
    """JEEP "w/o δ* & Step 3" in paper mode with an even spread and the loss early stop is MEMIT."""
    common = dict(base_model=tiny_llama, layers=[0, 1], mom2_update_weight=1.0, **FAST)
    jeep = with_stats(JEEP(high_layers=[2], optimise="low", update_regions="low", low_spread="even",
                           v_min_prob=None, **common))
    memit = with_stats(MEMIT(**common))
    w0 = jeep._weight(0).detach().clone()
    jeep.edit(REQS)
    memit.edit(REQS)
    for l in (0, 1):
        assert torch.equal(jeep._weight(l), memit._weight(l))
    assert not torch.equal(jeep._weight(0), w0)
    assert 2 not in jeep.history.steps[0]


@pytest.mark.parametrize("family,mode,optimise,update", [
    ("llama", "paper", "joint", "both"), ("llama", "code", "joint", "both"), ("gpt2", "code", "separate", "both"),
    ("gpt2", "paper", "joint", "high")])
def test_edit_changes_only_the_configured_layers_and_undo_is_exact(tiny_dirs, family, mode, optimise, update):
    ed = with_stats(JEEP(base_model=str(tiny_dirs[family]), layers=[0], high_layers=[2], mode=mode,
                         optimise=optimise, update_regions=update, mom2_update_weight=1.0, high_mom2_update_weight=1.0,
                         clamp_norm_factor=4.0, high_clamp_norm_factor=1.0, v_weight_decay=1e-3, **FAST))
    names = {l: ed.layout.module_name(l, "mlp_out") + ".weight" for l in range(3)}
    before = params(ed)
    info = ed.edit(REQS[:2])
    after = params(ed)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {names[0], names[2]} if update == "both" else {names[2]}
    assert changed == expected
    assert ("residual_low_first" in info) == (update == "both")
    ed.edit(REQS[2:])
    mid_free = params(ed)
    ed.undo()
    assert all(torch.equal(after[n], p) for n, p in params(ed).items())
    ed.undo()
    assert all(torch.equal(before[n], p) for n, p in params(ed).items())
    assert not all(torch.equal(after[n], mid_free[n]) for n in expected)


def test_edit_moves_the_prediction(tiny_llama):
    ed = with_stats(JEEP(base_model=tiny_llama, layers=[0, 1], high_layers=[2], mom2_update_weight=1e-2,
                         high_mom2_update_weight=1e-2, clamp_norm_factor=4.0, high_clamp_norm_factor=1.0,
                         v_weight_decay=1e-3, high_v_weight_decay=1e-3, **{**FAST, "v_steps": 20}))

    def nll():
        with torch.no_grad():
            lp, b = ed.target_logprobs([r.text for r in REQS], [r.target_new for r in REQS])
        return float(-(lp.gather(-1, b.target_ids[..., None]).squeeze(-1) * b.target_mask).sum())

    before = nll()
    ed.edit(REQS)
    assert nll() < before - 1.0
    with ed.disabled():
        assert nll() == pytest.approx(before)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_high_residual_without_delta(tiny_llama, mode):
    """With δ* = 0 (γ* = 0) the high region's residual is 0 in paper mode (z and the current value in
    one space), and a^{L*} − m^{L*} at PL in code mode (the official code's mixed spaces)."""
    ed = with_stats(JEEP(base_model=tiny_llama, layers=[0], high_layers=[1, 2], mode=mode, optimise="high",
                         update_regions="high", high_clamp_norm_factor=0.0, high_mom2_update_weight=1.0, **FAST))
    a = current_values(ed.layout, ed.tokenizer, REQS, "attn_out", 2, "prompt_last")
    m = current_values(ed.layout, ed.tokenizer, REQS, "mlp", 2, "prompt_last")
    w1 = ed._weight(1).detach().clone()
    info = ed.edit(REQS)
    if mode == "paper":
        assert info["residual_high_first"] < 1e-6  # 0 up to float noise (other padding)
        assert (ed._weight(1) - w1).abs().max() < 1e-6
    else:  # first high layer of two: the residual a − m spread evenly (÷ 2)
        assert info["residual_high_first"] == pytest.approx(float(((a - m) / 2).norm(dim=-1).mean()), rel=1e-4)
        assert not torch.equal(ed._weight(1), w1)


def test_failed_step_restores_and_bad_input(tiny_llama, fail_closed_form):
    ed = with_stats(JEEP(base_model=tiny_llama, layers=[0], high_layers=[2], **FAST))
    before = params(ed)
    fail_closed_form(2)  # fails at the high region, after the low layer was written
    with pytest.raises(EditError, match="restored"):
        ed.edit(REQS[:1])
    assert all(torch.equal(before[n], p) for n, p in params(ed).items())
    assert ed.history.steps == []
    with pytest.raises(ValueError, match="above the low region"):
        JEEP(base_model=tiny_llama, layers=[1], high_layers=[1])
    with pytest.raises(ValueError, match="update_regions must be"):
        JEEP(base_model=tiny_llama, layers=[0], high_layers=[2], optimise="low")
    with pytest.raises(ValueError, match="mode must be"):
        JEEP(base_model=tiny_llama, layers=[0], high_layers=[2], mode="official")
    with pytest.raises(ValueError, match="position"):
        DeltaSite("x", "block", 0, "last")
