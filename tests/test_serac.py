"""SERAC (BASELINES.md §6 (i)): an empty memory and a memory no input is routed to give the base
model's scores exactly; an input identical to a memory entry scores s = 1 and reads the edit in
context; withdrawing an edit restores the earlier outputs exactly and survives an edit-file round
trip; a failing step loses nothing; the classifier loss falls in training; fit and test run end to end."""
import json

import pytest
import torch

from editing.data import meta
from editing.data.readers import load_benchmark
from editing.editors import SERAC, NoEdit
from editing.editors.base import EditError
from tests.test_cli import cli
from tests.test_locate import REQS
from tests.test_mend import FIT, ddp_and_one_process


def scores(ed, prompts, targets):
    with torch.no_grad():
        lp, _ = ed.target_logprobs(prompts, targets)
    return lp


def test_empty_or_unrouted_memory_is_the_base_model(tiny_llama):
    ed = SERAC(base_model=tiny_llama, step_checks=False)
    base = NoEdit(base_model=tiny_llama)
    prompts, targets = [r.text for r in REQS], [r.target_new for r in REQS]
    assert torch.equal(scores(ed, prompts, targets), scores(base, prompts, targets))
    ed.hparams.threshold = 1.0                        # s ≤ 1 always: nothing is routed
    ed.edit(REQS[:2])
    assert torch.equal(scores(ed, prompts, targets), scores(base, prompts, targets))
    assert ed.generate(REQS[0].text, 5) == base.generate(REQS[0].text, 5)


def test_an_edited_prompt_scores_one_and_reads_its_edit(tiny_llama):
    ed = SERAC(base_model=tiny_llama, step_checks=False)
    ed.edit(REQS[:2])
    d = ed.distances(ed.keys(), [REQS[1].text])
    assert float(d[0, 1]) == pytest.approx(0.0, abs=1e-6)           # s = exp(0) = 1
    assert ed.route(REQS[1].text) == 1
    r = REQS[1]
    assert ed.prepare_prompt(r.text) == f"{r.text} {r.target_new} {r.text}"
    with ed.disabled():
        assert ed.prepare_prompt(r.text) == r.text


def test_withdrawal_is_exact_and_the_memory_round_trips(tiny_llama, tmp_path):
    ed = SERAC(base_model=tiny_llama, step_checks=False)
    prompts, targets = [r.text for r in REQS], [r.target_new for r in REQS]
    ed.edit(REQS[:1])
    before = scores(ed, prompts, targets)
    ed.edit(REQS[1:2])
    assert not torch.equal(scores(ed, prompts, targets), before)
    path = ed.save_edit(tmp_path / "serac.safetensors")
    assert ed.withdraw(REQS[1].case_id) == 1
    assert torch.equal(scores(ed, prompts, targets), before)
    with pytest.raises(KeyError):
        ed.withdraw("no such case")
    other = SERAC(base_model=tiny_llama, step_checks=False)
    other.load_edit(path)
    assert [m["case_id"] for m in other.memory] == [REQS[0].case_id, REQS[1].case_id]
    assert torch.equal(other.proj.weight, ed.proj.weight)


def test_failing_step_keeps_the_memory(tiny_llama, monkeypatch):
    ed = SERAC(base_model=tiny_llama, step_checks=False)
    ed.edit(REQS[:1])
    monkeypatch.setattr(ed, "check_finite", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(EditError, match="boom"):
        ed.edit(REQS[1:2])
    assert [m["case_id"] for m in ed.memory] == [REQS[0].case_id]


def test_classifier_training_lowers_its_loss(tiny_llama):
    torch.manual_seed(0)
    ed = SERAC(base_model=tiny_llama, step_checks=False)
    data = meta.MetaDataset(meta.select(load_benchmark(kind="counterfactual").requests, "train"), 1, 0)
    batch = [data[i] for i in range(8)]
    opt = torch.optim.Adam(ed.proj.parameters(), lr=1e-2)
    first, _ = ed.meta_loss(batch)
    for _ in range(30):
        opt.zero_grad()
        loss, logs = ed.meta_loss(batch)
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * float(first) and {"recall", "rejection"} <= logs.keys()
    assert all(p.grad is None for p in ed.model.parameters())


def test_fit_then_test_edits_held_out_relations(tiny_llama, tmp_path):
    args = ["--config", "configs/serac.yaml", "--model.init_args.base_model", tiny_llama, *FIT[4:],
            "--data.meta_batch_size", 2]
    cli("fit", *args, "--trainer.default_root_dir", tmp_path / "fit")
    [edit] = list((tmp_path / "fit").rglob("edit.safetensors"))
    assert list(edit.parent.glob("best-step=*.safetensors"))
    cli("test", *args, "--ckpt_path", edit, "--trainer.default_root_dir", tmp_path / "test")
    [res] = [json.loads(p.read_text()) for p in (tmp_path / "test").rglob("results.json")]
    assert res["method"] == "serac" and res["num_edits"] == 4


def test_ddp_training_equals_one_process(tiny_llama, tmp_path):
    """As MEND's: the scope classifier trained under DDP on two CPU processes equals one process's with
    the same global batch (to 1e-5)."""
    a, _ = ddp_and_one_process(tmp_path, "--config", "configs/serac.yaml", "--model.init_args.base_model", tiny_llama,
                               *FIT[4:])
    init = SERAC(base_model=tiny_llama).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if k in init and a[k].is_floating_point())  # it trained
