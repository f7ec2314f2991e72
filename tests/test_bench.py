"""`lopt bench` on a tiny model: the JSON has its fields and configurations that compute the same
function agree on the first step's loss. (No speed is asserted: the benchmark is not a test.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lopt.bench.runner import BENCH_UNITS, CONFIGS, bench_json, format_table, load_bench_json, whole_cycles
from lopt.cli import main

from conftest import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bench")
    make_tiny_model("llama", layers=4, hidden=64, tie=True).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_bench_two_configurations(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    rc = main(["bench", "--model", str(tiny_dir), "--configs", "e2e", "lopt-k2", "--seq-len", "32",
               "--batch-sizes", "2", "--steps", "2", "--repeats", "2", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    raw = json.loads(out.read_text())  # the file: memory in bytes, and it says so
    assert raw["units"] == {"memory": "bytes", "time": "seconds", "throughput": "tokens/s"}
    assert isinstance(raw["rows"][0]["saved_activation_bytes"], int) and "saved_activation_mb" not in raw["rows"][0]
    res = load_bench_json(out)  # read back in MiB, as the table shows it
    assert res["units"]["memory"] == "MiB"
    assert res["rows"][0]["saved_activation_mb"] == pytest.approx(raw["rows"][0]["saved_activation_bytes"] / 2**20)
    assert [r["name"] for r in res["rows"]] == ["e2e", "lopt-k2"]
    for r in res["rows"]:
        for k in ("step_time_s", "step_time_min_s", "step_time_max_s", "tokens_per_s", "peak_step_mb",
                  "saved_activation_mb", "first_loss", "ratio_tokens_per_s", "ratio_saved_activation"):
            assert r[k] is not None, k
        # the first process measures memory, the second times 2 steps under glibc's default allocator
        assert r["n_steps"] == 2 and r["time_processes"] == 1 and not r["times_slowed"]
        assert r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
        assert len(r["first_losses"]) == 2 and r["first_losses"][0] == pytest.approx(r["first_losses"][1])
    e2e, lo = res["rows"]
    assert e2e["ratio_tokens_per_s"] == 1.0
    # same model, same first batch, same function: the first-step losses agree across methods
    assert lo["first_loss"] == pytest.approx(e2e["first_loss"], rel=1e-5)
    assert lo["saved_activation_mb"] < e2e["saved_activation_mb"]
    assert "| lopt-k2 |" in format_table(res)


def test_bench_rows_of_the_new_methods(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_dir), "--configs", "lopt-k2-tg4", "lopt-default", "lisa", "badam",
               "--seq-len", "32", "--batch-sizes", "2", "--steps", "4", "--repeats", "1", "--json", str(out),
               "--output-dir", str(tmp_path)])
    assert rc == 0
    rows = {r["name"]: r for r in load_bench_json(out)["rows"]}
    for r in rows.values():
        assert r["times_slowed"]  # one process a configuration: its times ran under the memory settings
        assert r["n_steps"] == 4 and r["first_loss"] == pytest.approx(rows["lisa"]["first_loss"], rel=1e-5)
        assert r["saved_activation_mb"] > 0
    # LISA: one layer besides the (tied) embedding and the final norm; BAdam: one layer
    assert rows["badam"]["trainable_params"] < rows["lisa"]["trainable_params"] < rows["lopt-k2-tg4"]["trainable_params"]
    # lopt train's default keeps the tiny model's tied head tied: one matrix fewer to train than untied tg4
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"]
    one_matrix = cfg["vocab_size"] * cfg["hidden_size"]
    assert rows["lopt-k2-tg4"]["trainable_params"] - rows["lopt-default"]["trainable_params"] == one_matrix


def test_unknown_configuration(tiny_dir, capsys):
    assert main(["bench", "--model", str(tiny_dir), "--configs", "nope"]) == 2
    assert "unknown bench configuration" in capsys.readouterr().err


def test_every_configuration_is_a_valid_train_config():
    from lopt.engine.config import engine_defaults
    from lopt.recipes.sft import TrainConfig

    import importlib.util

    for name, overrides in CONFIGS.items():
        if overrides.get("method") == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
            continue  # its check asks for bitsandbytes (tests/test_precision.py checks that error)
        TrainConfig(**engine_defaults(overrides)).validate()  # as run_one builds them


def test_distbench_table_takes_medians_over_repeats():
    from lopt.bench.distbench import format_table as dist_table

    def row(label, tps, peaks, rep):
        return {"label": label, "processes": 2, "threads_per_process": 1, "per_rank_batch": 2, "micro_batches": 1,
                "block_ranges": [[0, 2], [2, 4]], "tokens_per_s": tps, "peak_rss_mb_per_process": peaks,
                "peak_rss_mb_max": max(peaks), "repeat": rep}
    rows = [row("ddp", 100, [1000, 1010], 0), row("pipe", 90, [600, 620], 0),
            row("ddp", 120, [1020, 1000], 1), row("pipe", 120, [580, 590], 1),
            row("ddp", 110, [1000, 990], 2), row("pipe", 99, [610, 600], 2)]
    lines = dist_table(rows, ref="ddp").splitlines()
    assert len(lines) == 4  # header, rule, one line per mode
    pipe = lines[3].split("|")
    assert pipe[5].strip() == "99 (90-120)" and pipe[6].strip() == f"{99 / 110:.2f}"
    assert pipe[7].strip() == "600 / 600 (590-620)" and pipe[8].strip() == f"{610 / 1010:.2f}"


def test_trl_peer_row_reports_lopts_fields(tmp_path):
    """`--peer trl`: TRL's SFTTrainer on the same tiny model and the same batches of a jsonl dataset,
    in its own process, reporting the fields lopt's rows report; same batch, same first loss."""
    pytest.importorskip("trl")
    from conftest import addition_rows, save_tiny, write_jsonl

    tiny = save_tiny(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny), "--configs", "e2e", "--peer", "trl", "--dataset", str(data),
               "--seq-len", "64", "--batch-sizes", "2", "--steps", "2", "--repeats", "1", "--json", str(out),
               "--output-dir", str(tmp_path)])
    assert rc == 0
    res = load_bench_json(out)
    e2e, trl = res["rows"]
    assert (e2e["name"], trl["name"]) == ("e2e", "trl") and trl["overrides"]["peer"] == "trl"
    assert set(trl) == set(e2e)
    for k in ("step_time_s", "tokens_per_s", "peak_step_mb", "peak_total_mb", "saved_activation_mb",
              "first_loss", "ratio_tokens_per_s", "trainable_params"):
        assert trl[k] is not None, k
    assert trl["n_steps"] == 2 and trl["trainable_params"] == e2e["trainable_params"]
    # the same padded batches with the prompts unlabelled: the same loss before any update
    assert trl["first_loss"] == pytest.approx(e2e["first_loss"], rel=1e-5)
    # real tokens only (the dataset's rows are padded): fewer than batch x length
    assert e2e["tokens_per_s"] * e2e["step_time_s"] < 2 * 64


def test_bench_json_is_in_bytes_and_old_records_still_read():
    """`lopt bench --json` writes bytes and says so; records written before it (MiB, no units) read the same."""
    old = {"rows": [{"name": "e2e", "peak_step_mb": 1000.0, "peak_total_mb": 1500.5, "saved_activation_mb": None,
                     "ratio_peak_step_mb": 1.0, "tokens_per_s": 100.0}],
           "reference": "e2e", "spec": {"seq_len": 64}}
    loaded = load_bench_json(old)
    assert loaded["units"] == BENCH_UNITS and loaded["rows"] == old["rows"] and loaded["spec"] == old["spec"]
    new = bench_json(loaded)
    assert new["units"]["memory"] == "bytes"
    row = new["rows"][0]
    assert row["peak_step_bytes"] == 1000 * 2**20 and row["peak_total_bytes"] == int(1500.5 * 2**20)
    assert row["saved_activation_bytes"] is None and row["ratio_peak_step_mb"] == 1.0  # a ratio has no unit
    assert not any(k.endswith("_mb") and not k.startswith("ratio_") for k in row)
    assert load_bench_json(json.loads(json.dumps(new))) == loaded
    # distbench-style keys with a suffix after the unit
    assert bench_json({"peak_rss_mb_per_process": [1.0, 2.0]})["peak_rss_bytes_per_process"] == [2**20, 2 * 2**20]


def test_bench_times_whole_cycles_and_writes_under_runs(tiny_dir, tmp_path, monkeypatch, capsys):
    """`--steps 1` under lopt's default (--task-grad-every 4) times a whole cycle, 4 steps, and says so
    in one line; with no --json / --plot the files go to runs/bench/ of the working folder."""
    monkeypatch.chdir(tmp_path)
    # (which configurations are rounded, and to what, is test_whole_cycles_rounds_up_to_the_longest_period's)
    rc = main(["bench", "--model", str(tiny_dir), "--configs", "lopt-default", "--seq-len", "16",
               "--batch-sizes", "2", "--steps", "1", "--repeats", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "whole cycles" in line]
    assert len(said) == 1 and "--steps 1 rounded up to 4 for lopt-default" in said[0]
    assert "whole cycles: lopt-default 4" in captured.out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["runs/bench/bench.json", "runs/bench/bench.png"]
    res = load_bench_json(tmp_path / "runs" / "bench" / "bench.json")
    assert [r["n_steps"] for r in res["rows"]] == [4]
    assert res["steps"] == 1 and res["timed_steps"] == {"lopt-default": 4}


def test_memory_and_time_come_from_their_own_processes(monkeypatch):
    """The first process of a configuration measures memory with glibc's mmap threshold fixed (RSS then
    tracks live memory); the others keep glibc's defaults, which users train with, and time the steps:
    on this project's CPU the fixed threshold made a SmolLM2 step about twice as slow."""
    import subprocess

    from lopt.bench import runner

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    seen = []

    def fake_run(cmd, env, **kw):
        spec = json.loads(cmd[-1])
        memory = spec["measure_saved"]
        seen.append((memory, env.get("MALLOC_MMAP_THRESHOLD_")))
        res = {"name": spec["name"], "overrides": spec["overrides"], "batch_size": 2, "seq_len": 8,
               "step_times": [4.0, 6.0] if memory else [2.0, 3.0], "first_loss": 1.0,
               "peak_step_mb": 100.0 if memory else 180.0, "peak_total_mb": 300.0 if memory else 380.0,
               "base_mb": 200.0, "saved_activation_mb": 50.0 if memory else None, "device": "cpu",
               "trainable_params": 10, "tokens_per_step": 16.0, "memory_process": memory}
        return subprocess.CompletedProcess(cmd, 0, stdout="LOPT_BENCH_RESULT " + json.dumps(res), stderr="")

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    row = runner.run_bench(["e2e"], [2], steps=2, repeats=3, progress=False)["rows"][0]
    assert seen == [(True, "65536"), (False, None), (False, None)]
    assert row["peak_step_mb"] == 100.0 and row["peak_total_mb"] == 300.0  # the memory process's
    assert row["step_time_s"] == 2.5 and row["n_steps"] == 4 and row["tokens_per_s"] == 16.0 / 2.5  # the others'
    assert row["time_processes"] == 2 and not row["times_slowed"]
    seen.clear()
    row = runner.run_bench(["e2e"], [2], steps=2, repeats=1, progress=False)["rows"][0]
    assert seen == [(True, "65536")] and row["step_time_s"] == 5.0 and row["times_slowed"]


def test_whole_cycles_rounds_up_to_the_longest_period(capsys):
    table = {"a": {"method": "e2e"}, "tg4": {"task_grad_every": 4}, "le3": {"lower_every": 3}}
    assert whole_cycles(list(table), table, 5) == {"a": 5, "tg4": 8, "le3": 6}
    assert capsys.readouterr().err.count("\n") == 1  # one line
    assert whole_cycles(list(table), table, 12) == {"a": 12, "tg4": 12, "le3": 12}
    assert capsys.readouterr().err == ""  # nothing rounded, nothing said


def test_bench_outputs_go_where_named(tiny_dir, tmp_path, monkeypatch):
    """--output-dir names the folder; --json / --plot name a file each; nothing lands in the working folder."""
    import lopt.bench.runner as runner

    fake = {"units": dict(BENCH_UNITS), "rows": [], "reference": "e2e", "dataset": "random tokens", "steps": 1,
            "timed_steps": {"e2e": 1}, "repeats": 1, "model": "m", "seq_len": 8, "wall_s": 0.0,
            "machine": {"cpus": 2}, "versions": {"torch": "x"}}
    monkeypatch.setattr(runner, "run_bench", lambda *a, **k: fake)
    monkeypatch.setattr(runner, "plot", lambda result, path: bool(Path(path).write_bytes(b"png")))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["bench", "--configs", "e2e", "--output-dir", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "bench.json").is_file() and (tmp_path / "mine" / "bench.png").is_file()
    assert main(["bench", "--configs", "e2e", "--json", str(tmp_path / "a" / "r.json"),
                 "--plot", str(tmp_path / "b" / "r.png")]) == 0
    assert (tmp_path / "a" / "r.json").is_file() and (tmp_path / "b" / "r.png").is_file()
    assert not any(work.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--configs", "e2e", "--output-dir", str(blocker / "sub")]) == 2  # fails before the bench
