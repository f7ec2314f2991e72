"""The study behind docs/RESULTS.md: its configurations, its report, and the whole --quick pipeline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lopt.recipes.study import short as ex


def test_study_covers_the_issue_configurations():
    configs = ex.study_configs(30)
    assert configs["lopt-k2"] == {"method": "lopt", "num_blocks": 2}  # the paper's setting: defaults
    assert configs["lopt-b7"]["boundaries"] == [7] and configs["lopt-b22"]["boundaries"] == [22]
    for name in ("e2e", "freeze-lower", "lora", "lopt-k4", "lopt-k2-lambda0", "lopt-k2-lambda1",
                 "lopt-k2-lrlow10", "lopt-k2-anchor", "lopt-k2-every4"):
        assert name in configs
    assert set(ex.NOISE_CONFIGS) <= set(configs) and set(ex.QUICK_CONFIGS) <= set(configs)


def test_train_config_maps_the_budget(tmp_path):
    b = ex.FULL
    cfg = ex._train_config("x", {"method": "lopt", "lr_lower_ratio": 0.1}, 1, b, model=None, dataset="d",
                           run_dir=tmp_path)
    assert cfg.lr == b.lr and math.isclose(cfg.lr_lower, b.lr * 0.1) and cfg.seed == 1
    assert cfg.max_steps == b.steps and cfg.batch_size == b.batch_size
    lora = ex._train_config("x", {"method": "lora"}, 0, b, model=None, dataset="d", run_dir=tmp_path)
    assert lora.lr == b.lr_lora and lora.lr_lower == b.lr_lora  # always explicit: lopt-k2 stays the paper's lr_lower = lr


def _record(name, loss, kl, cka, mmlu=0.25, boundaries=None, seed=0):
    layers = [{"index": i, "cka": c, "cos": c - 0.001} for i, c in enumerate(cka)]
    return {"spec": {"name": name}, "name": name, "seed": seed, "boundaries": boundaries,
            "eval": {"task_loss": {"loss": loss}, "gsm8k": {"acc": 0.1}, "mmlu_redux": {"acc": mmlu},
                     "retention_kl": {"kl": kl}, "drift": {"layers": layers}}}


def test_report_ratios_and_boundary_cka(tmp_path):
    (tmp_path / "results").mkdir()
    configs = ex.study_configs(4)
    records = {
        "base": _record("base", 2.0, 0.0, [1, 1, 1, 1, 1], mmlu=0.30),
        "e2e": _record("e2e", 1.0, 0.04, [1, 0.9, 0.8, 0.7, 0.6], mmlu=0.20),
        "lopt-k2": _record("lopt-k2", 1.5, 0.01, [1, 0.99, 0.97, 0.9, 0.8], mmlu=0.28, boundaries=[2]),
        "e2e-seed1": _record("e2e", 1.1, 0.05, [1, 0.9, 0.8, 0.7, 0.6], mmlu=0.21, seed=1),
    }
    bench = {"rows": [{"name": "e2e", "peak_step_mb": 1000.0, "tokens_per_s": 100.0},
                      {"name": "lopt-k2", "peak_step_mb": 600.0, "tokens_per_s": 130.0}]}
    meta = {"budget": vars(ex.FULL) | {"seeds": [0, 1]}, "quick": False, "model": "m", "num_layers": 4,
            "dataset": "train.jsonl", "machine": {"cpus": 2, "platform": "p", "torch": "t",
                                                  "transformers": "x", "python": "3"}}
    path = ex.write_report(tmp_path, records, bench, meta, configs)
    text = path.read_text()
    claims = next(line for line in text.splitlines() if line.startswith("| lopt-k2 | 1.50 |"))
    # MMLU drop 0.02 against e2e's 0.10 -> 0.20; KL 0.01/0.04 -> 0.25; CKA, cosine at layer 2; speed 1.30
    assert claims == "| lopt-k2 | 1.50 | 0.20 | 0.25 | 0.970 | 0.969 | 1.30 |"
    results = next(line for line in text.splitlines() if line.startswith("| e2e | e2e |"))
    assert "| 0.800 | 0.799 |" in results  # e2e has no boundary: CKA read at the midpoint layer (index 2 of 5)
    assert "| e2e | 2 | 1.000-1.100 |" in text  # the noise table spans both seeds
    assert not (tmp_path / "RESULTS.md.tmp").exists()


def test_a_changed_budget_redoes_the_record(tmp_path):
    path = tmp_path / "r.json"
    ex.write_json(path, {"spec": {"name": "a", "budget": {"steps": 2}}, "eval": {}})
    assert ex._load_record(path, {"name": "a", "budget": {"steps": 2}}) is not None
    assert ex._load_record(path, {"name": "a", "budget": {"steps": 3}}) is None
    assert ex._load_record(tmp_path / "missing.json", {}) is None


@pytest.mark.slow
def test_quick_study_end_to_end(shared_data, tmp_path, monkeypatch):
    from conftest import save_tiny

    model = str(save_tiny(tmp_path / "tiny"))
    monkeypatch.setenv("LOPT_EXPERIMENT_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "out"
    res = ex.run_study(out, quick=True, model=model, data_dir=shared_data, progress=False)
    text = (out / "RESULTS.md").read_text()
    for run in ("base", *ex.QUICK_CONFIGS):
        assert f"| {run} |" in text
    for plot in ("drift.png", "loss-vs-retention.png", "memory-vs-speed.png"):
        assert (out / "results" / plot).stat().st_size > 1000
    recs = {r: json.loads((out / "results" / f"{r}.json").read_text()) for r in ("base", *ex.QUICK_CONFIGS)}
    base_ev = recs["base"]["eval"]
    assert abs(base_ev["retention_kl"]["kl"]) < 1e-6 and base_ev["drift"]["min_cka"] > 0.9999
    assert recs["e2e"]["eval"]["retention_kl"]["kl"] > 0
    for r in ex.QUICK_CONFIGS:
        ev = recs[r]["eval"]
        assert 0 < ev["task_loss"]["loss"] < 10 and 0 <= ev["gsm8k"]["acc"] <= 1
        assert recs[r]["train"]["steps"] == ex.QUICK.steps
    # freeze-lower leaves everything below its boundary untouched: identical hidden states there
    frozen = recs["freeze-lower"]
    b = frozen["boundaries"][0]
    assert all(layer["cka"] > 0.9999 for layer in frozen["eval"]["drift"]["layers"][: b + 1])
    assert recs["lopt-k2"]["boundaries"] == [2]  # the midpoint of the tiny model's 4 layers
    bench = json.loads((out / "results" / "bench.json").read_text())
    assert {row["name"] for row in bench["rows"]} == set(ex.QUICK_CONFIGS)
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # the study keeps records, not weights
    # a second call resumes: nothing is trained or measured again
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    ex.run_study(out, quick=True, model=model, data_dir=shared_data, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == stamps
    assert res["report"] == str(out / "RESULTS.md")


def test_the_cost_budget_does_not_invalidate_training_records(tmp_path):
    path = tmp_path / "r.json"
    ex.write_json(path, {"spec": {"name": "a", "budget": {"steps": 2, "bench_repeats": 1}}})
    assert ex._load_record(path, {"name": "a", "budget": {"steps": 2, "bench_repeats": 2}}) is not None


def test_a_record_survives_its_json_round_trip(tmp_path):
    # tuples in the budget come back from the file as lists; the record is still the same run
    path = tmp_path / "r.json"
    spec = {"name": "a", "budget": {"steps": 2, "seeds": (0, 1)}}
    ex.write_json(path, {"spec": spec})
    assert ex._load_record(path, spec) is not None


def test_train_command_is_the_runs_config():
    from lopt.cli import build_parser, train_config_from_args

    configs = ex.study_configs(30)
    for name in ("e2e", "lopt-k2", "lopt-b7", "lopt-k2-lrlow10-every4", "lora"):
        line = ex.train_command(name, configs[name], 1, ex.FULL, model=None, dataset="data/train.jsonl",
                                run_dir=Path("runs") / name)
        assert line.startswith("lopt train ")
        parsed = train_config_from_args(build_parser().parse_args(line.split()[1:]))
        want = ex._train_config(name, configs[name], 1, ex.FULL, model=None, dataset="data/train.jsonl",
                                run_dir=Path("runs") / name)
        for field in ("method", "num_blocks", "boundaries", "lambda_aux", "lr", "lr_lower", "batch_size",
                      "max_steps", "max_length", "warmup_ratio", "seed", "lower_every", "dataset"):
            assert getattr(parsed, field) == getattr(want, field), (name, field)
