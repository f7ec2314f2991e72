"""The recipes' defaults under method lopt after study v2: the task gradient through the boundary every
4th step, lambda 0, the lower half at lr, a tied LM head kept tied (when the model ties it). The
engine (lopt.wrap) keeps the paper's pure local learning; the study and the bench spell out every
mechanism, so their runs do not change with the recipes' defaults."""
from __future__ import annotations

import pytest

import lopt
from lopt.cli import build_parser
from lopt.engine.config import engine_defaults
from lopt.recipes.sft import TrainConfig
from lopt.recipes.study import plan
from lopt.recipes.trl_bridge import RLConfig

from conftest import make_tiny_model


@pytest.mark.parametrize("cls", [TrainConfig, RLConfig])
def test_lopt_defaults_to_the_study_s_best_configuration(cls):
    c = cls()
    assert (c.method, c.task_grad_every, c.lambda_aux, c.tied_head) == ("lopt", 4, 0.0, None)
    paper = cls(task_grad_every=0)  # the paper's pure local learning, still one flag away
    assert (paper.lambda_aux, paper.tied_head) == (10.0, False)
    for method in ("e2e", "freeze-lower", "lora", "lisa", "badam"):
        other = cls(method=method)
        assert (other.task_grad_every, other.tied_head) == (0, False), method
    assert cls(tied_head=False).tied_head is False


def test_sharded_runs_keep_the_boundary_shut_or_the_head_untied():
    pipe = TrainConfig(pipeline=True)
    assert (pipe.task_grad_every, pipe.lambda_aux, pipe.tied_head) == (0, 10.0, False)
    pipe.validate()  # the defaults must not make --pipeline invalid
    fsdp = TrainConfig(fsdp=True)
    assert (fsdp.task_grad_every, fsdp.tied_head) == (4, False)


def test_the_lower_half_trains_at_lr_under_task_grad_every_and_at_a_tenth_without():
    cfg = TrainConfig(lr=1e-3)
    w = lopt.wrap(make_tiny_model("llama", tie=False), config=cfg.lopt_config())
    assert {g["name"]: g["lr"] for g in w.param_groups(cfg.lr)}["lower"] == pytest.approx(1e-3)
    paper = TrainConfig(lr=1e-3, task_grad_every=0)
    w = lopt.wrap(make_tiny_model("llama", tie=False), config=paper.lopt_config())
    assert {g["name"]: g["lr"] for g in w.param_groups(paper.lr)}["lower"] == pytest.approx(1e-4)


def test_the_default_keeps_a_tied_head_tied_and_leaves_an_untied_model_as_it_is():
    tied = lopt.wrap(make_tiny_model("llama", tie=True), config=TrainConfig().lopt_config())
    assert tied.tied and not tied.untied
    assert tied.model.lm_head.weight is tied.model.get_input_embeddings().weight
    untied = lopt.wrap(make_tiny_model("llama", tie=False), config=TrainConfig().lopt_config())
    assert not untied.tied and not untied.untied
    off = lopt.wrap(make_tiny_model("llama", tie=True), config=TrainConfig(tied_head=False).lopt_config())
    assert not off.tied and off.untied
    # the engine's own default is unchanged: the paper's mechanism, head untied
    plain = lopt.wrap(make_tiny_model("llama", tie=True))
    assert plain.lopt_config.task_grad_every == 0 and plain.untied


def test_cli_flags_override_the_defaults():
    ns = build_parser().parse_args(["train", "--task-grad-every", "0", "--no-tied-head"])
    assert ns.task_grad_every == 0 and ns.tied_head is False
    ns = build_parser().parse_args(["train", "--tied-head"])
    assert ns.tied_head is True


def test_commands_spell_out_what_the_defaults_would_change():
    def command(**kw):
        return plan.train_command(TrainConfig(**kw), pinned=lambda name: False)

    assert "--task-grad-every" not in command(method="e2e")
    assert "--lambda-aux" not in command(method="e2e")
    paper = command(task_grad_every=0)
    assert "--task-grad-every 0" in paper and "tied-head" not in paper and "--lambda-aux" not in paper
    assert "--no-tied-head" in command(tied_head=False)
    assert "task-grad-every" not in command() and "tied-head" not in command()
    # the study's configurations name their mechanism: none of them picks up the recipes' defaults
    assert TrainConfig(**engine_defaults({"method": "lopt"})).task_grad_every == 0
    cfg = plan.train_config(plan.configs()["lopt-tg4"], 0, plan.V2, lr=1e-4, model=None, dataset="d.jsonl",
                            run_dir=plan.Path("r"))
    assert cfg.tied_head is False and "--no-tied-head" in plan.train_command(cfg)


@pytest.mark.parametrize("option", [{"local_objective": "anchor"}, {"lower_every": 2}])
def test_local_loss_options_without_a_local_loss_are_refused(option):
    (key, value), = option.items()
    with pytest.raises(lopt.LoPTError, match=f"--{key.replace('_', '-')} {value} has no effect"):
        TrainConfig(**option).validate()  # lopt's default: lambda 0 under --task-grad-every 4
    TrainConfig(task_grad_every=0, **option).validate()  # the paper's local learning takes them
    TrainConfig(lambda_aux=1.0, **option).validate()  # so does a local loss beside the open steps
