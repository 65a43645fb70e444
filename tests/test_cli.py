"""The command line end to end on a tiny model: fit, test from the checkpoint, the unedited baseline,
and the same metrics from a two-process DDP test run as from one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def rounded(x):
    """JSON with every float rounded to 6 decimals (per-case records compared across processes)."""
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return [rounded(v) for v in x] if isinstance(x, list) else x


def results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


@pytest.fixture(scope="module")
def fitted(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = cli("fit", "--config", "configs/ft.yaml", "--model.init_args.base_model", tiny_dirs["llama"],
              "--model.init_args.layers", "[1]", "--model.init_args.lr", "0.05", "--data.num_edits", 6,
              "--data.edit_batch_size", 2, "--trainer.default_root_dir", root / "fit", "--test_after_fit", "true")
    ckpts = list((root / "fit").rglob("edit.safetensors"))
    assert len(ckpts) == 1 and "edit file:" in out and not list((root / "fit").rglob("*.ckpt"))
    return root, ckpts[0], out


def test_fit_then_test_prints_table_and_writes_results(fitted):
    root, ckpt, out = fitted
    [res] = results(root / "fit")
    assert res["method"] == "ft" and res["num_edits"] == 6 and res["edit_batch_size"] == 2
    for key in ("reliability", "generality", "locality", "score", "rewrite_acc", "locality_unchanged"):
        assert key in res["metrics"]
    assert res["timing"]["edit"] > 0 and res["timing"]["evaluate"] > 0
    assert "| ft |" in out.replace("  ", " ") or "ft" in out
    # the checkpoint is the edit, not the model
    assert ckpt.stat().st_size < 2_000_000


def test_ddp_test_matches_one_process(fitted, tiny_dirs):
    root, ckpt, _ = fitted
    common = ["test", "--config", "configs/ft.yaml", "--model.init_args.base_model", tiny_dirs["llama"],
              "--model.init_args.layers", "[1]", "--data.num_edits", 6, "--data.eval_batch_size", 2,
              "--ckpt_path", ckpt, "--trainer.accelerator", "cpu"]
    cli(*common, "--trainer.default_root_dir", root / "one")
    cli(*common, "--trainer.default_root_dir", root / "ddp", "--trainer.strategy", "ddp", "--trainer.devices", 2)
    [one], [ddp] = results(root / "one"), results(root / "ddp")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert one["metrics"].keys() == ddp["metrics"].keys()
    for k, v in one["metrics"].items():
        assert ddp["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert one["intervals"] == ddp["intervals"]
    lines = [sorted((root / n).rglob("cases.jsonl"))[0].read_text().splitlines() for n in ("one", "ddp")]
    assert len(lines[0]) == 6 and [rounded(json.loads(l)) for l in lines[0]] == [rounded(json.loads(l)) for l in lines[1]]
    [fitted_res] = results(root / "fit")
    for k, v in fitted_res["metrics"].items():
        assert one["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_noedit_baseline(tiny_dirs, tmp_path):
    cli("test", "--config", "configs/noedit.yaml", "--model.init_args.base_model", tiny_dirs["llama"],
        "--data.num_edits", 4, "--trainer.default_root_dir", tmp_path)
    [res] = results(tmp_path)
    assert res["method"] == "noedit"
    assert res["metrics"]["locality_unchanged"] == 100.0
    assert res["metrics"]["neighborhood_unchanged"] == 100.0
    assert res["metrics"]["ppl_ratio"] == 1.0
    assert res["metrics"]["neighborhood_gen"] == res["metrics"]["locality_gen"] == res["metrics"]["gen_locality"] == 100.0


def test_memit_ddp_fit_shards_targets_and_matches_one_process(tiny_dirs, tmp_path):
    """Under DDP each rank optimises a share of the target vectors and all ranks gather them: the edit
    written by a two-process fit equals the one-process edit (up to float rounding of the batching)."""
    import torch

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Text number {i} is about the capital of a country and its people." for i in range(40)))
    common = ["fit", "--config", "configs/memit.yaml", "--model.init_args.base_model", tiny_dirs["llama"],
              "--model.init_args.layers", "[0, 1]", "--model.init_args.corpus", corpus,
              "--model.init_args.stats_samples", 40, "--model.init_args.stats_max_length", 32,
              "--model.init_args.template_spec", "[[3, 2]]", "--model.init_args.v_steps", 8,
              "--model.init_args.mom2_update_weight", 10.0, "--data.num_edits", 5,
              "--trainer.accelerator", "cpu"]
    cli(*common, "--trainer.default_root_dir", tmp_path / "one")
    cli(*common, "--trainer.default_root_dir", tmp_path / "ddp", "--trainer.strategy", "ddp", "--trainer.devices", 2)
    from editing.edit_file import read_edit_file

    [one], [ddp] = (list((tmp_path / n).rglob("edit.safetensors")) for n in ("one", "ddp"))
    h1 = read_edit_file(one)["state_dict"]["history._extra_state"]
    h2 = read_edit_file(ddp)["state_dict"]["history._extra_state"]
    assert len(h1) == len(h2) == 1 and h1[0].keys() == h2[0].keys() == {"0", "1"}
    for layer in h1[0]:
        d1 = h1[0][layer][0].double() @ h1[0][layer][1].double().T
        d2 = h2[0][layer][0].double() @ h2[0][layer][1].double().T
        assert d1.norm() > 0
        assert torch.allclose(d1, d2, rtol=1e-3, atol=1e-4 * float(d1.abs().max())), layer


def test_console_output_is_a_compact_table_without_noise(tiny_dirs, tmp_path):
    """What a person sees after `fit --test_after_fit true`: the headline metrics as rows, the edited
    model beside the unedited one on the same cases, a reading of each, progress in cases; none of
    Lightning's notices, expected warnings or its own unrounded metric printout (all back with --verbose)."""
    args = [sys.executable, "cli.py", "fit", "--config", "configs/ft.yaml", "--model.init_args.base_model",
            tiny_dirs["llama"], "--model.init_args.layers", "[1]", "--data.num_edits", 4,
            "--trainer.default_root_dir", tmp_path, "--test_after_fit", "true"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, seen = proc.stdout, proc.stdout + proc.stderr
    assert "editing 4 cases of pararel_counterfactual" in out and "4/4 cases" in out
    table = [l for l in out.splitlines() if l.startswith("| ")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["metric", "edited", "unedited",
                                                                   "what it measures (% of cases)"]
    rows = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in table[1:]}
    assert list(rows) == ["reliability", "generality", "locality", "score", "gen_reliability", "gen_generality",
                          "gen_locality", "gen_score", "ppl_ratio"]
    [res] = results(tmp_path)
    assert res["unedited"]["ppl_ratio"] == 1.0 and res["unedited"]["gen_locality"] == 100.0
    assert set(res["intervals"]) >= {"reliability", "generality", "locality", "score", "gen_reliability"}
    [cases_file] = sorted(tmp_path.rglob("cases.jsonl"))
    cases = [json.loads(l) for l in cases_file.read_text().splitlines()]
    assert [c["case"] for c in cases] == [0, 1, 2, 3] and all("generated" in p for p in cases[0]["prompts"])
    for key, (edited, unedited, meaning) in rows.items():
        fmt = ".3f" if key == "ppl_ratio" else ".1f"   # a ratio near 1 gets three decimals
        assert edited == f"{res['metrics'][key]:{fmt}}" and unedited == f"{res['unedited'][key]:{fmt}}" and meaning
    assert rows["reliability"][2] == "teacher-forced: new target outscores the true one on edit prompts"
    assert max(len(l) for l in table) <= 110  # fits a terminal
    for noise in ("Test metric", "DataLoader 0", "litlogger", "eval mode", "LeafSpec", "GPU available",
                  "Seed set", "weights_only", "v_num", "Epoch 0"):
        assert noise not in seen, noise
    # --verbose brings the notices back
    proc = subprocess.run([str(a) for a in args] + ["--verbose", "true"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "Test metric" in proc.stdout and "eval mode" in proc.stderr


def test_unedited_column_is_the_unedited_model(tiny_dirs, tmp_path):
    """results.json's `unedited` is the unedited model on the same cases: NoEdit's own metrics, and
    the disabled model's for an edit."""
    cli("test", "--config", "configs/noedit.yaml", "--model.init_args.base_model", tiny_dirs["llama"],
        "--data.num_edits", 4, "--trainer.default_root_dir", tmp_path / "noedit")
    [base] = results(tmp_path / "noedit")
    assert base["unedited"] == base["metrics"]
    cli("fit", "--config", "configs/ft.yaml", "--model.init_args.base_model", tiny_dirs["llama"],
        "--model.init_args.layers", "[1]", "--model.init_args.lr", "0.05", "--data.num_edits", 4,
        "--trainer.default_root_dir", tmp_path / "ft", "--test_after_fit", "true")
    [ft] = results(tmp_path / "ft")
    for k, v in base["metrics"].items():
        assert ft["unedited"][k] == pytest.approx(v, abs=1e-6), k
    assert ft["metrics"]["reliability"] != ft["unedited"]["reliability"]
