"""Run state and run reporting: what callbacks see, the summary, progress bar, logging.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError


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


def _mean_records(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the per-step numbers of a logging window (the last lr)."""
    out: dict[str, Any] = {}
    for k in ("loss", "aux_loss", "grad_norm"):
        vals = [r[k] for r in recs if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    out["lr"] = recs[-1]["lr"]
    return out


def _summary(cfg, wrapped, state, data_stats, total_steps, out_dir, interrupted) -> dict[str, Any]:
    hist = state.history
    aux = [h["aux_loss"] for h in hist if h["aux_loss"] is not None]
    speeds = [h["tokens_per_s"] for h in hist[1:] or hist if h["tokens_per_s"]]  # first step warms up
    return {"steps": state.step, "total_steps": total_steps, "interrupted": interrupted,
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
            "aux_first": aux[0] if aux else None, "aux_last": aux[-1] if aux else None,
            "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "peak_mem_mb": max((h["peak_mem_mb"] for h in hist), default=None),
            "data": data_stats, "output_dir": str(out_dir), "method": cfg.method,
            "block_ranges": wrapped.block_ranges}


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


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LoPTError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(out_dir / "tensorboard"))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
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
    TensorBoard writer (each may be None) and give Ctrl-C back its previous handler."""
    if bar:
        bar.close()
    if log_file is not None:
        log_file.close()
    if tb is not None:
        tb.close()
    if old_handler is not None:
        signal.signal(signal.SIGINT, old_handler)
