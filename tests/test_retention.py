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
