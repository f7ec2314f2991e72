"""Fault injection through the CLI (tests/faults.py): a kill or Ctrl-C at a checkpoint write, then
``--resume``, must end with the uninterrupted run's weights and lose no completed checkpoint.

A small subset runs with the other tests; the full suite (>= 20 SIGKILL trials plus Ctrl-C trials,
minutes) runs with ``make test-faults`` (``pytest -m faults``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faults import run_faults

@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return run_faults(tmp_path_factory.mktemp("faults"), {"sigkill-write": 1, "sigint-write": 1}, seed=1, steps=4)


def test_subset_resumes_to_identical_weights_and_loses_nothing(subset):
    assert subset["errors"] == []
    assert subset["faults_injected"] == subset["trials"] == 2
    assert subset["identical_endings"] == 2
    assert subset["checkpoints_lost"] == 0 and subset["checkpoints_unequal_to_reference"] == 0


def test_subset_leaves_no_temporary_directory(subset):
    if not subset["sigkill_during_write"]:
        pytest.skip("the kill missed the checkpoint write this time")
    assert subset["trials_with_leftover_temp_dirs"] == 0, subset["leftover_temp_dirs"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    n = int(os.environ.get("LOPT_FAULT_SIGKILL", "20"))
    kinds = {"sigkill-step": n - n // 2, "sigkill-write": n // 2,
             "sigint-write": int(os.environ.get("LOPT_FAULT_SIGINT", "6")),
             "sigint2-write": int(os.environ.get("LOPT_FAULT_DOUBLE_SIGINT", "4"))}
    report = os.environ.get("LOPT_FAULT_REPORT")
    figures = run_faults(tmp_path_factory.mktemp("faults-full"), kinds, seed=int(os.environ.get("LOPT_FAULT_SEED", "0")),
                         report=Path(report) if report else None, log=print)
    print(json.dumps(figures, indent=2))
    return figures


@pytest.mark.faults
def test_full_suite_identical_endings_and_nothing_lost(full):
    assert full["errors"] == []
    assert full["by_kind"]["sigkill-step"] + full["by_kind"]["sigkill-write"] >= 20
    assert full["identical_endings"] == full["faults_injected"] == full["trials"]
    assert full["checkpoints_lost"] == 0 and full["checkpoints_unequal_to_reference"] == 0


@pytest.mark.faults
def test_full_suite_leaves_no_temporary_directory(full):
    assert full["trials_with_leftover_temp_dirs"] == 0, full["leftover_temp_dirs"]
