"""Reading resume state back: which checkpoint to resume, and loading its state without running code.

* State files are loaded with ``torch.load(weights_only=True)``: only tensors and plain Python data
  (dict, list, tuple, str, numbers, None) are rebuilt; a pickle that names any other global (a
  function to call, a class to build) is refused with ``UnsafeCheckpointError`` before anything of it
  runs. Every state lopt writes (optimizer, scheduler, data position, RNG states, history) is plain
  data, so checkpoints written by lopt 0.1 load unchanged.
* ``--resume`` (latest) takes the newest *complete* ``checkpoint-N``: one whose files match its
  manifest and whose state loads. Each one skipped is named on stderr with the reason. An unsafe state
  file is never skipped over silently: it stops the run.
* ``--resume DIR`` of an incomplete or corrupt checkpoint is a one-line error naming the file.
"""
from __future__ import annotations

import pickle
import re
import sys
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from lopt.engine.config import LoPTError
from lopt.runtime.checkpoints import CHECKPOINT_PREFIX, checkpoint_problem, list_checkpoints

T = TypeVar("T")

# At most this many "skipping ..." lines; the rest are counted in one more line.
MAX_SKIP_LINES = 3


class CheckpointError(LoPTError):
    """A checkpoint cannot be resumed; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A state file holds objects other than tensors and plain data: loading it could run code."""


class CorruptStateError(CheckpointError):
    """A state file that is not what lopt wrote (empty, truncated, damaged, wrong contents)."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file} is corrupt: {reason}")
        self.file, self.reason = file, reason


def _named_global(e: Exception) -> str | None:
    """The global (module.name) a refused pickle asked for, from torch's message."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return m.group(1).rstrip(".") if m else None


def load_state(file: Path, required: Sequence[str] = (), allow: Sequence[Any] = ()) -> dict[str, Any]:
    """Load a state file written by ``torch.save`` without running any code from it.

    ``weights_only=True``: tensors and plain data only (plus the types in ``allow``); memory-mapped, so
    a large optimizer state is read as it is used. ``required``: top-level keys the state must have.
    Raises ``UnsafeCheckpointError`` for a pickle naming any other global and ``CorruptStateError``
    for a file that is empty, truncated or damaged."""
    file = Path(file)
    if not file.is_file():
        raise CorruptStateError(file, "the file is missing")
    if file.stat().st_size == 0:
        raise CorruptStateError(file, "the file is empty")
    try:
        with torch.serialization.safe_globals(list(allow)) if allow else nullcontext():
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        name = _named_global(e)
        if name is None:  # no global asked for: the pickle stream itself is damaged
            raise CorruptStateError(file, f"its pickle is damaged ({_first_line(e)[:160]})") from None
        raise UnsafeCheckpointError(
            f"refusing to load {file}: it asks for {name}, which is neither a tensor nor plain data, and "
            f"loading it could run code; delete this checkpoint unless you know who wrote it, and resume "
            f"from one you trust or start afresh") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        text = _first_line(e)
        if "mmap can only be used" in text:
            text = "not a torch zip archive"
        raise CorruptStateError(file, f"it cannot be read ({text[:160]})") from None
    if not isinstance(state, dict):
        raise CorruptStateError(file, f"it holds a {type(state).__name__}, not a state dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CorruptStateError(file, f"it lacks {', '.join(missing)}")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def find_resume(output_dir: str | Path, resume: str, state_files: Sequence[str],
                load: Callable[[Path], T]) -> tuple[Path, T]:
    """The checkpoint to resume and what ``load`` read from it.

    ``resume == "latest"``: the newest ``checkpoint-N`` in ``output_dir`` that is complete (see
    ``checkpoint_problem``) and loads; each one skipped is named on stderr with the reason. Otherwise
    ``resume`` is a checkpoint directory, and any problem with it is a ``CheckpointError``."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"nothing to resume: {path} is not a checkpoint directory; pass a "
                                  f"{CHECKPOINT_PREFIX}N directory, or --resume alone for the latest one")
        problem = checkpoint_problem(path, list(state_files))
        if problem is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}; {_advice(path, problem)}")
        try:
            return path, load(path)
        except CorruptStateError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}; {_advice(path, e.reason)}") from None

    skipped = 0
    for ckpt in list_checkpoints(output_dir):
        problem = checkpoint_problem(ckpt, list(state_files))
        if problem is None:
            try:
                return ckpt, load(ckpt)
            except CorruptStateError as e:  # an UnsafeCheckpointError is not skipped: it ends the run
                problem = f"{e.file.name} is corrupt: {e.reason}"
        skipped += 1
        if skipped <= MAX_SKIP_LINES:
            print(f"lopt: skipping {ckpt}: {problem}; trying an older checkpoint", file=sys.stderr)
    if skipped > MAX_SKIP_LINES:
        print(f"lopt: ... and {skipped - MAX_SKIP_LINES} more checkpoints skipped", file=sys.stderr)
    found = f" ({skipped} {CHECKPOINT_PREFIX}N skipped, see above)" if skipped else ""
    raise CheckpointError(f"nothing to resume: no complete {CHECKPOINT_PREFIX}N/ in {output_dir}{found}; "
                          f"drop --resume to start afresh")


def _advice(path: Path, problem: str) -> str:
    if "save-only-model" in problem:
        return f"it cannot be resumed, but a new run can start from its weights with --model {path}"
    if "format" in problem:
        return "resume with the lopt version that wrote it"
    return (f"resume from an older {CHECKPOINT_PREFIX}N instead (--resume alone picks the newest complete "
            f"one) or start afresh")


def resume_on_all_ranks(ctx: Any, find: Callable[[], tuple[Path, T]], load: Callable[[Path], T]
                        ) -> tuple[Path, T]:
    """``find()`` on the main rank only (it may print and fall back); the other ranks ``load`` the
    checkpoint it chose, so every rank resumes the same one. ``ctx``: a ``DistContext`` or None."""
    if ctx is None:
        return find()
    import torch.distributed as dist

    box: list[Any] = [None, None]
    if ctx.is_main:
        try:
            path, state = find()
        except LoPTError as e:
            dist.broadcast_object_list([None, str(e)], src=0)  # release the other ranks with the reason
            raise
        dist.broadcast_object_list([str(path), None], src=0)
        return path, state
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    return Path(box[0]), load(Path(box[0]))
