"""Every shipped config parses and builds its editor and data module (on a tiny model)."""
from pathlib import Path

import pytest

from editing.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_builds(config, tiny_llama, tmp_path):
    args = ["--config", str(config), "--model.init_args.base_model", tiny_llama,
            "--trainer.default_root_dir", str(tmp_path), "--data.num_edits", "3"]
    if "\n    layers:" in config.read_text():  # the tiny model has 3 layers
        args += ["--model.init_args.layers", "[1]"]
    if "\n    layer:" in config.read_text():  # GRACE's one layer
        args += ["--model.init_args.layer", "1"]
    if "router_layer:" in config.read_text():  # MELO: the router below its LoRA layers
        args += ["--model.init_args.router_layer", "0", "--model.init_args.lora_layers", "[1, 2]"]
    if "high_layers:" in config.read_text():  # JEEP's high region must lie above the low one
        args += ["--model.init_args.high_layers", "[2]"]
    cli = main(args, run=False)
    assert cli.model.method in config.stem
    assert len(cli.datamodule.requests) == 3
    if getattr(cli.model, "trained", False):   # a training run (MEND): bounded by steps, validated
        assert cli.trainer.max_steps > 0 and cli.trainer.limit_val_batches > 0
    else:                                       # an edit run: one pass over the edit steps
        assert cli.trainer.max_epochs == 1
