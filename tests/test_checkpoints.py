"""Checkpoints on a tiny model: resume state that runs no code when loaded, resume falling back to the
newest complete checkpoint, stale temporaries removed at start, --save-total-limit and
--save-only-model (lopt train, lopt dpo, and --pipeline under torchrun)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lopt.cli import main
from lopt.recipes.sft import TrainConfig, train
from lopt.runtime import checkpoints as ck
from lopt.runtime.checkpoints import (MANIFEST_FILE, STATE_FILE, clean_stale_temporaries, latest_checkpoint,
                                      rotate_checkpoints, write_manifest)
from lopt.runtime.resume import UnsafeCheckpointError, load_state

from conftest import addition_rows, save_tiny, write_jsonl

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-ck"))


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ck-data") / "qa.jsonl", addition_rows())


def common(tiny_dir, qa_file, **kw) -> dict:
    opts = dict(model=str(tiny_dir), dataset=str(qa_file), batch_size=4, lr=2e-3, max_steps=5, progress=False)
    opts.update(kw)
    return opts


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop_at(step: int):
    def cb(rec, state):
        if state.step == step:
            state.stop_requested = True  # the Ctrl-C path: checkpoint, then stop
    return cb


@pytest.fixture(scope="module")
def reference(tiny_dir, qa_file, tmp_path_factory):
    """The uninterrupted 5-step run."""
    out = tmp_path_factory.mktemp("ck-ref") / "full"
    train(TrainConfig(output_dir=str(out), **common(tiny_dir, qa_file)))
    return out


@pytest.fixture(scope="module")
def stopped(tiny_dir, qa_file, tmp_path_factory):
    """The same run stopped after step 4, with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("ck-stopped") / "run"
    train(TrainConfig(output_dir=str(out), save_every=2, **common(tiny_dir, qa_file)), callbacks=[stop_at(4)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refresh_manifest(ckpt: Path) -> None:
    """What someone who edits a checkpoint on purpose would do: list the edited files anew."""
    old = json.loads((ckpt / MANIFEST_FILE).read_text())
    (ckpt / MANIFEST_FILE).unlink()
    write_manifest(ckpt, old["step"], old["resumable"], old["state_files"])


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


def cli_args(tiny_dir, qa_file, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_dir), "--dataset", str(qa_file), "--output-dir", str(out),
            "--batch-size", "4", "--lr", "2e-3", "--max-steps", "5", "--no-progress", *extra]


def error_line(err: str, command: str = "train") -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"lopt {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 1. nothing executes on load


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted pickle runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_code(state_file: Path, marker: Path, keep_manifest_valid: bool = True) -> None:
    state = torch.load(state_file, weights_only=True)
    state["history"] = [RunsCode(marker)]
    torch.save(state, state_file)
    if keep_manifest_valid and (state_file.parent / MANIFEST_FILE).exists():
        refresh_manifest(state_file.parent)


def test_the_planted_pickle_does_run_code(tmp_path):
    """The payload of the tests below is live: an ordinary unpickling creates the marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["explicit", "latest", "0.1-layout"])
def test_state_that_runs_code_is_refused(stopped, tiny_dir, qa_file, tmp_path, capsys, how):
    out = copy_run(stopped, tmp_path / "run")
    marker = tmp_path / "marker"
    ckpt = out / "checkpoint-4"
    if how == "0.1-layout":  # lopt 0.1 wrote no manifest
        for d in out.glob("checkpoint-*"):
            (d / MANIFEST_FILE).unlink()
    plant_code(ckpt / STATE_FILE, marker)
    resume = ["--resume", str(ckpt)] if how == "explicit" else ["--resume"]
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, *resume), capsys)
    line = error_line(err)
    assert rc == 2 and "refusing to load" in line and str(ckpt / STATE_FILE) in line, line
    assert "could run code" in line and "io.open" in line
    assert not marker.exists()
    # "latest": an older complete checkpoint is there, but a planted one stops the run, never skipped
    assert "skipping" not in err


def test_load_state_allows_plain_data_only(tmp_path):
    good = tmp_path / "good.pt"
    import random
    torch.save({"rng": random.getstate(), "t": torch.ones(2), "h": [{"loss": 1.0, "x": None}]}, good)
    state = load_state(good)
    assert state["rng"] == random.getstate() or isinstance(state["rng"], tuple)
    bad = tmp_path / "bad.pt"
    torch.save({"x": RunsCode(tmp_path / "m")}, bad)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_state(bad)
    assert not (tmp_path / "m").exists()


def test_checkpoint_written_without_manifest_still_resumes(stopped, reference, tiny_dir, qa_file, tmp_path,
                                                           capsys):
    """lopt 0.1 checkpoints (no manifest; the same plain-data state) resume unchanged."""
    out = copy_run(stopped, tmp_path / "run")
    for d in out.glob("checkpoint-*"):
        (d / MANIFEST_FILE).unlink()
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--resume"), capsys)
    assert rc == 0 and "resumed at step 4" in err, err
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx([r["loss"] for r in read_metrics(reference)],
                                                                    rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- 2. fall back to a complete one


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _scramble(f: Path) -> None:  # same size: only loading it finds the damage
    f.write_bytes(os.urandom(f.stat().st_size))


def _lacks_keys(f: Path) -> None:
    torch.save({"step": 4}, f)
    refresh_manifest(f.parent)


def _old_layout_truncated(f: Path) -> None:
    (f.parent / MANIFEST_FILE).unlink()
    _truncate(f)


DAMAGE = {
    "empty": (lambda f: f.write_bytes(b""), "trainer_state.pt is empty"),
    "truncated": (_truncate, "trainer_state.pt is truncated"),
    "scrambled": (_scramble, "trainer_state.pt is corrupt: it cannot be read"),
    "weights-missing": (lambda f: (f.parent / "model.safetensors").unlink(), "model.safetensors is missing"),
    "lacks-keys": (_lacks_keys, "trainer_state.pt is corrupt: it lacks optimizer"),
    "weights-scrambled": (lambda f: _scramble(f.parent / "model.safetensors"), "model.safetensors is corrupt"),
    "0.1-layout-truncated": (_old_layout_truncated, "trainer_state.pt is corrupt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint(stopped, reference, tiny_dir, qa_file, tmp_path, capsys, damage):
    out = copy_run(stopped, tmp_path / "run")
    hurt, says = DAMAGE[damage]
    hurt(out / "checkpoint-4" / STATE_FILE)
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--resume"), capsys)
    assert rc == 0, err
    skipped = [ln for ln in err.splitlines() if ln.startswith("lopt: skipping")]
    assert len(skipped) == 1 and str(out / "checkpoint-4") in skipped[0] and says in skipped[0], err
    assert "resumed at step 2" in err
    # Resumed at 2, the log drops the abandoned steps 3-4 and the run ends as the uninterrupted one.
    got, want = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5, abs=1e-6)
    wa, wb = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_no_complete_checkpoint_is_nothing_to_resume(stopped, tiny_dir, qa_file, tmp_path, capsys):
    out = copy_run(stopped, tmp_path / "run")
    (out / "checkpoint-4" / STATE_FILE).write_bytes(b"")
    _truncate(out / "checkpoint-2" / STATE_FILE)
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--resume"), capsys)
    assert rc == 2
    assert "nothing to resume" in error_line(err) and "2 checkpoint-N skipped" in error_line(err)
    assert len([ln for ln in err.splitlines() if ln.startswith("lopt: skipping")]) == 2


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(stopped, tiny_dir, qa_file, tmp_path, capsys,
                                                                damage):
    out = copy_run(stopped, tmp_path / "run")
    ckpt = out / "checkpoint-4"
    DAMAGE[damage][0](ckpt / STATE_FILE)
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--resume", str(ckpt)), capsys)
    line = error_line(err)
    assert rc == 2 and f"cannot resume from {ckpt}" in line and "trainer_state.pt" in line, line
    assert "skipping" not in err  # an explicit checkpoint is never swapped for another


def test_latest_checkpoint_ignores_incomplete_ones(stopped, tmp_path):
    out = copy_run(stopped, tmp_path / "run")
    assert latest_checkpoint(out).name == "checkpoint-4"
    (out / "checkpoint-4" / "config.json").unlink()
    assert latest_checkpoint(out).name == "checkpoint-2"


# ----------------------------------------------------------------------------- 3. stale temporaries


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _junk_dir(path: Path) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half")
    return path


def test_stale_temporaries_of_dead_processes_are_removed(stopped, tmp_path):
    out = copy_run(stopped, tmp_path / "run")
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, not reaped until wait()
    try:
        t0 = time.time()
        while Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.time() - t0 < 30
            time.sleep(0.05)
        stale = [_junk_dir(out / f".checkpoint-6.tmp-{dead}"), _junk_dir(out / f".final-{dead}"),
                 _junk_dir(out / f"..final-{dead}.tmp-{dead}"), _junk_dir(out / f".checkpoint-1.deleting-{dead}"),
                 _junk_dir(out / f".checkpoint-8.tmp-{zombie.pid}"),
                 _junk_dir(out / f".checkpoint-9.tmp-{os.getpid()}")]
        busy = _junk_dir(out / f".checkpoint-7.tmp-{live.pid}")
        (out / f".metrics.jsonl.tmp-{dead}").write_text("{}\n")  # trim_log's temporary file
        stale.append(out / f".metrics.jsonl.tmp-{dead}")
        # checkpoint-4 set aside for its replacement, which never arrived: it is put back
        os.replace(out / "checkpoint-4", out / f".checkpoint-4.old-{dead}")
        # checkpoint-2 set aside, and its replacement did arrive: the old one goes
        shutil.copytree(out / "checkpoint-2", out / f".checkpoint-2.old-{dead}")
        other = _junk_dir(out / ".keep-me")  # not ours
        done = clean_stale_temporaries(out)
        assert not any(p.exists() for p in stale) and not (out / f".checkpoint-2.old-{dead}").exists()
        assert busy.exists() and other.exists()  # a live writer's, and a name lopt never writes
        assert (out / "checkpoint-4").is_dir() and latest_checkpoint(out).name == "checkpoint-4"
        assert len(done) == 9
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_a_run_starting_removes_stale_temporaries(tiny_dir, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = _junk_dir(out / f".checkpoint-3.tmp-{_dead_pid()}")
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--max-steps", "1"), capsys)
    assert rc == 0 and not stale.exists()
    assert "removed 1 temporary left" in err and stale.name in err
    assert not any(p.name.startswith(".") for p in out.iterdir())


# ----------------------------------------------------------------------------- 4. disk limits


def test_save_total_limit_keeps_the_newest(tiny_dir, qa_file, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(output_dir=str(out), save_every=1, save_total_limit=2, **common(tiny_dir, qa_file)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "."))) == \
        ["checkpoint-4", "checkpoint-5"]  # the last step (5) is a checkpoint too
    assert latest_checkpoint(out).name == "checkpoint-5"


def test_save_total_limit_deletes_only_after_the_new_one_is_complete(tiny_dir, qa_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ck.write_manifest

    def fail_at_3(d, step, *a, **kw):
        if step == 3:
            raise OSError("disk full")  # while checkpoint-3 is being written
        return real(d, step, *a, **kw)

    monkeypatch.setattr(ck, "write_manifest", fail_at_3)
    with pytest.raises(OSError, match="disk full"):
        train(TrainConfig(output_dir=str(out), save_every=1, save_total_limit=1, **common(tiny_dir, qa_file)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "."))) == ["checkpoint-2"]
    assert latest_checkpoint(out).name == "checkpoint-2"


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    for n in (1, 2, 10):  # checkpoint-10: left by an earlier, longer run in the same dir
        (tmp_path / f"checkpoint-{n}").mkdir()
    deleted = rotate_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-10"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_save_only_model(tiny_dir, qa_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    res = train(TrainConfig(output_dir=str(out), save_every=1, save_only_model=True, **common(tiny_dir, qa_file)),
                callbacks=[stop_at(2)])
    assert res.summary["interrupted"]
    err = capsys.readouterr().err
    assert "holds the weights only (--save-only-model): it cannot be resumed" in err
    ckpt = out / "checkpoint-2"
    assert not (ckpt / STATE_FILE).exists() and (ckpt / "model.safetensors").is_file()
    assert json.loads((ckpt / MANIFEST_FILE).read_text())["resumable"] is False
    AutoModelForCausalLM.from_pretrained(ckpt)
    # --resume skips such checkpoints (saying why); with none other it is nothing to resume
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--resume"), capsys)
    assert rc == 2 and "nothing to resume" in error_line(err)
    assert "saved with --save-only-model" in err and str(ckpt) in err
    rc, err = run_cli(cli_args(tiny_dir, qa_file, out, "--resume", str(ckpt)), capsys)
    line = error_line(err)
    assert rc == 2 and "cannot be resumed" in line and f"--model {ckpt}" in line


@pytest.mark.parametrize("flag", ["--save-total-limit", "--save-every"])
def test_save_options_must_be_positive(tiny_dir, qa_file, tmp_path, capsys, flag):
    rc, err = run_cli(cli_args(tiny_dir, qa_file, tmp_path / "run", flag, "0"), capsys)
    assert rc == 2 and "must be >= 1" in error_line(err)


# ----------------------------------------------------------------------------- the RL recipes (TRL)


def test_rl_options_reach_trl():
    from lopt.recipes.trl_bridge import RLConfig, trl_common_args

    args = trl_common_args(RLConfig(save_every=2, save_total_limit=3, save_only_model=True), torch.device("cpu"))
    assert args["save_total_limit"] == 3 and args["save_only_model"] is True


def test_rl_state_that_runs_code_is_refused(tmp_path):
    """lopt's state and every file TRL reads back are loaded with weights_only=True."""
    import numpy as np
    import random

    from lopt.recipes.trl_bridge import LOPT_STATE_FILE, TRAINER_STATE_FILE, check_rl_state

    d = tmp_path / "checkpoint-1"
    d.mkdir()
    (d / TRAINER_STATE_FILE).write_text(json.dumps({"global_step": 1}))
    torch.save({"heads.0.weight": torch.ones(2)}, d / LOPT_STATE_FILE)
    # what transformers writes: numpy's RNG state among plain data
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               d / "rng_state.pth")
    assert set(check_rl_state(d)) == {"heads.0.weight"}
    marker = tmp_path / "marker"
    for name in (LOPT_STATE_FILE, "optimizer.pt"):
        torch.save({"state": RunsCode(marker)}, d / name)
        with pytest.raises(UnsafeCheckpointError, match=name):
            check_rl_state(d)
        torch.save({}, d / name)
    assert not marker.exists()


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}"}
            for a, b in zip(range(3, 27), range(1, 25))]
    return write_jsonl(tmp_path_factory.mktemp("ck-dpo") / "gsm8k.jsonl", rows)


def dpo_config(tiny_dir, gsm8k_file, out, **kw):
    from lopt.recipes.dpo import DPORunConfig

    opts = dict(model=str(tiny_dir), dataset=f"synthetic-gsm8k:{gsm8k_file}", output_dir=str(out),
                batch_size=2, max_steps=4, lr=1e-3, progress=False)
    opts.update(kw)
    return DPORunConfig(**opts)


def test_dpo_limit_fallback_and_model_only(tiny_dir, gsm8k_file, tmp_path, capsys):
    from lopt.recipes.dpo import dpo

    out = tmp_path / "run"
    dpo(dpo_config(tiny_dir, gsm8k_file, out, save_every=1, save_total_limit=2))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "."))) == \
        ["checkpoint-3", "checkpoint-4"]  # the last step (4) is a checkpoint too
    want = load_file(out / "model.safetensors")
    # TRL's optimizer.pt of the newest checkpoint is damaged: resume falls back to checkpoint-3
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    capsys.readouterr()
    res = dpo(dpo_config(tiny_dir, gsm8k_file, out, save_every=1, save_total_limit=2, resume="latest"))
    err = capsys.readouterr().err
    assert res.summary["steps"] == 4
    assert f"skipping {out / 'checkpoint-4'}: optimizer.pt is truncated" in err, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    got = load_file(out / "model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    # --save-only-model: the weights and TRL's log, nothing to resume from
    lean = tmp_path / "lean"
    dpo(dpo_config(tiny_dir, gsm8k_file, lean, max_steps=2, save_every=1, save_only_model=True))
    names = {p.name for p in (lean / "checkpoint-1").iterdir()}
    assert "model.safetensors" in names and not names & {"optimizer.pt", "lopt_state.pt", "rng_state.pth"}
    with pytest.raises(ValueError, match="cannot be resumed"):
        dpo(dpo_config(tiny_dir, gsm8k_file, lean, max_steps=2, resume=str(lean / "checkpoint-1")))


# ----------------------------------------------------------------------------- --pipeline (torchrun, 2 ranks)


def test_pipeline_limit_fallback_and_model_only(tiny_dir, qa_file, tmp_path):
    full, resumed, lean = tmp_path / "full", tmp_path / "resumed", tmp_path / "lean"
    opts = dict(model=str(tiny_dir), dataset=str(qa_file), batch_size=4, max_steps=4, lr=1e-2,
                warmup_ratio=0.0, progress=False, pipeline=True, save_every=1)
    jobs = [{"config": {**opts, "output_dir": str(full), "save_total_limit": 2}},
            # a copy of the finished run whose newest checkpoint is damaged, resumed
            {"copy": [str(full), str(resumed)], "truncate": str(resumed / "checkpoint-4" / STATE_FILE),
             "config": {**opts, "output_dir": str(resumed), "resume": "latest", "save_total_limit": 2}},
            {"config": {**opts, "output_dir": str(lean), "max_steps": 2, "save_only_model": True}}]
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "dist_worker.py"), str(spec)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert f"skipping {resumed / 'checkpoint-4'}: trainer_state.pt is truncated" in proc.stderr
    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)  # nothing is reduced: bitwise
    assert [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (lean / "checkpoint-1" / STATE_FILE).exists() and (lean / "checkpoint-1" / "model.safetensors").is_file()
