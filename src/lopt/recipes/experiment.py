"""``make experiment``: the project's own study (study v3), which is ``lopt study`` with the project's
settings (:data:`SETTINGS`), written to records/study-v3/ and resumable piece by piece.

    python -m lopt.recipes.experiment               # study v3: runs or resumes lopt study into records/study-v3
    python -m lopt.recipes.experiment --dry-run     # its plan and time estimate (benches, trains nothing)
    python -m lopt.recipes.experiment --quick       # the whole pipeline, tiny, into runs/experiment-quick
    python -m lopt.recipes.experiment --model gemma3-270m --gguf-file FILE --methods e2e lopt freeze-lower \\
        --rates 1 --method-rates e2e=1 --output-dir records/study-v3-gemma3    # a second model family

Every argument but ``--quick`` goes to ``lopt study`` after the project's settings (and after
:data:`QUICK`'s with ``--quick``). argparse keeps the last value of an option given twice, a list
option included (a later ``--methods`` replaces the earlier list, it does not add to it), so an
argument given here overrides the setting of the same name. ``--method-rates e2e=3`` is a setting:
give ``--method-rates e2e=N`` to change it, and leave e2e in ``--methods`` or give another
``--method-rates`` naming one of them. The data folder is ``--data-dir``, else ``$LOPT_DATA_DIR``
(``make experiment`` sets it to the project's data folder beside the repository).

After a study that ran (not ``--dry-run``, not ``--quick``), the README's block of its output folder is
regenerated from the records (:func:`lopt.recipes.study.summary.sync_readme`) when the README has that
block's markers. Study v2's frozen code runs as ``python -m lopt.recipes.study.v2``; study v1 is kept
only as frozen records in records/study-v1/.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from lopt.recipes.study.summary import sync_readme

# The project's settings of lopt study: study v3's command (records/study-v3/README.md shows it, and a
# test checks that it is this list). Changing one changes the records' specs: the study redoes the
# pieces it touches.
SETTINGS = ["--dataset", "gsm8k", "--eval-dataset", "gsm8k", "--eval-limit", "300", "--max-length", "384",
            "--retention-prompts", "32", "--retention-new-tokens", "48",
            "--methods", "e2e", "lopt", "freeze-lower", "lora", "lisa", "badam",
            "--steps", "256", "--batch-size", "4", "--method-rates", "e2e=3", "--precision", "bf16-mixed",
            "--bench-steps", "4", "--bench-repeats", "2", "--seeds", "0", "1", "--seed-methods", "e2e", "lopt",
            "--output-dir", "records/study-v3"]
DEFAULT_OUT = Path("records/study-v3")
# --quick: the same pipeline (bench, sweep, runs, evaluation, report) on a tiny budget; not a result.
QUICK_OUT = Path("runs/experiment-quick")
QUICK = ["--steps", "4", "--batch-size", "2", "--val-size", "8", "--eval-limit", "8", "--lr-factors", "0.3", "1",
         "--rates", "1", "--method-rates", "e2e=2", "--retention-prompts", "4", "--retention-new-tokens", "8",
         "--bench-steps", "1", "--bench-repeats", "1", "--output-dir", str(QUICK_OUT)]
# The README whose block of the study (between summary.readme_markers) a finished study refreshes.
README = Path("README.md")


def study_args(argv: list[str]) -> tuple[list[str], bool]:
    """``lopt study``'s arguments for ``argv``: the settings, QUICK's with ``--quick``, then ``argv``
    less ``--quick``; and whether ``--quick`` was given."""
    quick = "--quick" in argv
    rest = [a for a in argv if a != "--quick"]
    return [*SETTINGS, *(QUICK if quick else []), *rest], quick


def command_text(data_dir: str, width: int = 100) -> str:
    """Study v3's ``lopt study`` command as its README and docs/study.md show it: the settings, with
    ``--data-dir``, wrapped between options."""
    words, groups = ["--data-dir", data_dir, *SETTINGS], []
    for w in words:
        if w.startswith("--") or not groups:
            groups.append(w)
        else:
            groups[-1] += " " + w
    lines, line = [], "lopt study"
    for g in groups:
        if len(line) + 1 + len(g) > width - 2:
            lines.append(line)
            line = "    " + g
        else:
            line += " " + g
    return " \\\n".join([*lines, line])


def run_lopt_study(args: list[str]) -> int:
    """``lopt study ARGS`` in a child process (the command line lives above the recipes); its exit status."""
    return subprocess.call([sys.executable, "-m", "lopt", "study", *args])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    args, quick = study_args(argv)
    rc = run_lopt_study(args)
    if rc != 0 or quick:
        return rc
    # Where it wrote and whether it trained, as lopt study read them (the last of repeated options wins).
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--output-dir")
    p.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False)
    ns, _ = p.parse_known_args(args)
    if not ns.dry_run and sync_readme(README, Path(ns.output_dir)):
        print(f"{README}: the block of {ns.output_dir} regenerated from its records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
