"""Retention in every run (issue 28): the base model's log-probs on lopt's general prompts are recorded
before the first step (``lopt.eval.retention.RetentionProbe``), and retention KL against them is reported
at --eval-every and at the end, surviving a resume. On tiny Llamas built in-process."""
from __future__ import annotations

import json

import pytest
import torch

from lopt.eval.common import EvalError
from lopt.eval.kl import retention_kl
from lopt.eval.retention import RETENTION_FILE, RetentionProbe, parse_retention

from conftest import make_tiny_model, save_tiny


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with noise on every weight: a model that moved from its base."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_probe_kl_is_lopt_eval_retention_kl(tokenizer):
    base = make_tiny_model(seed=0).eval()
    tuned = perturbed(base)
    probe = RetentionProbe.record(base, tokenizer, prompts=4, max_new_tokens=6, batch_size=3)
    assert probe.tokens > 0 and probe.base_logprobs.shape == (probe.tokens, 320)
    assert probe.kl(base, tokenizer) == pytest.approx(0.0, abs=1e-6)  # unchanged model: 0
    ref = retention_kl(tuned, base, tokenizer, limit=4, max_new_tokens=6, batch_size=3)
    got = probe.measure(tuned, tokenizer)
    assert got["kl"] > 1e-4
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-5)
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert got["base_nll"] == pytest.approx(ref["base_nll"], rel=1e-5)
    assert got["tokens"] == ref["tokens"]


def test_probe_restores_train_mode_and_survives_save_load(tokenizer, tmp_path):
    base = make_tiny_model(seed=0).train()
    probe = RetentionProbe.record(base, tokenizer, prompts=2, max_new_tokens=4)
    assert base.training
    tuned = perturbed(base).train()
    kl = probe.kl(tuned, tokenizer)
    assert tuned.training
    path = probe.save(tmp_path)
    assert path == tmp_path / RETENTION_FILE
    again = RetentionProbe.load(tmp_path)
    assert again.sequences == probe.sequences
    assert again.kl(tuned, tokenizer) == pytest.approx(kl, rel=1e-6)
    (tmp_path / RETENTION_FILE).write_bytes(b"not a torch file")
    with pytest.raises(EvalError, match="not a readable retention record"):
        RetentionProbe.load(tmp_path)


def test_probe_refuses_another_vocabulary(tokenizer):
    probe = RetentionProbe.record(make_tiny_model(seed=0), tokenizer, prompts=2, max_new_tokens=3)
    with pytest.raises(EvalError, match="same tokenizer"):
        probe.kl(make_tiny_model(vocab_size=400, seed=0), tokenizer)


@pytest.mark.parametrize("spec, want", [("none", ("none", ())), ("kl", ("kl", ())), ("KL", ("kl", ())),
                                        ("suite", ("suite", ("arc-easy", "piqa"))),
                                        ("suite:piqa,lambada", ("suite", ("piqa", "lambada")))])
def test_parse_retention(spec, want):
    assert parse_retention(spec) == want


@pytest.mark.parametrize("spec, why", [("kll", "must be none, kl or suite"), ("kl:piqa", "must be none, kl"),
                                       ("suite:mmlu", "no task 'mmlu'")])
def test_parse_retention_rejects(spec, why):
    with pytest.raises(EvalError, match=why):
        parse_retention(spec)


# ---- lopt train: recorded before the first step, reported at --eval-every and the end, kept over a resume

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-retention"), eos_token_id=3)


def train_args(tiny_dir, out, *extra):
    # A learning rate that moves the tiny model: the retention KL is then far from 0.
    return ["train", "--model", str(tiny_dir), "--dataset", "arithmetic", "--limit", "64", "--output-dir", str(out),
            "--batch-size", "4", "--lr", "3e-3", "--no-progress", "--retention-prompts", "4",
            "--retention-new-tokens", "8", *extra]


def with_retention(*extra):
    return ["--retention", "kl", *extra]


def retention_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"retention"' in line]


def final_retention(out):
    return json.loads((out / "lopt_run.json").read_text())["final_metrics"]["retention"]


def lopt_eval_kl(model_dir, base_dir, prompts=4, new_tokens=8):
    """``lopt eval --tasks retention-kl --base BASE --limit 4 --kl-new-tokens 8``, through its Python API."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return retention_kl(model, base, AutoTokenizer.from_pretrained(base_dir), limit=prompts,
                        max_new_tokens=new_tokens)["kl"]


def test_train_reports_retention_and_keeps_the_original_base_over_a_resume(tiny_dir, tmp_path, capsys):
    from lopt.cli import main

    out = tmp_path / "run"
    assert main(train_args(tiny_dir, out, *with_retention("--max-steps", "4", "--eval-every", "2",
                                                         "--save-every", "2"))) == 0
    table = capsys.readouterr().out
    assert "retention KL (general prompts)" in table and "0 = unchanged" in table
    recs = retention_records(out)
    assert [r["step"] for r in recs] == [2, 4]
    assert recs[-1]["retention"]["kl"] > recs[0]["retention"]["kl"] > 1e-4  # the model moved
    final = final_retention(out)
    assert final["step"] == 4 and final["kl"] == recs[-1]["retention"]["kl"]
    assert "0 = unchanged" in final["meaning"]
    # The same number as lopt eval's retention-kl on the saved model against the base.
    assert final["kl"] == pytest.approx(lopt_eval_kl(out, tiny_dir), rel=1e-4)
    record = (out / RETENTION_FILE).read_bytes()

    # Resume to step 6: the run measures against the original base, not the step-4 weights it resumed from.
    assert main(train_args(tiny_dir, out, "--max-steps", "6", "--resume")) == 0  # its options: --retention kl ...
    assert (out / RETENTION_FILE).read_bytes() == record
    assert [r["step"] for r in retention_records(out)] == [2, 4, 6]
    final = final_retention(out)
    assert final["step"] == 6
    assert final["kl"] == pytest.approx(lopt_eval_kl(out, tiny_dir), rel=1e-4)
    against_resumed = lopt_eval_kl(out, out / "checkpoint-4")
    assert abs(final["kl"] - against_resumed) > 0.1 * final["kl"]


def test_retention_is_off_by_default_says_so_and_a_resume_without_a_record_says_so(tiny_dir, tmp_path, capsys):
    from lopt.cli import main

    out = tmp_path / "run"
    assert main(train_args(tiny_dir, out, "--max-steps", "2", "--save-every", "2")) == 0
    assert not (out / RETENTION_FILE).exists() and retention_records(out) == []
    assert "retention" not in json.loads((out / "lopt_run.json").read_text())["final_metrics"]
    printed = capsys.readouterr()
    assert "retention KL" not in printed.out
    assert "lopt: retention: off by default" in printed.err and "--retention kl" in printed.err
    # Resumed with retention on: the step-2 weights are not the base, so it measures none, in one line.
    assert main(train_args(tiny_dir, out, "--max-steps", "3", "--resume", "--retention", "kl")) == 0
    err = capsys.readouterr().err
    assert "holds no base record" in err and "measures no retention" in err
    assert retention_records(out) == []


def test_bad_retention_flag_is_one_line(tiny_dir, tmp_path, capsys):
    from lopt.cli import main

    assert main(train_args(tiny_dir, tmp_path / "run", "--max-steps", "1", "--retention", "suite:mmlu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lopt train: error: ") and "no task 'mmlu'" in err[-1]
    assert not (tmp_path / "run").exists()


def test_retention_callback_in_a_transformers_trainer(tokenizer, tmp_path):
    """The TrainerCallback (what lopt's TRL integration uses): records the base at on_train_begin and logs
    retention/kl through Trainer.log at every eval_every-th step and the last."""
    from transformers import Trainer, TrainingArguments

    from lopt.eval.retention import retention_callback

    model = make_tiny_model(seed=0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            (tokenizer(f"What is {a} + 2? {a + 2}")["input_ids"] for a in range(12))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=1,
                             learning_rate=3e-3, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    base = make_tiny_model(seed=0)
    cb = retention_callback(tokenizer, eval_every=2, prompts=2, max_new_tokens=4, trainer=trainer)
    trainer.add_callback(cb)
    trainer.train()
    assert [h["step"] for h in cb.history] == [2, 3]
    assert (tmp_path / RETENTION_FILE).is_file()
    logged = [h for h in trainer.state.log_history if "retention/kl" in h]
    assert [h["retention/kl"] for h in logged] == [h["retention"]["kl"] for h in cb.history]
    assert cb.history[-1]["retention"]["kl"] == pytest.approx(
        retention_kl(model, base, tokenizer, limit=2, max_new_tokens=4)["kl"], rel=1e-4)
    assert cb.history[-1]["retention"]["kl"] > 1e-4


def test_run_retention_suite_records_base_scores_and_reads_them_back(tokenizer, tmp_path, shared_data):
    from lopt.eval.retention import SUITE_FILE, RunRetention
    from lopt.eval.suite import run_benchmark

    base = make_tiny_model(seed=0)
    notes = []
    run = RunRetention.start("suite:arc-easy", base, tokenizer, tmp_path, resumed=False, prompts=2, max_new_tokens=3,
                             suite_limit=4, data_dir=shared_data, log=notes.append)
    assert (tmp_path / SUITE_FILE).is_file() and "arc-easy" in notes[0]
    tuned = perturbed(base, scale=0.5)
    got = run.measure(tuned, 1, tokenizer)["suite"]["arc-easy"]
    want = run_benchmark("arc-easy", tuned, tokenizer, limit=4, data_dir=shared_data)["acc_norm"]
    base_score = run_benchmark("arc-easy", base, tokenizer, limit=4, data_dir=shared_data)["acc_norm"]
    assert (got["score"], got["base"], got["change"]) == (want, base_score, pytest.approx(want - base_score))
    # On resume the base scores come from the run folder, not from the (resumed) model given.
    again = RunRetention.start("suite:arc-easy", tuned, tokenizer, tmp_path, resumed=True, suite_limit=4,
                               data_dir=shared_data, log=notes.append)
    assert again.suite.base_scores == {"arc-easy": base_score}
    assert again.probe.sequences == run.probe.sequences
