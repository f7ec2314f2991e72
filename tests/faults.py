"""Fault injection through the CLI only: ``lopt train`` on a tiny saved model with ``--save-every 1`` is
killed at seeded random moments (SIGKILL anywhere in training or during a checkpoint write; SIGINT,
once or twice, during a checkpoint write), then run again with ``--resume`` until it finishes. Every
trial's final weights are compared with an uninterrupted run's, and every checkpoint that was complete
when the signal landed must still be there, loadable, and equal to the uninterrupted run's.

    python tests/faults.py --sigkill 20 --sigint 6 --double-sigint 4 --seed 0   # prints the figures

``run_faults`` is what tests/test_faults.py calls. Only the command line and the files in the output
directory are used, so the harness does not depend on how the trainer is organised inside.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lopt.runtime.resume import load_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import addition_rows, save_tiny, write_jsonl  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
CHECKPOINT = "checkpoint-"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
POLL_S = 0.001
RUN_TIMEOUT_S = 300

# What each kind of trial does: the signal, how many times it is sent, and where it is aimed.
KINDS = {
    "sigkill-step": (signal.SIGKILL, 1, "step"),     # a random moment after checkpoint-k is complete
    "sigkill-write": (signal.SIGKILL, 1, "write"),   # while checkpoint-k is being written
    "sigint-write": (signal.SIGINT, 1, "write"),     # Ctrl-C during a write: finish, save, exit 130
    "sigint2-write": (signal.SIGINT, 2, "write"),    # Ctrl-C twice: the second aborts the interrupt save
}


@dataclass
class Trial:
    index: int
    kind: str
    target_step: int
    delay_s: float
    injected: bool = False           # the signal reached a live training process
    during_write: bool = False       # a checkpoint's temporary directory was there when it died
    exit_code: int | None = None
    complete_at_fault: list[int] = field(default_factory=list)  # checkpoint steps complete when it died
    lost: list[int] = field(default_factory=list)               # of those: gone or unreadable at the end
    mismatched: list[int] = field(default_factory=list)         # any checkpoint-N unequal to the reference's
    restarts: int = 0                # later runs needed to finish
    fresh_restart: bool = False      # nothing to resume: started again without --resume
    identical: bool = False          # final weights equal to the reference's (float tolerance)
    bitwise: bool = False
    max_abs_diff: float | None = None
    leftovers: list[str] = field(default_factory=list)          # temporary entries left in the output dir
    error: str | None = None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # One thread: the same arithmetic in every run (and no spinning threads on a shared machine).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


class Harness:
    """An uninterrupted reference run plus trials in ``workdir``."""

    def __init__(self, workdir: Path, steps: int = 6, python: str = sys.executable):
        self.workdir, self.steps, self.python = Path(workdir), steps, python
        self.model = save_tiny(self.workdir / "model")
        self.data = write_jsonl(self.workdir / "data.jsonl", addition_rows())
        self.env = _env()
        self.ref_dir = self.workdir / "reference"
        self.ref_final: dict[str, torch.Tensor] = {}
        self.ref_checkpoints: dict[int, dict[str, torch.Tensor]] = {}
        self.period_s = 0.0   # one step plus its checkpoint write, in the reference run (median)
        self.write_s = 0.0    # how long a checkpoint's temporary directory lives (median)

    def command(self, out: Path, resume: bool) -> list[str]:
        return [self.python, "-m", "lopt", "train", "--model", str(self.model), "--dataset", str(self.data),
                "--output-dir", str(out), "--max-steps", str(self.steps), "--save-every", "1",
                "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--device", "cpu", "--precision", "fp32",
                "--no-progress"] + (["--resume"] if resume else [])

    def start(self, out: Path, resume: bool, log: Path) -> subprocess.Popen:
        with log.open("ab") as f:
            return subprocess.Popen(self.command(out, resume), stdout=f, stderr=subprocess.STDOUT, env=self.env)

    def run(self, out: Path, resume: bool, log: Path) -> int:
        proc = self.start(out, resume, log)
        try:
            return proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -1

    # ------------------------------------------------------------------ reference

    def reference(self) -> None:
        """Run once without faults, timing the checkpoint writes from outside."""
        shutil.rmtree(self.ref_dir, ignore_errors=True)
        log = self.workdir / "reference.log"
        proc = self.start(self.ref_dir, False, log)
        done, seen, spans = {}, {}, []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            temps = {e for e in _temp_entries(self.ref_dir) if e.startswith(f".{CHECKPOINT}")}
            for s in _complete(self.ref_dir):
                done.setdefault(s, now)
            for t in temps:
                seen.setdefault(t, now)
            for t in [t for t in seen if t not in temps]:
                spans.append(now - seen.pop(t))
            time.sleep(POLL_S)
        if proc.wait(max(1.0, deadline - time.monotonic())) != 0:
            raise RuntimeError(f"the reference run failed; see {log}:\n{_tail(log)}")
        times = [done[s] for s in sorted(done)]
        if len(times) < 2 or not spans:
            raise RuntimeError("the reference run's checkpoint writes were not seen; cannot aim faults")
        self.period_s = statistics.median(b - a for a, b in zip(times, times[1:]))
        self.write_s = statistics.median(spans)
        self.ref_final = load_file(self.ref_dir / WEIGHTS)
        self.ref_checkpoints = {s: load_file(self.ref_dir / f"{CHECKPOINT}{s}" / WEIGHTS)
                                for s in _complete(self.ref_dir)}
        if sorted(self.ref_checkpoints) != list(range(1, self.steps + 1)):  # the last step's included
            raise RuntimeError(f"expected checkpoints 1..{self.steps}, got {sorted(self.ref_checkpoints)}")

    # ------------------------------------------------------------------ one trial

    def trial(self, index: int, kind: str, rng: random.Random) -> Trial:
        sig, count, aim = KINDS[kind]
        k = rng.randint(1, self.steps - 1)
        # 'step': within the next step or its write (after the last checkpoint: the last step, the final
        # save, the exit); 'write': inside the write, which takes write_s
        delay = rng.uniform(0, 1.5 * self.period_s) if aim == "step" else rng.uniform(0, 0.5 * self.write_s)
        t = Trial(index, kind, k, delay)
        out, log = self.workdir / f"trial-{index:03d}", self.workdir / f"trial-{index:03d}.log"
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
        proc = self.start(out, False, log)
        try:
            self._aim(proc, out, aim, k, delay)
            t.injected = proc.poll() is None
            if t.injected:
                proc.send_signal(sig)
                # Ctrl-C: was a write under way when it arrived? (SIGKILL: known exactly after death)
                t.during_write = any(e.startswith(f".{CHECKPOINT}") for e in _temp_entries(out))
            for _ in range(count - 1):  # a second Ctrl-C somewhere in the writes that follow
                time.sleep(rng.uniform(0, 2 * self.write_s))
                if proc.poll() is None:
                    proc.send_signal(sig)
            t.exit_code = proc.wait(RUN_TIMEOUT_S)
            if sig == signal.SIGKILL:
                t.during_write = any(e.startswith(f".{CHECKPOINT}") for e in _temp_entries(out))
        except subprocess.TimeoutExpired:
            proc.kill()
            t.exit_code = proc.wait()
            t.error = "the interrupted run hung"
            return t
        t.complete_at_fault = _complete(out)
        self._finish(t, out, log)
        return t

    def _aim(self, proc: subprocess.Popen, out: Path, aim: str, k: int, delay: float) -> None:
        """Wait until checkpoint-k's write begins ('write') or checkpoint-k is complete ('step'), then
        ``delay`` seconds more."""
        temp = f".{CHECKPOINT}{k}.tmp-{proc.pid}"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if (temp in _temp_entries(out)) if aim == "write" else (k in _complete(out)):
                break
            time.sleep(POLL_S)
        time.sleep(delay)

    def _finish(self, t: Trial, out: Path, log: Path) -> None:
        """Resume until the run completes, then compare with the reference."""
        rc = t.exit_code
        while rc != 0 and t.restarts < 3:
            resume = bool(_complete(out))
            t.fresh_restart |= not resume
            t.restarts += 1
            rc = self.run(out, resume, log)
        if rc != 0:
            t.error = f"could not finish after {t.restarts} restarts (exit {rc}): {_tail(log, 1)}"
        for s in t.complete_at_fault:
            if not _sound(out / f"{CHECKPOINT}{s}"):
                t.lost.append(s)
        for s in _complete(out):
            ref = self.ref_checkpoints.get(s)
            if ref is None or not _sound(out / f"{CHECKPOINT}{s}") or not _same(load_file(out / f"{CHECKPOINT}{s}" / WEIGHTS), ref)[0]:
                t.mismatched.append(s)
        if (out / WEIGHTS).is_file():
            t.identical, t.bitwise, t.max_abs_diff = _same(load_file(out / WEIGHTS), self.ref_final)
        t.leftovers = sorted(_temp_entries(out))


def _temp_entries(out: Path) -> list[str]:
    """Hidden temporary entries the trainer writes in its output dir (.checkpoint-N.tmp-PID, .final-PID, ...)."""
    try:
        return [e.name for e in os.scandir(out) if e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _complete(out: Path) -> list[int]:
    try:
        names = [e.name for e in os.scandir(out) if e.is_dir() and e.name.startswith(CHECKPOINT)]
    except FileNotFoundError:
        return []
    return sorted(int(n[len(CHECKPOINT):]) for n in names if n[len(CHECKPOINT):].isdigit())


def _sound(ckpt: Path) -> bool:
    """Weights and resumable state both load."""
    try:
        load_file(ckpt / WEIGHTS)
        load_state(ckpt / STATE)  # lopt's own safe loader (weights_only)
        return True
    except Exception:
        return False


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, bool, float]:
    if a.keys() != b.keys():
        return False, False, float("inf")
    diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)
    close = all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)
    return close, all(torch.equal(a[k], b[k]) for k in a), diff


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------- the suite


def summarize(trials: list[Trial]) -> dict:
    hit = [t for t in trials if t.injected]
    return {
        "trials": len(trials),
        "faults_injected": len(hit),
        "by_kind": {k: sum(t.kind == k for t in hit) for k in KINDS if any(t.kind == k for t in trials)},
        "during_checkpoint_write": sum(t.during_write for t in hit),
        "sigkill_during_write": sum(t.during_write for t in hit if t.kind.startswith("sigkill")),
        "identical_endings": sum(t.identical for t in hit),
        "bitwise_identical_endings": sum(t.bitwise for t in hit),
        "max_abs_diff": max((t.max_abs_diff for t in hit if t.max_abs_diff is not None), default=None),
        "checkpoints_complete_at_fault": sum(len(t.complete_at_fault) for t in hit),
        # how far each run had got: complete checkpoints when the signal landed -> trials
        "spread": dict(sorted(Counter(len(t.complete_at_fault) for t in hit).items())),
        "checkpoints_lost": sum(len(t.lost) for t in hit),
        "checkpoints_unequal_to_reference": sum(len(t.mismatched) for t in hit),
        "fresh_restarts": sum(t.fresh_restart for t in hit),
        "trials_with_leftover_temp_dirs": sum(bool(t.leftovers) for t in hit),
        "leftover_temp_dirs": sorted({re.sub(r"(final-|tmp-|old-)\d+", r"\1PID", e) for t in hit for e in t.leftovers}),
        "errors": [f"trial {t.index} ({t.kind}): {t.error}" for t in trials if t.error],
    }


def run_faults(workdir: Path, kinds: dict[str, int], seed: int = 0, steps: int = 6,
               report: Path | None = None, log=None) -> dict:
    """Run ``kinds`` ({kind: trials}) in a seeded random order; returns the figures (and writes them,
    with every trial, to ``report``)."""
    h = Harness(Path(workdir), steps=steps)
    t0 = time.monotonic()
    h.reference()
    rng = random.Random(seed)
    plan = [k for k, n in kinds.items() for _ in range(n)]
    rng.shuffle(plan)
    trials = []
    for i, kind in enumerate(plan):
        trials.append(h.trial(i, kind, rng))
        if log:
            t = trials[-1]
            log(f"trial {i:3d} {kind:14s} injected={t.injected!s:5} write={t.during_write!s:5} "
                f"rc={t.exit_code} complete={t.complete_at_fault} identical={t.identical} lost={t.lost} "
                f"leftovers={t.leftovers}" + (f" ERROR {t.error}" if t.error else ""))
    figures = summarize(trials)
    figures.update(seed=seed, steps=steps, step_period_s=round(h.period_s, 4),
                   checkpoint_write_s=round(h.write_s, 4), wall_s=round(time.monotonic() - t0, 1))
    if report is not None:
        report.write_text(json.dumps({"figures": figures, "trials": [asdict(t) for t in trials]}, indent=2) + "\n")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sigkill", type=int, default=20, help="SIGKILL trials (half anywhere, half during a write)")
    p.add_argument("--sigint", type=int, default=6, help="Ctrl-C during a checkpoint write")
    p.add_argument("--double-sigint", type=int, default=4, help="Ctrl-C twice during checkpoint writes")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary directory, removed)")
    p.add_argument("--report", help="write the figures and every trial to this JSON file")
    a = p.parse_args(argv)
    kinds = {"sigkill-step": a.sigkill - a.sigkill // 2, "sigkill-write": a.sigkill // 2,
             "sigint-write": a.sigint, "sigint2-write": a.double_sigint}
    with tempfile.TemporaryDirectory(prefix="lopt-faults-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = run_faults(work, kinds, seed=a.seed, steps=a.steps,
                             report=Path(a.report) if a.report else None, log=lambda m: print(m, flush=True))
    print(json.dumps(figures, indent=2))
    return 0 if figures["faults_injected"] == figures["identical_endings"] and not figures["checkpoints_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
