"""`--resume` continues the run it names, with the options the run recorded (issue 31): a tiny Llama,
40 GSM8K rows, `--max-steps 4 --save-every 2`. The last step is a checkpoint too; options given with
--resume override (one line each), --max-steps may grow; an override that makes the checkpoint
meaningless is one line and writes nothing."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lopt.cli import build_parser, config_from_args, main
from lopt.recipes.dpo import DPORunConfig
from lopt.recipes.sft import TrainConfig

from conftest import SHARED_DATA, addition_rows, save_tiny, write_jsonl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-resume-run"))


def gsm8k_rows(start: int, n: int) -> list[dict]:
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    lines = path.read_text().splitlines()[start:start + n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("gsm8k-40") / "gsm8k40.jsonl", gsm8k_rows(0, 40))


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("gsm8k-other") / "other40.jsonl", gsm8k_rows(40, 40))


def train_args(tiny_dir, data, out, *extra):
    return ["train", "--model", str(tiny_dir), "--dataset", str(data), "--output-dir", str(out),
            "--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--max-length", "192", "--lr", "1e-3",
            "--no-progress", *extra]


def metrics_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics_lines(out)]


def loss_at(out: Path, step: int) -> float:
    return next(json.loads(x)["loss"] for x in metrics_lines(out) if json.loads(x)["step"] == step)


@pytest.fixture(scope="module")
def finished(tiny_dir, data, tmp_path_factory):
    """The uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("resume-run") / "r"
    assert main(train_args(tiny_dir, data, out)) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))}


def test_the_final_step_is_a_checkpoint(finished):
    assert sorted(p.name for p in finished.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (finished / "checkpoint-4" / "trainer_state.pt").is_file()
    assert steps(finished) == [1, 2, 3, 4]


def test_resume_alone_continues_the_run(finished, data, tmp_path, capsys):
    r = copy_run(finished, tmp_path / "r")
    shutil.rmtree(r / "checkpoint-4")
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(r)]) == 0
    err = capsys.readouterr().err
    assert f"resuming the run recorded in {r / 'checkpoint-2' / 'lopt_run.json'}" in err
    # the run's own model and data (not the embedded arithmetic set), its 4 steps
    assert f"rows of {json.loads((finished / 'lopt_run.json').read_text())['options']['dataset']}" in err, err
    assert "4 steps on" in err and "resumed at step 2" in err, err
    assert "(the run had" not in err  # nothing was overridden
    assert steps(r) == [1, 2, 3, 4]
    assert loss_at(r, 4) == pytest.approx(loss_at(finished, 4), rel=1e-5)
    assert (r / "checkpoint-4").is_dir()
    info = json.loads((r / "lopt_run.json").read_text())
    assert info["options"]["max_steps"] == 4 and info["options"]["dataset"] == json.loads(
        (finished / "lopt_run.json").read_text())["options"]["dataset"]


def test_resume_with_more_steps_extends_a_finished_run(finished, tmp_path, capsys):
    r = copy_run(finished, tmp_path / "r")
    before = metrics_lines(r)
    capsys.readouterr()
    assert main(["train", "--resume", "--max-steps", "6", "--save-total-limit", "1", "--output-dir", str(r)]) == 0
    err = capsys.readouterr().err
    assert "--max-steps 6 (the run had 4)" in err and "--save-total-limit 1 (the run had (unset))" in err, err
    assert "resumed at step 4" in err and "6 steps" in err, err
    after = metrics_lines(r)
    assert after[:4] == before  # steps 1-4 as they were
    assert steps(r) == [1, 2, 3, 4, 5, 6]
    # trained steps 5-6 only, and --save-total-limit holds
    assert sorted(p.name for p in r.glob("checkpoint-*")) == ["checkpoint-6"]
    assert json.loads((r / "lopt_run.json").read_text())["final_metrics"]["steps"] == 6


def test_resume_of_a_named_checkpoint_finds_its_run(finished, tmp_path):
    r = copy_run(finished, tmp_path / "r")
    ns = build_parser().parse_args(["train", "--resume", str(r / "checkpoint-2"), "--task-grad-every", "0"])
    cfg = config_from_args(ns, TrainConfig)
    recorded = json.loads((finished / "lopt_run.json").read_text())["options"]
    assert cfg.output_dir == str(r) and cfg.dataset == recorded["dataset"] and cfg.model == recorded["model"]
    assert (cfg.max_steps, cfg.max_length, cfg.save_every, cfg.lr) == (4, 192, 2, 1e-3)
    # lambda_aux was left to its default: it follows the new --task-grad-every (10 with 0), as a new run's
    assert recorded["lambda_aux"] == 0.0 and cfg.lambda_aux == 10.0


def test_a_config_file_counts_as_given(finished, tmp_path, capsys):
    yaml = tmp_path / "more.yaml"
    yaml.write_text("max_steps: 8\nlr: 0.002\n")
    capsys.readouterr()
    ns = build_parser().parse_args(["train", "--resume", "--output-dir", str(finished), "--config", str(yaml),
                                    "--lr", "0.003"])
    cfg = config_from_args(ns, TrainConfig)
    assert (cfg.max_steps, cfg.lr, cfg.save_every) == (8, 0.003, 2)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "(the run had" in line] == [
        "lopt train: --lr 0.003 (the run had 0.001)", "lopt train: --max-steps 8 (the run had 4)"]


@pytest.mark.parametrize("extra, says", [
    (["--model", "other-model"], "--model"),
    (["--method", "e2e"], "--method"),
    (["--num-blocks", "3"], "--num-blocks"),
    (["--dataset", "OTHER"], "--force"),
    (["--max-steps", "3"], "at least 4"),
])
def test_conflicting_resume_is_one_line_and_writes_nothing(finished, other_data, tmp_path, capsys, extra, says):
    r = copy_run(finished, tmp_path / "r")
    extra = [str(other_data) if x == "OTHER" else x for x in extra]
    before = snapshot(r)
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(r), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lopt train: error: ") and says in err[0], err
    assert snapshot(r) == before


def test_another_command_cannot_resume_the_run(finished, capsys):
    before = snapshot(finished)
    assert main(["grpo", "--resume", "--output-dir", str(finished)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of lopt train" in err[0], err
    assert snapshot(finished) == before
    with pytest.raises(ValueError, match="lopt train"):
        config_from_args(build_parser().parse_args(["dpo", "--resume", "--output-dir", str(finished)]),
                         DPORunConfig, command="dpo")


def test_force_allows_another_dataset(finished, other_data, tmp_path, capsys):
    r = copy_run(finished, tmp_path / "r")
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(r), "--dataset", str(other_data), "--force",
                 "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert f"--dataset {other_data} (the run had" in err, err
    assert steps(r) == [1, 2, 3, 4, 5, 6]
    assert json.loads((r / "lopt_run.json").read_text())["options"]["dataset"] == str(other_data)


# ----------------------------------------------------------------------------- lopt grpo


def test_grpo_resume_alone_continues_its_run(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    grpo_model = save_tiny(tmp_path / "tiny", eos_token_id=3)
    qa = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    g = tmp_path / "g"
    assert main(["grpo", "--model", str(grpo_model), "--task", str(qa), "--output-dir", str(g), "--batch-size", "4",
                 "--num-generations", "4", "--max-completion-length", "8", "--max-steps", "4", "--save-every", "2",
                 "--lr", "1e-3", "--no-progress", "--task-grad-every", "0"]) == 0
    assert sorted(p.name for p in g.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    part = copy_run(g, tmp_path / "part")
    shutil.rmtree(part / "checkpoint-4")
    capsys.readouterr()
    assert main(["grpo", "--resume", "--output-dir", str(part)]) == 0
    err = capsys.readouterr().err
    assert f"resuming {part / 'checkpoint-2'}" in err and str(qa) in err, err
    a = [json.loads(x) for x in metrics_lines(g)]
    b = [json.loads(x) for x in metrics_lines(part)]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward", "loss", "kl"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-7), key
    assert (part / "checkpoint-4").is_dir()
    # a finished grpo run grows by --max-steps, from its last step
    assert main(["grpo", "--resume", "--output-dir", str(g), "--max-steps", "5"]) == 0
    assert [json.loads(x)["step"] for x in metrics_lines(g)] == [1, 2, 3, 4, 5]
    assert [json.loads(x) for x in metrics_lines(g)][:4] == a
    assert (g / "checkpoint-5").is_dir()


# ----------------------------------------------------------------------------- torchrun


def test_resume_alone_under_torchrun(tiny_dir, tmp_path):
    """Every rank reads the recorded options and continues the same run (data parallel, 2 ranks)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    qa = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    r = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lopt"]

    def launch(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*torchrun, "train", *args], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-6000:]
        return proc

    launch("--model", str(tiny_dir), "--dataset", str(qa), "--output-dir", str(r), "--max-steps", "4",
           "--save-every", "2", "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--device", "cpu")
    assert sorted(p.name for p in r.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    part = copy_run(r, tmp_path / "part")
    shutil.rmtree(part / "checkpoint-4")
    proc = launch("--resume", "--output-dir", str(part))
    assert proc.stderr.count("resuming the run recorded in") == 1  # rank 0 says it
    assert "resumed at step 2" in proc.stderr and "2 processes" in proc.stderr, proc.stderr[-3000:]
    assert steps(part) == [1, 2, 3, 4]
    wa, wb = load_file(r / "model.safetensors"), load_file(part / "model.safetensors")
    for k in wa:
        assert (wb[k] - wa[k]).abs().max() <= 1e-6 + 1e-5 * wa[k].abs().max(), k
