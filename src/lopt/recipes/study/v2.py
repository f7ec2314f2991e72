"""Study v2, frozen: its code stays runnable to reproduce records/study-v2/ and its report.

    python -m lopt.recipes.study.v2                    # the whole study (resumes from records/study-v2/results/)
    python -m lopt.recipes.study.v2 --only e2e lisa    # some runs; the report uses every record
    python -m lopt.recipes.study.v2 --quick            # the whole pipeline in minutes; not a result

Study v2 (256 steps, 13 runs, one learning rate per method) was what ``make experiment`` ran until
study v3; ``make experiment`` now runs ``lopt study`` with the project's settings
(:mod:`lopt.recipes.experiment`). Study v2 keeps its own code (``plan``, ``run``, ``report``) and
records, and a full run here still refreshes the README's study-v2 table between its markers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lopt.engine.config import LoPTError
from lopt.recipes.study import run as v2

# Where study v2 writes by default, relative to the repository root.
DEFAULT_OUT = Path("records/study-v2")
QUICK_OUT = Path("runs/study-v2-quick")
# The README whose study-v2 table a full study refreshes (between lopt.recipes.study.report's markers).
README = Path("README.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lopt.recipes.study.v2", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny budget that runs the whole pipeline in minutes "
                   "(its numbers mean nothing)")
    p.add_argument("--out", default=None, help=f"where RESULTS.md and results/ go (default: {DEFAULT_OUT}, "
                   f"{QUICK_OUT} with --quick); the README's study-v2 table is refreshed only for the default")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these runs or configurations ('base', 'bench' too); the report uses every record")
    p.add_argument("--data-dir", default=None,
                   help="the data folder holding gsm8k/, arc/, piqa/, winogrande/ and lambada/ "
                   "(default: $LOPT_DATA_DIR)")
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
