"""Checks a run makes before it loads a model, so that a wrong path or a bad data file fails in a
second with one line, not after minutes of loading (and not with a traceback).

    check_output_dir("runs/x")        # raises PreflightError if it cannot become a directory
    preflight_train(cfg)              # the output directory and the dataset of a `lopt train` run
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class PreflightError(ValueError):
    """A run that cannot work, found before loading anything: one line naming what and what to do."""


def check_output_dir(path: str | os.PathLike[str], option: str = "--output-dir") -> Path:
    """``path`` as a Path if it is, or can be created as, a writable directory; creates nothing.

    Raises ``PreflightError`` if it names an existing file, if a parent on the way is a file, or if
    the nearest existing directory is not writable.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{option} {out} is an existing file, not a directory; pass a directory "
                             f"path (new or existing)")
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(f"{option} {out} cannot be created: {probe} is a file; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"{option} {out}: {probe} is not writable; choose a directory you can write to")
    return out


def preflight_train(cfg: Any) -> dict:
    """The checks of a ``lopt train`` run (a ``TrainConfig``) that need no model: its output
    directory, and its dataset through ``lopt.data.validate_dataset``. Returns the dataset check."""
    from lopt.data import validate_dataset

    check_output_dir(cfg.output_dir)
    return validate_dataset(cfg.dataset, split=cfg.split, limit=cfg.limit, max_length=cfg.max_length,
                            data_dir=getattr(cfg, "data_dir", None))


__all__ = ["PreflightError", "check_output_dir", "preflight_train"]
