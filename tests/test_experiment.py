"""``make experiment`` (python -m lopt.recipes.experiment): where study v2 writes, and that study v1's
code is gone while its frozen records stay."""
from __future__ import annotations

from pathlib import Path

import pytest

from lopt.recipes import experiment

ROOT = Path(__file__).resolve().parents[1]


def test_the_study_writes_into_records_and_refreshes_the_readme(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(experiment.v2, "run_study", lambda out, **kw: calls.append((out, kw)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# x\n")
    assert experiment.main(["--only", "e2e", "--no-bench"]) == 0
    out, kw = calls[-1]
    assert out == Path("records/study-v2") and kw["readme"] == Path("README.md")
    assert kw["only"] == ["e2e"] and kw["bench"] is False and not kw["quick"]
    # a quick run, or one written elsewhere, leaves the README alone
    assert experiment.main(["--quick"]) == 0
    assert calls[-1][0] == Path("runs/experiment-quick") and calls[-1][1]["readme"] is None
    assert experiment.main(["--out", "elsewhere"]) == 0
    assert calls[-1][0] == Path("elsewhere") and calls[-1][1]["readme"] is None


def test_study_v1_is_records_only(capsys):
    with pytest.raises(SystemExit):
        experiment.main(["--budget", "short"])  # the option went with study v1's code
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(ImportError):
        __import__("lopt.recipes.study.short")
    v1 = ROOT / "records" / "study-v1"
    assert (v1 / "RESULTS.md").is_file() and (v1 / "results" / "e2e.json").is_file()


def test_the_default_paths_exist_in_the_repository():
    assert (ROOT / experiment.DEFAULT_OUT / "results" / "meta.json").is_file()
    assert (ROOT / experiment.DEFAULT_OUT / "RESULTS.md").is_file()
    assert (ROOT / experiment.README).is_file()


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    assert experiment.main(["--quick", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--data-dir" in err and err.count("\n") == 1
