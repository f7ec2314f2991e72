"""``--resume`` continues the run it names, with that run's options: what ``lopt train`` (and ``demo``),
``grpo`` and ``dpo`` share (``lopt.cli.config_from_args`` calls ``resume_options``).

* Every ``checkpoint-N`` holds ``lopt_run.json`` with the options of the run that wrote it (so does
  ``OUT/lopt_run.json`` once the run has finished). ``--resume`` reads them from the checkpoint it names,
  or from the newest complete one in ``--output-dir`` (falling back to ``OUT/lopt_run.json``): the
  same model, data, order, schedule and max steps.
* Options given now (flags, or a ``--config`` file) override the recorded ones, and one line each says
  what changed; ``--max-steps`` / ``--epochs`` may grow (never below the checkpoint's step).
* An override that makes the checkpoint meaningless is a ``LoPTError`` before anything is written:
  another command, model, method or blocks (``--num-blocks``, ``--boundaries``), or another dataset
  (``--dataset``, grpo's ``--task``) unless ``--force``.
* Under a launcher every rank reads the same files; ``same_options_on_all_ranks`` then makes every
  rank run with rank 0's options, whatever a checkpoint written meanwhile would have told another rank.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lopt.engine.config import LoPTError
from lopt.runtime.checkpoints import (RUN_FILE, checkpoint_problem, checkpoint_step, list_checkpoints,
                                      read_manifest)

# Recorded, but never taken over: they describe this invocation, not the run.
NOT_INHERITED = ("resume", "force", "output_dir")
# Another value makes the checkpoint's weights and state meaningless.
FIXED = ("model", "gguf_file", "method", "num_blocks", "boundaries")
# Another value changes what the run trains on: allowed with --force.
DATA = ("dataset", "task")
# Filled from the other options when unset (``fill_recipe_defaults``): re-derived after an override.
DERIVED = ("task_grad_every", "tied_head", "lambda_aux")


@dataclass
class RecordedRun:
    """The options a run recorded: where they were read, the command, and the checkpoint's step."""

    source: Path
    command: str
    options: dict[str, Any]
    step: int | None


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("options"), dict) else None


def _step_of(ckpt: Path) -> int | None:
    try:
        manifest = read_manifest(ckpt)
    except ValueError:
        manifest = None
    step = manifest.get("step") if manifest else None
    return step if isinstance(step, int) else checkpoint_step(ckpt)


def find_recorded_run(output_dir: str | Path, resume: str) -> RecordedRun | None:
    """The recorded options of the run ``--resume`` continues: those of the checkpoint ``resume``
    names, or (``latest``) of the newest complete checkpoint in ``output_dir`` that has them, else
    ``OUT/lopt_run.json``; None when there are none (``find_resume`` then says why)."""
    if resume != "latest":
        candidates = [Path(resume)]
    else:
        candidates = [p for p in list_checkpoints(output_dir) if checkpoint_problem(p, []) is None]
    for ckpt in candidates:
        info = _read_record(ckpt / RUN_FILE)
        if info is not None:
            return RecordedRun(ckpt / RUN_FILE, str(info.get("command", "train")), info["options"], _step_of(ckpt))
    final = Path(output_dir) / RUN_FILE
    info = _read_record(final) if resume == "latest" else None
    if info is None:
        return None
    return RecordedRun(final, str(info.get("command", "train")), info["options"], None)


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else "(unset)" if v is None else str(v)


def resume_options(config_cls: type, values: dict[str, Any], given: set[str], command: str,
                   say: bool | None = None) -> dict[str, Any]:
    """The options of a ``--resume`` run: ``values`` (defaults < --config < flags) with the recorded
    options in place of every one not ``given``. Prints what changed (on rank 0 unless ``say``);
    raises ``LoPTError`` for an override that makes the checkpoint meaningless."""
    say = os.environ.get("RANK", "0") == "0" if say is None else say
    prog = f"lopt {command}"
    names = {f.name for f in fields(config_cls)}
    values = dict(values)
    resume = values["resume"]
    out_default = next(f.default for f in fields(config_cls) if f.name == "output_dir")
    moved = resume != "latest" and "output_dir" not in given and Path(resume).is_dir()
    if moved:
        values["output_dir"] = str(Path(resume).parent)  # the run's own folder: its log and final model
    record = find_recorded_run(values.get("output_dir", out_default), resume)
    if record is None:
        return values
    here = "train" if command == "demo" else command
    where = record.source.parent
    if record.command != here:
        raise LoPTError(f"{where} holds a run of lopt {record.command}: resume it with lopt {record.command} "
                        f"--resume, or start a new run in another --output-dir")
    rec = record.options
    for name in (*FIXED, *DATA):
        if name in given and name in rec and not _same(values[name], rec[name]):
            if name in DATA and values.get("force"):
                continue
            fix = "add --force to continue the run on the new data" if name in DATA else \
                "start a new run in another --output-dir"
            raise LoPTError(f"--resume: {where} was written by a run with {_flag(name)} {_show(rec[name])}; "
                            f"{_flag(name)} {_show(values[name])} does not fit it: drop {_flag(name)}, or {fix}")
    recorded = {k: v for k, v in rec.items() if k in names and k not in NOT_INHERITED}
    # A derived option the run left to its default is derived again from the merged options.
    try:
        rederived = config_cls(**{**recorded, **{k: None for k in DERIVED if k in recorded}})
        for k in DERIVED:
            if k in recorded and getattr(rederived, k) == recorded[k]:
                del recorded[k]
    except (TypeError, ValueError):
        pass
    merged = {**values, **{k: v for k, v in recorded.items() if k not in given}}
    if record.step is not None and merged.get("max_steps") is not None and merged["max_steps"] < record.step:
        raise LoPTError(f"--resume: {where} is at step {record.step}; --max-steps {merged['max_steps']} would end "
                        f"before it: give at least {record.step}")
    if say:
        print(f"{prog}: resuming the run recorded in {record.source}", file=sys.stderr)
        if moved:
            print(f"{prog}: --output-dir {values['output_dir']} (the checkpoint's folder)", file=sys.stderr)
        for k in sorted(given):
            if k in rec and k not in NOT_INHERITED and not _same(values[k], rec[k]):
                print(f"{prog}: {_flag(k)} {_show(values[k])} (the run had {_show(rec[k])})", file=sys.stderr)
    return merged


def same_options_on_all_ranks(ctx: Any, cfg: Any) -> Any:
    """Under a launcher: ``cfg`` with rank 0's options on every rank (each keeps its own ``device``),
    so that a resumed run's recorded options, read by each rank from disk, are the same everywhere."""
    if ctx is None:
        return cfg
    import torch.distributed as dist

    box = [asdict(cfg) if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    if ctx.is_main or box[0] == asdict(cfg):
        return cfg
    return type(cfg)(**{**box[0], "device": cfg.device})


__all__ = ["RecordedRun", "find_recorded_run", "resume_options", "same_options_on_all_ranks"]
