"""``make experiment``: the project's study of LoPT against its baselines (study v2), written to
records/study-v2/ (its records in results/, the report RESULTS.md) and the README's headline table.

    python -m lopt.recipes.experiment                    # study v2 (resumes from records/study-v2/results/)
    python -m lopt.recipes.experiment --only e2e lisa    # some runs; the report uses every record
    python -m lopt.recipes.experiment --quick            # the whole pipeline in minutes; not a result

Study v1 (20 steps) is kept as it was, frozen, in records/study-v1/. ``lopt study``
(:mod:`lopt.recipes.study.command`) is the general command: any model, data and methods, with a
learning-rate sweep per method and retention at matched task skill; study v2 keeps its own code and records.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lopt.engine.config import LoPTError
from lopt.recipes.study import run as v2

# Where the study writes by default, relative to the repository root (``make experiment`` runs there).
DEFAULT_OUT = Path("records/study-v2")
QUICK_OUT = Path("runs/experiment-quick")
# The README whose headline table a full study refreshes (between lopt.recipes.study.report's markers).
README = Path("README.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lopt.recipes.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny budget that runs the whole pipeline in minutes "
                   "(its numbers mean nothing)")
    p.add_argument("--out", default=None, help=f"where RESULTS.md and results/ go (default: {DEFAULT_OUT}, "
                   f"{QUICK_OUT} with --quick); the README's headline table is refreshed only for the default")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these runs or configurations ('base', 'bench' too); the report uses every record")
    p.add_argument("--data-dir", default=None,
                   help="the data folder holding gsm8k/, arc/, piqa/, winogrande/ and lambada/")
    p.add_argument("--keep-models", action="store_true", help="keep each run's checkpoints")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the memory/speed phase")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    data_dir = Path(ns.data_dir) if ns.data_dir else None
    out = Path(ns.out) if ns.out else (QUICK_OUT if ns.quick else DEFAULT_OUT)
    readme = README if ns.out is None and not ns.quick and README.is_file() else None
    try:
        v2.run_study(out, quick=ns.quick, model=ns.model, only=ns.only, data_dir=data_dir,
                     keep_models=ns.keep_models, bench=ns.bench, readme=readme)
    except LoPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
