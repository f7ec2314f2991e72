"""``make experiment`` (python -m lopt.recipes.experiment): ``lopt study`` with the project's settings
(study v3), the arguments it passes on, the README block it refreshes; study v2's frozen entry point
(python -m lopt.recipes.study.v2); study v1's code gone while its frozen records stay."""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest

from lopt.recipes import experiment
from lopt.recipes.study import v2

ROOT = Path(__file__).resolve().parents[1]
# The data folder study v3 was run with, relative to the repository root, as its README shows it.
RECORD_DATA_DIR = "../shared/data"


def _options(args: list[str]):
    """The StudyOptions lopt study's own parser makes of ``args``."""
    from lopt.cli import build_parser, config_from_args
    from lopt.recipes.study.command import StudyOptions

    return config_from_args(build_parser().parse_args(["study", *args]), StudyOptions, command="study")


@pytest.fixture
def study_calls(monkeypatch, tmp_path):
    """main() with lopt study replaced by a recorder (exit status ``rc``), in a scratch folder whose
    README has the block of records/study-v3; the README sync replaced by a recorder too."""
    calls, synced = {"rc": 0, "args": []}, []

    def fake(args):
        calls["args"].append(args)
        return calls["rc"]

    monkeypatch.setattr(experiment, "run_lopt_study", fake)
    monkeypatch.setattr(experiment, "sync_readme", lambda readme, out: synced.append((readme, out)) or True)
    monkeypatch.chdir(tmp_path)
    calls["synced"] = synced
    return calls


def test_make_experiment_is_lopt_study_with_the_projects_settings(study_calls):
    assert experiment.main([]) == 0
    args = study_calls["args"][-1]
    assert args == experiment.SETTINGS
    o = _options(args)
    assert (o.dataset, o.eval_dataset, o.eval_limit, o.max_length, o.steps, o.batch_size) == (
        "gsm8k", "gsm8k", 300, 384, 256, 4)
    assert o.methods == ["e2e", "lopt", "freeze-lower", "lora", "lisa", "badam"] and o.method_rates == ["e2e=3"]
    assert (o.precision, o.bench_steps, o.bench_repeats) == ("bf16-mixed", 4, 2)
    assert o.output_dir == "records/study-v3" and o.data_dir is None  # $LOPT_DATA_DIR, as the Makefile sets it
    assert study_calls["synced"] == [(Path("README.md"), Path("records/study-v3"))]


def test_arguments_pass_through_and_a_later_option_wins(study_calls):
    gemma = ["--model", "gemma3-270m", "--gguf-file", "g.gguf", "--methods", "e2e", "lopt", "freeze-lower",
             "--rates", "1", "--method-rates", "e2e=1", "--output-dir", "records/study-v3-gemma3"]
    assert experiment.main(gemma) == 0
    o = _options(study_calls["args"][-1])
    assert o.methods == ["e2e", "lopt", "freeze-lower"]  # the later list replaces the settings' list
    assert (o.model, o.rates, o.method_rates, o.output_dir, o.steps) == (
        "gemma3-270m", 1, ["e2e=1"], "records/study-v3-gemma3", 256)
    assert study_calls["synced"][-1] == (Path("README.md"), Path("records/study-v3-gemma3"))
    # --dry-run trains nothing: the README is left alone; so is it when the study fails
    n = len(study_calls["synced"])
    assert experiment.main(["--dry-run"]) == 0 and _options(study_calls["args"][-1]).dry_run
    study_calls["rc"] = 2
    assert experiment.main([]) == 2
    assert len(study_calls["synced"]) == n


def test_quick_is_the_whole_pipeline_on_a_tiny_budget(study_calls):
    assert experiment.main(["--quick"]) == 0
    o = _options(study_calls["args"][-1])
    assert o.output_dir == "runs/experiment-quick" and (o.steps, o.batch_size, o.eval_limit, o.rates) == (4, 2, 8, 1)
    assert o.methods == _options(experiment.SETTINGS).methods  # every method: the whole pipeline
    assert experiment.main(["--quick", "--output-dir", "elsewhere"]) == 0
    assert _options(study_calls["args"][-1]).output_dir == "elsewhere"
    assert study_calls["synced"] == []  # a quick run is not a result: no README block


def test_a_bad_argument_is_lopt_studys_one_line_error(capfd, monkeypatch, tmp_path):
    """The real child process: lopt study checks its options before it reads any data."""
    monkeypatch.chdir(tmp_path)
    assert experiment.main(["--steps", "0"]) == 2
    err = capfd.readouterr().err
    assert err == "lopt study: error: --steps must be >= 1, got 0\n"


def test_the_records_readme_and_the_guide_show_the_settings():
    """records/study-v3/README.md and docs/study.md show the command made of SETTINGS, and the records
    of study v3 were made with those settings."""
    text = experiment.command_text(RECORD_DATA_DIR)
    assert shlex.split(text.replace("\\\n", " "))[2:] == ["--data-dir", RECORD_DATA_DIR,
                                                           *experiment.SETTINGS]
    for doc in (ROOT / experiment.DEFAULT_OUT / "README.md", ROOT / "docs" / "study.md"):
        assert text in doc.read_text(), f"{doc} does not show study v3's command (experiment.command_text())"
    meta = ROOT / experiment.DEFAULT_OUT / "results" / "meta.json"
    if not meta.is_file():
        pytest.skip(f"{meta} not written yet")
    recorded = json.loads(meta.read_text())["options"]
    expected = asdict(_options(experiment.SETTINGS))
    for key in ("data_dir", "progress", "dry_run"):  # where the data was, and how it ran: not the settings
        recorded.pop(key, None), expected.pop(key)
    assert recorded == expected


def test_the_readme_block_and_results_md_are_study_v3s_records():
    """records/study-v3/RESULTS.md is the report its records give, and once every run is recorded
    README.md holds exactly the block the reporter makes of them (both regenerated by ``python -m
    lopt.recipes.study.summary records/study-v3 --readme README.md``; ``make experiment`` does it when
    the study ends). While the study runs, a block, if there, is the records' partial one too."""
    from lopt.recipes.study.summary import collect, markdown, readme_block, readme_markers

    out = ROOT / experiment.DEFAULT_OUT
    if not any((out / "results" / "runs").glob("*/eval.json")):
        pytest.skip("records/study-v3 has no finished run yet (study v3 is running)")
    study = collect(out)
    assert (out / "RESULTS.md").read_text() == markdown(study)
    start, end = readme_markers(out, ROOT)
    text = (ROOT / "README.md").read_text()
    if (study["missing"] or not study["meta"].get("runs")) and start not in text:
        return  # partial: the README gets the block with the last run
    assert text.count(start) == 1 and text.count(end) == 1, f"README.md has no block {start} ... {end}"
    block = text.split(start, 1)[1].split(end, 1)[0].strip("\n").splitlines()
    assert block == readme_block(out, ROOT)


def test_study_v2_keeps_its_own_entry_point(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(v2.v2, "run_study", lambda out, **kw: calls.append((out, kw)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# x\n")
    assert v2.main(["--only", "e2e", "--no-bench"]) == 0
    out, kw = calls[-1]
    assert out == Path("records/study-v2") and kw["readme"] == Path("README.md")
    assert kw["only"] == ["e2e"] and kw["bench"] is False and not kw["quick"]
    # a quick run, or one written elsewhere, leaves the README alone
    assert v2.main(["--quick"]) == 0
    assert calls[-1][0] == Path("runs/study-v2-quick") and calls[-1][1]["readme"] is None
    assert v2.main(["--out", "elsewhere"]) == 0
    assert calls[-1][0] == Path("elsewhere") and calls[-1][1]["readme"] is None
    assert (ROOT / v2.DEFAULT_OUT / "results" / "meta.json").is_file()
    assert (ROOT / v2.DEFAULT_OUT / "RESULTS.md").is_file() and (ROOT / v2.README).is_file()


def test_study_v1_is_records_only(capsys):
    with pytest.raises(SystemExit):
        v2.main(["--budget", "short"])  # the option went with study v1's code
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(ImportError):
        __import__("lopt.recipes.study.short")
    v1 = ROOT / "records" / "study-v1"
    assert (v1 / "RESULTS.md").is_file() and (v1 / "results" / "e2e.json").is_file()


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    assert v2.main(["--quick", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--data-dir" in err and err.count("\n") == 1
