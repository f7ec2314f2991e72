"""Every script in scripts/ still imports, answers --help, and does its job on tiny inputs where it can
without a model or lm-evaluation-harness."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def load(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lopt_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_are_the_known_ones():
    # a new script gets its checks here; a deleted one leaves this list
    assert [p.stem for p in SCRIPTS] == ["lmeval_compare", "lmeval_requests_check", "lmeval_tasks",
                                         "math_verify_agreement", "precision_quality", "retention_timing"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_each_script_imports_and_answers_help(path):
    load(path.stem)  # importing runs nothing and needs neither lm_eval nor a model
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:")
    assert "/work/" not in path.read_text() and "shared/data" not in path.read_text()  # no machine's paths


def test_lmeval_tasks_needs_a_data_folder_and_rewrites_arc_and_piqa(tmp_path, monkeypatch):
    m = load("lmeval_tasks")
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    with pytest.raises(SystemExit):
        m.parse_args([str(tmp_path / "out")])
    assert m.parse_args([str(tmp_path / "out"), "--data-dir", str(tmp_path)]).data_dir == tmp_path
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "q1", "answerKey": "B", "question": {
        "stem": "2 + 2?", "choices": [{"label": "A", "text": "3"}, {"label": "B", "text": "4"}]}}) + "\n")
    m._arc(arc, tmp_path / "arc-out.jsonl")
    assert json.loads((tmp_path / "arc-out.jsonl").read_text()) == {
        "id": "q1", "question": "2 + 2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}
    piqa, labels = tmp_path / "piqa.jsonl", tmp_path / "labels.lst"
    piqa.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    labels.write_text("1\n")
    m._piqa(piqa, labels, tmp_path / "piqa-out.jsonl")
    assert json.loads((tmp_path / "piqa-out.jsonl").read_text())["label"] == 1


def test_lmeval_compare_matches_items(tmp_path):
    m = load("lmeval_compare")
    lopt = {"tasks": {}}
    for kind, task in m.LMEVAL_TASK.items():
        if kind == "lambada":
            items = [{"loglik": -1.0, "acc": 1.0}, {"loglik": -2.0, "acc": 0.0}]
            samples = [{"doc_id": i, "acc": it["acc"], "filtered_resps": [[str(it["loglik"]), "True"]]}
                       for i, it in enumerate(items)]
        else:
            items = [{"loglik": [-1.0, -2.0], "acc": 1.0, "acc_norm": 1.0}, {"loglik": [-3.0, -1.0], "acc": 0.0,
                                                                              "acc_norm": 1.0}]
            samples = [{"doc_id": i, "acc": it["acc"], "acc_norm": it["acc_norm"] if i == 0 else 0.0,
                        "filtered_resps": [[str(x), "False"] for x in it["loglik"]]} for i, it in enumerate(items)]
        lopt["tasks"][kind] = {"items": items}
        (tmp_path / f"samples_{task}_2026.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    rows = {r["task"]: r for r in m.compare(lopt, tmp_path)}
    assert rows["arc-easy"]["acc_items_differ"] == 0 and rows["arc-easy"]["acc_norm_items_differ"] == 1
    assert rows["winogrande"]["max_abs_loglik_diff"] == 0.0
    assert rows["lambada"]["perplexity"][0] == pytest.approx(rows["lambada"]["perplexity"][1])


def test_math_verify_agreement_runs(capsys):
    pytest.importorskip("math_verify")
    assert load("math_verify_agreement").main(["--n", "30", "--seed", "0", "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert "30 pairs (seed 0)" in out and "### lopt vs mv" in out


def test_precision_quality_never_redoes_a_finished_run_and_reports_against_fp32(tmp_path, monkeypatch):
    pq = load("precision_quality")
    args = pq.argparse.Namespace(steps=128, eval_limit=300, data_dir=None, records=str(tmp_path / "runs"),
                                 runs_dir=str(tmp_path / "out"))
    losses = {("e2e", "fp32", 0): 1.00, ("e2e", "fp32", 1): 1.02, ("e2e", "bf16-true", 0): 1.01,
              ("e2e", "bf16-true", 1): 1.03, ("e2e", "bf16-true-plain", 0): 1.5}
    for (m, p, s), loss in losses.items():
        name = f"{m}-{p}-s{s}-128steps"
        spec = {"method": m, "precision": p, "seed": s, "steps": 128, "eval_limit": 300}
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps({"spec": spec, "heldout_loss": loss}))
    monkeypatch.setattr(pq.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was started again"))
    assert pq.run_one("e2e-fp32-s0-128steps", "e2e", "fp32", 0, args)["heldout_loss"] == 1.00
    table = pq.report(tmp_path / "runs", 128)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if line.startswith("| e2e")}
    assert "| 1.0100 | 2 |  | 0.99% |" in rows[("e2e", "fp32")]  # seeds 1.00 and 1.02
    assert "+0.99%" in rows[("e2e", "bf16-true")] and "+48.51%" in rows[("e2e", "bf16-true-plain")]
    cmd = pq.command("e2e", "bf16-true-plain", 1, args, tmp_path / "o")
    assert cmd[:2] == ["lopt", "train"] and "--bf16-update" in cmd and cmd[cmd.index("--bf16-update") + 1] == "plain"
    from lopt.cli import main as cli_main  # the recorded command is lopt train's own
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *cmd[2:], "--help"])
    assert e.value.code == 0
