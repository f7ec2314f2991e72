"""Checkpoint I/O of a training run: ``OUT/checkpoint-N`` (a plain model plus the state to resume from),
the final model, and the output directory's housekeeping (stale temporaries, ``--save-total-limit``).

Every ``checkpoint-N`` is written whole in a temporary directory and renamed into place
(``lopt.models.save_checkpoint``). Its last file, ``lopt_checkpoint.json`` (the manifest), lists every
file with its size, the step, and whether it can be resumed; a checkpoint whose files no longer match
it is incomplete. Reading resume state back (safely) is ``lopt.runtime.resume``. See docs/checkpoints.md.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable
import torch

from lopt.version import __version__
from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError
from lopt.models import save_checkpoint


CHECKPOINT_PREFIX = "checkpoint-"


STATE_FILE = "trainer_state.pt"


RUN_FILE = "lopt_run.json"


MANIFEST_FILE = "lopt_checkpoint.json"


# Bump when the manifest's meaning changes; a reader refuses a format it does not know.
MANIFEST_FORMAT = 1


def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` directory name, else None."""
    tail = path.name[len(CHECKPOINT_PREFIX):]
    return int(tail) if path.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` directories of ``output_dir``, newest (highest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step, reverse=True)


def write_manifest(directory: Path, step: int, resumable: bool, state_files: list[str]) -> None:
    """Write ``lopt_checkpoint.json`` listing every file already in ``directory`` with its size. Call it
    last, on the temporary directory, so that a later change to any file is detectable."""
    files = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file()}
    manifest = {"format": MANIFEST_FORMAT, "lopt": __version__, "step": step, "resumable": resumable,
                "state_files": state_files, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of checkpoint ``path``; None when it has none (written by lopt 0.1). Raises
    ValueError (with the reason) when it is unreadable."""
    f = path / MANIFEST_FILE
    if not f.exists():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{MANIFEST_FILE} is unreadable ({type(e).__name__})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST_FILE} is not a lopt checkpoint manifest")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{MANIFEST_FILE} has format {manifest.get('format')!r}, which this lopt "
                         f"({__version__}) does not read: resume with the lopt that wrote it")
    return manifest


def checkpoint_problem(path: Path, state_files: list[str]) -> str | None:
    """Why checkpoint ``path`` cannot be resumed, judged from its files (only the safetensors headers
    are read), or None.

    With a manifest: every listed file present with its listed size, and the checkpoint resumable.
    Without one (lopt 0.1): ``config.json`` and each of ``state_files`` present and non-empty. Either
    way every ``*.safetensors`` header must parse."""
    if not path.is_dir():
        return "it is not a directory"
    try:
        manifest = read_manifest(path)
    except ValueError as e:
        return str(e)
    if manifest is None:
        for name in ["config.json", *state_files]:
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size == 0:
                return f"{name} is empty"
        return _weights_problem(path)
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} is {'empty' if actual == 0 else 'truncated' if actual < size else 'altered'} " \
                   f"({actual} of {size} bytes)"
    if not manifest.get("resumable", False):
        return "it was saved with --save-only-model (weights only, no optimizer or trainer state)"
    return _weights_problem(path)


def _weights_problem(path: Path) -> str | None:
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own error types; any of them means unreadable
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            return f"{f.name} is corrupt ({why})"
    return None


def latest_checkpoint(output_dir: str | Path, state_files: tuple[str, ...] = (STATE_FILE,)) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose files are complete and resumable (judged
    from the manifest, nothing loaded), or None. ``lopt.runtime.resume`` also loads and reports."""
    return next((p for p in list_checkpoints(output_dir) if checkpoint_problem(p, list(state_files)) is None),
                None)


def stopped_message(step: int, path: Path | None, model_only: bool) -> str:
    """What an interrupted run says about its last checkpoint."""
    if model_only:
        return (f"lopt: stopped at step {step}; {path} holds the weights only (--save-only-model): it "
                f"cannot be resumed")
    return f"lopt: stopped at step {step}; resume with --resume (checkpoint: {path})"


def versions() -> dict[str, str]:
    import transformers


    return {"lopt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_info(cfg: Any, wrapped: LoPTModel, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {"options": asdict(cfg), "method": cfg.method, **wrapped.describe(), "versions": versions(),
            "final_metrics": metrics or {}}


def save_plain_into(wrapped: LoPTModel, tokenizer, target: Path, info: dict[str, Any]) -> None:
    """Write the final plain checkpoint's files into ``target``, which also holds checkpoint-N/ and
    metrics.jsonl: the checkpoint is written whole in a temporary directory, then each file is
    renamed into place."""
    tmp = save_checkpoint(wrapped, tokenizer, target / f".final-{os.getpid()}", extra_json={RUN_FILE: info})
    try:
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def state_writer(step: int, write_state: Callable[[Path], None] | None,
                 state_files: list[str]) -> Callable[[Path], None]:
    """The ``write_extra`` of ``save_checkpoint`` for a training checkpoint: the resume state (unless
    ``write_state`` is None: ``--save-only-model``), then the manifest, last."""
    def write(d: Path) -> None:
        if write_state is not None:
            write_state(d)
        write_manifest(d, step, resumable=write_state is not None, state_files=state_files)
    return write


def save_training_checkpoint(wrapped: LoPTModel, tokenizer, output_dir: Path, step: int,
                             info: dict[str, Any], state: dict[str, Any] | None,
                             total_limit: int | None = None) -> Path:
    """``OUT/checkpoint-N``: a plain model plus ``trainer_state.pt`` to resume from (none when ``state``
    is None: ``--save-only-model``) and the manifest, written in a temporary directory and renamed, so a
    crash never leaves a half-written checkpoint. Then, with ``total_limit``, older checkpoints beyond
    the newest ``total_limit`` are deleted."""
    write_state = None if state is None else (lambda d: torch.save(state, d / STATE_FILE))
    path = save_checkpoint(wrapped, tokenizer, output_dir / f"{CHECKPOINT_PREFIX}{step}",
                           extra_json={RUN_FILE: info},
                           write_extra=state_writer(step, write_state, [STATE_FILE]))
    rotate_checkpoints(output_dir, total_limit, keep=path)
    return path


def rotate_checkpoints(output_dir: Path, total_limit: int | None, keep: Path) -> list[Path]:
    """``--save-total-limit``: delete the oldest ``checkpoint-N`` (by N) until ``total_limit`` remain;
    ``keep`` (the one just written, complete) is never deleted. Each is first renamed to a hidden
    name, so a crash mid-delete never leaves a partial ``checkpoint-N``. Returns the deleted paths."""
    if not total_limit:
        return []
    ckpts = [p for p in list_checkpoints(output_dir) if p.resolve() != keep.resolve()]
    doomed = ckpts[max(0, total_limit - 1):]  # newest first: keep + the next total_limit - 1
    for p in doomed:
        aside = p.parent / f".{p.name}.deleting-{os.getpid()}"
        try:
            os.replace(p, aside)
        except OSError as e:  # the new checkpoint is safe; failing to free space must not end the run
            print(f"lopt: warning: could not delete {p} (--save-total-limit): {e}", file=sys.stderr)
            continue
        shutil.rmtree(aside, ignore_errors=True)
    return doomed


# ``save_checkpoint`` writes ``.NAME.tmp-PID`` and sets the old ``NAME`` aside as ``.NAME.old-PID``;
# ``save_plain_into`` writes via ``.final-PID``; ``rotate_checkpoints`` deletes via ``.NAME.deleting-PID``;
# ``trim_log`` rewrites metrics.jsonl via the file ``.metrics.jsonl.tmp-PID``.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|deleting)-(?P<pid>\d+)$|^\.final-(?P<fpid>\d+)$")


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this machine (a zombie, killed but not yet reaped, is not)."""
    if pid == os.getpid():
        return False  # this process starts a run now: whatever it left before is not being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def clean_stale_temporaries(output_dir: str | Path, quiet: bool = False) -> list[str]:
    """Remove what an interrupted writer left in ``output_dir``: the temporary checkpoint directories
    (and log rewrites) of processes that are no longer running. A checkpoint set aside for replacement (``.NAME.old-PID``)
    whose replacement never arrived is put back as ``NAME``. Those of a live process are left alone:
    it may be writing them now. Call on the main rank when a run starts. Returns the names handled."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    handled = []
    for p in sorted(out.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m is None or _process_alive(int(m["pid"] or m["fpid"])):
            continue
        target = out / m["name"] if m["name"] else None
        if m["kind"] == "old" and target is not None and checkpoint_step(target) is not None \
                and p.is_dir() and not target.exists():
            os.replace(p, target)  # the crash came between setting it aside and renaming its successor in
            handled.append(f"{p.name} (restored as {target.name})")
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        handled.append(p.name)
    if handled and not quiet:
        print(f"lopt: removed {len(handled)} temporar{'y' if len(handled) == 1 else 'ies'} left in "
              f"{out} by an interrupted run: {', '.join(handled)}", file=sys.stderr)
    return handled


def method_extra_state(wrapped: LoPTModel) -> dict[str, torch.Tensor]:
    """Trainable tensors that the plain checkpoint does not hold: local heads, LoRA adapters."""
    # Under FSDP the heads are sharded (DTensor): gather them (collective; every rank saves alike).
    state = {f"heads.{k}": v.full_tensor() if hasattr(v, "full_tensor") else v
             for k, v in wrapped.heads.state_dict().items()}
    # The anchors are the *pretrained* lower blocks: a resumed run cannot rebuild them from its
    # checkpoint's (trained) weights, so they travel with the trainer state.
    state.update({f"anchors.{k}": v for k, v in wrapped.anchors.state_dict().items()})
    for name in ("anchor_embedding", "exit_head"):  # frozen copies of the base's embedding, final norm, LM head
        if getattr(wrapped, name, None) is not None:
            state.update({f"{name}.{k}": v for k, v in getattr(wrapped, name).state_dict().items()})
    state.update({f"model.{k}": v for k, v in wrapped.method_impl.extra_state(wrapped.model).items()})
    return state
