"""The SFT recipe (``lopt train``): load a model and a dataset, wrap, train, checkpoint, resume.

One function, ``train(TrainConfig)``, that the CLI calls and that users can import. It composes the
components (``lopt.models``, ``lopt.data``, ``lopt.wrap``, ``lopt.runtime``, ``lopt.parallel``); the
step itself is ``lopt.runtime.loop.Stepper``, shared with ``lopt bench``.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable
import torch

from lopt.data import Batches, build_sft_dataset, chat_prompt, describe_skips
from lopt.engine.boundary import wrap
from lopt.engine.checkpointing import check_checkpointing
from lopt.engine.config import LoPTConfig, LoPTError, fill_recipe_defaults
from lopt.engine.memory import peak_memory_mb
from lopt.eval.runner import evaluate
from lopt.eval.tasks import check_tasks
from lopt.methods import get_method
from lopt.models import load_model
from lopt.parallel.context import init_distributed
from lopt.parallel.data_parallel import DataParallel
from lopt.parallel.pipeline import train_pipeline
from lopt.runtime.checkpoints import (STATE_FILE, _extra_state, _save_plain_into, check_save_options,
                                      clean_stale_temporaries, run_info, save_training_checkpoint,
                                      stopped_message)
from lopt.runtime.resume import CheckpointError, CorruptStateError, find_resume, load_state, resume_on_all_ranks
from lopt.runtime.loop import OPTIMIZERS, Stepper, resolve_device, set_seed
from lopt.runtime.preflight import preflight_train
from lopt.runtime.state import (TrainResult, TrainState, _main_thread, _mean_records, _postfix, _progress,
                                _summary, _tensorboard, close_run, install_sigint, trim_log)


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI flags and YAML keys have the same names)."""

    # what to train
    model: str | None = None  # hub id, local dir, .gguf file, alias; None = embedded SmolLM2-135M-Instruct
    gguf_file: str | None = None
    dataset: str = "arithmetic"  # file, preset, hub id, or the embedded 'arithmetic'
    split: str = "train"
    data_dir: str | None = None  # local data folder for presets (else $LOPT_DATA_DIR, else the hub)
    limit: int | None = None  # use only the first N rows
    max_length: int = 512
    output_dir: str = "runs/lopt"
    # method
    method: str = "lopt"
    num_blocks: int = 2
    boundaries: list[int] | None = None
    lambda_aux: float | None = None  # None: 10, or 0 under task_grad_every (engine.config.default_lambda_aux)
    schedule: str = "blockwise"
    lora_r: int = 16
    lora_alpha: int = 32
    chunked_ce: bool = True  # task loss in chunks, never the full logits tensor
    local_objective: str = "recon"  # recon (the paper's) | anchor (stay close to the frozen pretrained block)
    lower_every: int = 1  # update the lower blocks only every N-th optimizer step
    task_grad_every: int | None = None  # open the boundary every N-th step (0: never); None: 4 for lopt
    tied_head: bool | None = None  # keep a tied LM head tied across the boundary; None: lopt's default
    lisa_layers: int = 1  # method lisa: decoder layers trained at a time (LMFlow's default)
    lisa_interval: int = 20  # method lisa: steps before the layers are drawn again
    badam_switch_every: int = 50  # method badam: steps before the next block (LLaMA-Factory's example)
    badam_order: str = "ascending"  # method badam: ascending | descending | random
    badam_block_size: int = 1  # method badam: decoder layers per block
    # optimisation
    lr: float = 2e-5
    lr_lower: float | None = None  # default: lr / 10 for lopt with task_grad_every 0, else lr (param_groups)
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    per_block_step: str = "auto"  # auto | on | off: step each lower block right after its local backward
    optimizer_in_backward: bool = False  # step the last block's parameters one by one inside the backward
    optimizer: str = "adamw"  # adamw (fused where possible) | adamw-8bit (bitsandbytes)
    gradient_checkpointing: str = "off"  # off | all | last-block | lower-blocks
    selective_checkpointing: str = "off"  # same scopes; those layers keep their matmul outputs
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16 | fp16
    device: str | None = None
    seed: int = 0
    # several processes (launched by torchrun / accelerate launch; see lopt.parallel)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of replicating them
    pipeline: bool = False  # one LoPT block per process, blocks run concurrently (WORLD_SIZE = blocks)
    # bookkeeping
    log_every: int = 1
    save_every: int | None = None
    save_total_limit: int | None = None  # keep only the newest N checkpoint-N directories
    save_only_model: bool = False  # checkpoints without optimizer/trainer state (cannot be resumed)
    resume: str | None = None  # 'latest' or a checkpoint dir
    tensorboard: bool = False
    eval_every: int | None = None  # run eval_tasks every N steps (and at the end)
    eval_tasks: list[str] = field(default_factory=list)  # lopt eval task specs, e.g. task-loss:arithmetic
    eval_limit: int | None = 50
    progress: bool = True
    sample_prompt: str | None = None  # answered by the trained model in the summary
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        fill_recipe_defaults(self)

    def validate(self) -> None:
        check_checkpointing(self)
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise LoPTError(f"max_grad_norm must be >= 0 (0 or none: no clipping), got {self.max_grad_norm}")
        lc = self.lopt_config()
        lc.validate()
        get_method(self.method).check(lc)
        if self.fsdp and get_method(self.method).switches_layers:
            raise LoPTError(f"--fsdp does not support --method {self.method} (it freezes and unfreezes layers while "
                            f"training, which FSDP's sharded gradients do not follow); use data parallel without --fsdp")
        if self.tied_head and (self.pipeline or self.fsdp):
            raise LoPTError(f"--tied-head is not supported with --{'pipeline' if self.pipeline else 'fsdp'} (the shared "
                            f"matrix would have to live in two processes' shards); drop one of them")
        if self.pipeline and self.task_grad_every:
            raise LoPTError("--pipeline runs each block in its own process, so the task gradient cannot reach the "
                            "lower blocks: drop --task-grad-every, or train without --pipeline")
        if self.per_block_step not in ("auto", "on", "off"):
            raise LoPTError(f"per_block_step must be auto, on or off, got {self.per_block_step!r}")
        if self.per_block_step == "on" and not (self.method == "lopt" and self.schedule == "blockwise"
                                                and self.grad_accum == 1 and self.precision != "fp16"):
            raise LoPTError("per_block_step=on needs method lopt, schedule blockwise, grad_accum 1 and no fp16")
        if self.optimizer not in OPTIMIZERS:
            raise LoPTError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer_in_backward:
            check_optimizer_in_backward(self)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LoPTError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise LoPTError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoPTError(f"max_steps must be >= 1, got {self.max_steps}")
        check_save_options(self)
        if self.lr <= 0:
            raise LoPTError(f"lr must be > 0, got {self.lr}")
        if self.fsdp and self.pipeline:
            raise LoPTError("--fsdp and --pipeline exclude each other: choose one")
        if self.fsdp and self.per_block_step == "on":
            raise LoPTError("per_block_step=on is not supported with --fsdp (FSDP reduces gradients inside "
                            "the backward; the whole model steps at the end)")

    def lopt_config(self) -> LoPTConfig:
        return LoPTConfig.from_options(self)


# The keys a trainer_state.pt of lopt train must hold.
STATE_KEYS = ("step", "optimizer", "scheduler", "data", "rng", "extra_state")


def load_sft_state(checkpoint: Path, fsdp: bool) -> dict[str, Any]:
    """The resume state of a ``lopt train`` checkpoint, loaded without running code from it; a
    CheckpointError when it was written by a run of another mode (--fsdp, --pipeline)."""
    ts = load_state(checkpoint / STATE_FILE, required=("step",))
    if ts.get("fsdp", False) != fsdp or "pipeline" in ts:
        raise CheckpointError(f"{checkpoint} was written by a run {'with' if ts.get('fsdp') else 'without'} "
                              f"--fsdp{' (--pipeline)' if 'pipeline' in ts else ''}: resume it the same way")
    missing = [k for k in STATE_KEYS if k not in ts]
    if missing:
        raise CorruptStateError(checkpoint / STATE_FILE, f"it lacks {', '.join(missing)}")
    return ts

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_optimizer_in_backward(cfg: Any) -> None:
    """What ``optimizer_in_backward`` cannot be combined with: everything that needs all gradients
    before the first parameter steps."""
    if cfg.grad_accum != 1:
        raise LoPTError("--optimizer-in-backward needs --grad-accum 1 (each parameter steps as soon as its "
                        "gradient is ready, so gradients cannot be accumulated over micro-batches)")
    if cfg.precision == "fp16":
        raise LoPTError("--optimizer-in-backward does not work with --precision fp16 (the grad scaler checks "
                        "every gradient for inf before any step); use bf16 or fp32")
    if cfg.fsdp or cfg.pipeline:
        raise LoPTError("--optimizer-in-backward runs in one process only: drop --fsdp / --pipeline or it")


def train(cfg: TrainConfig, callbacks: list[Callable[[dict[str, Any], TrainState], None]] | None = None
          ) -> TrainResult:
    """Run supervised post-training; returns the summary (also written to ``lopt_run.json``) and the
    trained (wrapped) model with its tokenizer."""

    cfg.validate()
    preflight_train(cfg)  # a bad output path or data file fails now, not after the model has loaded
    ctx = init_distributed(cfg.device)  # None unless a launcher started several processes
    if ctx is None and (cfg.fsdp or cfg.pipeline):
        raise LoPTError(f"--{'fsdp' if cfg.fsdp else 'pipeline'} needs several processes: launch with "
                        f"torchrun --nproc_per_node N -m lopt train ... (or accelerate launch)")
    if ctx is not None and cfg.pipeline:

        try:
            return train_pipeline(cfg, ctx, callbacks)
        finally:
            ctx.close()
    if ctx is not None and cfg.fsdp and ctx.device.type == "cuda" and ctx.backend != "nccl":
        raise LoPTError(f"--fsdp needs one GPU per process (NCCL); these {ctx.world_size} processes share "
                        f"{ctx.device}: launch at most as many processes as GPUs")
    if ctx is not None and cfg.optimizer_in_backward:
        raise LoPTError("--optimizer-in-backward runs in one process only (the gradients would have to be "
                        "averaged across processes before each parameter's step); drop it or the launcher")
    if ctx is not None and cfg.fsdp and cfg.eval_every:
        raise LoPTError("--eval-every is not supported with --fsdp (the sharded model runs only on all "
                        "ranks together); evaluate the saved checkpoint with lopt eval")
    main = ctx is None or ctx.is_main
    dp = DataParallel(ctx, fsdp=cfg.fsdp) if ctx is not None else None
    out_dir = Path(cfg.output_dir)
    device = ctx.device if ctx is not None else resolve_device(cfg.device)
    set_seed(cfg.seed)

    if main:
        clean_stale_temporaries(out_dir)
    resume_dir, ts = None, None
    if cfg.resume:  # before the model loads: a bad checkpoint fails in a second
        def load(path: Path) -> dict[str, Any]:
            return load_sft_state(path, cfg.fsdp)
        resume_dir, ts = resume_on_all_ranks(ctx, lambda: find_resume(out_dir, cfg.resume, [STATE_FILE], load), load)

    # A resumed LoRA run restarts from the base model (its checkpoint has the adapters merged in, the
    # adapters travel in the trainer state); every other method restarts from the checkpoint's weights.
    source = str(resume_dir) if resume_dir is not None and not get_method(cfg.method).resume_from_base else cfg.model
    # FSDP: every rank loads on the CPU and fully_shard moves its shard to the device.
    load_device = torch.device("cpu") if cfg.fsdp else device
    model, tokenizer = load_model(source, gguf_file=None if source != cfg.model else cfg.gguf_file,
                                  device=load_device, trust_remote_code=cfg.trust_remote_code)
    examples, data_stats = build_sft_dataset(cfg.dataset, tokenizer, max_length=cfg.max_length,
                                             split=cfg.split, limit=cfg.limit)
    wrapped = wrap(model, config=cfg.lopt_config()).to(load_device)
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()

    if ts is not None:
        missing = wrapped.load_state_dict(ts["extra_state"], strict=False)  # before sharding: plain tensors
        if missing.unexpected_keys:
            raise LoPTError(f"{resume_dir} was written by another method/config "
                            f"(unexpected keys {missing.unexpected_keys[:3]}...): resume with the same options")
    if dp is not None:
        wrapped = dp.prepare_model(wrapped)

    # Data parallel: each global batch has batch_size rows per process; rank r takes slice r.
    world = ctx.world_size if ctx is not None else 1
    batches = Batches(examples, cfg.batch_size * world, tokenizer.pad_token_id, seed=cfg.seed)
    steps_per_epoch = max(1, batches.batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    stepper = Stepper(wrapped, cfg, device, total_steps, dist=dp)
    optimizer, scheduler, scaler = stepper.optimizer, stepper.scheduler, stepper.scaler

    state = TrainState()
    if ts is not None:
        if dp is not None:
            dp.load_optimizer_state(wrapped, optimizer, ts["optimizer"])
        else:
            stepper.load_optimizer_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        batches.load_state_dict(ts["data"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        state.step, state.history = ts["step"], ts.get("history", [])
        random.setstate(ts["rng"]["python"])
        torch.set_rng_state(ts["rng"]["torch"])
        if torch.cuda.is_available() and ts["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        del ts

    metrics_path = out_dir / "metrics.jsonl"
    if main:  # only rank 0 writes the log, the progress bar and the checkpoints
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir is None and metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log
        elif resume_dir is not None:
            trim_log(metrics_path, state.step)
    tb = _tensorboard(out_dir) if cfg.tensorboard and main else None
    run_eval = _periodic_eval(cfg, tokenizer, device) if main else None
    log_file = metrics_path.open("a") if main else open(os.devnull, "w")
    if main:
        print(f"lopt: {cfg.method} on {type(model).__name__} ({wrapped.num_layers} layers, blocks "
              f"{wrapped.block_ranges}), {data_stats['rows']} examples ({data_stats['format']}), "
              f"{total_steps} steps on {device}" + (f", resumed at step {state.step}" if resume_dir else "")
              + (f", {world} processes ({'FSDP' if cfg.fsdp else 'data parallel'}, global batch "
                 f"{cfg.batch_size * world})" if ctx is not None else ""), file=sys.stderr)
    if data_stats.get("truncated") and main:
        print(f"lopt: {data_stats['truncated']} examples truncated to {cfg.max_length} tokens", file=sys.stderr)
    if describe_skips(data_stats) and main:
        print(f"lopt: {describe_skips(data_stats)}", file=sys.stderr)

    def make_state() -> dict[str, Any]:
        opt_state = dp.optimizer_state(wrapped, optimizer) if dp is not None else stepper.optimizer_state_dict()
        return {"step": state.step, "optimizer": opt_state, "scheduler": scheduler.state_dict(), "fsdp": cfg.fsdp,
                "data": batches.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "extra_state": _extra_state(wrapped), "history": state.history,
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def checkpoint() -> Path | None:
        # Called on every rank: under FSDP gathering the full weights and optimizer state is collective.
        last = state.history[-1] if state.history else None
        model_to_save = dp.saveable(wrapped) if dp is not None else wrapped
        train_state = None if cfg.save_only_model else make_state()
        path = None
        if main:
            path = save_training_checkpoint(model_to_save, tokenizer, out_dir, state.step,
                                            run_info(cfg, wrapped, last), train_state,
                                            total_limit=cfg.save_total_limit)
        if ctx is not None:
            ctx.barrier()
        return path

    # Ctrl-C: finish the current step, save, exit. A second Ctrl-C stops at once (under a launcher a
    # repeat within seconds is its forwarded copy of the same Ctrl-C and is ignored).
    old_handler = install_sigint(state, ctx, "\nlopt: interrupt received, saving a checkpoint after this "
                                 "step (Ctrl-C again to abort)") if _main_thread() else None

    bar = _progress(total_steps, state.step, cfg.progress and main)
    t_window, tok_window, loss_window = time.perf_counter(), 0, []
    last_eval = None
    # The agreed decision to stop. state.stop_requested is only ever read here, never overwritten: the
    # Ctrl-C handler may set it while ctx.any() is waiting, and writing the reduced value back over it
    # lost that Ctrl-C (the ranks trained on until torchrun killed them).
    stop = state.stop_requested if ctx is None else ctx.any(state.stop_requested)
    try:
        while state.step < total_steps and not stop:
            rec = stepper.step([next(batches) for _ in range(cfg.grad_accum)])
            state.step += 1
            tok_window += rec.pop("tokens")
            if bar:
                bar.update(1)
            loss_window.append(rec)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                dt = time.perf_counter() - t_window
                rec = {"step": state.step, **_mean_records(loss_window),
                       "tokens_per_s": tok_window / dt if dt > 0 else None,
                       "peak_mem_mb": peak_memory_mb(device), "time": time.time()}
                t_window, tok_window, loss_window = time.perf_counter(), 0, []
                state.history.append(rec)
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                if tb is not None:
                    for k in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
                        if rec[k] is not None:
                            tb.add_scalar(f"train/{k}", rec[k], state.step)
                if bar:
                    bar.set_postfix(_postfix(rec), refresh=False)
                for cb in callbacks or []:
                    cb(rec, state)
            stop = state.stop_requested
            if ctx is not None:  # every rank stops after the same step (Ctrl-C reaches them at different times)
                stop = ctx.any(stop)
            if run_eval and (state.step % cfg.eval_every == 0 or state.step == total_steps):
                last_eval = run_eval(wrapped.model)
                log_file.write(json.dumps({"step": state.step, "eval": last_eval}, default=str) + "\n")
                log_file.flush()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                checkpoint()
        interrupted = stop and state.step < total_steps
        if interrupted:
            path = checkpoint()
            if main:
                print(stopped_message(state.step, path, cfg.save_only_model), file=sys.stderr)
    finally:
        close_run(bar, log_file, tb, old_handler)

    summary = _summary(cfg, wrapped, state, data_stats, total_steps, out_dir, interrupted)
    summary["eval"] = last_eval
    if ctx is not None:
        summary["rank"], summary["world_size"] = ctx.rank, ctx.world_size
    if not interrupted:
        model_to_save = dp.saveable(wrapped) if dp is not None else wrapped
        if main:
            _save_plain_into(model_to_save, tokenizer, out_dir, run_info(cfg, wrapped, summary))
    if ctx is not None:
        ctx.barrier()
        ctx.close()
    return TrainResult(summary, wrapped, tokenizer)


def _periodic_eval(cfg: TrainConfig, tokenizer, device: torch.device):
    """A function model -> eval results for ``--eval-every``, or None. The base model (for
    retention-kl and drift) is loaded once, only when a task needs it."""
    if not cfg.eval_every:
        return None

    tasks = cfg.eval_tasks or [f"task-loss:{cfg.dataset}"]
    parsed = check_tasks(tasks, has_base=True)
    base = None
    if any(kind in ("retention-kl", "drift") for kind, _ in parsed):
        base, _ = load_model(cfg.model, gguf_file=cfg.gguf_file, device=device,
                             trust_remote_code=cfg.trust_remote_code)
        base.eval()

    def run(model) -> dict[str, Any]:
        return evaluate(model, tokenizer, tasks, base=base, limit=cfg.eval_limit, progress=False)
    return run


@torch.no_grad()
def sample_answer(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer of a (wrapped or plain) model to one chat prompt."""
    model.eval()
    enc = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    gen = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
