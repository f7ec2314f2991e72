"""Checkpoint I/O of a training run: ``OUT/checkpoint-N`` (a plain model plus the state to resume from) and the final model.
"""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any
import torch

from lopt import __version__
from lopt.engine.boundary import LoPTModel
from lopt.models import save_checkpoint


CHECKPOINT_PREFIX = "checkpoint-"


STATE_FILE = "trainer_state.pt"


RUN_FILE = "lopt_run.json"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    out = Path(output_dir)
    if not out.is_dir():
        return None
    cands = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return max(cands, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def versions() -> dict[str, str]:
    import transformers


    return {"lopt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_info(cfg: Any, wrapped: LoPTModel, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {"options": asdict(cfg), "method": cfg.method, **wrapped.describe(), "versions": versions(),
            "final_metrics": metrics or {}}


def _save_plain_into(wrapped: LoPTModel, tokenizer, target: Path, info: dict[str, Any]) -> None:
    """Write the final plain checkpoint's files into ``target``, which also holds checkpoint-N/ and
    metrics.jsonl: the checkpoint is written whole in a temporary directory, then each file is
    renamed into place."""
    tmp = save_checkpoint(wrapped, tokenizer, target / f".final-{os.getpid()}", extra_json={RUN_FILE: info})
    try:
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_training_checkpoint(wrapped: LoPTModel, tokenizer, output_dir: Path, step: int,
                             info: dict[str, Any], state: dict[str, Any]) -> Path:
    """``OUT/checkpoint-N``: a plain model plus ``trainer_state.pt`` to resume from, written in a
    temporary directory and renamed, so a crash never leaves a half-written checkpoint."""

    return save_checkpoint(wrapped, tokenizer, output_dir / f"{CHECKPOINT_PREFIX}{step}",
                           extra_json={RUN_FILE: info},
                           write_extra=lambda d: torch.save(state, d / STATE_FILE))


def _extra_state(wrapped: LoPTModel) -> dict[str, torch.Tensor]:
    """Trainable tensors that the plain checkpoint does not hold: local heads, LoRA adapters."""
    # Under FSDP the heads are sharded (DTensor): gather them (collective; every rank saves alike).
    state = {f"heads.{k}": v.full_tensor() if hasattr(v, "full_tensor") else v
             for k, v in wrapped.heads.state_dict().items()}
    # The anchors are the *pretrained* lower blocks: a resumed run cannot rebuild them from its
    # checkpoint's (trained) weights, so they travel with the trainer state.
    state.update({f"anchors.{k}": v for k, v in wrapped.anchors.state_dict().items()})
    state.update({f"model.{k}": v for k, v in wrapped.method_impl.extra_state(wrapped.model).items()})
    return state
