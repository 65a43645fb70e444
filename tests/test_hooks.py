"""Hooks: capture, add, replace at (row, position), padding-aware, always cleaned up."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing import hooks
from editing.layout import Layout
from editing.tokens import encode

from conftest import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[request.param]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs[request.param])
    tok.pad_token = tok.eos_token
    model(torch.randint(3, 300, (1, 3)), output_hidden_states=True)
    model._base_hooks = 0
    model._base_hooks = n_hooks(model)
    return model, tok, Layout(model)


def n_hooks(module):
    """Hooks beyond those transformers registers itself."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) - module._base_hooks


def test_capture_matches_hidden_states(setup):
    model, tok, lay = setup
    x = torch.randint(3, 300, (2, 6))
    out = model(x, output_hidden_states=True)
    with hooks.capture({"b1": lay.block(1)}) as cap:
        model(x)
    torch.testing.assert_close(cap["b1"], out.hidden_states[2])
    pos = torch.tensor([2, 5])
    with hooks.capture({"b1": lay.block(1)}, positions=pos) as cap:
        model(x)
    torch.testing.assert_close(cap["b1"], out.hidden_states[2][torch.arange(2), pos])
    assert n_hooks(model) == 0


def test_padding_aware_capture(setup):
    """The state at each row's last real token is the same padded or not (right padding)."""
    model, tok, lay = setup
    prompts = ["The capital of France is", "Alan Turing works in the field of"]
    batch = encode(tok, prompts)
    with hooks.capture({"mlp": lay.mlp_out(2)}, "input", positions=batch.prompt_last) as cap:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for i, p in enumerate(prompts):
        single = encode(tok, [p])
        with hooks.capture({"mlp": lay.mlp_out(2)}, "input", positions=single.prompt_last) as one:
            model(input_ids=single.input_ids)
        torch.testing.assert_close(cap["mlp"][i], one["mlp"][0], atol=1e-5, rtol=1e-4)


def test_add_and_replace_at_positions(setup):
    model, tok, lay = setup
    x = torch.randint(3, 300, (2, 6))
    base = model(x).logits
    delta = torch.randn(2, 32)
    pos = torch.tensor([3, 1])
    with hooks.add_at(lay.block(1), pos, delta):
        edited = model(x).logits
    for row, p in enumerate(pos.tolist()):
        # Causality: positions before the edit are untouched, the edited one changes.
        torch.testing.assert_close(edited[row, :p], base[row, :p])
        assert not torch.allclose(edited[row, p], base[row, p])
    # Adding to a block output: the captured output is the original plus delta at that entry only.
    with hooks.capture({"b": lay.block(1)}) as cap0:
        model(x)
    with hooks.add_at(lay.block(1), pos, delta), hooks.capture({"b": lay.block(1)}) as cap1:
        model(x)
    diff = cap1["b"] - cap0["b"]
    torch.testing.assert_close(diff[torch.arange(2), pos], delta)
    diff[torch.arange(2), pos] = 0
    assert diff.abs().max() == 0
    # Replace writes the value.
    value = torch.randn(2, 32)
    with hooks.replace_at(lay.block(1), pos, value), hooks.capture({"b": lay.block(1)}) as cap2:
        model(x)
    torch.testing.assert_close(cap2["b"][torch.arange(2), pos], value)
    assert n_hooks(model) == 0


def test_add_at_is_differentiable(setup):
    model, tok, lay = setup
    x = torch.randint(3, 300, (1, 5))
    delta = torch.zeros(1, 32, requires_grad=True)
    with hooks.add_at(lay.mlp(0), torch.tensor([4]), delta):
        model(x).logits[0, -1].logsumexp(-1).backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_hooks_removed_when_forward_raises(setup):
    model, tok, lay = setup
    x = torch.randint(3, 300, (1, 4))
    with pytest.raises(IndexError):
        with hooks.capture({"b": lay.block(0)}), hooks.add_at(lay.block(0), torch.tensor([9]), torch.ones(1, 32)):
            model(x)  # position 9 does not exist
    assert n_hooks(model) == 0


def test_attach_io_and_stop_after(setup):
    model, tok, lay = setup
    x = torch.randint(3, 300, (1, 4))
    mod = lay.mlp_out(1)
    seen = {}
    handle = hooks.attach_io(mod, lambda i, o: seen.update(i=i, o=o))
    model(x)
    handle.remove()
    torch.testing.assert_close(mod(seen["i"]), seen["o"])
    with hooks.stop_after(lay.block(0)), hooks.capture({"last": lay.block(2)}) as cap:
        with pytest.raises(hooks.StopForward):
            model(x)
    assert "last" not in cap
    assert n_hooks(model) == 0
