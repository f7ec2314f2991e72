"""Held-out evaluation that is held out (issue 31): `--val-size` takes seeded rows out of training and
scores them, `--eval-dataset` scores another set, and `--eval-every` alone never scores the training
rows as if they were a test split. On a tiny Llama and 40 GSM8K rows from the shared data folder."""
from __future__ import annotations

import json

import pytest

from lopt.cli import build_parser, main
from lopt.data import DataError, has_test_split, held_out_count, hold_out

from conftest import save_tiny, write_jsonl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-heldout"), eos_token_id=3)


@pytest.fixture(scope="module")
def gsm40(shared_data, tmp_path_factory):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]
    path = tmp_path_factory.mktemp("gsm40") / "gsm40.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(tiny_dir, data, out, *extra):
    return ["train", "--model", str(tiny_dir), "--dataset", str(data), "--output-dir", str(out),
            "--max-steps", "4", "--batch-size", "4", "--no-progress", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys, command="train") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"lopt {command}: error: "), err
    return err[-1]


# --------------------------------------------------------------------------- the split itself


def test_hold_out_is_seeded_disjoint_and_ordered():
    items = list(range(40))
    train, val = hold_out(items, 8, seed=0)
    assert len(train) == 32 and len(val) == 8 and sorted(train + val) == items
    assert train == sorted(train) and val == sorted(val)  # both keep the file's order
    assert hold_out(items, 8, seed=0) == (train, val)  # the same seed, the same rows (resume, other ranks)
    assert hold_out(items, 8, seed=1)[1] != val
    assert len(hold_out(items, 0.25, seed=0)[1]) == 10  # a fraction of the rows
    assert held_out_count(0.001, 40) == 1  # a fraction holds out at least one row


@pytest.mark.parametrize("value, why", [(0, "> 0"), (-3, "> 0"), (2.5, "whole number"), (40, "none to train"),
                                        (41, "none to train"), (1.0 - 1e-9, "none to train")])
def test_held_out_count_rejects(value, why):
    with pytest.raises(DataError, match=why):
        held_out_count(value, 40)


def test_val_size_flag_takes_counts_and_fractions():
    parser = build_parser()
    assert parser.parse_args(["train", "--val-size", "8"]).val_size == 8
    assert parser.parse_args(["train", "--val-size", "0.2"]).val_size == 0.2
    assert parser.parse_args(["grpo", "--val-size", "8"]).val_size == 8


def test_which_sources_have_a_test_split(gsm40, shared_data):
    assert has_test_split("arithmetic") is True
    assert has_test_split("gsm8k", shared_data) is True
    assert has_test_split(str(gsm40)) is False  # a file is one split
    assert has_test_split("alpaca") is False  # the hub's alpaca has a train split only
    assert has_test_split(str(shared_data / "gsm8k")) is True  # a folder with a test file
    assert has_test_split("someone/some-dataset") is None  # known once loaded


# --------------------------------------------------------------------------- lopt train


def test_eval_every_alone_on_a_file_stops_with_one_line(tiny_dir, gsm40, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(train_args(tiny_dir, gsm40, out, "--eval-every", "2")) == 2
    line = one_line_error(capsys)
    assert "--val-size" in line and "--eval-dataset" in line and "test split" in line
    assert not out.exists()  # nothing written


def test_val_size_trains_32_and_scores_8(tiny_dir, gsm40, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(train_args(tiny_dir, gsm40, out, "--val-size", "8", "--eval-every", "2")) == 0
    captured = capsys.readouterr()
    first = next(line for line in captured.err.splitlines() if line.startswith("lopt: "))
    assert "32 examples" in first and "8 more held out by --val-size" in first
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert list(r["eval"]) == ["task-loss:val"]
        res = r["eval"]["task-loss:val"]
        assert res["n"] == 8 and res["split"] == "val" and res["max_length"] == 512 and res["loss"] > 0
    assert not any(res.get("split") == "test" for r in evals for res in r["eval"].values())
    info = json.loads((out / "lopt_run.json").read_text())
    data = info["final_metrics"]["data"]
    assert data["rows"] == 32 and data["val_rows"] == 8
    assert info["final_metrics"]["eval"]["task-loss:val"]["n"] == 8
    assert "held-out eval (last)" in captured.out and "n 8" in captured.out


def test_val_size_alone_scores_after_the_last_step(tiny_dir, gsm40, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(train_args(tiny_dir, gsm40, out, "--val-size", "0.1", "--max-steps", "2")) == 0
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2] and evals[0]["eval"]["task-loss:val"]["n"] == 4
    assert "36 examples" in capsys.readouterr().err


def test_eval_dataset_follows_trainings_max_length(tiny_dir, gsm40, shared_data, tmp_path):
    test_file = write_jsonl(tmp_path / "held.jsonl", [json.loads(x) for x in (
        shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:6]])
    out = tmp_path / "r"
    assert main(train_args(tiny_dir, gsm40, out, "--eval-dataset", str(test_file), "--max-length", "768",
                           "--max-steps", "2")) == 0
    res = [r for r in read_metrics(out) if "eval" in r][-1]["eval"][f"task-loss:{test_file}"]
    assert res["n"] == 6 and res["split"] == "eval-dataset" and res["max_length"] == 768
    out2 = tmp_path / "r2"
    assert main(train_args(tiny_dir, gsm40, out2, "--eval-dataset", str(test_file), "--max-length", "768",
                           "--eval-max-length", "600", "--max-steps", "1")) == 0
    assert [r for r in read_metrics(out2) if "eval" in r][-1]["eval"][f"task-loss:{test_file}"]["max_length"] == 600


def test_explicit_task_loss_on_a_file_is_not_called_test(tiny_dir, gsm40, tmp_path):
    out = tmp_path / "r"
    assert main(train_args(tiny_dir, gsm40, out, "--eval-every", "2", "--max-steps", "2", "--eval-limit", "4",
                           "--eval-tasks", f"task-loss:{gsm40}")) == 0
    res = [r for r in read_metrics(out) if "eval" in r][-1]["eval"][f"task-loss:{gsm40}"]
    assert res["split"] == "file" and res["max_length"] == 512


def test_a_dataset_with_a_test_split_keeps_working(tiny_dir, tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--model", str(tiny_dir), "--dataset", "arithmetic", "--limit", "16", "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--no-progress", "--eval-every", "2",
                 "--eval-limit", "4", "--max-length", "128"]) == 0
    res = [r for r in read_metrics(out) if "eval" in r][-1]["eval"]["task-loss:arithmetic"]
    assert res["split"] == "test" and res["n"] == 4 and res["max_length"] == 128


@pytest.mark.parametrize("extra, message", [
    (["--val-size", "40"], "leaving none to train on"),
    (["--val-size", "50"], "leaving none to train on"),
    (["--val-size", "0"], "--val-size must be"),
    (["--val-size", "-2"], "--val-size must be"),
    (["--eval-dataset", "EMPTY"], "--eval-dataset"),
    (["--eval-dataset", "MISSING"], "--eval-dataset"),
])
def test_bad_held_out_input_one_line_nothing_written(tiny_dir, gsm40, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = [{"EMPTY": str(empty), "MISSING": str(tmp_path / "nope.jsonl")}.get(x, x) for x in extra]
    out = tmp_path / "r"
    assert main(train_args(tiny_dir, gsm40, out, *extra)) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- lopt grpo


def grpo_args(tiny_dir, data, out, *extra):
    return ["grpo", "--model", str(tiny_dir), "--task", str(data), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "4", "--no-progress",
            "--task-grad-every", "0", *extra]


def test_grpo_val_size_scores_held_out_prompts(tiny_dir, gsm40, tmp_path, capsys):
    pytest.importorskip("trl")
    out = tmp_path / "g"
    assert main(grpo_args(tiny_dir, gsm40, out, "--val-size", "8")) == 0
    assert "32 prompts" in capsys.readouterr().err
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [1]
    ev = evals[0]["eval"]
    assert ev["n"] == 8 and ev["split"] == "val" and "reward" in ev
    data = json.loads((out / "lopt_run.json").read_text())["final_metrics"]["data"]
    assert data["rows"] == 32 and data["val_rows"] == 8


@pytest.mark.parametrize("extra, message", [
    (["--eval-every", "1"], "--val-size N|FRACTION, or give held-out questions with --eval-dataset"),
    (["--val-size", "40"], "leaving none to train on"),
    (["--val-size", "0"], "--val-size must be"),
    (["--eval-dataset", "EMPTY"], "--eval-dataset"),
])
def test_grpo_bad_held_out_input(tiny_dir, gsm40, tmp_path, capsys, extra, message):
    pytest.importorskip("trl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = [str(empty) if x == "EMPTY" else x for x in extra]
    out = tmp_path / "g"
    assert main(grpo_args(tiny_dir, gsm40, out, *extra)) == 2
    assert message in one_line_error(capsys, "grpo")
    assert not out.exists()
