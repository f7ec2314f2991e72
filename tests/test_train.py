"""`lopt train` end to end on a tiny model: every method, resume, checkpoints, config files, bad input."""
from __future__ import annotations

import json
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.cli import main
from lopt.recipes.sft import TrainConfig, train
from lopt.runtime.checkpoints import latest_checkpoint

from conftest import addition_rows, save_tiny, write_jsonl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", addition_rows())


def base_args(tiny_dir, qa_file, out, *extra):
    return ["train", "--model", str(tiny_dir), "--dataset", str(qa_file), "--output-dir", str(out),
            "--batch-size", "4", "--lr", "1e-3", "--no-progress", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lopt", "e2e", "freeze-lower", "lora"])
def test_cli_every_method(tiny_dir, qa_file, tmp_path, method, capsys):
    out = tmp_path / method
    rc = main(base_args(tiny_dir, qa_file, out, "--method", method, "--max-steps", "3",
                        "--sample-prompt", "What is 2 + 2?"))
    assert rc == 0
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    for r in m:
        assert set(r) >= {"step", "loss", "aux_loss", "lr", "tokens_per_s", "peak_mem_mb"}
        assert r["peak_mem_mb"] > 0 and r["tokens_per_s"] > 0
    # lopt's default (the task gradient every 4th step, lambda 0) computes no local loss
    assert all(r["aux_loss"] is None for r in m)
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["method"] == method and info["options"]["max_steps"] == 3
    assert info["versions"]["transformers"].startswith("5.")
    # the final checkpoint is plain transformers, with the tokenizer and its chat template
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    assert not any("lora" in n for n, _ in model.named_parameters())
    printed = capsys.readouterr().out
    assert "task loss first -> last" in printed and "model answer:" in printed
    # the summary shows only the rows that apply: no aux-loss row when no local loss was computed
    assert ("aux loss first -> last" in printed) == any(r["aux_loss"] is not None for r in m)
    assert "- -> -" not in printed


def test_summary_shows_only_the_rows_that_apply(capsys):
    from lopt.cli import print_summary

    s = {"method": "lopt", "block_ranges": [[0, 2], [2, 4]], "steps": 3, "total_steps": 3, "interrupted": False,
         "loss_first": 2.0, "loss_last": 1.5, "aux_first": None, "aux_last": None, "tokens_per_s": 120.0,
         "peak_mem_mb": None, "output_dir": "runs/x"}
    print_summary(s, 4.0, None, None)
    out = capsys.readouterr().out
    assert "task loss first -> last" in out and "2.0000 -> 1.5000" in out and "120" in out
    assert "aux loss" not in out and "peak memory" not in out and "| - " not in out
    print_summary(s | {"aux_first": 0.5, "aux_last": 0.25, "peak_mem_mb": 512.0}, 4.0, None, None)
    out = capsys.readouterr().out
    assert "0.5000 -> 0.2500 |" in out and "512 MiB" in out


@pytest.mark.parametrize("task_grad_every", [None, 0])  # lopt's default; the paper's pure local learning
def test_lopt_trains_and_checkpoint_matches(tiny_dir, qa_file, tmp_path, task_grad_every):
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_dir), dataset=str(qa_file), output_dir=str(out), batch_size=8,
                      lr=3e-3, max_steps=12, progress=False, warmup_ratio=0.0, task_grad_every=task_grad_every)
    res = train(cfg)
    hist = res.summary
    assert hist["loss_last"] < hist["loss_first"]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    res.model.eval()
    with torch.no_grad():
        ref = res.model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["block_ranges"] == [[0, 2], [2, 4]]
    # the default keeps the tiny model's tied head tied; the paper's setting unties it
    assert (info["untied_lm_head"], info["tied_lm_head"]) == ((False, True) if task_grad_every is None else (True, False))
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["tie_word_embeddings"] is (task_grad_every is None)  # untied: the LM head got its own copy


@pytest.mark.parametrize("method", ["lopt", "lora"])
def test_resume_reproduces_uninterrupted_run(tiny_dir, qa_file, tmp_path, method):
    common = dict(model=str(tiny_dir), dataset=str(qa_file), batch_size=4, lr=2e-3, max_steps=6,
                  progress=False, method=method, lora_r=4)
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), **common)).summary

    def stop_at_3(rec, state):
        if state.step == 3:
            state.stop_requested = True  # the Ctrl-C path: checkpoint, then stop

    part_dir = tmp_path / "part"
    res = train(TrainConfig(output_dir=str(part_dir), **common), callbacks=[stop_at_3])
    assert res.summary["interrupted"] and res.summary["steps"] == 3
    assert latest_checkpoint(part_dir).name == "checkpoint-3"
    assert not (part_dir / "model.safetensors").exists()  # no final model for an interrupted run
    train(TrainConfig(output_dir=str(part_dir), resume="latest", **common))
    a = [r["loss"] for r in read_metrics(tmp_path / "full")]
    b = [r["loss"] for r in read_metrics(part_dir)]
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert full["steps"] == 6


def test_checkpoint_every_and_reload(tiny_dir, qa_file, tmp_path):
    out = tmp_path / "ck"
    assert main(base_args(tiny_dir, qa_file, out, "--max-steps", "4", "--save-every", "2")) == 0
    ck = out / "checkpoint-2"
    assert (ck / "trainer_state.pt").is_file() and (ck / "lopt_run.json").is_file()
    AutoModelForCausalLM.from_pretrained(ck)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary leftovers


def test_sigint_saves_a_checkpoint(tiny_dir, qa_file, tmp_path):
    import os

    def interrupt(rec, state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "int"
    res = train(TrainConfig(model=str(tiny_dir), dataset=str(qa_file), output_dir=str(out), max_steps=5,
                            progress=False), callbacks=[interrupt])
    assert res.summary["interrupted"] and res.summary["steps"] == 2
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()


def test_yaml_config_and_flag_override(tiny_dir, qa_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "yaml"
    cfg.write_text(f"model: {tiny_dir}\ndataset: {qa_file}\noutput-dir: {out}\nmax_steps: 5\n"
                   f"method: e2e\nprogress: false\nlr: 0.001\n")
    assert main(["train", "--config", str(cfg), "--max-steps", "2"]) == 0
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["options"]["max_steps"] == 2 and info["method"] == "e2e"


@pytest.mark.parametrize("extra, match", [
    (["--num-blocks", "9"], "num_blocks must be between 2"),
    (["--boundaries", "3", "1"], "strictly increasing"),
    (["--dataset", "/nonexistent/data.jsonl"], "nonexistent"),
    (["--model", "/nonexistent/model"], "nonexistent"),
    (["--gradient-checkpointing", "last-block", "--method", "e2e"], "needs a method with a boundary"),
    (["--resume"], "nothing to resume"),
])
def test_bad_input_is_one_clear_line(tiny_dir, qa_file, tmp_path, capsys, extra, match):
    rc = main(base_args(tiny_dir, qa_file, tmp_path / "bad", "--max-steps", "1", *extra))
    err = capsys.readouterr().err
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("lopt train: error:")]
    assert line and match in line[0], err
    assert "Traceback" not in err


def test_yaml_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option 'learning_rate'" in capsys.readouterr().err


def test_gradient_checkpointing_last_block_same_loss(tiny_dir, qa_file, tmp_path):
    common = dict(model=str(tiny_dir), dataset=str(qa_file), batch_size=4, max_steps=3, progress=False,
                  task_grad_every=0)
    a = train(TrainConfig(output_dir=str(tmp_path / "a"), **common)).summary
    b = train(TrainConfig(output_dir=str(tmp_path / "b"), gradient_checkpointing="last-block", **common)).summary
    assert b["loss_last"] == pytest.approx(a["loss_last"], rel=1e-5)
    assert b["aux_last"] == pytest.approx(a["aux_last"], rel=1e-5)


def test_eval_every_logs_to_metrics(tiny_dir, qa_file, tmp_path):
    out = tmp_path / "ev"
    res = train(TrainConfig(model=str(tiny_dir), dataset=str(qa_file), output_dir=str(out), max_steps=4,
                            progress=False, eval_every=2, eval_tasks=[f"task-loss:{qa_file}"], eval_limit=8))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    losses = [next(iter(r["eval"].values()))["loss"] for r in evals]
    assert all(0 < x < 20 for x in losses)
    assert res.summary["eval"] == evals[-1]["eval"]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]


def test_anchor_and_lower_every_resume(tiny_dir, qa_file, tmp_path):
    common = dict(model=str(tiny_dir), dataset=str(qa_file), batch_size=4, lr=2e-3, max_steps=6,
                  progress=False, local_objective="anchor", lower_every=2, task_grad_every=0)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **common))
    full = read_metrics(tmp_path / "full")
    # the lower blocks are updated on steps 1, 3, 5 (0-based 0, 2, 4) only
    assert [r["aux_loss"] is not None for r in full] == [True, False] * 3

    def stop_at_3(rec, state):
        state.stop_requested = state.step == 3

    train(TrainConfig(output_dir=str(tmp_path / "part"), **common), callbacks=[stop_at_3])
    train(TrainConfig(output_dir=str(tmp_path / "part"), resume="latest", **common))
    part = read_metrics(tmp_path / "part")
    assert [r["loss"] for r in part] == pytest.approx([r["loss"] for r in full], rel=1e-5, abs=1e-6)
    def aux(rs):
        return [-1.0 if r["aux_loss"] is None else r["aux_loss"] for r in rs]
    assert aux(part) == pytest.approx(aux(full), rel=1e-5, abs=1e-9)
