"""Layout facts on tiny random models of every family."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from editing import hooks
from editing.layout import Layout, UnsupportedModelError, family_for, is_transposed, linear, weight_out_in

from conftest import FAMILIES


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {f: AutoModelForCausalLM.from_pretrained(tiny_dirs[f]).eval() for f in FAMILIES}


def ids():
    torch.manual_seed(1)
    return torch.randint(3, 300, (2, 7))


@pytest.mark.parametrize("family", FAMILIES)
def test_structure(models, family):
    model = models[family]
    lay = Layout(model)
    assert lay.num_layers == 3
    assert lay.hidden_size == 32
    w = lay.mlp_out_weight(1)
    assert w.shape == (32, lay.mlp_key_size(1))
    assert lay.mlp_key_size(1) == (128 if family in ("gpt2", "gptj") else 64)
    assert lay.unembedding.shape == (model.config.vocab_size, 32)
    assert lay.layer_index(-1) == 2
    with pytest.raises(IndexError):
        lay.block(3)
    expected_parallel = {"gpt2": False, "gptj": True, "gpt_neox": True, "gpt_neox_seq": False, "llama": False}
    assert lay.parallel == expected_parallel[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_output_projection_orientation(models, family):
    """module(k) == k @ W(out,in)^T + b for Conv1D (stored transposed) and Linear alike."""
    lay = Layout(models[family])
    mod = lay.mlp_out(0)
    assert is_transposed(mod) == (family == "gpt2")
    k = torch.randn(5, lay.mlp_key_size(0))
    bias = mod.bias if getattr(mod, "bias", None) is not None else 0
    torch.testing.assert_close(mod(k), linear(mod, k) + bias)
    # Writing through the (out, in) view writes the stored weight.
    with torch.no_grad():
        before = mod(k).clone()
        weight_out_in(mod)[3, 5] += 1.0
        after = mod(k)
        weight_out_in(mod)[3, 5] -= 1.0
    torch.testing.assert_close(after[:, 3] - before[:, 3], k[:, 5])
    torch.testing.assert_close(after[:, :3], before[:, :3])


def test_square_conv1d_orientation():
    """Square Conv1D weights are where shape-based orientation guesses fail."""
    conv = Conv1D(8, 8)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(conv(x), linear(conv, x) + conv.bias)
    lin = torch.nn.Linear(8, 8)
    torch.testing.assert_close(lin(x), linear(lin, x) + lin.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_key_is_input_of_output_projection(models, family):
    """The MLP key equals act(W_in x) (or act(gate x) * up x for gated MLPs) of the MLP input."""
    model = models[family]
    lay = Layout(model)
    x = ids()
    with hooks.capture({"in": lay.mlp(1)}, "input") as mlp_in, \
            hooks.capture({"key": lay.mlp_out(1)}, "input") as key, \
            hooks.capture({"out": lay.mlp(1)}, "output") as mlp_out:
        model(x)
    mlp = lay.mlp(1)
    if family == "llama":
        expected = mlp.act_fn(mlp.gate_proj(mlp_in["in"])) * mlp.up_proj(mlp_in["in"])
    elif family == "gpt2":
        expected = mlp.act(mlp.c_fc(mlp_in["in"]))
    elif family == "gptj":
        expected = mlp.act(mlp.fc_in(mlp_in["in"]))
    else:
        expected = mlp.act(mlp.dense_h_to_4h(mlp_in["in"]))
    torch.testing.assert_close(key["key"], expected)
    torch.testing.assert_close(lay.mlp_out(1)(key["key"]), mlp_out["out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_final_norm_and_unembedding(models, family):
    model = models[family]
    lay = Layout(model)
    x = ids()
    logits = model(x).logits
    hidden = lay.backbone(input_ids=x)[0]
    torch.testing.assert_close(lay.lm_head(hidden), logits)
    # The final norm is what turns the last block's output into that hidden state.
    with hooks.capture({"last": lay.block(-1)}, "output") as cap:
        model(x)
    torch.testing.assert_close(lay.final_norm(cap["last"]), hidden)
    bias = getattr(lay.lm_head, "bias", None)
    torch.testing.assert_close(hidden @ lay.unembedding.T + (0 if bias is None else bias), logits)


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        family_for("t5")
    msg = str(e.value)
    assert "'t5'" in msg and "gpt2" in msg and "llama" in msg and "editing/layout.py" in msg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start", [0, 1, 2])
def test_truncated_forward_equals_full(models, family, start):
    """run_from(start, input of block start) == the full forward's final hidden state."""
    model = models[family]
    lay = Layout(model)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 5:] = 0  # right padding in row 1
    full = lay.backbone(input_ids=x, attention_mask=mask)[0]
    with hooks.capture({"in": lay.block(start)}, "input") as cap:
        lay.backbone(input_ids=x, attention_mask=mask)
    out = lay.run_from(start, cap["in"], mask)
    torch.testing.assert_close(out[0], full[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, :5], full[1, :5], atol=1e-5, rtol=1e-4)
    assert lay.num_layers == 3  # the blocks are back
