"""The SFT recipe: load a model and a dataset, wrap, train, checkpoint, resume.

One function, ``train(TrainConfig)``, that the CLI calls and that users can import. It is a plain
loop over the pieces (``lopt.models``, ``lopt.data``, ``lopt.wrap``), not a framework.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from .boundary import CHECKPOINT_SCOPES, LoPTConfig, LoPTError, LoPTModel, wrap
from .memory import peak_memory_mb

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
RUN_FILE = "lopt_run.json"


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI flags and YAML keys have the same names)."""

    # what to train
    model: str | None = None  # hub id, local dir, .gguf file, alias; None = embedded SmolLM2-135M-Instruct
    gguf_file: str | None = None
    dataset: str = "arithmetic"  # file, preset, hub id, or the embedded 'arithmetic'
    split: str = "train"
    limit: int | None = None  # use only the first N rows
    max_length: int = 512
    output_dir: str = "runs/lopt"
    # method
    method: str = "lopt"
    num_blocks: int = 2
    boundaries: list[int] | None = None
    lambda_aux: float = 10.0
    schedule: str = "blockwise"
    lora_r: int = 16
    lora_alpha: int = 32
    chunked_ce: bool = True  # task loss in chunks, never the full logits tensor
    local_objective: str = "recon"  # recon (the paper's) | anchor (stay close to the frozen pretrained block)
    lower_every: int = 1  # update the lower blocks only every N-th optimizer step
    # optimisation
    lr: float = 2e-5
    lr_lower: float | None = None  # default: lr / 10 for method lopt, else lr (LoPTModel.param_groups)
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    per_block_step: str = "auto"  # auto | on | off: step each lower block right after its local backward
    gradient_checkpointing: str = "off"  # off | all | last-block | lower-blocks
    selective_checkpointing: str = "off"  # same scopes; those layers keep their matmul outputs
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16 | fp16
    device: str | None = None
    seed: int = 0
    # several processes (launched by torchrun / accelerate launch; see lopt.distributed)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of replicating them
    pipeline: bool = False  # one LoPT block per process, blocks run concurrently (WORLD_SIZE = blocks)
    # bookkeeping
    log_every: int = 1
    save_every: int | None = None
    resume: str | None = None  # 'latest' or a checkpoint dir
    tensorboard: bool = False
    eval_every: int | None = None  # run eval_tasks every N steps (and at the end)
    eval_tasks: list[str] = field(default_factory=list)  # lopt eval task specs, e.g. task-loss:arithmetic
    eval_limit: int | None = 50
    progress: bool = True
    sample_prompt: str | None = None  # answered by the trained model in the summary
    trust_remote_code: bool = False

    def validate(self) -> None:
        check_checkpointing(self)
        if self.per_block_step not in ("auto", "on", "off"):
            raise LoPTError(f"per_block_step must be auto, on or off, got {self.per_block_step!r}")
        if self.per_block_step == "on" and not (self.method == "lopt" and self.schedule == "blockwise"
                                                and self.grad_accum == 1 and self.precision != "fp16"):
            raise LoPTError("per_block_step=on needs method lopt, schedule blockwise, grad_accum 1 and no fp16")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LoPTError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise LoPTError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoPTError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise LoPTError(f"lr must be > 0, got {self.lr}")
        if self.fsdp and self.pipeline:
            raise LoPTError("--fsdp and --pipeline exclude each other: choose one")
        if self.fsdp and self.per_block_step == "on":
            raise LoPTError("per_block_step=on is not supported with --fsdp (FSDP reduces gradients inside "
                            "the backward; the whole model steps at the end)")

    def lopt_config(self) -> LoPTConfig:
        return LoPTConfig.from_options(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_checkpointing(cfg: Any) -> None:
    """LoPTError for a gradient_checkpointing / selective_checkpointing value that cannot work."""
    for name in ("gradient_checkpointing", "selective_checkpointing"):
        value = getattr(cfg, name)
        if value not in CHECKPOINT_SCOPES:
            raise LoPTError(f"{name} must be one of {', '.join(CHECKPOINT_SCOPES)}, got {value!r}")
        if value in ("last-block", "lower-blocks") and cfg.method not in ("lopt", "freeze-lower"):
            raise LoPTError(f"{name}={value} needs a method with a boundary (lopt, freeze-lower)")


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


# --------------------------------------------------------------------------- small pieces


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    out = Path(output_dir)
    if not out.is_dir():
        return None
    cands = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return max(cands, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"lopt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_info(cfg: TrainConfig, wrapped: LoPTModel, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {"options": asdict(cfg), "method": cfg.method, **wrapped.describe(), "versions": versions(),
            "final_metrics": metrics or {}}


def _save_plain_into(wrapped: LoPTModel, tokenizer, target: Path, info: dict[str, Any]) -> None:
    """Write the final plain checkpoint's files into ``target``, which also holds checkpoint-N/ and
    metrics.jsonl: the checkpoint is written whole in a temporary directory, then each file is
    renamed into place."""
    from .models import save_checkpoint

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
    from .models import save_checkpoint

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
    if wrapped.method == "lora":
        state.update({f"model.{k}": v for k, v in wrapped.model.state_dict().items() if "lora_" in k})
    return state


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, callbacks: list[Callable[[dict[str, Any], TrainState], None]] | None = None
          ) -> TrainResult:
    """Run supervised post-training; returns the summary (also written to ``lopt_run.json``) and the
    trained (wrapped) model with its tokenizer."""
    from .data import Batches, build_sft_dataset, describe_skips
    from .distributed import DataParallel, init_distributed, install_sigint
    from .models import load_model

    cfg.validate()
    ctx = init_distributed(cfg.device)  # None unless a launcher started several processes
    if ctx is None and (cfg.fsdp or cfg.pipeline):
        raise LoPTError(f"--{'fsdp' if cfg.fsdp else 'pipeline'} needs several processes: launch with "
                        f"torchrun --nproc_per_node N -m lopt train ... (or accelerate launch)")
    if ctx is not None and cfg.pipeline:
        from .distributed import train_pipeline

        try:
            return train_pipeline(cfg, ctx, callbacks)
        finally:
            ctx.close()
    if ctx is not None and cfg.fsdp and cfg.eval_every:
        raise LoPTError("--eval-every is not supported with --fsdp (the sharded model runs only on all "
                        "ranks together); evaluate the saved checkpoint with lopt eval")
    main = ctx is None or ctx.is_main
    dp = DataParallel(ctx, fsdp=cfg.fsdp) if ctx is not None else None
    out_dir = Path(cfg.output_dir)
    device = ctx.device if ctx is not None else resolve_device(cfg.device)
    set_seed(cfg.seed)

    resume_dir = None
    if cfg.resume:
        resume_dir = latest_checkpoint(out_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_dir is None or not (resume_dir / STATE_FILE).is_file():
            raise LoPTError(f"nothing to resume: no {CHECKPOINT_PREFIX}N/{STATE_FILE} in "
                            f"{resume_dir or out_dir}; drop --resume to start afresh")

    # A resumed LoRA run restarts from the base model (its checkpoint has the adapters merged in);
    # every other method restarts from the checkpoint's weights.
    source = str(resume_dir) if resume_dir is not None and cfg.method != "lora" else cfg.model
    # FSDP: every rank loads on the CPU and fully_shard moves its shard to the device.
    load_device = torch.device("cpu") if cfg.fsdp else device
    model, tokenizer = load_model(source, gguf_file=None if source != cfg.model else cfg.gguf_file,
                                  device=load_device, trust_remote_code=cfg.trust_remote_code)
    examples, data_stats = build_sft_dataset(cfg.dataset, tokenizer, max_length=cfg.max_length,
                                             split=cfg.split, limit=cfg.limit)
    wrapped = wrap(model, config=cfg.lopt_config()).to(load_device)
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()

    ts = None
    if resume_dir is not None:
        ts = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if ts.get("fsdp", False) != cfg.fsdp or "pipeline" in ts:
            raise LoPTError(f"{resume_dir} was written by a run {'with' if ts.get('fsdp') else 'without'} "
                            f"--fsdp{' (--pipeline)' if 'pipeline' in ts else ''}: resume it the same way")
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
            optimizer.load_state_dict(ts["optimizer"])
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
        opt_state = dp.optimizer_state(wrapped, optimizer) if dp is not None else optimizer.state_dict()
        return {"step": state.step, "optimizer": opt_state, "scheduler": scheduler.state_dict(), "fsdp": cfg.fsdp,
                "data": batches.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "extra_state": _extra_state(wrapped), "history": state.history,
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def checkpoint() -> Path | None:
        # Called on every rank: under FSDP gathering the full weights and optimizer state is collective.
        last = state.history[-1] if state.history else None
        model_to_save = dp.saveable(wrapped) if dp is not None else wrapped
        train_state = make_state()
        path = None
        if main:
            path = save_training_checkpoint(model_to_save, tokenizer, out_dir, state.step,
                                            run_info(cfg, wrapped, last), train_state)
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
    try:
        while state.step < total_steps and not state.stop_requested:
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
            if ctx is not None:  # every rank stops after the same step (Ctrl-C reaches them at different times)
                state.stop_requested = ctx.any(state.stop_requested)
            if run_eval and (state.step % cfg.eval_every == 0 or state.step == total_steps):
                last_eval = run_eval(wrapped.model)
                log_file.write(json.dumps({"step": state.step, "eval": last_eval}, default=str) + "\n")
                log_file.flush()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                checkpoint()
        interrupted = state.stop_requested and state.step < total_steps
        if interrupted:
            path = checkpoint()
            if main:
                print(f"lopt: stopped at step {state.step}; resume with --resume (checkpoint: {path})",
                      file=sys.stderr)
    finally:
        if bar:
            bar.close()
        log_file.close()
        if tb is not None:
            tb.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

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
    from .evaluate import check_tasks, evaluate
    from .models import load_model

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


def build_optimizer(wrapped: LoPTModel, lr: float, lr_lower: float | None = None,
                    weight_decay: float = 0.0, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``wrapped.param_groups`` (upper block at ``lr``, lower blocks, embeddings and local
    heads at ``lr_lower``), with PyTorch's fused kernel where the parameters allow it (CPU and CUDA
    floating point): besides being faster, the default multi-tensor kernel allocates a temporary the
    size of all parameters (the square root of the second moment), which made the optimizer step the
    peak of a whole training step."""
    groups = wrapped.param_groups(lr, lr_lower, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = fused and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


class Stepper:
    """One optimizer step of a wrapped model: micro-batches, autocast, gradient accumulation, clipping,
    the per-block step, the LR schedule. Shared by ``train`` and ``bench`` so both measure one thing."""

    def __init__(self, wrapped: LoPTModel, cfg: TrainConfig, device: torch.device, total_steps: int,
                 dist: Any = None):
        # dist: a lopt.distributed.DataParallel for multi-process runs (slices the batches, scales the
        # losses, synchronises gradients); None in a single process.
        self.wrapped, self.cfg, self.device, self.dist = wrapped, cfg, device, dist
        self.optimizer = build_optimizer(wrapped, cfg.lr, cfg.lr_lower, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total_steps, int(cfg.warmup_ratio * total_steps)))
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.per_block = cfg.per_block_step == "on" or (
            cfg.per_block_step == "auto" and cfg.method == "lopt" and cfg.schedule == "blockwise"
            and cfg.grad_accum == 1 and self.scaler is None and not cfg.fsdp)
        self._block_norms: list[float] = []
        wrapped.head_grad_in_forward = not cfg.fsdp  # every task loss goes through wrapped.backward below
        wrapped.after_local_backward = self._step_block if self.per_block else None
        if dist is not None:
            wrapped.after_local_backward = dist.local_hook(wrapped.after_local_backward)

    def _step_block(self, block: int, params: list[torch.nn.Parameter]) -> None:
        # Each lower block is clipped and stepped as soon as its local backward is done, and its
        # gradients freed, so they never coexist with the upper block's activations. Clipping is
        # therefore per block (max_grad_norm bounds each block's gradient norm separately).
        self._block_norms.append(_clip(params, self.cfg.max_grad_norm) or 0.0)
        self.optimizer.step()  # only this block holds gradients now
        for p in params:
            p.grad = None

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Forward/backward every micro-batch, then step. Returns loss, aux_loss, lr, grad_norm, tokens."""
        w, dev = self.wrapped, self.device
        # --lower-every N: the lower blocks are updated on steps 0, N, 2N, ... only.
        w.update_lower = self.scheduler.last_epoch % self.cfg.lower_every == 0
        loss_sum, aux_sum, n_aux, tokens = 0.0, 0.0, 0, 0
        n = len(micro_batches)
        if self.dist is not None:
            micro_batches = self.dist.local_batches(micro_batches)
        for i, b in enumerate(micro_batches):
            b = {k: v.to(dev) for k, v in b.items()}
            scale = self.scaler.scale(torch.ones((), device=dev)).item() if self.scaler else 1.0
            w.loss_scale = scale / n
            if self.dist is not None:
                self.dist.begin_micro(i, n)
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = w(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            w.backward(out)
            # This rank's share of the global mean (1 in a single process); 0 leaves a NaN out.
            wl, wa = self.dist.stat_weights(i) if self.dist is not None else (1.0, 1.0)
            if self.dist is not None:
                self.dist.end_micro(i, n)
            if wl:
                loss_sum += out.loss.item() * wl
            if out.aux_loss is not None:
                if wa:
                    aux_sum += out.aux_loss.item() * wa
                n_aux += 1
            tokens += int(b["attention_mask"].sum())
        if self.dist is not None:
            self.dist.finish()
            loss_sum, aux_sum, tokens = self.dist.reduce_stats(loss_sum, aux_sum, tokens)
        grad_norm, lr = finish_step(self, list(w.parameters()))
        if self._block_norms:
            grad_norm = math.sqrt(sum(n * n for n in self._block_norms) + (grad_norm or 0.0) ** 2)
            self._block_norms.clear()
        return {"loss": loss_sum / len(micro_batches), "aux_loss": aux_sum / n_aux if n_aux else None,
                "lr": lr, "grad_norm": grad_norm, "tokens": tokens}


def finish_step(stepper: Any, params: list[torch.nn.Parameter]) -> tuple[float | None, float]:
    """The end of an optimizer step of ``stepper`` (``Stepper`` or the pipeline's, with .optimizer,
    .scheduler, .scaler, .cfg): unscale, clip ``params``, step, advance the schedule, free the
    gradients. Returns (gradient norm before clipping, the learning rate the step used)."""
    opt, scaler = stepper.optimizer, stepper.scaler
    if scaler is not None:
        scaler.unscale_(opt)
    grad_norm = _clip(params, stepper.cfg.max_grad_norm)
    lr = opt.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    stepper.scheduler.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, lr


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


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
    """Clip to ``max_norm`` (None: only measure); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    if max_norm is None:
        if any(hasattr(p.grad, "full_tensor") for p in params):  # FSDP: sharded gradients (DTensor)
            return _full(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    return _full(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _full(norm: torch.Tensor) -> float:
    """A norm as a float; under FSDP it is a DTensor, whose value needs the other shards."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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


@torch.no_grad()
def sample_answer(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer of a (wrapped or plain) model to one chat prompt."""
    from .data import chat_prompt

    model.eval()
    enc = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    gen = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
