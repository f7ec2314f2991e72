"""What ``lopt grpo`` and ``lopt dpo`` share around TRL's trainer: loading and wrapping the model,
the TrainingArguments that follow from lopt's options, resume, metrics.jsonl, the progress bar,
Ctrl-C, the summary.

LoPT itself runs inside TRL's step through ``lopt.integrations.trl`` (``wrap_trainer``), the same
code that puts any lopt method into a user's own TRL or ``Trainer`` script: the optimizer over
``wrapped.param_groups``, the local loss scaled for gradient accumulation, per-block clipping, lopt's
checkpoints (a plain transformers checkpoint plus TRL's resume files and ``lopt_state.pt``). The
commands add lopt's LR schedule (warm-up + cosine), the frozen base as the reference model and the
bookkeeping below. ``--save-only-model`` leaves out all but ``trainer_state.json``;
``--save-total-limit`` deletes older checkpoints after each save.
"""
from __future__ import annotations

import copy
import json
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lopt.config import RLConfig  # noqa: F401  (re-exported: lopt.recipes.trl_bridge's name)
from lopt.engine.boundary import LoPTModel
from lopt.engine.memory import peak_memory_mb
from lopt.eval.retention import RETENTION_OFF_NOTE
from lopt.integrations.trl import (CHECKPOINT_PREFIX, LOPT_STATE_FILE, RUN_FILE, STATE_FILES,  # noqa: F401  (names of lopt.recipes.trl_bridge)
                                   TRAINER_STATE_FILE, TRAINER_TORCH_FILES, checkpoint_global_step, lopt_schedule,
                                   lopt_trainer_class, wrap_seeded, wrap_trainer)
from lopt.models import load_model
from lopt.runtime import checkpoints as ckpt
from lopt.runtime.trackers import check_trackers
from lopt.runtime.checkpoints import clean_stale_temporaries, method_extra_state, save_plain_into, stopped_message, versions
from lopt.runtime.resume import CorruptStateError, find_resume, load_state
from lopt.runtime.loop import autocast_dtype
from lopt.runtime.precision import apply_precision, cast_reference
from lopt.runtime.state import trim_log


@dataclass
class RLResult:
    """What a recipe returns: the summary (also in ``lopt_run.json``), the wrapped model, the tokenizer."""

    summary: dict[str, Any]
    model: LoPTModel
    tokenizer: Any


# --------------------------------------------------------------------------- set-up


def resolve_resume(cfg: RLConfig) -> Path | None:
    """Start a run in ``output_dir``: remove the temporaries an interrupted run left there, then pick
    the checkpoint to resume from (the newest complete one for ``latest``, falling back past damaged
    ones with a message; or the given directory), or None when not resuming."""
    clean_stale_temporaries(cfg.output_dir)
    if not cfg.resume:
        return None
    path, _ = find_resume(cfg.output_dir, cfg.resume, STATE_FILES, check_rl_state)
    return path


def _numpy_rng_types() -> list[Any]:
    """What transformers' rng_state.pth holds beyond plain data: numpy's RNG state (an array and its
    dtype). The same allowlist transformers uses when it reads the file back."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def check_rl_state(checkpoint: Path) -> dict[str, Any]:
    """Load ``lopt_state.pt`` and check that every resume file TRL will read loads safely (tensors and
    plain data only) and that ``trainer_state.json`` parses; returns lopt's state."""
    state = load_state(checkpoint / LOPT_STATE_FILE)
    try:
        json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStateError(checkpoint / TRAINER_STATE_FILE, f"it is not readable JSON ({type(e).__name__})")
    for name in TRAINER_TORCH_FILES:
        if (checkpoint / name).exists():
            load_state(checkpoint / name, allow=_numpy_rng_types() if name.startswith("rng_state") else ())
    return state


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose files are complete and resumable (nothing
    is loaded; ``resolve_resume`` also loads and falls back)."""
    return ckpt.latest_checkpoint(output_dir, STATE_FILES)


def load_and_wrap(cfg: RLConfig, device: torch.device, with_reference: bool):
    """Load the base model, keep a frozen copy as the reference (when asked for and the method is not
    LoRA, whose reference is the base with its adapters off), wrap the model for ``cfg.method`` and
    route its decoder stack through LoPT's step set-up. Returns (wrapped, tokenizer, reference)."""
    model, tokenizer = load_model(cfg.model, gguf_file=cfg.gguf_file, device=device,
                                  trust_remote_code=cfg.trust_remote_code)
    # The copy must be taken before wrapping: wrap unties the LM head, installs hooks on the layers,
    # and a deep copy made afterwards would carry hooks that call back into this wrapper.
    reference = None
    if with_reference and cfg.method != "lora":
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    wrapped = wrap_seeded(model, cfg.lopt_config(), cfg.seed).to(device)  # as wrap_trainer draws the heads
    apply_precision(wrapped, cfg.precision, device, cfg.bf16_update)  # frozen weights (all, under bf16-true) in bf16
    cast_reference(reference, cfg.precision, device)  # frozen too: bf16 under the bf16 precisions
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()
    wrapped.route_forward()
    return wrapped, tokenizer, reference


def trl_common_args(cfg: RLConfig, device: torch.device) -> dict[str, Any]:
    """The TRL/transformers TrainingArguments that follow from lopt's options."""
    amp = autocast_dtype(cfg.precision, device)
    return dict(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps or -1, num_train_epochs=cfg.epochs,
        max_grad_norm=cfg.max_grad_norm or 0.0, logging_steps=cfg.log_every,
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 500,
        save_total_limit=cfg.save_total_limit, save_only_model=cfg.save_only_model,
        # --report-to: transformers' own trackers (its report_to), checked first: a missing one is one line
        report_to=check_trackers(cfg.report_to) or "none", bf16=amp == torch.bfloat16, fp16=amp == torch.float16,
        use_cpu=device.type == "cpu", seed=cfg.seed, disable_tqdm=True,
        dataloader_num_workers=0,
        # Not the fused kernel: resumed under TRL's checkpoint loading it did not reproduce the
        # uninterrupted run to 1e-4 (LoRA DPO), which the default kernel does.
        optim="adamw_torch",
        # lopt checkpoints the layers itself (wrapped.gradient_checkpointing_enable), so the
        # boundary hooks and the checkpointing scope stay under its control. (transformers >= 5.2x
        # calls it activation checkpointing; the old name still works but warns.)
        **({"activation_checkpointing": False} if _has_arg("activation_checkpointing")
           else {"gradient_checkpointing": False}),
    )


def _has_arg(name: str) -> bool:
    from transformers import TrainingArguments

    return name in TrainingArguments.__dataclass_fields__


def lopt_extra_state(wrapped: LoPTModel) -> dict[str, torch.Tensor]:
    """Trainable tensors that the plain checkpoint does not hold: local heads, anchors, LoRA adapters."""
    return method_extra_state(wrapped)


def make_trainer(base: type, cfg: RLConfig, wrapped: LoPTModel, run: "RunState", **kwargs: Any):
    """``base`` (a TRL trainer class) built with ``kwargs`` on ``wrapped.model`` and given LoPT through
    ``lopt.integrations.trl.wrap_trainer``, with lopt's LR schedule, the lower blocks' ``--lr-lower``,
    and the run's bookkeeping (tokens and local losses counted in ``run``, ``lopt_run.json`` of each
    checkpoint from it)."""
    trainer = lopt_trainer_class(base)(model=wrapped.model, **kwargs)  # lopt's class from the start: no telemetry
    retention = dict(eval_every=getattr(cfg, "eval_every", None), prompts=cfg.retention_prompts,
                     max_new_tokens=cfg.retention_new_tokens, suite_limit=cfg.retention_limit, data_dir=cfg.data_dir)
    if cfg.retention is None:  # the default: off, and the run says so
        print(RETENTION_OFF_NOTE, file=sys.stderr)
    wrap_trainer(trainer, wrapped=wrapped, lr_lower=cfg.lr_lower, stats=run, schedule=lopt_schedule(cfg.warmup_ratio),
                 retention=cfg.retention, retention_options=retention)
    trainer.lopt_info = lambda: run.info(wrapped, None)
    trainer.lopt_on_checkpoint = run.checkpoints.append
    return trainer


# --------------------------------------------------------------------------- run bookkeeping


@dataclass
class RunState:
    """Per-run counters the trainer and the callback share (the trainer counts ``tokens`` and
    ``aux_window`` here: ``lopt.integrations.trl.StepStats``'s fields)."""

    cfg: RLConfig
    command: str
    device: torch.device
    tokens: int = 0
    aux_window: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    stop_requested: bool = False
    extra_info: dict[str, Any] = field(default_factory=dict)
    eval_info: dict[str, Any] = field(default_factory=dict)  # joins every eval record (split, n)

    def info(self, wrapped: LoPTModel, metrics: dict[str, Any] | None) -> dict[str, Any]:
        """The ``lopt_run.json`` contents: options, block ranges, versions, final metrics."""
        import trl


        return {"command": self.command, "options": asdict(self.cfg), "method": self.cfg.method,
                **wrapped.describe(), "versions": {**versions(), "trl": trl.__version__},
                **self.extra_info, "final_metrics": metrics or {}}


def make_callback(run: RunState, wrapped: LoPTModel, metrics_path: Path, postfix_keys: tuple[str, ...],
                  retention: Any = None):
    """The TrainerCallback that writes ``metrics.jsonl``, shows the progress bar and turns a requested
    stop (Ctrl-C) into a checkpoint and the end of the run (LoPT's per-step switches are
    ``lopt.integrations.trl``'s callback)."""
    from transformers import TrainerCallback

    class LoPTCallback(TrainerCallback):
        def __init__(self):
            self.retention = None  # (step, measurement) waiting for that step's record
            self.bar = None
            self.t_window = time.perf_counter()
            self.tokens_window = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if run.cfg.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=run.command,
                                dynamic_ncols=True, file=sys.stderr)
            self.t_window = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if state.global_step >= state.max_steps:
                # The final model goes to OUT itself; with --save-every the last step is also a
                # checkpoint-N (as lopt train's), which --resume --max-steps M extends.
                control.should_save = bool(run.cfg.save_every)
            if run.stop_requested and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_runtime" in logs:  # the end-of-training summary, not a step
                return
            if "loss" not in logs and any(k.startswith("retention/") for k in logs):  # (Trainer.log adds the epoch)
                # A retention measurement (made at the step's end, before the step's own log): the whole
                # of it (kl, nll, tokens, seconds, suite) joins that step's record.
                kept = retention.history[-1]["retention"] if retention is not None and retention.history \
                    else {k[len("retention/"):]: v for k, v in logs.items() if k.startswith("retention/")}
                self.flush_retention()
                self.retention = (state.global_step, kept)
                return
            if any(k.startswith("eval_") for k in logs):  # an evaluation: its own record, as lopt train writes
                rec = {"step": state.global_step, "eval": {**run.eval_info, **{
                    k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")}}}
                run.history.append(rec)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                self.t_window = time.perf_counter()  # evaluation time is not training throughput
                return
            now = time.perf_counter()
            dt, tokens = now - self.t_window, run.tokens - self.tokens_window
            self.t_window, self.tokens_window = now, run.tokens
            aux = logs.pop("aux_loss", None)  # the trainer's mean local loss since the last log
            rec: dict[str, Any] = {"step": state.global_step, "loss": logs.pop("loss", None),
                                   "aux_loss": aux, "lr": logs.pop("learning_rate", None),
                                   "grad_norm": logs.pop("grad_norm", None),
                                   "tokens_per_s": tokens / dt if dt > 0 and tokens else None,
                                   "peak_mem_mb": peak_memory_mb(run.device), "time": time.time()}
            for k, v in logs.items():
                if isinstance(v, (int, float)) and k not in rec:
                    rec[k] = v
            if self.retention is not None and self.retention[0] == state.global_step:
                rec["retention"], self.retention = self.retention[1], None
            self.flush_retention()
            run.history.append(rec)
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.bar is not None:
                shown = {k: f"{rec[k]:.3g}" for k in postfix_keys if isinstance(rec.get(k), (int, float))}
                if aux is not None:
                    shown["aux"] = f"{aux:.4f}"
                self.bar.set_postfix(shown, refresh=False)

        def flush_retention(self):
            # A measurement whose step was not logged (--log-every): a record of its own.
            if self.retention is not None:
                rec = {"step": self.retention[0], "retention": self.retention[1]}
                self.retention = None
                run.history.append(rec)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")

        def on_train_end(self, args, state, control, **kwargs):
            self.flush_retention()
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return LoPTCallback()


def prepare_trainer(trainer, run: RunState, wrapped: LoPTModel, postfix_keys: tuple[str, ...],
                    callbacks: list | None) -> Path:
    """Swap the Trainer's printing callbacks for lopt's (one progress bar, metrics.jsonl) and add the
    caller's callbacks. Returns the metrics file (a fresh run starts it afresh)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    out = Path(run.cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if not run.cfg.resume and metrics_path.exists():
        metrics_path.unlink()
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    for cb in callbacks or []:
        trainer.add_callback(cb)
    # Last, so that a stop requested by any callback during a step is acted on at that step's end.
    trainer.add_callback(make_callback(run, wrapped, metrics_path, postfix_keys, getattr(trainer, "lopt_retention", None)))
    return metrics_path


def run_trainer(trainer, run: RunState, resume_dir: Path | None) -> bool:
    """``trainer.train()`` with lopt's Ctrl-C handling: the first Ctrl-C finishes the current step,
    saves ``checkpoint-N`` and stops; a second one aborts at once. Returns True when interrupted."""
    def on_sigint(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        print("\nlopt: interrupt received, saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr)

    import threading

    main = threading.current_thread() is threading.main_thread()
    if resume_dir is not None:  # the log continues from the checkpoint's step
        trim_log(Path(run.cfg.output_dir) / "metrics.jsonl", checkpoint_global_step(resume_dir))
    old = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        with warnings.catch_warnings():
            # TRL calls a transformers API that transformers >= 5.2x renamed; nothing for the user to do.
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
            trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return run.stop_requested and trainer.state.global_step < trainer.state.max_steps


def finish(run: RunState, trainer, wrapped: LoPTModel, tokenizer, interrupted: bool,
           headline: dict[str, str]) -> dict[str, Any]:
    """Summary of the run; unless interrupted, the final plain checkpoint in ``output_dir`` with
    ``lopt_run.json``. ``headline`` maps summary names to metrics keys to report first/last of."""

    out = Path(run.cfg.output_dir)
    hist = run.history
    speeds = [h["tokens_per_s"] for h in hist[1:] or hist if h.get("tokens_per_s")]  # first step warms up
    aux = [h["aux_loss"] for h in hist if h.get("aux_loss") is not None]
    summary: dict[str, Any] = {
        "command": run.command, "steps": trainer.state.global_step, "total_steps": trainer.state.max_steps,
        "interrupted": interrupted, "method": run.cfg.method, "block_ranges": wrapped.block_ranges,
        "aux_first": aux[0] if aux else None, "aux_last": aux[-1] if aux else None,
        "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "peak_mem_mb": max((h["peak_mem_mb"] for h in hist if "peak_mem_mb" in h), default=None),
        "output_dir": str(out),
        "checkpoint": str(run.checkpoints[-1]) if interrupted and run.checkpoints else None,
        **run.extra_info,
    }
    for name, key in headline.items():
        vals = [h[key] for h in hist if isinstance(h.get(key), (int, float))]
        summary[f"{name}_first"] = vals[0] if vals else None
        summary[f"{name}_last"] = vals[-1] if vals else None
    evals = [h for h in hist if "eval" in h]
    summary["eval"] = evals[-1]["eval"] if evals else None
    retention = getattr(getattr(trainer, "lopt_retention", None), "run", None)
    if retention is not None and retention.last is not None:
        summary["retention"] = retention.summary()
    if not interrupted:
        save_plain_into(wrapped, tokenizer, out, run.info(wrapped, summary))
    return summary


def train_and_finish(trainer, run: RunState, resume_dir: Path | None, wrapped: LoPTModel, tokenizer,
                     headline: dict[str, str]) -> RLResult:
    """Run the trainer (resuming from ``resume_dir``), then ``finish``; says how to resume if stopped."""
    interrupted = run_trainer(trainer, run, resume_dir)
    summary = finish(run, trainer, wrapped, tokenizer, interrupted, headline)
    if interrupted:
        print(stopped_message(summary["steps"], summary["checkpoint"], run.cfg.save_only_model), file=sys.stderr)
    return RLResult(summary, wrapped, tokenizer)


def run_command(recipe, cfg: RLConfig, callbacks: list | None, headline: dict[str, str]) -> int:
    """A CLI command over ``recipe(cfg, callbacks)``: run, print the summary table; 130 when interrupted."""
    t0 = time.perf_counter()
    result = recipe(cfg, callbacks)
    print_summary(result.summary, time.perf_counter() - t0, headline)
    return 130 if result.summary["interrupted"] else 0


def print_summary(summary: dict[str, Any], seconds: float, headline: dict[str, str]) -> None:
    """The end-of-run table, like ``lopt train``'s."""
    def f(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    def first_last(a, b):  # None (the row is left out) when neither end was logged
        return None if a is None and b is None else f"{f(a)} -> {f(b)}"

    def opt(x, fmt):
        return None if x is None else fmt.format(x)

    rows = [("method", f"{summary['method']} (blocks {summary['block_ranges']})"),
            ("steps", f"{summary['steps']}/{summary['total_steps']}"
             + (" (interrupted)" if summary["interrupted"] else ""))]
    rows += [(f"{name} first -> last", first_last(summary.get(f"{name}_first"), summary.get(f"{name}_last")))
             for name in headline]
    if summary.get("eval"):
        shown = {k: v for k, v in summary["eval"].items()
                 if k in ("loss", "reward", "rewards/margins", "rewards/accuracies")}
        where = f" ({summary['eval']['split']}, n {summary['eval'].get('n')})" if "split" in summary["eval"] else ""
        rows.append(("held-out eval (last)", ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + where))
    r = summary.get("retention")
    if r and r.get("kl") is not None:
        rows.append(("retention KL (general prompts)",
                     f"{r['kl']:.4g} at step {r['step']}: how far the model's answers to general prompts moved from "
                     f"the base model's (0 = unchanged); measuring it took {r['seconds']:.1f} s"
                     + (f" ({100 * r['seconds'] / seconds:.1f}% of the run)" if seconds > 0 else "")))
    rows += [("aux loss first -> last", first_last(summary.get("aux_first"), summary.get("aux_last"))),
             ("tokens/s (median)", opt(summary.get("tokens_per_s"), "{:.0f}")),
             ("peak memory", opt(summary.get("peak_mem_mb"), "{:.0f} MiB")),
             ("wall time", f"{seconds:.0f} s"),
             ("checkpoint", summary.get("checkpoint") or summary.get("output_dir") or None)]
    rows = [(k, v) for k, v in rows if v is not None]  # only the rows that apply
    w = max(len(r[0]) for r in rows)
    print("\n| " + "what".ljust(w) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
