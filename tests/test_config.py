"""One home for options: every recipe's options are dataclass fields with their help beside them; the
CLI flags, their --help and the YAML keys are generated from those fields."""
from __future__ import annotations

from dataclasses import fields

import pytest

from lopt.cli import build_parser, main
from lopt.config import RecipeConfig, RLConfig, TrainConfig
from lopt.engine.config import EngineConfig
from lopt.methods import LoPTConfig, get_method, method_names
from lopt.recipes.dpo import DPORunConfig
from lopt.recipes.grpo import GRPORunConfig


@pytest.mark.parametrize("cls", [TrainConfig, RLConfig, GRPORunConfig, DPORunConfig, LoPTConfig])
def test_every_option_has_help(cls):
    missing = [f.name for f in fields(cls) if f.metadata.get("cli", True) and not f.metadata.get("help")]
    assert missing == []


def test_recipes_share_one_base_and_methods_bring_their_options():
    assert issubclass(TrainConfig, RecipeConfig) and issubclass(RLConfig, RecipeConfig)
    assert issubclass(RecipeConfig, LoPTConfig) and issubclass(LoPTConfig, EngineConfig)
    # Each method's options are declared once, in its own file, and reach every config.
    for name in method_names():
        opts = get_method(name).options
        for f in fields(opts) if opts else ():
            assert f.name in TrainConfig.field_names() and f.name in GRPORunConfig.field_names()
            assert f.name not in {g.name for g in fields(EngineConfig)}
    assert {"lisa_layers", "badam_block_size", "lora_r"} <= {f.name for f in fields(LoPTConfig)}


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("grpo", GRPORunConfig), ("dpo", DPORunConfig)])
def test_every_field_is_a_flag_with_its_help(command, cls, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert (flag in text) == f.metadata.get("cli", True), flag
    assert "method: lisa:" in text and "method: the boundary (lopt, freeze-lower):" in text


def test_flags_parse_into_the_config():
    ns = build_parser().parse_args(["train", "--method", "lisa", "--lisa-layers", "2", "--boundaries", "1", "3",
                                    "--max-grad-norm", "none", "--lora-target-modules", "q_proj", "v_proj"])
    from lopt.cli import train_config_from_args

    cfg = train_config_from_args(ns)
    assert (cfg.method, cfg.lisa_layers, cfg.boundaries, cfg.max_grad_norm) == ("lisa", 2, [1, 3], None)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("command", ["train", "demo", "grpo", "dpo"])
def test_print_config_round_trips_through_config(command, tmp_path, capsys):
    assert main([command, "--print-config", "--lr", "3e-4", "--method", "badam", "--badam-order", "random"]) == 0
    first = capsys.readouterr().out
    assert "# order of the blocks" in first and 'badam_order: "random"' in first and "lr: 0.0003" in first
    path = tmp_path / "c.yaml"
    path.write_text(first)
    assert main([command, "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == first
