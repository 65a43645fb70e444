"""The contrast-based probe (`editing.probe`) on tiny random models: the last block's curve with the
final norm is the model's own next-token distribution (probability and rank of the answers' first
tokens, at the subject's last token and at the prediction position), the GPT-2 embedding row holds
the position embedding, records without answers are refused, and `plot` / `main` write their files."""
import json

import pytest
import torch

from editing.data.records import EditRequest
from editing.models import load
from editing.probe import first_tokens, lens, main, plot, probe

# prompts of different lengths (padding inside a batch), subjects at the start, middle and end
REQS = [
    EditRequest("0", "The capital of {} is", "France", "Tamil", "Paris"),
    EditRequest("1", "{} speaks", "Danielle Darrieux", "Logic", "French"),
    EditRequest("2", "{} works in the field of", "Alan Turing", "guitar", "logic"),
    EditRequest("3", "The mother tongue of {}", "Toko Yasuda", "French", "Japanese"),
]


def own_distribution(model, tokenizer, req: EditRequest):
    """The model's softmax at the subject's last token and at the prompt's last token, computed
    without the probe's code: one unpadded forward, positions from the character offsets."""
    text = req.text
    enc = tokenizer(text, return_offsets_mapping=True)
    start = req.prompt.index("{}")
    end = start + len(req.subject)
    sl = max(j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].float()
    probs = torch.softmax(logits, -1)
    return probs[[sl, len(enc["input_ids"]) - 1]]           # [2 positions, V]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_last_layer_with_final_norm_is_the_model_output(tiny_dirs, family):
    model, tok = load(str(tiny_dirs[family]))
    raw = lens(model, tok, REQS, final_norm=True, batch_size=3)   # two batches, the first padded
    n_layers = model.config.num_hidden_layers
    assert raw["original_prob"].shape == (len(REQS), n_layers + 1, 2)
    for answer in ("original", "target"):
        ids = first_tokens(tok, REQS, answer)
        for i, r in enumerate(REQS):
            # the first answer token is the first token after the prompt in the joint encoding
            prompt_ids = tok(r.text)["input_ids"]
            joint = tok(r.text + " " + (r.target_true if answer == "original" else r.target_new))["input_ids"]
            assert joint[:len(prompt_ids)] == prompt_ids and joint[len(prompt_ids)] == ids[i]
            P = own_distribution(model, tok, r)                  # [2, V]
            p = P[:, ids[i]]
            torch.testing.assert_close(raw[f"{answer}_prob"][i, -1], p, atol=1e-5, rtol=1e-4)
            strictly_higher = (P > p[:, None]).sum(-1).float()
            assert torch.equal(raw[f"{answer}_rank"][i, -1], strictly_higher)
    # ranks are counts of other tokens: in [0, V - 1]; probabilities in (0, 1]
    V = model.get_output_embeddings().weight.shape[0]
    for key, t in raw.items():
        if key.endswith("rank"):
            assert t.min() >= 0 and t.max() <= V - 1
        else:
            assert t.min() > 0 and t.max() <= 1


def test_curves_average_the_records(tiny_llama):
    model, tok = load(tiny_llama)
    res = probe(model, tok, REQS, final_norm=False, batch_size=2, name="tiny")
    raw = lens(model, tok, REQS, final_norm=False)
    assert res.layers == ["emb", 0, 1, 2] and res.num_records == len(REQS) and not res.final_norm
    for p, pos in enumerate(("subject_last", "prediction")):
        for a in ("original", "target"):
            torch.testing.assert_close(torch.tensor(res.curves[pos][a]["prob"]), raw[f"{a}_prob"][:, :, p].mean(0))
            torch.testing.assert_close(torch.tensor(res.curves[pos][a]["rank"]), raw[f"{a}_rank"][:, :, p].mean(0))
            assert len(res.per_record[pos][a]["rank"]) == len(REQS)
    # without the final norm the last layer is not the model's output (the norm matters)
    normed = lens(model, tok, REQS, final_norm=True)
    assert not torch.allclose(raw["target_prob"][:, -1], normed["target_prob"][:, -1])
    json.dumps(res.to_json())


def test_gpt2_embedding_row_includes_the_position_embedding(tiny_gpt2):
    model, tok = load(tiny_gpt2)
    raw = lens(model, tok, REQS[:2], final_norm=True)
    ids = first_tokens(tok, REQS[:2], "target")
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    for i, r in enumerate(REQS[:2]):
        enc = tok(r.text)["input_ids"]
        pos = len(enc) - 1
        h = wte[enc[pos]] + wpe[pos]
        with torch.no_grad():
            p = torch.softmax(model.lm_head(model.transformer.ln_f(h)).float(), -1)[ids[i]]
            p_tok_only = torch.softmax(model.lm_head(model.transformer.ln_f(wte[enc[pos]])).float(), -1)[ids[i]]
        torch.testing.assert_close(raw["target_prob"][i, 0, 1], p, atol=1e-6, rtol=1e-5)
        assert not torch.isclose(raw["target_prob"][i, 0, 1], p_tok_only, atol=1e-7, rtol=1e-4)


def test_records_without_answers_are_refused(tiny_llama):
    model, tok = load(tiny_llama)
    bare = EditRequest("no-true", "{} speaks", "Danielle Darrieux", "Logic")
    with pytest.raises(ValueError, match="target_true.*no-true"):
        probe(model, tok, [REQS[0], bare])
    with pytest.raises(ValueError, match="at least one record"):
        probe(model, tok, [])


def test_plot_and_main_write_their_files(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    png = plot(probe(model, tok, REQS, name="tiny"), tmp_path / "sub" / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = tmp_path / "records.jsonl"
    rows = REQS + [EditRequest("bare", "{} plays the", "Toko Yasuda", "guitar")]  # skipped by main
    data.write_text("\n".join(json.dumps(r.to_dict()) for r in rows) + "\n")
    out = tmp_path / "run"
    result = main(["--model", tiny_llama, "--data", str(data), "--n", "3", "--out", str(out), "--no-final-norm"])
    saved = json.loads((out / "probe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["num_records"] == 3 and saved["final_norm"] is False and saved["model"] == tiny_llama
    assert len(saved["curves"]["prediction"]["target"]["prob"]) == 4
    assert (out / "probe.png").stat().st_size > 0
