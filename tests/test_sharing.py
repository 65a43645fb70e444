"""Edits that leave the toolkit, through the command line on a tiny model: the edit a `fit` writes is
a safe file; a planted pickle handed to every loading path is refused and never runs; a checkpoint of
another method or base model is refused naming both; `export` gives a directory plain transformers
load with the edited logits; `predict` prints and writes edited vs unedited continuations; edit
directories (save_pretrained / from_pretrained); results.json names its edit file; metrics.csv."""
import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing.edit_file import EditFileError
from editing.editors import FT, CheckpointMismatchError, Editor
from tests.test_locate import REQS

ROOT = Path(__file__).resolve().parents[1]
FT_ARGS = ["--config", "configs/ft.yaml", "--model.init_args.layers", "[1]"]


def cli(*args, code=0, env=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def fitted(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    llama = tiny_dirs["llama"]
    cli("fit", *FT_ARGS, "--model.init_args.base_model", llama, "--model.init_args.lr", "0.05",
        "--data.num_edits", 2, "--trainer.default_root_dir", root / "fit", "--test_after_fit", "true")
    [path] = (root / "fit").rglob("edit.safetensors")
    return root, path, llama


def test_fit_writes_a_safe_edit_file_logged_every_step(fitted):
    root, path, _ = fitted
    assert not list(root.rglob("*.ckpt"))
    assert path.read_bytes()[:1] != b"\x80" and not path.read_bytes().startswith(b"PK")   # no pickle of any kind
    [res] = [json.loads(p.read_text()) for p in root.rglob("results.json")]
    assert res["edit_file"] == str(path)
    [metrics] = root.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("edit/num_edits")]
    assert [float(r["edit/num_edits"]) for r in rows] == [1.0, 2.0]   # one row per edit step


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))   # unpickling would create the marker file


def test_a_planted_pickle_is_refused_by_every_loading_path(fitted, tmp_path):
    _, _, llama = fitted
    marker = tmp_path / "pwned"
    bad = tmp_path / "edit.safetensors"
    torch.save({"state_dict": Planted(marker), "hyper_parameters": {"x": Planted(marker)}}, bad)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "edit.safetensors").write_bytes(pickle.dumps(Planted(marker)))
    (tmp_path / "dir" / "edit_config.json").write_text(json.dumps(
        {"class_path": "editing.editors.ft.FT", "hyper_parameters": {"base_model": str(llama), "layers": [1]}}))
    with pytest.raises(EditFileError, match="not an edit file.*pickle"):
        FT(base_model=str(llama), layers=[1]).load_edit(bad)
    with pytest.raises(EditFileError, match="not an edit file.*pickle"):
        Editor.from_pretrained(tmp_path / "dir")
    for sub, extra in (("test", []), ("predict", ["--data.prompts", "Hello"]), ("export", ["--out", tmp_path / "x"])):
        proc = cli(sub, *FT_ARGS, "--model.init_args.base_model", llama, "--data.num_edits", 1, "--ckpt_path", bad,
                   "--trainer.default_root_dir", tmp_path / "runs", *extra, code=2)
        [line] = proc.stderr.strip().splitlines()[-1:]
        assert line.startswith("error: EditFileError:") and str(bad) in line and "pickle" in line, proc.stderr
        assert not marker.exists()
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_of_another_method_or_base_model_is_refused(fitted, tiny_dirs, tmp_path):
    _, path, llama = fitted
    proc = cli("test", "--config", "configs/memit.yaml", "--model.init_args.base_model", llama, "--ckpt_path", path,
               "--trainer.default_root_dir", tmp_path, code=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "method 'ft'" in last and "method 'memit'" in last and str(path) in last
    proc = cli("test", *FT_ARGS, "--model.init_args.base_model", tiny_dirs["gpt2"], "--ckpt_path", path,
               "--trainer.default_root_dir", tmp_path, code=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "CheckpointMismatchError" in last and str(llama) in last and str(tiny_dirs["gpt2"]) in last
    assert not list(tmp_path.rglob("results.json"))


def logits(model, tok, texts):
    b = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**b).logits.float()


def test_cli_export_loads_with_plain_transformers_and_matches(fitted, tmp_path):
    _, path, llama = fitted
    out = tmp_path / "exported"
    cli("export", *FT_ARGS, "--model.init_args.base_model", llama, "--ckpt_path", path, "--out", out)
    editor = FT(base_model=str(llama), layers=[1])
    editor.load_edit(path)
    texts = [f[0] for step in editor.edit_log for f in step["facts"]]
    code = ("import sys, json, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "b = t(json.loads(sys.argv[2]), return_tensors='pt', padding=True); "
            "torch.save(m(**b).logits.detach(), sys.argv[3]); "
            "assert not any(k.startswith('editing') for k in sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(out), json.dumps(texts), str(tmp_path / "l.pt")], check=True,
                   cwd=tmp_path, capture_output=True)
    plain = torch.load(tmp_path / "l.pt")
    edited = logits(editor.model, editor.tokenizer, texts)
    assert (plain - edited).abs().max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(str(llama))
    assert (logits(base, editor.tokenizer, texts) - edited).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    assert "ft" in card and str(llama) in card and texts[0] in card and "## Scores" in card
    # offline, --push_to_hub says so in one line (the directory is written first)
    proc = cli("export", *FT_ARGS, "--model.init_args.base_model", llama, "--ckpt_path", path, "--out",
               tmp_path / "again", "--push_to_hub", "someone/edited", code=2, env={"HF_HUB_OFFLINE": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    assert "push_to_hub someone/edited" in last and "offline" in last.lower() or "HF_HUB_OFFLINE" in last
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_cli_predict_prints_and_writes_edited_beside_unedited(fitted, tmp_path):
    _, path, llama = fitted
    editor = FT(base_model=str(llama), layers=[1])
    editor.load_edit(path)
    edited_prompt = editor.edit_log[0]["facts"][0][0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{edited_prompt}\nThe weather today is\n")
    proc = cli("predict", *FT_ARGS, "--model.init_args.base_model", llama, "--ckpt_path", path,
               "--data.prompts", prompts, "--trainer.default_root_dir", tmp_path)
    [out] = tmp_path.rglob("predictions.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [edited_prompt, "The weather today is"]
    assert rows == editor.compare([edited_prompt, "The weather today is"])
    assert rows[0]["changed"] and rows[0]["edited"] != rows[0]["unedited"]
    assert "| prompt | edited model | unedited model |" in proc.stdout and edited_prompt in proc.stdout
    # two processes answer a share each; rank 0 writes all of them in order
    cli("predict", *FT_ARGS, "--model.init_args.base_model", llama, "--ckpt_path", path, "--data.prompts", prompts,
        "--trainer.default_root_dir", tmp_path / "ddp", "--trainer.strategy", "ddp", "--trainer.devices", 2,
        "--trainer.accelerator", "cpu")
    [ddp] = (tmp_path / "ddp").rglob("predictions.jsonl")
    assert [json.loads(line) for line in ddp.read_text().splitlines()] == rows


def test_an_edit_directory_round_trips_and_refuses_another_base(tiny_dirs, tmp_path):
    ed = FT(base_model=str(tiny_dirs["llama"]), layers=[1], steps=5, lr=5e-2)
    ed.edit(REQS[:2])
    d = ed.save_pretrained(tmp_path / "my-edit")
    assert sorted(p.name for p in d.iterdir()) == ["edit.safetensors", "edit_config.json"]
    again = Editor.from_pretrained(d)
    assert type(again) is FT and again.edit_log == ed.edit_log
    texts = [r.text for r in REQS[:2]]
    assert torch.equal(logits(again.model, again.tokenizer, texts), logits(ed.model, ed.tokenizer, texts))
    with pytest.raises(CheckpointMismatchError, match="base model"):
        Editor.from_pretrained(d, base_model=str(tiny_dirs["gpt2"]))
    from editing.editors import MEMIT
    with pytest.raises(CheckpointMismatchError, match="not a MEMIT"):
        MEMIT.from_pretrained(d)


def test_a_wheel_install_gives_the_editing_command_and_its_configs(tmp_path):
    """`pip install` of the built wheel (not -e): the `editing` command with the same subcommands as
    cli.py, and configs found by name from the package, run outside the repository."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    import shutil
    src = tmp_path / "src"   # built from a copy, so that the build writes nothing into the repository
    shutil.copytree(ROOT / "editing", src / "editing", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp_path / "wheel", src], check=True, env=env,
                   capture_output=True, cwd=tmp_path)
    [wheel] = (tmp_path / "wheel").glob("editing-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True, env=env,
                   capture_output=True, cwd=tmp_path)
    env["PYTHONPATH"] = str(tmp_path / "site")
    command = str(tmp_path / "site" / "bin" / "editing")

    def run(*args):
        proc = subprocess.run([command, *args], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert all(s in run("--help") for s in ("fit", "test", "predict", "export"))
    for name, cls in (("smollm2/memit", "editing.editors.MEMIT"), ("published/ireva_gptj", "editing.editors.IReVa")):
        printed = run("fit", "--config", name, "--print_config")
        assert f"class_path: {cls}" in printed, (name, printed[:2000])
    where = subprocess.run([sys.executable, "-c", "import editing; print(editing.__file__)"], env=env, text=True,
                           capture_output=True, cwd=tmp_path).stdout
    assert where.startswith(str(tmp_path / "site")), where
