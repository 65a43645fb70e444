"""MEND (BASELINES.md §4 (i)) and the trained-editor plumbing: an identity editor network without
normalisation makes an edit exactly a gradient step scaled by α (either sign, Linear and Conv1D);
α = 0 leaves the logits bit-identical; the normaliser is the rows' mean and unbiased std; the
meta-loss reaches α and the network and never the model's weights or deltas; a failing step restores
the deltas; the split is deterministic and disjoint; `fit` trains with validation and a safe best
checkpoint, `test` edits held-out relations with it; DDP training equals one process."""
import json

import pytest
import torch

from editing.data import meta
from editing.data.readers import load_benchmark
from editing.editors import MEND
from editing.editors.base import EditError
from editing.editors.ft import target_nll
from editing.edit_file import read_edit_file
from tests.test_cli import cli
from tests.test_locate import REQS


def tiny(path, **kw):
    return MEND(base_model=str(path), rank=8, step_checks=False, **{"norm": False, "sign": "paper", **kw})


def instances(n=2, k=1):
    return [meta.MetaDataset(meta.select(load_benchmark(kind="counterfactual").requests, "train"), k)[i]
            for i in range(n)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sign", ["paper", "official"])
def test_identity_editor_step_is_a_scaled_gradient_step(family, sign, tiny_dirs):
    ed = tiny(tiny_dirs[family], sign=sign, edit_lr=0.03)
    layers = list(ed.delta_layers().values())
    for m in layers:
        m.delta.requires_grad_(True)
    grads = torch.autograd.grad(target_nll(ed, REQS[:2]), [m.delta for m in layers])  # = Σ_b δ_b u_bᵀ
    for m in layers:
        m.delta.requires_grad_(False)
    ed.edit(REQS[:2])
    s = -1.0 if sign == "paper" else 1.0
    for m, g in zip(layers, grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(m.delta, s * 0.03 * g, rtol=1e-5, atol=1e-8)


def test_zero_step_leaves_logits_and_untrained_normaliser_refuses(tiny_llama):
    ed = tiny(tiny_llama, edit_lr=0.0)
    ids = ed.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        before = ed.model(**ids).logits
    ed.edit(REQS[:1])
    with torch.no_grad():
        assert torch.equal(ed.model(**ids).logits, before)
    with pytest.raises(EditError, match="normaliser has seen fewer than 2 rows"):
        MEND(base_model=tiny_llama, rank=8, step_checks=False).edit(REQS[:1])


def test_normaliser_is_mean_and_unbiased_std():
    from editing.editors.mend import Normaliser

    rows = torch.randn(50, 6, dtype=torch.float64) * 3 + 1
    norm = Normaliser(6)
    norm.add(norm.increments(rows[:20]))
    norm.add(norm.increments(rows[20:]))  # two updates add up like one (and like two processes)
    expect = (rows - rows.mean(0)) / (rows.std(0, unbiased=True) + 1e-7)
    torch.testing.assert_close(norm(rows), expect)


def test_meta_loss_trains_the_network_and_never_the_model(tiny_llama):
    ed = tiny(tiny_llama, norm=True)
    ids = ed.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        before = ed.model(**ids).logits
    loss, logs = ed.meta_loss(instances(2))
    loss.backward()
    assert torch.isfinite(loss) and {"edit_nll", "kl", "edit_success", "locality"} <= logs.keys()
    assert ed.edit_lrs.grad is not None and ed.edit_lrs.grad.abs().sum() > 0
    assert all(net.U[0].grad.abs().sum() > 0 for net in ed.mend.values())
    assert all(float(net.norm.count) > 2 for net in ed.mend.values())
    assert all(p.grad is None for p in ed.model.parameters())
    assert all(m.pending is None and not m.delta.any() for m in ed.delta_layers().values())
    with torch.no_grad():
        assert torch.equal(ed.model(**ids).logits, before)


def test_failing_step_restores_the_deltas(tiny_llama, monkeypatch):
    ed = tiny(tiny_llama, edit_lr=0.05)
    ed.edit(REQS[:1])
    saved = {n: m.delta.clone() for n, m in ed.delta_layers().items()}
    real = ed.proposed

    def half_then_fail(factors):
        out = real(factors)
        for n, m in ed.delta_layers().items():
            m.delta += out[n]
        raise RuntimeError("boom")
    monkeypatch.setattr(ed, "proposed", half_then_fail)
    with pytest.raises(EditError, match="boom"):
        ed.edit(REQS[1:2])
    for n, m in ed.delta_layers().items():
        assert torch.equal(m.delta, saved[n])


def test_split_is_deterministic_and_disjoint():
    reqs = load_benchmark(kind="counterfactual").requests
    parts = meta.split_of(reqs, 0)
    assert parts == meta.split_of(list(reversed(reqs)), 0)
    rel = {p: {r.relation_id for r in reqs if parts[r.case_id] == p} for p in ("train", "val", "test")}
    assert [len(rel[p]) for p in ("train", "val", "test")] == [19, 3, 5]
    assert not (rel["train"] & rel["val"]) and not (rel["train"] & rel["test"]) and not (rel["val"] & rel["test"])
    factual = load_benchmark(kind="factual").requests
    fparts = meta.split_of(factual, 0)
    assert {r.relation_id for r in factual if fparts[r.case_id] == "test"} == rel["test"]
    # records without relations are split by subject
    from dataclasses import replace
    plain = [replace(r, relation_id=None) for r in reqs]
    sparts = meta.split_of(plain, 0)
    by_subject = {}
    for r in plain:
        by_subject.setdefault(r.subject, set()).add(sparts[r.case_id])
    assert all(len(s) == 1 for s in by_subject.values()) and set(sparts.values()) == {"train", "val", "test"}


FIT = ["--model.init_args.rank", 8, "--model.init_args.layers", "[1, 2]", "--model.init_args.lr", 1e-3,
       "--trainer.max_steps", 6, "--trainer.accumulate_grad_batches", 1, "--trainer.val_check_interval", 3,
       "--data.val_instances", 4, "--data.num_edits", 4, "--trainer.enable_progress_bar", "false",
       "--trainer.accelerator", "cpu"]


def test_fit_trains_with_validation_and_test_edits_held_out_relations(tiny_llama, tmp_path):
    cli("fit", "--config", "configs/mend.yaml", "--model.init_args.base_model", tiny_llama, *FIT,
        "--trainer.default_root_dir", tmp_path / "fit")
    [edit] = list((tmp_path / "fit").rglob("edit.safetensors"))
    assert list(edit.parent.glob("best-step=*.safetensors"))            # SafeCheckpoint: no pickle anywhere
    assert not list((tmp_path / "fit").rglob("*.ckpt"))
    rows = (edit.parent.parent / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert "val/edit_success" in head and "train/loss" in head
    filled = [r.split(",")[head.index("val/edit_success")] for r in rows[1:]]
    assert sum(1 for v in filled if v) == 2                               # validated at batches 3 and 6
    trained = read_edit_file(edit)["state_dict"]
    counts = [float(v) for k, v in trained.items() if k.endswith("norm.count")]
    assert len(counts) == 2 and min(counts) > 2                            # the normalisers were trained
    cli("test", "--config", "configs/mend.yaml", "--model.init_args.base_model", tiny_llama, *FIT,
        "--ckpt_path", edit, "--trainer.default_root_dir", tmp_path / "test")
    [res] = [json.loads(p.read_text()) for p in (tmp_path / "test").rglob("results.json")]
    assert res["method"] == "mend" and res["num_edits"] == 4
    held_out = {r.relation_id for r in meta.select(load_benchmark(kind="counterfactual").requests, "test")}
    cases = [json.loads(line) for line in next((tmp_path / "test").rglob("cases.jsonl")).read_text().splitlines()]
    assert cases and all(c["case_id"].split(":")[0] in held_out for c in cases)


def ddp_and_one_process(tmp_path, *args) -> tuple[dict, dict]:
    """The trained editor's state of `fit *args` in one process with meta-batch 2 and under DDP on two
    CPU processes with meta-batch 1 each (the same global batches)."""
    common = ["fit", *args, "--trainer.max_steps", 4, "--trainer.val_check_interval", 100]
    cli(*common, "--data.meta_batch_size", 2, "--trainer.default_root_dir", tmp_path / "one")
    cli(*common, "--data.meta_batch_size", 1, "--trainer.strategy", "ddp", "--trainer.devices", 2,
        "--trainer.default_root_dir", tmp_path / "ddp")
    [one], [ddp] = (list((tmp_path / n).rglob("edit.safetensors")) for n in ("one", "ddp"))
    a, b = read_edit_file(one)["state_dict"], read_edit_file(ddp)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    return a, b


def test_ddp_training_equals_one_process(tiny_llama, tmp_path):
    """Two processes with one instance each see the global batches of one process with two: the trained
    editors agree to 1e-5 (float32 sums in another order)."""
    a, _ = ddp_and_one_process(tmp_path, "--config", "configs/mend.yaml", "--model.init_args.base_model", tiny_llama,
                               *FIT, "--model.init_args.norm", "true")
    moved = sum(int(k.endswith("U.0") and a[k].abs().sum() > 0) for k in a)
    assert moved == 2  # both networks trained (U starts at 0)
