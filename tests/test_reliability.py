"""Nothing half-done, nothing silent (docs/reliability.md): interrupts inside a step leave the exact
pre-step state; SIGTERM / SIGINT under `cli.py fit` exit non-zero with a partial checkpoint of the
completed steps; destroyed, target-worsening and no-op steps are caught or reported; requests are
validated on the Python path; checkpoints of another method or edit shape are refused."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editing.data.records import DataError, EditRequest
from editing.editors import FT, MEMIT, ROME, EditError, IReVa
from editing.editors.base import CheckpointMismatchError
from editing.editors.lifecycle import free_path
from tests.test_locate import REQS, with_stats

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(template_spec=[[3, 2]], v_steps=4, mom2_update_weight=1.0)


def state(ed):
    return {k: v.detach().clone() for k, v in ed.state_dict().items()}, list(ed.edit_log)


def same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]


# --- interrupts inside a step ---------------------------------------------------------------------------
def test_ctrl_c_inside_ft_restores_the_exact_state(tiny_llama, monkeypatch):
    ed = FT(base_model=tiny_llama, layers=[1], steps=10, lr=5e-2)
    ed.edit(REQS[:1])
    before, weights = state(ed), ed.delta(1).detach().clone()
    real, calls = FT.loss, {"n": 0}

    def interrupted(self, requests):
        calls["n"] += 1
        if calls["n"] == 4:   # three optimiser steps have moved the delta
            raise KeyboardInterrupt
        return real(self, requests)
    monkeypatch.setattr(FT, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(REQS[1:2])
    assert calls["n"] == 4
    same(state(ed), before)
    assert torch.equal(ed.delta(1), weights)


def test_ctrl_c_inside_memit_restores_the_exact_state(tiny_llama, fail_closed_form):
    ed = with_stats(MEMIT(base_model=tiny_llama, layers=[0, 1], **FAST))
    ed.edit(REQS[:1])
    weights = {l: ed._weight(l).detach().clone() for l in ed.layers}
    log = list(ed.edit_log)
    fail_closed_form(2, KeyboardInterrupt)   # after layer 0 of the second step was written
    with pytest.raises(KeyboardInterrupt):
        ed.edit(REQS[1:3])
    assert all(torch.equal(ed._weight(l), weights[l]) for l in ed.layers)
    assert len(ed.history.steps) == 1 and ed.edit_log == log
    ed.undo()   # the right step goes
    assert ed.edit_log == [] and not ed.history.steps


SIGNAL_RUN = """
import os, signal, sys
from editing.editors.ft import FT
real, calls = FT.apply_edit, {"n": 0}
def patched(self, batch):
    calls["n"] += 1
    if calls["n"] == 2:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(self, batch)
FT.apply_edit = patched
from editing.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig,code,steps", [("SIGTERM", 143, 2), ("SIGINT", 1, 1)])
def test_signals_under_fit_exit_non_zero_with_a_partial_checkpoint(tiny_dirs, tmp_path, sig, code, steps):
    """SIGTERM lets the step in flight finish (Lightning stops between steps); Ctrl-C rolls it back."""
    args = ["fit", "--config", "configs/ft.yaml", "--model.init_args.base_model", str(tiny_dirs["llama"]),
            "--model.init_args.layers", "[1]", "--model.init_args.steps", "2", "--data.num_edits", "4",
            "--trainer.default_root_dir", str(tmp_path)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", SIGNAL_RUN, sig, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    [path] = list(tmp_path.rglob("edit.partial.safetensors"))
    assert not list(tmp_path.rglob("edit.safetensors"))
    assert f"after {steps} completed edit step" in proc.stderr
    from editing.edit_file import read_edit_file
    ckpt = read_edit_file(path)
    assert ckpt["partial"]["steps"] == steps and len(ckpt["edit_log"]) == steps
    fresh = FT(base_model=str(tiny_dirs["llama"]), layers=[1])
    fresh.load_edit(path)
    assert fresh.delta(1).abs().sum() > 0


def test_a_partial_checkpoint_never_overwrites_one(tmp_path):
    first = tmp_path / "edit.partial.safetensors"
    assert free_path(first) == first
    first.write_text("old")
    assert free_path(first).name == "edit.partial-1.safetensors"


# --- destroyed, worsening and no-op steps ----------------------------------------------------------------
def test_a_destroyed_ft_model_is_rolled_back(tiny_llama):
    ed = FT(base_model=tiny_llama, layers=[1], steps=5, lr=1e4, early_stop_loss=-1.0)
    before = state(ed)
    with pytest.raises(EditError, match="check"):
        ed.edit(REQS[:1])
    same(state(ed), before)


def test_a_step_that_worsens_its_targets_is_rolled_back(tiny_llama, monkeypatch):
    ed = FT(base_model=tiny_llama, layers=[1], steps=10, lr=5e-2, early_stop_loss=-1e9)
    real = FT.loss
    monkeypatch.setattr(FT, "loss", lambda self, requests: -real(self, requests))   # gradient ascent
    before = state(ed)
    with pytest.raises(EditError, match="target check"):
        ed.edit(REQS[:1])
    same(state(ed), before)


def test_a_no_op_memit_step_is_reported(tiny_llama, caplog):
    ed = with_stats(MEMIT(base_model=tiny_llama, layers=[0, 1], clamp_norm_factor=0.0, **FAST))
    with caplog.at_level("WARNING"):
        info = ed.edit(REQS[:1])
    assert info["no_op"] == 1.0 and "changed nothing" in caplog.text
    ok = with_stats(MEMIT(base_model=tiny_llama, layers=[0, 1], clamp_norm_factor=50.0, v_weight_decay=1e-4,
                          **{**FAST, "v_steps": 15})).edit(REQS[:1])
    assert ok["no_op"] == 0.0 and ok["target_logprob_after"] > ok["target_logprob_before"]


def test_a_huge_memit_edit_is_rolled_back(tiny_llama):
    ed = with_stats(MEMIT(base_model=tiny_llama, layers=[0, 1], clamp_norm_factor=1e6, v_lr=1e3,
                          mom2_update_weight=1e-9, max_relative_change=5.0,
                          **{k: v for k, v in FAST.items() if k != "mom2_update_weight"}))
    w = {l: ed._weight(l).detach().clone() for l in ed.layers}
    with pytest.raises(EditError, match="check"):
        ed.edit(REQS[:2])
    assert all(torch.equal(ed._weight(l), w[l]) for l in ed.layers) and not ed.history.steps


# --- requests on the Python path ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    ([EditRequest("x", "The capital of France is", "France", "Tamil")], "'x'.*field 'prompt'"),
    ([EditRequest("x", "The capital of {} is", "France", "Paris", "Paris")], "'x'.*target_new equals target_true"),
    ([REQS[0], EditRequest("0", "{} plays", "Iron Man", "guitar")], "'0' appears twice"),
    ([REQS[0], EditRequest("9", REQS[0].prompt, REQS[0].subject, "Berlin")], "'0' and '9' contradict"),
    ([EditRequest("long", "{} " + "word " * 60, "France", "Tamil")], "'long' is .* tokens long"),
])
def test_requests_are_validated_before_any_work(tiny_llama, bad, match, monkeypatch):
    ed = FT(base_model=tiny_llama, layers=[1], max_length=40)
    monkeypatch.setattr(FT, "apply_edit", lambda self, batch: pytest.fail("work started"))
    with pytest.raises(DataError, match=match):
        ed.edit(bad)


def test_ireva_refuses_a_case_id_it_already_holds(tiny_gpt2):
    ed = IReVa(base_model=tiny_gpt2, layers=[1], retrofit=False)
    ed.edit(REQS[:1])
    with pytest.raises(DataError, match="'0' was edited before"):
        ed.edit([EditRequest("0", "{} plays", "Iron Man", "guitar")])
    assert ed.case_ids == ["0"]


# --- checkpoint identity and small ones ------------------------------------------------------------------------
def test_checkpoints_of_another_method_or_shape_are_refused(tiny_llama, tmp_path):
    memit = with_stats(MEMIT(base_model=tiny_llama, layers=[0, 1], **FAST))
    memit.edit(REQS[:1])
    path = memit.save_edit(tmp_path / "memit.ckpt")
    with pytest.raises(CheckpointMismatchError, match="'memit'.*ROME.*'rome'"):
        ROME(base_model=tiny_llama, layers=[1]).load_edit(path)
    with pytest.raises(CheckpointMismatchError, match=r"\[0, 1\].*\[1\]"):
        MEMIT(base_model=tiny_llama, layers=[1]).load_edit(path)
    with pytest.raises(ValueError, match=">= 1"):
        memit.undo(0)
    assert len(memit.history.steps) == 1


def test_empty_corpus_and_duplicate_case_ids(tmp_path):
    from editing.corpus import load_corpus
    from editing.data import EditDataModule
    from editing.data.readers import write_jsonl
    from editing.data.records import Benchmark

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(str(empty))
    path = write_jsonl(Benchmark("dup", "counterfact", [REQS[0], REQS[0]]), tmp_path / "dup.jsonl")
    with pytest.raises(DataError, match="appear more than once"):
        EditDataModule(str(path)).setup()


def test_cli_user_errors_are_one_line_and_leave_no_run_folder(tiny_dirs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"case_id": "a", "prompt": "no slot", "subject": "x", "target_new": "y"}\n')
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    env.pop("EDITING_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "cli.py", "fit", "--config", "configs/ft.yaml", "--model.init_args.base_model",
                           str(tiny_dirs["llama"]), "--model.init_args.layers", "[1]", "--data.path", str(bad),
                           "--trainer.default_root_dir",
                           str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DataError") and "record 0" in last and "prompt" in last
    assert "Traceback" not in proc.stderr
    assert not [p for p in (tmp_path / "runs").rglob("version_*")]


def test_a_folder_that_is_no_known_layout_says_what_each_expects(tmp_path):
    from editing.data import load_benchmark

    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="patterns/ and tuples/.*save_to_disk"):
        load_benchmark(str(tmp_path / "stuff"))


def test_the_step_checks_target_logprob_is_the_same_in_chunks(tiny_llama):
    """The step checks score the requests in length-sorted forwards of `forward_batch_size`; the mean
    is each request's own mean target log-probability averaged, whatever the chunks."""
    from editing.editors import checks

    ed = FT(base_model=tiny_llama, layers=[1], forward_batch_size=2)
    one = []
    for r in REQS:
        lp, b = ed.target_logprobs([r.text], [r.target_new])
        one.append(float(lp.gather(-1, b.target_ids[..., None]).squeeze(-1).sum() / b.target_mask.sum()))
    torch.testing.assert_close(checks.target_logprob(ed, REQS), sum(one) / len(one), atol=1e-5, rtol=1e-5)
