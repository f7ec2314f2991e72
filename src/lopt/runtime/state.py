"""Run state and run reporting, shared by every training loop (``lopt train`` and ``--pipeline``):
what callbacks see (``TrainState``), what ``train`` returns (``TrainResult``), and ``RunLog``: the
metrics log, the trackers (``--report-to``), the progress bar, the logging window, the callbacks, Ctrl-C and the summary.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError
from lopt.engine.memory import peak_memory_mb
from lopt.runtime.checkpoints import stopped_message
from lopt.runtime.trackers import Trackers, check_trackers


@dataclass
class TrainResult:
    """What ``train`` returns: the summary (also in ``lopt_run.json``) and the trained model."""

    summary: dict[str, Any]
    model: LoPTModel
    tokenizer: Any


@dataclass
class TrainState:
    """What a callback sees and may change (``stop_requested`` ends the run after a checkpoint)."""

    step: int = 0
    stop_requested: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


Callback = Callable[[dict[str, Any], TrainState], None]

# The numbers of a log record that go to the trackers (as train/NAME).
_SCALARS = ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb")


def mean_records(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the per-step numbers of a logging window (the last lr)."""
    out: dict[str, Any] = {}
    for k in ("loss", "aux_loss", "grad_norm"):
        vals = [r[k] for r in recs if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    out["lr"] = recs[-1]["lr"]
    return out


def count_steps(cfg: Any, batches_per_epoch: int) -> int:
    """The optimizer steps of a run: ``cfg.max_steps``, else ``cfg.epochs`` epochs of ``cfg.grad_accum``
    batches a step (at least one)."""
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))


def trim_log(path: Path, step: int) -> int:
    """On resume from step ``step``: drop the records of ``metrics.jsonl`` past that step (logged by a
    run that went further than its last complete checkpoint) and a last line a crash cut short, so the
    resumed run's records follow on. Rewritten atomically. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] <= step:
            keep.append(line)
    if len(keep) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


def _postfix(rec: dict[str, Any]) -> dict[str, str]:
    d = {"loss": f"{rec['loss']:.3f}"}
    if rec["aux_loss"] is not None:
        d["aux"] = f"{rec['aux_loss']:.4f}"
    if rec["tokens_per_s"]:
        d["tok/s"] = f"{rec['tokens_per_s']:.0f}"
    d["mem"] = f"{rec['peak_mem_mb']:.0f}MB"
    return d


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)


def open_trackers(cfg: Any, out_dir: Path) -> Trackers | None:
    """The trackers of ``cfg.report_to`` (and the old ``cfg.tensorboard``), opened with the run's options as
    parameters; None when there are none. A tracker that fails to start is a one-line LoPTError."""
    names = check_trackers(getattr(cfg, "report_to", None), bool(getattr(cfg, "tensorboard", False)))
    if not names:
        return None
    from dataclasses import asdict, is_dataclass

    try:
        return Trackers(names, out_dir, config=asdict(cfg) if is_dataclass(cfg) else None)
    except LoPTError:
        raise
    except Exception as e:  # the tracker's own error (a store it cannot use, a login): its first line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoPTError(f"--report-to {' '.join(names)}: the tracker failed to start: {msg}") from e


# A second SIGINT this soon after the first is the launcher's forwarded copy (a terminal's Ctrl-C
# reaches every worker directly, and torchrun forwards it once more), not a request to abort.
SIGINT_DUPLICATE_S = 5.0


def install_sigint(state: Any, ctx: Any, message: str) -> Any:
    """Ctrl-C handler for a (possibly distributed) run: the first SIGINT sets ``state.stop_requested``;
    under a launcher a repeat within SIGINT_DUPLICATE_S seconds is the launcher's forwarded copy and
    is ignored; a later one aborts. Returns the previous handler."""
    first: list[float] = []

    def on_sigint(signum, frame):
        now = time.monotonic()
        if state.stop_requested:
            if ctx is not None and first and now - first[0] < SIGINT_DUPLICATE_S:
                return
            raise KeyboardInterrupt
        state.stop_requested = True
        first.append(now)
        if ctx is None or ctx.is_main:
            print(message, file=sys.stderr)
    return signal.signal(signal.SIGINT, on_sigint)


def close_run(bar: Any, log_file: Any, tb: Any, old_handler: Any) -> None:
    """The end of a training loop, however it ended: close the progress bar, the metrics log and the
    trackers (each may be None) and give Ctrl-C back its previous handler."""
    if bar:
        bar.close()
    if log_file is not None:
        log_file.close()
    if tb is not None:
        tb.close()
    if old_handler is not None:
        signal.signal(signal.SIGINT, old_handler)


class RunLog:
    """The bookkeeping of one training loop, the same for every trainer that runs its own loop:

    * on the main process (``main``), ``OUT/metrics.jsonl`` - started afresh, or on resume trimmed to
      the resumed step (``trim_log``) - and the trackers of ``cfg.report_to`` (``lopt.runtime.trackers``);
    * the progress bar (``cfg.progress``, main process only);
    * the logging window: ``end_step`` collects each step's numbers and every ``cfg.log_every``-th
      step (and the last) returns their record (mean loss, tokens/s, peak memory);
    * ``log``: a record into the history, the log, the trackers, the bar and the callbacks; ``track``:
      other series (retention, evaluation) into the trackers;
    * Ctrl-C while the loop runs (``install_sigint``: the first sets ``state.stop_requested``);
    * ``summary`` of the run, and ``report_stop`` for a run stopped early.

    Use it as a context manager around the loop: entering installs the Ctrl-C handler and starts the
    bar and the window; leaving, however the loop ended, closes them and gives Ctrl-C back."""

    def __init__(self, cfg: Any, state: TrainState, total_steps: int, device: torch.device, *, main: bool,
                 resumed: bool, ctx: Any = None, callbacks: list[Callback] | None = None,
                 sigint_message: str = "\nlopt: interrupt received, saving a checkpoint after this step "
                                       "(Ctrl-C again to abort)"):
        self.cfg, self.state, self.total_steps, self.device = cfg, state, total_steps, device
        self.main, self.ctx, self.callbacks = main, ctx, list(callbacks or [])
        self.out_dir = Path(cfg.output_dir)
        self.sigint_message = sigint_message
        self.path = self.out_dir / "metrics.jsonl"
        if main:  # only the main process writes the log, the progress bar and the checkpoints
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resumed and self.path.exists():
                self.path.unlink()  # a fresh run starts a fresh log
            elif resumed:
                trim_log(self.path, state.step)
        self.trackers = open_trackers(cfg, self.out_dir) if main else None  # lopt.runtime.trackers.Trackers
        self.file = self.path.open("a") if main else None
        self.bar = None
        self._old_handler = None
        self._window: list[dict[str, Any]] = []
        self._tokens, self._t = 0, time.perf_counter()

    def __enter__(self) -> RunLog:
        # Ctrl-C: finish the current step, save, exit. A second Ctrl-C stops at once (under a launcher a
        # repeat within seconds is its forwarded copy of the same Ctrl-C and is ignored).
        if threading.current_thread() is threading.main_thread():
            self._old_handler = install_sigint(self.state, self.ctx, self.sigint_message)
        self.bar = _progress(self.total_steps, self.state.step, self.cfg.progress and self.main)
        self._window, self._tokens, self._t = [], 0, time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        close_run(self.bar, self.file, self.trackers, self._old_handler)
        self.bar = self.file = self.trackers = self._old_handler = None

    def end_step(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """After ``state.step`` counted a finished step: its numbers (a stepper's record, with
        ``tokens``) join the logging window and the bar moves on. On a logging step (every
        ``log_every``-th, and the last) returns the window's record and starts the next window."""
        self._tokens += rec.pop("tokens")
        if self.bar:
            self.bar.update(1)
        self._window.append(rec)
        step = self.state.step
        if step % self.cfg.log_every != 0 and step != self.total_steps:
            return None
        dt = time.perf_counter() - self._t
        out = {"step": step, **mean_records(self._window),
               "tokens_per_s": self._tokens / dt if dt > 0 else None,
               "peak_mem_mb": peak_memory_mb(self.device), "time": time.time()}
        self._window, self._tokens, self._t = [], 0, time.perf_counter()
        return out

    def log(self, rec: dict[str, Any]) -> None:
        """One logging step's record: into the history (saved with checkpoints), the metrics log and
        the trackers (main process), the bar's postfix, then the callbacks."""
        self.state.history.append(rec)
        self.write(rec)
        self.track({f"train/{k}": rec.get(k) for k in _SCALARS}, rec["step"])
        if self.bar:
            self.bar.set_postfix(_postfix(rec), refresh=False)
        for cb in self.callbacks:
            cb(rec, self.state)

    def track(self, values: dict[str, Any], step: int) -> None:
        """Numbers (name -> value, None left out) into the trackers at ``step`` (main process)."""
        if self.trackers is not None:
            self.trackers.log(values, step)

    def write(self, rec: dict[str, Any]) -> None:
        """A line of ``metrics.jsonl`` (nothing off the main process)."""
        if self.file is not None:
            self.file.write(json.dumps(rec, default=str) + "\n")
            self.file.flush()

    def report_stop(self, path: Path | None) -> None:
        """What a run stopped early (Ctrl-C, a callback) says about its last checkpoint ``path``."""
        if self.main:
            print(stopped_message(self.state.step, path, self.cfg.save_only_model), file=sys.stderr)

    def summary(self, wrapped: Any, data_stats: dict[str, Any] | None, interrupted: bool,
                **extra: Any) -> dict[str, Any]:
        """The run's summary (``lopt_run.json``, ``TrainResult.summary``): first and last loss, median
        tokens/s, peak memory; ``extra`` entries follow, then this process's rank under a launcher."""
        cfg, hist = self.cfg, self.state.history
        aux = [h["aux_loss"] for h in hist if h["aux_loss"] is not None]
        speeds = [h["tokens_per_s"] for h in hist[1:] or hist if h["tokens_per_s"]]  # first step warms up
        out = {"steps": self.state.step, "total_steps": self.total_steps, "interrupted": interrupted,
               "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
               "aux_first": aux[0] if aux else None, "aux_last": aux[-1] if aux else None,
               "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
               "peak_mem_mb": max((h["peak_mem_mb"] for h in hist), default=None),
               "data": data_stats, "output_dir": str(self.out_dir), "method": cfg.method,
               "block_ranges": wrapped.block_ranges, **extra}
        if self.ctx is not None:
            out["rank"], out["world_size"] = self.ctx.rank, self.ctx.world_size
        return out
