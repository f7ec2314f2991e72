"""Issue 29's runner (lopt.recipes.study.local_objectives): its runs are study pieces with a reference
study's setup (data checked by digest, cached base answers), resumable, and the bar's verdict."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from conftest import addition_rows, save_tiny, write_jsonl
from lopt.engine.config import LoPTError
from lopt.recipes.study.matched import Point


def _reference(tmp_path: Path) -> tuple[Path, Path]:
    """A hand-made reference study: its options (a tiny model, the addition rows), its swept rate for
    lopt, and two freeze-lower runs on its curve. Returns (study folder, rows file)."""
    from lopt.recipes.study.command import StudyData, StudyOptions
    from lopt.recipes.study.records import Records

    rows = write_jsonl(tmp_path / "rows.jsonl", addition_rows())
    study = tmp_path / "ref"
    opts = StudyOptions(model=str(save_tiny(tmp_path / "tiny")), dataset=str(rows), methods=["freeze-lower", "lopt"],
                        seeds=[0, 1], seed_methods=["freeze-lower"], method_rates=["freeze-lower=3"], steps=2, batch_size=2, max_length=128, val_size=3, eval_limit=3, retention_prompts=2,
                        retention_new_tokens=4, output_dir=str(study), progress=False)
    digest = StudyData(opts, study / "data").digest
    runs = [{"run": f"freeze-lower-lr{lr:g}", "method": "freeze-lower", "lr": lr, "seed": 0} for lr in (1e-3, 3e-4)]
    meta = {"options": {k: v for k, v in asdict(opts).items() if k not in ("dry_run", "progress")},
            "best": {"lopt": 1e-3, "freeze-lower": 1e-3}, "data": {"digest": digest}, "runs": runs}
    (study / "results").mkdir(parents=True)
    (study / "results" / "meta.json").write_text(json.dumps(meta))
    rec = Records(study / "results")
    for run, (loss, kl) in zip(runs, ((2.0, 0.5), (2.5, 0.1))):
        rec.put(f"runs/{run['run']}/train", run, {"train_seconds": 1.0, "command": "lopt train"})
        rec.put(f"runs/{run['run']}/eval", run, {"eval": {"task_loss": {"loss": loss}, "retention_kl": {"kl": kl},
                                                          "drift": {"cos_at_boundary": 1.0}}})
    return study, rows


def test_runs_are_the_reference_studys_pieces_and_resume(tmp_path):
    """Two runs train with the reference's settings and a pure local objective, are evaluated like its
    runs, land in RESULTS.md beside its references; run again, nothing is redone."""
    from lopt.recipes.study.local_objectives import ObjectiveStudy, main, objective_options, runs, write_results

    study, _ = _reference(tmp_path)
    out = tmp_path / "lo"
    planned = runs(1e-3)
    assert [r["run"] for r in planned] == [
        "freeze-lower-lr0.001", "early-exit-lower0.001", "recon+cos-lower0.001", "recon+anchor-lower0.001", "recon-std-lower0.001",
        "early-exit-lower0.0001"]
    paper = runs(1e-3, ("recon",), second=("recon",))[-1]
    assert paper["run"] == "recon-lower0.0001" and paper["extra"]["lr_lower"] == pytest.approx(1e-4)
    opts = objective_options(study, out)
    st = ObjectiveStudy(opts, study)
    st.data.write()
    assert st.cache_dir == study / "cache"  # the reference's base answers, not a second set
    table = st.bench_table()
    assert list(table) == ["e2e", "freeze-lower", "lopt", "pure recon", "pure early-exit", "pure recon+cos",
                           "pure recon+anchor", "pure recon-std"]
    assert table["pure recon-std"]["task_grad_every"] == 0 and table["pure recon-std"]["local_objective"] == "recon-std"
    assert planned[0]["method"] == "freeze-lower" and "extra" not in planned[0]
    picked = [planned[1], paper]
    for r in picked:
        st.run(r)
    assert st.executed == [f"runs/{r['run']}/{k}" for r in picked for k in ("train", "eval")]
    for r in picked:
        tr = st.records.read(f"runs/{r['run']}/train")
        # the paper's recon is lopt train's default: its command does not name it
        assert ("--local-objective" in tr["command"]) == (r["objective"] != "recon")
        assert r["objective"] == "recon" or f"--local-objective {r['objective']}" in tr["command"]
        assert "--task-grad-every 0" in tr["command"] and f"--lr-lower {r['extra']['lr_lower']:g}" in tr["command"]
        ev = st.records.read(f"runs/{r['run']}/eval")["eval"]
        assert ev["task_loss"]["loss"] > 0 and ev["retention_kl"]["kl"] >= 0 and 0 < ev["drift"]["cos_at_boundary"] <= 1
    assert list((study / "cache").glob("probe-*.pt"))
    text = write_results(out, study).read_text()
    assert "| study v3: freeze-lower-lr0.001 |" in text and "| recon+cos-lower0.001 | 0.001 | not run yet |" in text
    assert "| control: freeze-lower-lr0.001 | - | not run yet |" in text
    assert "| early-exit-lower0.001 | 0.001 | " in text and ("passes: " in text or "fails: " in text)
    (out / "results" / "notes.md").write_text("## What the runs show\n\nA reading.\n")
    assert write_results(out, study).read_text().endswith("\n## What the runs show\n\nA reading.\n")
    # Again, through the command: both runs are recorded, nothing trains.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results" / "runs").rglob("*.json")}
    with pytest.raises(SystemExit, match="unknown run"):
        main(["--study", str(study), "--out", str(out), "--only", "nope"])
    again = ObjectiveStudy(opts, study)
    for r in picked:
        again.run(r)
    assert again.executed == []
    assert {p: p.stat().st_mtime_ns for p in (out / "results" / "runs").rglob("*.json")} == stamps


def test_the_control_at_the_runs_rate_joins_the_bar(tmp_path):
    """A candidate between the reference's freeze-lower runs is judged against the freeze-lower control
    trained at the candidates' own upper rate too, once it is recorded."""
    from lopt.recipes.study.local_objectives import control, runs, write_results
    from lopt.recipes.study.records import Records

    study, _ = _reference(tmp_path)
    out = tmp_path / "lo"
    rec = Records(out / "results")
    cand = runs(1e-3)[1]

    def put(run, loss, kl):
        rec.put(f"runs/{run['run']}/train", run, {"train_seconds": 1.0, "command": "lopt train"})
        rec.put(f"runs/{run['run']}/eval", run, {"eval": {"task_loss": {"loss": loss}, "retention_kl": {"kl": kl},
                                                          "drift": {"cos_at_boundary": 1.0}}})

    put(cand, 2.2, 0.2)  # under the chord of the reference's runs (2.0, 0.5) and (2.5, 0.1), beating neither
    text = write_results(out, study).read_text()
    assert f"| {cand['run']} | 0.001 | 2.2000 | 0.2000 |" in text and "fails: beats no freeze-lower run" in text
    put(control(1e-3), 2.3, 0.25)  # the control at the same rate: worse on both axes
    text = write_results(out, study).read_text()
    assert "| control: freeze-lower-lr0.001 | - | 2.3000 | 0.2500 |" in text
    assert "beats freeze-lower-lr0.001; cost not benched" in text


def test_other_data_than_the_references_is_refused(tmp_path):
    from lopt.recipes.study.local_objectives import ObjectiveStudy, objective_options

    study, _ = _reference(tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", addition_rows()[::-1])
    with pytest.raises(LoPTError, match="differ from .*digest"):
        ObjectiveStudy(replace(objective_options(study, tmp_path / "lo"), dataset=str(other)), study)


def test_the_bar_beats_a_freezing_run_on_both_axes_at_no_more_cost():
    from lopt.recipes.study.local_objectives import verdict

    freeze = [Point(0.75, 0.34, run="fl-hi"), Point(0.76, 0.10, run="fl-lo")]
    paper = {"peak_mb": 1000.0, "tokens_per_s": 100.0}
    same = {"peak_mb": 1010.0, "tokens_per_s": 98.0}
    ok, why = verdict(Point(0.755, 0.09, run="c"), freeze, same, paper)
    assert ok and why.startswith("beats fl-lo at 1.01x")
    # lower loss than fl-lo but more KL than it, and more KL than fl-hi's: beats neither
    ok, why = verdict(Point(0.755, 0.40), freeze, same, paper)
    assert not ok and "freeze-lower's KL at this loss is 0.2200" in why
    # below every freeze-lower loss at more KL than any: nothing to read on its curve
    ok, why = verdict(Point(0.70, 0.50), freeze, same, paper)
    assert not ok and "freeze-lower's lowest loss is 0.7500" in why
    # beats one on both axes, but costs more memory than the paper's LoPT
    ok, why = verdict(Point(0.74, 0.30), freeze, {"peak_mb": 1200.0, "tokens_per_s": 100.0}, paper)
    assert not ok and "1.20x its memory" in why and "beats fl-hi" in why
    ok, why = verdict(Point(0.74, 0.30), freeze, None, None)
    assert not ok and "not benched" in why


def test_the_activation_table_reads_the_last_traced_step_against_the_base(tmp_path):
    from lopt.recipes.study.local_objectives import activation_lines

    def stats(cos, first, rest, rank):
        return {"cos": cos, "cos_without_massive": cos - 0.01, "first_norm": first, "rest_rms_median": rest,
                "effective_rank": rank}

    trace = [{"step": 16, "boundary": stats(0.9, 200.0, 6.0, 40.0), "base_boundary": stats(1.0, 240.0, 5.0, 50.0),
              "adam_steps": {"mlp": {"full_step_fraction": 0.5}}},
             {"step": 64, "boundary": stats(0.5, 180.0, 7.5, 30.0), "base_boundary": stats(1.0, 240.0, 5.0, 50.0),
              "adam_steps": {"mlp": {"full_step_fraction": 0.25}, "q": {"full_step_fraction": 0.125}}}]
    (tmp_path / "recon-lr0.0001.json").write_text(json.dumps({"objective": "recon", "lr_lower": 1e-4, "trace": trace}))
    lines = activation_lines(tmp_path)
    assert lines[0].endswith("| full steps: mlp | full steps: q |")
    assert lines[2] == "| recon, 0.0001 (64) | 0.500 | 0.490 | 0.75 | 1.50 | 30 (50) | 25% | 12% |"
    assert activation_lines(tmp_path / "none") == []
