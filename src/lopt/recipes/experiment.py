"""``make experiment``: the project's study of LoPT against its baselines, written to docs/RESULTS.md.

    python -m lopt.recipes.experiment                    # study v2 (resumes from docs/results/)
    python -m lopt.recipes.experiment --only e2e lisa    # some runs; the report uses every record
    python -m lopt.recipes.experiment --quick            # the whole v2 pipeline in minutes; not a result
    python -m lopt.recipes.experiment --budget short     # study v1 (20 steps), docs/short-budget/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lopt.engine.config import LoPTError
from lopt.recipes.study import run as v2
from lopt.recipes.study import short


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lopt.recipes.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=("v2", "short"), default="v2",
                   help="v2: 256 steps x 4 examples per run, retention suite, forgetting curves (default); "
                        "short: study v1, 20 steps")
    p.add_argument("--quick", action="store_true", help="a tiny budget that runs the whole pipeline in minutes "
                   "(its numbers mean nothing)")
    p.add_argument("--out", default=None, help="where RESULTS.md and results/ go (default: docs, "
                   "docs/short-budget with --budget short, runs/experiment-quick with --quick)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these runs or configurations ('base', 'bench' too); the report uses every record")
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: ../shared/data)")
    p.add_argument("--keep-models", action="store_true", help="keep each run's checkpoints")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the memory/speed phase")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    data_dir = Path(ns.data_dir) if ns.data_dir else None
    try:
        if ns.budget == "short":
            out = Path(ns.out or ("runs/experiment-quick-short" if ns.quick else "docs/short-budget"))
            short.run_study(out, quick=ns.quick, model=ns.model, only=ns.only, data_dir=data_dir,
                            keep_models=ns.keep_models, bench=ns.bench)
        else:
            out = Path(ns.out or ("runs/experiment-quick" if ns.quick else "docs"))
            v2.run_study(out, quick=ns.quick, model=ns.model, only=ns.only, data_dir=data_dir,
                         keep_models=ns.keep_models, bench=ns.bench)
    except LoPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
