"""Trackers (issue 28): ``--report-to tensorboard wandb mlflow`` gets the run's loss, retention KL, tokens/s and
memory series, read back here with each tracker's own reader: W&B offline (its .wandb file, records parsed
with W&B's protobuf), MLflow's local file store (MlflowClient.get_metric_history) and TensorBoard's event
files. Nothing leaves the machine. Unknown names and missing packages are one-line errors before training."""
from __future__ import annotations

import json
import re
import struct
import sys

import pytest

from lopt.cli import main
from lopt.engine.config import LoPTError
from lopt.runtime.trackers import check_trackers

from conftest import save_tiny

SERIES = ("train/loss", "train/tokens_per_s", "train/peak_mem_mb", "retention/kl")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-trackers"), eos_token_id=3)


def train_args(tiny_dir, out, *extra):
    return ["train", "--model", str(tiny_dir), "--dataset", "arithmetic", "--limit", "32", "--output-dir", str(out),
            "--max-steps", "3", "--batch-size", "4", "--no-progress", "--eval-every", "2", "--retention", "kl",
            "--retention-prompts", "2", "--retention-new-tokens", "4", *extra]


def wandb_history(wandb_dir) -> list[dict]:
    """The history rows of the one offline run under ``wandb_dir``: its .wandb file is a LevelDB-style log
    (a 7-byte header, 32 KiB blocks of records, each with a 7-byte header: crc, length, type) of W&B
    protobuf Records; the history records are parsed with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, buf, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos: pos + 7])
        pos += 7
        buf, pos = buf + data[pos: pos + n], pos + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def metrics_series(out) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says each series should hold: name -> {step: value}."""
    want: dict[str, dict[int, float]] = {k: {} for k in SERIES}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "retention" in rec:
            want["retention/kl"][rec["step"]] = rec["retention"]["kl"]
        elif "loss" in rec:
            for k in ("loss", "tokens_per_s", "peak_mem_mb"):
                if rec[k] is not None:
                    want[f"train/{k}"][rec["step"]] = rec[k]
    return want


def test_report_to_wandb_mlflow_tensorboard_write_the_series(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, out, "--report-to", "wandb", "mlflow", "tensorboard")) == 0
    want = metrics_series(out)
    assert sorted(want["train/loss"]) == [1, 2, 3] and sorted(want["retention/kl"]) == [2, 3]

    rows = wandb_history(tmp_path / "wandb-dir")
    for name, values in want.items():
        got = {r["_step"]: r[name] for r in rows if name in r}
        assert got == pytest.approx(values, rel=1e-6), name

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("lopt").experiment_id])
    assert run.data.params["method"] == "lopt" and run.info.status == "FINISHED"
    for name, values in want.items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert got == pytest.approx(values, rel=1e-6), name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name, values in want.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(values, rel=1e-5), name  # TensorBoard stores float32


@pytest.mark.parametrize("flags, why", [
    (["--report-to", "comet"], "unknown tracker 'comet'; choose from tensorboard, wandb, mlflow, all, none"),
    (["--report-to", "none", "wandb"], "--report-to none excludes the other trackers"),
])
def test_bad_tracker_is_one_line_before_training(tiny_dir, tmp_path, capsys, flags, why):
    assert main(train_args(tiny_dir, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lopt train: error: ") and why in err[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tracker, extra", [("wandb", "lopt[wandb]"), ("mlflow", "lopt[mlflow]"),
                                            ("tensorboard", "lopt[tensorboard]")])
def test_missing_extra_says_what_to_install(tiny_dir, tmp_path, capsys, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: find_spec then finds nothing
    with pytest.raises(LoPTError, match=re.escape(f"needs the {tracker} package: pip install '{extra}'")):
        check_trackers([tracker])
    assert main(train_args(tiny_dir, tmp_path / "run", "--report-to", tracker)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lopt train: error: ") and extra in err[-1]
    assert not (tmp_path / "run").exists()


def test_report_to_names_resolve_like_transformers(monkeypatch):
    assert check_trackers(None) == [] and check_trackers(["none"]) == []
    monkeypatch.setitem(sys.modules, "wandb", None)
    installed = check_trackers(["all"])
    assert "wandb" not in installed and set(installed) <= {"tensorboard", "mlflow"}
    if "tensorboard" in installed:  # the old --tensorboard flag adds it once
        assert check_trackers(["tensorboard"], tensorboard=True) == ["tensorboard"]


def test_grpo_and_dpo_pass_report_to_to_transformers(monkeypatch):
    """lopt grpo / dpo run TRL's trainers: --report-to becomes their TrainingArguments' report_to."""
    import torch

    from lopt.recipes.dpo import DPORunConfig
    from lopt.recipes.trl_bridge import trl_common_args

    cpu = torch.device("cpu")
    assert trl_common_args(DPORunConfig(), cpu)["report_to"] == "none"
    assert trl_common_args(DPORunConfig(report_to=["tensorboard", "tensorboard"]), cpu)["report_to"] == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(LoPTError, match=re.escape("pip install 'lopt[wandb]'")):
        trl_common_args(DPORunConfig(report_to=["wandb"]), cpu)
