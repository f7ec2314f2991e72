"""Study v2 (python -m lopt.recipes.study.v2): its plan, its records, its report, and the whole --quick
pipeline on a tiny model; lopt study (make experiment's study v3): end to end on a tiny model, its plan,
its report and README block, matched skill and the rules."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from conftest import addition_rows, save_tiny, write_jsonl
from lopt.recipes.study import plan
from lopt.recipes.study.records import Records
from lopt.recipes.study.report import (HEADLINE_END, HEADLINE_START, headline, readme_table, sync_readme,
                                       write_report)
from lopt.recipes.study.run import run_study
from lopt.recipes.study.summary import readme_block, readme_markers
from lopt.recipes.study.summary import sync_readme as sync_study_readme


def test_the_plan_has_every_run_the_issue_asks_for():
    names = list(plan.configs())
    runs = plan.runs(names, plan.V2)
    got = {r for r, _, _ in runs}
    for r in ("e2e", "e2e-seed1", "freeze-lower", "lora", "lopt-paper", "lopt-default", "lopt-tg4",
              "lopt-tg4-seed1", "lisa", "badam"):
        assert r in got
    c = plan.configs()
    assert c["lopt-paper"]["lambda_aux"] == 10 and c["lopt-paper"]["lr_lower_ratio"] == 1.0
    assert c["lopt-default"]["lr_lower_ratio"] == 0.1
    assert c["lopt-tg4"]["task_grad_every"] == 4 and c["lopt-tg4"]["lr_lower_ratio"] == 4.0
    # the best configuration found: tg4 with the tied head (which the bench sees) and the lower blocks at lr
    assert ({k: v for k, v in c["lopt-tg4-tied"].items() if k not in ("tied_head", "lr_lower_ratio")}
            == {k: v for k, v in c["lopt-tg4"].items() if k != "lr_lower_ratio"})
    assert c["lopt-tg4-tied"]["lr_lower_ratio"] == 1.0
    assert c["lopt-tg4-tied"]["tied_head"] and "tied_head" in plan.COST_KEYS
    # every configuration trains on the same rows, for the same steps: at least 1,000 examples
    assert plan.V2.steps * plan.V2.batch_size >= 1000 and plan.V2.train_rows == plan.V2.steps * plan.V2.batch_size
    assert plan.V2.curve_steps == [64, 128]
    # e2e at half the swept rate: its whole model, lower half included, at lr / 2
    half = plan.train_config(c["e2e-half-lr"], 0, plan.V2, lr=1e-4, model=None, dataset="d.jsonl", run_dir=Path("r"))
    assert (half.method, half.lr, half.lr_lower) == ("e2e", 5e-5, 5e-5)
    assert "lr = swept lr x 0.5" in plan.describe(c["e2e-half-lr"])


def test_the_commands_are_the_runs_configs():
    from lopt.cli import build_parser, train_config_from_args

    for name, overrides in plan.configs().items():
        want = plan.train_config(overrides, 1, plan.V2, lr=3e-5, model=None, dataset="data/train.jsonl",
                                 run_dir=Path("runs") / name)
        line = plan.train_command(want)
        assert line.startswith("lopt train ")
        got = train_config_from_args(build_parser().parse_args(line.split()[1:]))
        for field in ("method", "num_blocks", "lambda_aux", "lr", "lr_lower", "batch_size", "max_steps", "limit",
                      "max_length", "warmup_ratio", "seed", "task_grad_every", "tied_head", "dataset", "output_dir"):
            assert getattr(got, field) == getattr(want, field), (name, field)


def test_records_are_redone_when_their_settings_change(tmp_path):
    rec = Records(tmp_path)
    rec.put("a/train", {"steps": 2, "seeds": (0, 1)}, {"x": 1})
    assert rec.get("a/train", {"steps": 2, "seeds": (0, 1)})["x"] == 1  # a tuple survives the JSON round trip
    assert rec.get("a/train", {"steps": 3, "seeds": (0, 1)}) is None
    assert rec.get("missing", {}) is None
    assert not list(tmp_path.rglob("*.tmp"))


def _retention(scores: dict[str, list[float]]) -> dict:
    from lopt.eval.suite import PRIMARY

    tasks = {k: {"items": [{"id": i, PRIMARY[k]: v} for i, v in enumerate(vals)], PRIMARY[k]: sum(vals) / len(vals)}
             for k, vals in scores.items()}
    macro = sum(t[PRIMARY[k]] for k, t in tasks.items()) / len(tasks)
    return {"tasks": tasks, "macro": {"value": macro, "stderr": 0.01}}


def _eval(loss: float, scores: dict[str, list[float]], kl: float) -> dict:
    layers = [{"cos": 1.0 - 0.01 * i, "cka": 1.0} for i in range(5)]
    return {"task_loss": {"loss": loss}, "retention": _retention(scores), "retention_kl": {"kl": kl},
            "gsm8k": {"acc": 0.05}, "drift": {"layers": layers, "boundaries": [2]}, "seconds": 60.0}


def test_the_report_reads_drops_goals_and_curves_off_the_records(tmp_path):
    b = plan.QUICK
    rec = Records(tmp_path / "results")
    kinds = ("arc-easy", "arc-challenge", "piqa", "winogrande", "lambada")
    base = {k: [1, 1, 0, 0] for k in kinds}
    e2e = {k: [1, 0, 0, 0] for k in kinds}  # one item of four lost on every task: a drop of 25 points
    tg4 = {k: [1, 1, 0, 0] for k in kinds}  # nothing lost
    meta = {"budget": json.loads(json.dumps(asdict(b))),
            "quick": True, "configs": {n: plan.configs()[n] for n in plan.QUICK_CONFIGS}, "model": "m",
            "num_layers": 4, "dataset": "train.jsonl",
            "machine": {"cpus": 2, "platform": "p", "torch": "t", "transformers": "x", "python": "3", "threads": 2}}
    rec.put("meta", None, meta)
    rec.put("base/eval", {}, {"eval": _eval(2.0, base, 0.0)})
    rec.put("e2e/train", {"config": "e2e", "seed": 0}, {"command": "lopt train --method e2e", "train_seconds": 600})
    rec.put("e2e/eval", {"config": "e2e", "seed": 0}, {"eval": _eval(1.0, e2e, 0.04)})
    rec.put("lopt-tg4/train", {"config": "lopt-tg4", "seed": 0}, {"command": "lopt train --task-grad-every 4",
                                                                  "train_seconds": 500})
    rec.put("lopt-tg4/eval", {"config": "lopt-tg4", "seed": 0}, {"eval": _eval(1.01, tg4, 0.01)})
    for step in b.curve_steps:
        rec.put(f"e2e/curve-{step}", {}, {"step": step, "eval": _eval(1.5, e2e, 0.02)})
    rec.put("bench", {}, {"rows": [{"name": "e2e", "peak_step_mb": 1000.0, "tokens_per_s": 100.0},
                                   {"name": "lopt-tg4", "peak_step_mb": 700.0, "tokens_per_s": 125.0}],
                          "wall_s": 120.0})
    text = write_report(tmp_path).read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| e2e | e2e |"))
    assert "| +25.0 ± " in row  # the macro drop, with its paired standard error
    goal = next(ln for ln in text.splitlines() if ln.startswith("| lopt-tg4 | 1.010 |"))
    assert goal.endswith("| yes |") and "| 0.00 | 0.25 | 1.25 | 0.70 |" in goal  # drop, KL, speed, memory x e2e
    assert "The retention test used the suite's drop" in text
    assert "**Partial report**" in text and "lora" in text.split("**Partial report**")[1].splitlines()[0]
    curve = next(ln for ln in text.splitlines() if ln.startswith("| e2e | 2.000 / +0.0 |"))
    assert curve.count("/ +50.0 ± ") == 3  # the first 2 items of each task: 1,1 then 1,0; both checkpoints and the final
    assert "| **total** | **0.42** |" in text  # 600 + 500 s training, 3 x 60 s evaluations, 2 x 60 s curves, 120 s bench
    for png in ("curves.png", "loss-vs-retention.png", "memory-vs-speed.png", "drift.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    # the one-table summary, at the top of the report
    table = headline(tmp_path)
    assert any(ln.startswith("| lopt-tg4 | lopt: k 2, task gradient every 4") and
               ln.endswith("| 1.010 (1.010) | 0.010 (0.25) | +0.0 ± 0.0 | 1.25 | 0.70 |") for ln in table)
    assert any(ln.startswith("| lora | lora | not run yet |") for ln in table)
    assert "\n".join(table) in text
    # the README's cost table, refreshed in a README that has its markers
    short = readme_table(tmp_path)
    assert "| lopt-tg4 | 1.010 (1.01) | 0.010 (0.25) | 1.25 | 0.70 |" in short
    assert "| lora | not run yet |  |  |  |" in short and not any(ln.startswith("| base ") for ln in short)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{HEADLINE_START}\nstale\n{HEADLINE_END}\n\nafter\n")
    write_report(tmp_path, readme=readme)
    assert readme.read_text() == f"# x\n\n{HEADLINE_START}\n" + "\n".join(short) + f"\n{HEADLINE_END}\n\nafter\n"
    readme.write_text("no markers\n")
    assert not sync_readme(readme, short) and readme.read_text() == "no markers\n"


def test_study_v2s_report_is_its_records():
    """records/study-v2/RESULTS.md's cost table is the one its records give (the README carried it until
    study v3's block took its place)."""
    root = Path(__file__).resolve().parents[1]
    study = root / "records" / "study-v2"
    assert HEADLINE_START not in (root / "README.md").read_text()
    assert readme_table(study)[0].startswith("| run | held-out loss")
    report = (study / "RESULTS.md").read_text()
    assert "\n".join(headline(study)) in report
    assert "records/study-v2/results/" in report and "docs/" not in report
    assert "[../study-v1/RESULTS.md](../study-v1/RESULTS.md)" in report  # the appendix finds study v1
    for link in ("results/memory-vs-speed.png", "results/curves.png", "results/drift.png"):
        assert f"]({link})" in report and (study / link).is_file()


def test_the_goal_falls_back_to_retention_kl_when_e2e_lost_nothing(tmp_path):
    b = plan.QUICK
    rec = Records(tmp_path / "results")
    kinds = ("arc-easy", "arc-challenge", "piqa", "winogrande", "lambada")
    configs = {n: plan.configs()[n] for n in ("e2e", "lopt-tg4", "lopt-tg2")}
    rec.put("meta", None, {"budget": json.loads(json.dumps(asdict(b))), "quick": True, "configs": configs,
                           "model": "m", "num_layers": 4, "dataset": "train.jsonl",
                           "machine": {"cpus": 2, "platform": "p", "torch": "t", "transformers": "x", "python": "3"}})
    rec.put("base/eval", {}, {"eval": _eval(2.0, {k: [1, 0, 0, 0] for k in kinds}, 0.0)})
    # e2e gains an item on every task, so it has no drop to halve; the runs differ only in retention KL
    for run, kl in (("e2e", 0.04), ("lopt-tg4", 0.01), ("lopt-tg2", 0.03)):
        rec.put(f"{run}/eval", {"config": run, "seed": 0}, {"eval": _eval(1.0, {k: [1, 1, 0, 0] for k in kinds}, kl)})
    rec.put("bench", {}, {"rows": [{"name": n, "peak_step_mb": 700.0 if n != "e2e" else 1000.0,
                                    "tokens_per_s": 125.0 if n != "e2e" else 100.0} for n in configs]})
    text = write_report(tmp_path).read_text()
    tg4 = next(ln for ln in text.splitlines() if ln.startswith("| lopt-tg4 | 1.000 |"))
    tg2 = next(ln for ln in text.splitlines() if ln.startswith("| lopt-tg2 | 1.000 |"))
    assert tg4.endswith("| - | 0.25 | 1.25 | 0.70 | yes |")
    assert tg2.endswith("| - | 0.75 | 1.25 | 0.70 | no (retention) |")
    assert "e2e did not lose retention on the suite (its drop: -25.0 points)" in text
    # a run the bench has not measured yet is not said to fail on speed or memory
    rec.put("lopt-paper/eval", {"config": "lopt-paper", "seed": 0},
            {"eval": _eval(1.1, {k: [1, 1, 0, 0] for k in kinds}, 0.01)})
    meta = rec.read("meta")
    meta["configs"]["lopt-paper"] = plan.configs()["lopt-paper"]
    rec.put("meta", None, {k: v for k, v in meta.items() if k != "spec"})
    paper = next(ln for ln in write_report(tmp_path).read_text().splitlines() if ln.startswith("| lopt-paper | 1.100 |"))
    assert paper.endswith("| - | - | no (loss); cost not benched yet |")


def test_a_killed_run_continues_from_its_checkpoint(shared_data, tmp_path, monkeypatch):
    """A run whose training was interrupted after a checkpoint continues from it: the record says so and
    the curve point at that step is still measured."""
    from lopt.recipes.sft import train
    from lopt.recipes.study.run import Study

    model = save_tiny(tmp_path / "tiny")
    monkeypatch.setenv("LOPT_EXPERIMENT_RUNS", str(tmp_path / "runs"))
    study = Study(tmp_path / "out", quick=True, model=str(model), data_dir=shared_data, keep_models=False,
                  progress=False)
    b = study.budget
    run_dir = tmp_path / "runs" / "e2e"
    cfg = plan.train_config(plan.configs()["e2e"], 0, b, lr=1e-3, model=str(model), dataset=str(study.data.train),
                            run_dir=run_dir)
    cfg.save_every = 1
    train(cfg)
    # What a kill right after checkpoint-2 leaves: no final model, no later checkpoint.
    for p in run_dir.iterdir():
        if p.is_file() and p.name != "metrics.jsonl":
            p.unlink()
        elif p.is_dir() and int(p.name.split("-")[1]) > b.curve_steps[-1]:
            shutil.rmtree(p)
    study.run("e2e", "e2e", 0, 1e-3)
    rec = study.records.read("e2e/train")
    assert rec["resumed_from"] == f"checkpoint-{b.curve_steps[-1]}"
    assert rec["summary"]["steps"] == b.steps
    assert [h["step"] for h in rec["history"]] == list(range(1, b.steps + 1))
    assert study.records.read(f"e2e/curve-{b.curve_steps[0]}")["eval"]["task_loss"]["loss"] > 0
    assert not run_dir.exists()


def test_a_wider_sweep_grid_or_another_bench_keeps_finished_records():
    from lopt.recipes.study.run import budget_spec

    b = plan.V2
    assert budget_spec(replace(b, sweep_lrs=(1e-5, 3e-5, 1e-4, 3e-4), bench_repeats=3)) == budget_spec(b)
    assert budget_spec(replace(b, steps=128)) != budget_spec(b)  # what a record depends on still counts
    assert budget_spec(replace(b, retention_rows=200)) != budget_spec(b)


# --------------------------------------------------------------------------- lopt study (issue 26)


def test_matched_skill_interpolates_along_each_curve_and_says_does_not_reach():
    from lopt.recipes.study.matched import Point, at_loss, matched_table

    # e2e: three rates. Its best loss is 1.00; a gentler rate moves less and learns less.
    e2e = [Point(1.00, 0.30, 0.02), Point(1.10, 0.10, 0.01), Point(1.30, 0.02, 0.0)]
    # lopt: never as good as e2e's best, reaches 1.02 and 1.05
    lopt = [Point(1.04, 0.08, None), Point(1.01, 0.20, None)]
    # lora: only above 1.05
    lora = [Point(1.20, 0.01)]
    t = matched_table({"e2e": e2e, "lopt": lopt, "lora": lora}, 1.00)
    assert t["e2e"][1.0].kl == pytest.approx(0.30) and t["e2e"][1.0].how == "interpolated"
    # 1.02 lies 20% of the way from (1.00, 0.30) to (1.10, 0.10): 0.30 - 0.2 x 0.20 = 0.26
    assert t["e2e"][1.02].kl == pytest.approx(0.26) and t["e2e"][1.02].drop == pytest.approx(0.018)
    assert t["e2e"][1.05].kl == pytest.approx(0.20)
    assert not t["lopt"][1.0].reached and t["lopt"][1.0].text() == "does not reach"
    # the points are sorted by loss before joining: 1.02 is a third of the way from 1.01 to 1.04
    assert t["lopt"][1.02].kl == pytest.approx(0.20 - 0.12 / 3) and t["lopt"][1.02].drop is None
    assert t["lopt"][1.05].how == "at most" and t["lopt"][1.05].kl == pytest.approx(0.08)
    assert t["lopt"][1.05].text("{:.2f}") == "<= 0.08"
    assert all(not m.reached for m in t["lora"].values())
    # a point exactly at the target, a single point, equal losses (the lower KL counts), no points
    assert at_loss([Point(1.0, 0.5)], 1.0).kl == 0.5
    assert at_loss([Point(1.0, 0.5), Point(1.0, 0.4), Point(2.0, 0.0)], 1.5).kl == pytest.approx(0.2)
    assert not at_loss([], 1.0).reached
    assert not at_loss([Point(float("nan"), 0.1)], 1.0).reached


def test_which_method_when_follows_its_rules_with_evidence_and_seed_noise():
    from lopt.recipes.study.rules import Cost, RunResult, which_method_when

    runs = [RunResult("e2e", "e2e-lr1e-4", 1.00, 0.30, 1e-4, 0), RunResult("e2e", "e2e-lr1e-4-seed1", 1.02, 0.34, 1e-4, 1),
            RunResult("e2e", "e2e-lr3e-5", 1.10, 0.10, 3e-5),
            RunResult("lopt", "lopt-lr1e-4", 1.04, 0.08, 1e-4), RunResult("lora", "lora-lr1e-3", 1.20, 0.01, 1e-3)]
    cost = {"e2e": Cost(100.0, 1000.0), "lopt": Cost(120.0, 800.0), "lora": Cost(150.0, 500.0)}
    v = which_method_when(runs, cost)
    assert [x.rule.split(",")[0].split(" (")[0] for x in v] == [
        "Lowest loss", "Least forgetting at matched skill", "Fastest within 1.05x of the best loss",
        "Leanest within 1.05x of the best loss"]
    # e2e's 1e-4 counts once, at its two seeds' mean (1.01, 0.32)
    assert v[0].method == "e2e" and "e2e-lr1e-4 (mean of 2 seeds) reaches held-out loss 1.0100" in v[0].evidence
    assert "lopt (lopt-lr1e-4), 1.0400 (1.030x)" in v[0].evidence
    assert "e2e 0.0200 over 2 seeds" in v[0].noise and "not a finding" not in v[0].noise  # margin 0.03 > 0.02
    # the band's edge is 1.05 x 1.01 = 1.0605: e2e's curve there lies between (1.01, 0.32) and (1.10, 0.10)
    edge = 1.05 * 1.01
    e2e_kl = 0.32 + (0.10 - 0.32) * (edge - 1.01) / (1.10 - 1.01)
    assert f"({edge:.4f})" in v[1].rule and f"e2e {e2e_kl:.4f} (between e2e-lr1e-4 (mean of 2 seeds) and e2e-lr3e-5)" in v[1].evidence
    # lopt's only run is more skilled than the edge: its KL there is at most 0.08, the lowest; lora (1.20) is out
    assert v[1].method == "lopt" and "lopt at most 0.0800" in v[1].evidence
    assert "Not reaching it (every run less skilled): lora (best 1.2000)." in v[1].evidence
    # a miss by less than the loss seed noise says so
    near = which_method_when(runs[:4] + [RunResult("lora", "lora-lr1e-3", 1.07, 0.01, 1e-3)], cost)[1]
    assert "lora (best 1.0700, within the largest loss seed noise (0.0200) of it)" in near.evidence
    assert v[2].method == "lopt" and v[3].method == "lopt" and "lopt 800, e2e 1000" in v[3].evidence
    # a margin below the seed noise is flagged
    close = [RunResult("e2e", "a", 1.00, 0.30, 1e-4, 0), RunResult("e2e", "b", 1.05, 0.3, 1e-4, 1),
             RunResult("lopt", "c", 1.02, 0.2)]
    assert "within seed noise" in which_method_when(close, {})[0].noise
    assert "Seed noise: not measured" in which_method_when([RunResult("lopt", "c", 1.0, 0.2),
                                                            RunResult("e2e", "d", 1.1, 0.1)], {})[0].noise
    # neither of the two compared ran twice: the largest spread measured stands in, and says whose it is
    proxy = which_method_when([RunResult("e2e", "a", 1.00, 0.30, 1e-4, 0), RunResult("e2e", "b", 1.20, 0.36, 1e-4, 1),
                               RunResult("lopt", "c", 0.90, 0.2), RunResult("lora", "d", 0.91, 0.25)], {})
    assert proxy[0].method == "lopt" and "not measured for these methods" in proxy[0].noise
    assert "e2e's 0.2000 over 2 seeds, stands in" in proxy[0].noise and "not a finding" in proxy[0].noise
    assert which_method_when([], {})[0].method is None


def test_least_forgetting_compares_methods_at_the_same_loss_not_the_same_run():
    """A gentle run of one method against an aggressive run of another is "moves less", not "forgets
    less": the rule reads every method's curve at the band's edge."""
    from lopt.recipes.study.rules import RunResult, configurations, which_method_when

    runs = [RunResult("e2e", "e2e-hi", 1.00, 0.40, 1e-4), RunResult("e2e", "e2e-lo", 1.10, 0.05, 1e-5),
            RunResult("lopt", "lopt-hi", 1.04, 0.20, 1e-4), RunResult("lopt", "lopt-lo", 1.20, 0.10, 1e-5)]
    rule = which_method_when(runs, {})[1]
    # at loss 1.05, e2e: 0.40 - 0.35 * 0.5 = 0.225; lopt: 0.20 - 0.10 * (0.01 / 0.16) = 0.19375
    assert rule.method == "lopt" and "e2e 0.2250" in rule.evidence and "lopt 0.1938" in rule.evidence
    # e2e a little gentler: at 1.05 its curve is lower, and the verdict turns, with the same two lopt runs
    runs[1] = RunResult("e2e", "e2e-lo", 1.06, 0.05, 1e-5)
    rule = which_method_when(runs, {})[1]
    assert rule.method == "e2e" and "e2e 0.1083" in rule.evidence  # 0.40 - 0.35 * 5 / 6
    # an upper bound as the runner-up is said to be one
    bound = which_method_when([RunResult("e2e", "a", 1.00, 0.02, 1e-4), RunResult("lopt", "b", 1.01, 0.30, 1e-4)], {})[1]
    assert bound.method == "e2e" and "lopt's figure is an upper bound" in bound.evidence
    # seeds of one rate average into one configuration; rates stay apart; no rate: each run its own
    conf = configurations([RunResult("m", "m-1", 1.0, 0.2, 1e-4, 0, 0.01), RunResult("m", "m-1-s1", 1.2, 0.4, 1e-4, 1, 0.03),
                           RunResult("m", "m-2", 1.5, 0.1, 1e-5), RunResult("x", "x-a", 1.0, 0.1), RunResult("x", "x-b", 2.0, 0.1)])
    assert [(c.run, round(c.loss, 6), round(c.kl, 6)) for c in conf][:2] == [("m-1 (mean of 2 seeds)", 1.1, 0.3), ("m-2", 1.5, 0.1)]
    assert conf[0].drop == pytest.approx(0.02) and len(conf) == 4


def _study_args(model: Path, out: Path, data: Path) -> list[str]:
    return ["study", "--model", str(model), "--dataset", "arithmetic", "--methods", "e2e", "lopt", "--steps", "2",
            "--batch-size", "2", "--max-length", "128", "--val-size", "3", "--eval-limit", "3", "--lr-factors", "1",
            "10", "--retention-prompts", "2", "--retention-new-tokens", "4", "--retention-suite", "arc-easy",
            "--limit", "2", "--data-dir", str(data), "--bench-steps", "1", "--bench-repeats", "1", "--eval-batch-size", "4",
            "--sweep-extend", "0", "--output-dir", str(out), "--no-progress"]


def test_lopt_study_end_to_end_then_resumes_without_redoing_anything(shared_data, tmp_path, capsys):
    """lopt study on a tiny model: bench, base, sweep, runs at two rates, evaluation, report, plot; a
    second call runs nothing; a missing piece is the only one redone; --dry-run prints the plan."""
    from lopt.cli import build_parser, config_from_args, main
    from lopt.recipes.study.command import Study, StudyOptions, run_study

    model, out = save_tiny(tmp_path / "tiny"), tmp_path / "study"
    args = _study_args(model, out, shared_data)
    capsys.readouterr()  # saving the tiny model showed transformers' bar
    assert main(args) == 0
    said = capsys.readouterr()
    assert "(14 pieces run now)" in said.out  # bench, base, 2 x 2 sweep points, 4 runs x (train, eval)
    # the study's own bar is the only one: no transformers bar for each model its pieces load and save
    assert "Loading weights" not in said.err and "Writing model shards" not in said.err
    s = json.loads((out / "study.json").read_text())
    assert [(r["method"], r["lr"]) for r in s["runs"]] == [
        ("e2e", s["meta"]["best"]["e2e"]), ("e2e", round(0.3 * s["meta"]["best"]["e2e"], 8)),
        ("lopt", s["meta"]["best"]["lopt"]), ("lopt", round(0.3 * s["meta"]["best"]["lopt"], 8))]
    for r in s["runs"]:
        assert r["loss"] > 0 and r["kl"] > 0 and r["drop"] is not None and 0 < r["cos_at_boundary"] <= 1
        assert r["command"].startswith(f"lopt train --method {r['method']} ")
    assert s["runs"][2]["boundary"] == 2  # lopt's boundary at the midpoint of the 4 layers
    assert s["reference_loss"] == min(r["loss"] for r in s["runs"] if r["method"] == "e2e")
    assert s["matched"]["e2e"]["1"]["reached"] and s["matched"]["e2e"]["1"]["kl"] == pytest.approx(
        min((r for r in s["runs"] if r["method"] == "e2e"), key=lambda r: r["loss"])["kl"])
    assert {r["name"] for r in s["meta"] and json.loads((out / "results" / "bench.json").read_text())["rows"]} == {
        "e2e", "lopt"}
    text = (out / "RESULTS.md").read_text()
    for section in ("## Which method when", "## Retention at matched task skill", "## Cost: `lopt bench`",
                    "- Lowest loss: **", "KL at 1.02x"):
        assert section in text
    assert "Partial report" not in text and (out / "loss-vs-retention.png").stat().st_size > 1000
    assert not (out / "models" / "e2e-lr0.001").exists()  # records are kept, weights are not
    # The README's block of the study: the rules' lines and the matched-skill table, between its markers.
    block = readme_block(out, tmp_path)
    assert block[0].startswith("`lopt study` on ") and "[RESULTS.md](study/RESULTS.md)" in block[0]
    assert [ln for ln in block if ln.startswith("- ")] == s["which_lines"] and "Partial" not in "\n".join(block)
    e2e_row = next(ln for ln in block if ln.startswith("| e2e |"))
    assert e2e_row.endswith("| 1.00 | 1.00 |") and f"| {s['matched']['e2e']['1']['kl']:.4f} " in e2e_row
    lopt_row = next(ln for ln in block if ln.startswith("| lopt |")).split(" | ")
    assert lopt_row[-2] == f"{s['cost']['lopt']['tokens_per_s'] / s['cost']['e2e']['tokens_per_s']:.2f}"
    start, end = readme_markers(out, tmp_path)
    assert start == "<!-- study: generated from study by lopt.recipes.study.summary; do not edit -->"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{start}\nstale\n{end}\nafter\n")
    assert sync_study_readme(readme, out)
    assert readme.read_text() == f"# x\n{start}\n" + "\n".join(block) + f"\n{end}\nafter\n"
    readme.write_text("no markers\n")
    assert not sync_study_readme(readme, out) and readme.read_text() == "no markers\n"
    # Again: every piece is recorded, nothing runs.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json") if p.name != "meta.json"}
    opts = config_from_args(build_parser().parse_args(args), StudyOptions, command="study")
    assert run_study(Study(opts)) == []
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json") if p.name != "meta.json"} == stamps
    # A missing piece (a sweep point) is the only one redone.
    (out / "results" / "sweep" / "lopt-lr0.0001.json").unlink()
    assert run_study(Study(opts)) == ["sweep/lopt-lr0.0001"]
    # The dry run: the plan and the estimate from the recorded bench.
    capsys.readouterr()
    assert main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "e2e: 0.0001, 0.001" in plan and "e2e 2, lopt 2)" in plan and "4 runs of 2 steps" in plan
    assert "estimate: " in plan and "  lopt-lr" in plan  # the runs, named: the sweep is recorded
    assert "still to run: nothing" in plan  # a finished study has nothing left
    done = Study(opts)
    base_seconds = done.records.read("base/eval")["eval"]["seconds"]
    assert done.left() == 0 and done.eval_estimate() == base_seconds  # the base's evaluation, as measured
    run_eval = out / "results" / "runs" / "e2e-lr0.001" / "eval.json"
    kept = run_eval.read_text()
    run_eval.unlink()
    assert done.left() == base_seconds
    run_eval.write_text(kept)
    # ... and leaves a finished study's report whole (its sweep is read back from the records)
    from lopt.recipes.study.summary import collect
    assert json.loads((out / "results" / "meta.json").read_text())["best"] == s["meta"]["best"]
    assert not collect(out)["missing"]


def test_seed_repeats_can_be_limited_to_some_methods():
    from lopt.recipes.study.command import StudyOptions, final_runs

    o = StudyOptions(dataset="d.jsonl", methods=["e2e", "lopt", "lora"], seeds=[0, 1], seed_methods=["e2e", "lopt"])
    runs = [r["run"] for r in final_runs({"e2e": 1e-4, "lopt": 1e-4, "lora": 1e-3}, o)]
    assert runs == ["e2e-lr0.0001", "e2e-lr3e-05", "e2e-lr0.0001-seed1", "lopt-lr0.0001", "lopt-lr3e-05",
                    "lopt-lr0.0001-seed1", "lora-lr0.001", "lora-lr0.0003"]


def test_the_study_plan_states_grids_rates_and_budget_adapted_schedules():
    from lopt.recipes.study.command import StudyOptions, final_runs, grids, schedule

    from lopt.methods import METHODS
    from lopt.recipes.study.command import START_LR

    assert set(START_LR) == set(METHODS)  # every method has a stated starting rate
    o = StudyOptions(dataset="d.jsonl", start_lr=["lora=2e-4"], seeds=[0, 1], method_rates=["e2e=3"])
    g = grids(o)
    assert g["e2e"] == [3e-5, 1e-4, 3e-4] and g["lora"] == [6e-5, 2e-4, 6e-4]  # study v2's e2e grid; a moved start
    runs = final_runs({"e2e": 1e-4, "lora": 1e-3}, o)
    assert [(r["run"], r["lr"], r["seed"]) for r in runs] == [
        ("e2e-lr0.0001", 1e-4, 0), ("e2e-lr3e-05", 3e-5, 0), ("e2e-lr1e-05", 1e-5, 0), ("e2e-lr0.0001-seed1", 1e-4, 1),
        ("lora-lr0.001", 1e-3, 0), ("lora-lr0.0003", 3e-4, 0), ("lora-lr0.001-seed1", 1e-3, 1)]
    # BAdam at LLaMA-Factory's 50 steps trains 6 of SmolLM2's 30 layers in 256 steps; adapted, all of them
    opts, why = schedule("badam", 30, 256, adapt=True)
    assert opts == {"badam_switch_every": 8} and "all 30 layers get a turn" in why and "would train 6" in why
    opts, why = schedule("lisa", 30, 256, adapt=True)
    assert opts == {"lisa_interval": 8} and "32 draws for 30 layers" in why
    assert schedule("badam", 30, 8, adapt=True)[0] == {"badam_switch_every": 1}
    assert "only 8 of 30 layers" in schedule("badam", 30, 8, adapt=True)[1]
    assert schedule("badam", 30, 256, adapt=False)[0] == {} and schedule("e2e", 30, 256, adapt=True) == ({}, "")


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "{rows}", "--steps", "50"], "is too small for the budget: 20 rows are left to train on after "
                                               "holding out 12, and --steps 50 x --batch-size 2 needs 100"),
    (["--dataset", "{rows}", "--val-size", "20"], "no held-out split possible: "),
    (["--dataset", "{rows}", "--methods", "e2e", "--start-lr", "lisa=1e-4"],
     "--start-lr lisa=1e-4: 'lisa' is not one of --methods (e2e)"),
    (["--dataset", "{rows}", "--start-lr", "e2e=fast"], "--start-lr e2e=fast: give METHOD=LR"),
    (["--dataset", "{rows}", "--retention-suite", "arc-easy,mmlu"], "--retention-suite arc-easy,mmlu: no task 'mmlu'"),
    (["--dataset", "{rows}", "--methods", "e2e", "e2e"], "--methods names a method twice"),
    (["--dataset", "{rows}", "--sweep-extend", "-1"], "--sweep-extend must be >= 0"),
    (["--dataset", "{rows}", "--methods", "e2e", "--seed-methods", "lora"],
     "--seed-methods lora: not one of --methods (e2e)"),
    (["--dataset", "{rows}", "--method-rates", "e2e=4"], "--method-rates e2e=4: give METHOD=N with N 1, 2 or 3"),
    ([], "--dataset is required"),
])
def test_bad_study_input_is_one_line_before_anything_loads(tmp_path, capsys, extra, message):
    from lopt.cli import main

    rows = write_jsonl(tmp_path / "rows.jsonl", addition_rows())  # 32 rows
    out = tmp_path / "out"
    argv = ["study", "--model", str(tmp_path / "no-such-model"), "--batch-size", "2", "--val-size", "6",
            "--output-dir", str(out), *[a.format(rows=rows) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing written, no model loaded (the model named does not exist)


def _tiny_e2e_study(tmp_path: Path):
    """A 4-step e2e study of the tiny model on the addition rows, its data written: (options, study)."""
    from lopt.recipes.study.command import Study, StudyOptions

    rows = write_jsonl(tmp_path / "rows.jsonl", addition_rows())
    opts = StudyOptions(model=str(save_tiny(tmp_path / "tiny")), dataset=str(rows), methods=["e2e"], steps=4,
                        batch_size=2, max_length=128, val_size=3, eval_limit=3, retention_prompts=2,
                        retention_new_tokens=4, output_dir=str(tmp_path / "out"), progress=False)
    study = Study(opts)
    study.data.write()
    return opts, study


def test_the_bench_measures_each_method_as_its_runs_train_it(tmp_path):
    """lopt bench fills the engine's defaults (pure local learning, an untied head) where lopt train fills
    the recipes' (lopt: the boundary open every 4th step, a tied head kept tied): the study's bench rows
    must name them, or its cost column is another method's."""
    from lopt.bench.runner import BenchSpec, bench_config
    from lopt.recipes.study.command import DEFAULT_METHODS, Study

    opts, _ = _tiny_e2e_study(tmp_path)
    study = Study(replace(opts, methods=list(DEFAULT_METHODS), precision="bf16-mixed"))
    table = study.bench_table()
    assert list(table) == list(DEFAULT_METHODS)
    keys = ("method", "task_grad_every", "tied_head", "lambda_aux", "local_objective", "precision", "lisa_interval",
            "badam_switch_every", "num_blocks", "lora_r")
    for m in DEFAULT_METHODS:
        bench = bench_config(BenchSpec(name=m, overrides=table[m]))
        run = study.train_config(m, 1e-4, 0, opts.steps, tmp_path / m)
        assert {k: getattr(bench, k) for k in keys} == {k: getattr(run, k) for k in keys}, m
    assert table["lopt"]["task_grad_every"] == 4 and table["lopt"]["tied_head"] is None
    # the bare overrides, as the bench read them before, measured the paper's pure local learning instead
    bare = bench_config(BenchSpec(name="lopt", overrides=study.overrides("lopt", opts.steps)))
    assert bare.task_grad_every == 0 and bare.tied_head is False


def test_a_killed_study_run_continues_from_its_checkpoint(tmp_path):
    """A study run killed after a checkpoint continues from it; its record says so."""
    from lopt.recipes.sft import train
    from lopt.recipes.study.command import Study

    opts, study = _tiny_e2e_study(tmp_path)
    run = {"run": "e2e-lr0.001", "method": "e2e", "lr": 1e-3, "seed": 0}
    run_dir = study.runs_dir / run["run"]
    cfg = study.train_config("e2e", 1e-3, 0, 4, run_dir)
    cfg.save_every = 2
    train(cfg)
    # What a kill right after checkpoint-2 leaves: no final model, no later checkpoint.
    shutil.rmtree(run_dir / "checkpoint-4")
    for p in run_dir.iterdir():
        if p.is_file() and p.name != "metrics.jsonl":
            p.unlink()
    # only a checkpoint of this run's settings is resumed (one left by another rate is dropped)
    from lopt.recipes.study.command import same_run
    assert same_run(run_dir / "checkpoint-2", cfg) and not same_run(run_dir / "checkpoint-2", replace(cfg, lr=2e-3))
    assert not same_run(run_dir / "checkpoint-2", replace(cfg, local_objective="early-exit"))  # a run's variant
    # --precision reaches every run (its command, its checkpoint's identity) and keys the records
    bf = Study(replace(opts, precision="bf16-mixed"))
    bf_cfg = bf.train_config("e2e", 1e-3, 0, 4, run_dir)
    assert bf_cfg.precision == "bf16-mixed" and "--precision bf16-mixed" in Study.command(bf_cfg)
    assert bf.overrides("e2e", 4) != study.overrides("e2e", 4) and not same_run(run_dir / "checkpoint-2", bf_cfg)
    # a one-rate grid (--lr-factors 1) has nothing to choose: no sweep run, no sweep time in the estimate
    one = Study(replace(opts, lr_factors=[1.0], start_lr=["e2e=3e-4"]))
    assert one.sweep("e2e") == 3e-4 and one.recorded_best() == {"e2e": 3e-4}
    assert one.executed == [] and one.estimates()["sweep"] == 0
    assert "  e2e: 0.0003 (one rate: no sweep)" in one.plan_lines(None)
    study.run(run)
    rec = study.records.read("runs/e2e-lr0.001/train")
    assert rec["resumed_from"] == "checkpoint-2" and rec["summary"]["steps"] == 4
    assert [h["step"] for h in rec["history"]] == [1, 2, 3, 4]
    assert "--save-every" not in rec["command"] and "--resume" not in rec["command"]
    assert study.records.read("runs/e2e-lr0.001/eval")["eval"]["task_loss"]["loss"] > 0
    assert study.executed == ["runs/e2e-lr0.001/train", "runs/e2e-lr0.001/eval"] and not run_dir.exists()


def _study_eval(loss: float, kl: float, change: float | None = None) -> dict:
    ev = {"task_loss": {"loss": loss}, "retention_kl": {"kl": kl}, "seconds": 1.0,
          "drift": {"boundary": 2, "cos_at_boundary": 0.99, "layers": [{"cos": 1.0, "cka": 1.0}] * 5}}
    if change is not None:
        ev["suite"] = {"arc-easy": {"score": 0.5 + change, "base": 0.5, "change": change, "n": 2}}
    return {"eval": ev}


def test_the_study_report_reads_matched_skill_and_rules_off_the_records(tmp_path):
    """The report of hand-made records: matched-skill cells, the rules' lines, a partial report."""
    from lopt.recipes.study.command import StudyOptions
    from lopt.recipes.study.summary import write_summary

    rec = Records(tmp_path / "results")
    runs = [{"run": f"{m}-lr{lr:g}", "method": m, "lr": lr, "seed": 0} for m, lr in
            (("e2e", 1e-4), ("e2e", 3e-5), ("lopt", 1e-4), ("lopt", 3e-5))]
    rec.put("meta", None, {"options": asdict(StudyOptions(dataset="d.jsonl", methods=["e2e", "lopt"])),
                           "num_layers": 4, "data": {"rows": 100, "train_rows": 40, "eval": "E", "sweep": "S"},
                           "grids": {"e2e": [1e-4], "lopt": [1e-4]}, "rate_factors": [1.0, 0.3], "schedules": {},
                           "sweep_steps": 2, "best": {"e2e": 1e-4, "lopt": 1e-4}, "runs": runs, "suite": ["arc-easy"],
                           "machine": {"cpus": 2, "platform": "p", "torch": "t", "transformers": "x"}})
    rec.put("base/eval", {}, _study_eval(2.0, 0.0, 0.0))
    rec.put("runs/e2e-lr0.0001/eval", {}, _study_eval(1.00, 0.30, -0.10))
    rec.put("runs/e2e-lr3e-05/eval", {}, _study_eval(1.10, 0.10, 0.0))
    rec.put("runs/lopt-lr0.0001/eval", {}, _study_eval(1.04, 0.08, -0.02))
    rec.put("bench", {}, {"rows": [{"name": "e2e", "step_time_s": 1.0, "tokens_per_s": 100.0, "peak_step_mb": 900.0},
                                   {"name": "lopt", "step_time_s": 0.8, "tokens_per_s": 125.0, "peak_step_mb": 700.0}]})
    write_summary(tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "**Partial report**: 1 of 4 runs have no evaluation yet (lopt-lr3e-05)" in text
    # lopt's one run (1.04) lies above e2e's best loss and below 1.05x of it
    assert "| e2e | 0.3000 / +10.0 pt | 0.2600 / +8.0 pt | 0.2000 / +5.0 pt | 100 | 900 |" in text
    assert "| lopt | does not reach | does not reach | <= 0.0800 / +2.0 pt | 125 | 700 |" in text
    assert ("- Least forgetting at matched skill, 1.05x the best loss (1.0500): **lopt**. Retention KL on each "
            "method's curve at that loss: lopt at most 0.0800 (every run more skilled; the least KL, lopt-lr0.0001); "
            "e2e 0.2000 (between e2e-lr0.0001 and e2e-lr3e-05).") in text
    assert "- Fastest within 1.05x of the best loss: **lopt**. tokens/s: lopt 125, e2e 100." in text
    s = json.loads((tmp_path / "study.json").read_text())
    assert s["matched"]["lopt"]["1.05"] == {"target": 1.05, "reached": True, "kl": 0.08, "drop": 0.02, "how": "at most"}
    assert (tmp_path / "loss-vs-retention.png").stat().st_size > 1000
    # python -m lopt.recipes.study.summary: the report and a README's block, regenerated from the records
    from lopt.recipes.study.summary import main

    (tmp_path / "RESULTS.md").unlink()
    readme = tmp_path.parent / f"{tmp_path.name}-README.md"  # beside the study's folder, as the repository's
    start, end = readme_markers(tmp_path, readme.parent)
    readme.write_text(f"{start}\n{end}\n")
    assert main([str(tmp_path), "--readme", str(readme)]) == 0 and (tmp_path / "RESULTS.md").read_text() == text
    block = readme.read_text().splitlines()[1:-1]
    assert block == readme_block(tmp_path, readme.parent) and "**Partial**: 1 of 4 runs have no evaluation yet; " \
        "the figures below are the finished runs'." in block
    assert "| lopt | does not reach | does not reach | <= 0.0800 / +2.0 pt | 1.25 | 0.78 |" in block
    readme.write_text("no block\n")
    assert main([str(tmp_path), "--readme", str(readme)]) == 2 and readme.read_text() == "no block\n"


def test_the_study_holds_out_rows_or_reads_the_eval_dataset(tmp_path):
    from lopt.recipes.study.command import StudyData, StudyOptions

    rows = write_jsonl(tmp_path / "rows.jsonl", addition_rows())  # 32 rows
    held = StudyData(StudyOptions(dataset=str(rows), steps=5, batch_size=2, val_size=4), tmp_path / "a")
    held.write()
    train, val, ev = ([json.loads(ln) for ln in p.read_text().splitlines()]
                      for p in (held.train, held.sweep_val, held.eval))
    assert (len(train), len(val), len(ev)) == (10, 4, 4) and "held out" in held.eval_note
    qs = [r["question"] for r in train + val + ev]
    assert len(set(qs)) == len(qs)  # no row both trained on and held out
    other = write_jsonl(tmp_path / "other.jsonl", addition_rows()[:6])
    given = StudyData(StudyOptions(dataset=str(rows), eval_dataset=str(other), steps=5, batch_size=2, val_size=4,
                                   eval_limit=5), tmp_path / "b")
    given.write()
    assert given.eval.read_text().count("\n") == 5 and "other.jsonl" in given.eval_note
    assert given.sweep_val.read_text().count("\n") == 4 and given.digest != held.digest


def test_the_run_estimate_follows_the_padded_tokens_of_its_own_batches(tmp_path):
    """lopt bench times the first batches of a full run; a run's estimate scales its step time by its
    own batches' padded tokens against those the bench timed (lopt.bench.runner.bench_batches)."""
    from lopt.bench.runner import BenchSpec, bench_batches
    from lopt.data import Batches, build_sft_dataset
    from lopt.recipes.study.command import Study, StudyOptions

    # half the questions long: batches differ in padded length
    rows = [{"question": f"What is {a} + {b}?" + (" Think about it step by step, please." * 6 if a % 2 else ""),
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(1, 9) for b in range(1, 5)]
    opts = StudyOptions(model=str(save_tiny(tmp_path / "tiny")), dataset=str(write_jsonl(tmp_path / "r.jsonl", rows)),
                        methods=["e2e"], steps=12, batch_size=2, max_length=128, val_size=4, eval_limit=4,
                        bench_steps=2, output_dir=str(tmp_path / "out"), progress=False)
    study = Study(opts)
    study.data.write()
    tok = study._load_base()[1]
    spec = BenchSpec(name="e2e", overrides={}, batch_size=2, seq_len=128, warmup=1, steps=2,
                     dataset=str(study.data.train), limit=12 * 2)
    timed = [b["input_ids"].numel() for b in bench_batches(spec, tok, vocab=0)[1:3]]  # after the warm-up batch
    for steps in (12, 4):
        examples, _ = build_sft_dataset(str(study.data.train), tok, max_length=128, limit=steps * 2)
        it = Batches(examples, 2, tok.pad_token_id, seed=0)
        own = [next(it)["input_ids"].numel() for _ in range(steps)]
        assert study.length_scale(steps) == pytest.approx((sum(own) / steps) / (sum(timed) / 2))
    assert len({study.length_scale(12), study.length_scale(4), 1.0}) == 3  # the rows make them differ
    study.records.put("bench", {}, {"rows": [{"name": "e2e", "step_time_s": 0.5, "tokens_per_s": 100.0}]})
    assert study.train_estimate("e2e", 12) == pytest.approx(12 * 0.5 * study.length_scale(12) + 2.0)


def test_the_sweep_walks_past_an_edge_until_the_best_is_bracketed():
    import math

    from lopt.recipes.study.command import walk_grid

    def bowl(at: float):  # a held-out loss with its minimum at lr = at, symmetric in log lr
        seen = []

        def loss(lr: float) -> float:
            seen.append(lr)
            return 1.0 + (math.log10(lr) - math.log10(at)) ** 2
        return loss, seen

    grid = [3e-5, 1e-4, 3e-4]
    loss, seen = bowl(1e-4)  # bracketed already: nothing more
    assert walk_grid(grid, loss, 2)[0] == grid and seen == grid
    loss, seen = bowl(1e-3)  # the top is best: 9e-4 is better still, 2.7e-3 worse, so it stops
    walked, losses = walk_grid(grid, loss, 2)
    assert walked == [3e-5, 1e-4, 3e-4, 9e-4, 2.7e-3] and min(losses, key=losses.get) == 9e-4
    loss, seen = bowl(1.0)  # far above: two more rates, then the limit
    assert walk_grid(grid, loss, 2)[0] == [3e-5, 1e-4, 3e-4, 9e-4, 2.7e-3]
    loss, seen = bowl(1e-7)  # below: down by x3
    assert walk_grid(grid, loss, 1)[0] == [1e-5, 3e-5, 1e-4, 3e-4]
    assert walk_grid(grid, bowl(1.0)[0], 0)[0] == grid  # --sweep-extend 0: the grid as given
    # a point that is not recorded stops the walk (recorded_best: the sweep is not finished)
    assert walk_grid(grid, lambda lr: None if lr > 3e-4 else -lr, 2) is None
    assert walk_grid(grid, lambda lr: float("nan"), 2)[0] == grid  # nothing finite: no direction to walk


def test_a_swept_edge_is_extended_from_the_records_and_never_retrained(tmp_path):
    from lopt.recipes.study.command import Study

    opts, study = _tiny_e2e_study(tmp_path)
    for lr, loss in ((3e-5, 0.9), (1e-4, 0.8), (3e-4, 0.7)):  # the grid's top rate is best
        study.records.put(f"sweep/e2e-lr{lr:g}", study.sweep_spec("e2e", lr), {"val": {"loss": loss}})
    assert study.recorded_best() is None  # the rate beyond the edge is not recorded: the sweep is not done
    study.records.put("sweep/e2e-lr0.0009", study.sweep_spec("e2e", 9e-4), {"val": {"loss": 0.75}})
    assert study.recorded_best() == {"e2e": 3e-4} and study.swept["e2e"] == [3e-5, 1e-4, 3e-4, 9e-4]
    again = Study(opts)
    assert again.sweep("e2e") == 3e-4 and again.executed == []  # every point read back, none trained
    assert "  e2e: 3e-05, 0.0001, 0.0003, 0.0009" in again.plan_lines(None)
    again.meta({"e2e": 3e-4})
    assert again.records.read("meta")["grids"]["e2e"] == [3e-5, 1e-4, 3e-4, 9e-4]
    assert Study(replace(opts, sweep_extend=0)).recorded_best() == {"e2e": 3e-4}
