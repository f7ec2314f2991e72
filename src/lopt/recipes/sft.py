"""The SFT recipe (``lopt train``): load a model and a dataset, wrap, train, checkpoint, resume.

One function, ``train(TrainConfig)``, that the CLI calls and that users can import. It composes the
components (``lopt.models``, ``lopt.data``, ``lopt.wrap``, ``lopt.runtime``, ``lopt.parallel``); the
step itself is ``lopt.runtime.loop.Stepper``, shared with ``lopt bench``.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any
import torch

from lopt.data import (Batches, DataError, build_sft_dataset, chat_prompt, describe_skips, has_test_split,
                       held_out_count, hold_out, validate_dataset)
from lopt.config import TrainConfig, check_optimizer_in_backward  # noqa: F401  (re-exported: lopt.recipes.sft's names)
from lopt.engine.config import LoPTError
from lopt.eval.perplexity import examples_loss
from lopt.eval.retention import RETENTION_OFF_NOTE, RunRetention, parse_retention
from lopt.eval.runner import evaluate
from lopt.eval.tasks import check_tasks
from lopt.methods import get_method, wrap
from lopt.models import load_model
from lopt.parallel.context import init_distributed
from lopt.parallel.data_parallel import DataParallel
from lopt.recipes.pipeline import train_pipeline
from lopt.runtime.checkpoints import (STATE_FILE, method_extra_state, save_plain_into,
                                      clean_stale_temporaries, run_info, save_training_checkpoint)
from lopt.runtime.resume import CheckpointError, CorruptStateError, find_resume, load_state, resume_on_all_ranks
from lopt.runtime.resume_options import same_options_on_all_ranks
from lopt.runtime.loop import Stepper, resolve_device, set_seed
from lopt.runtime.precision import apply_precision, check_device_options, resolve_precision
from lopt.runtime.preflight import preflight_train
from lopt.runtime.state import Callback, RunLog, TrainResult, TrainState, count_steps
from lopt.runtime.trackers import check_trackers


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


def train(cfg: TrainConfig, callbacks: list[Callback] | None = None) -> TrainResult:
    """Run supervised post-training; returns the summary (also written to ``lopt_run.json``) and the
    trained (wrapped) model with its tokenizer."""

    cfg.validate()
    checked = preflight_train(cfg)  # a bad output path or data file fails now, not after the model has loaded
    eval_tasks = check_held_out_data(cfg, checked)  # so does held-out evaluation that cannot work
    check_trackers(cfg.report_to, cfg.tensorboard)  # and a tracker that is not installed
    parse_retention(cfg.retention)
    ctx = init_distributed(cfg.device)  # None unless a launcher started several processes
    if ctx is not None and cfg.resume:  # the options each rank read from the resumed run: rank 0's
        cfg = same_options_on_all_ranks(ctx, cfg)
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
    if ctx is not None and cfg.fsdp and (cfg.eval_every or cfg.val_size or cfg.eval_dataset):
        raise LoPTError("--eval-every, --val-size and --eval-dataset are not supported with --fsdp (the sharded model runs only on all "
                        "ranks together); evaluate the saved checkpoint with lopt eval")
    main = ctx is None or ctx.is_main
    dp = DataParallel(ctx, fsdp=cfg.fsdp) if ctx is not None else None
    out_dir = Path(cfg.output_dir)
    device = ctx.device if ctx is not None else resolve_device(cfg.device)
    check_device_options(cfg, device)  # bf16 on a GPU without it, a paged optimizer off CUDA: before any load
    set_seed(cfg.seed)

    if main:
        clean_stale_temporaries(out_dir)
    resume_dir, ts = None, None
    if cfg.resume:  # before the model loads: a bad checkpoint fails in a second
        def load(path: Path) -> dict[str, Any]:
            return load_sft_state(path, cfg.fsdp)
        resume_dir, ts = resume_on_all_ranks(ctx, lambda: find_resume(out_dir, cfg.resume, [STATE_FILE], load), load)

    if cfg.batch_size == "auto":  # lopt plan's largest batch for this device, before anything loads
        if ctx is not None or cfg.resume:
            raise LoPTError("--batch-size auto plans one process's device for a new run: give a number under "
                            "torchrun, and none with --resume (the run recorded its batch)")
        from lopt.plan.planner import PlanError, auto_batch_size

        try:
            cfg.batch_size, cfg.grad_accum, note = auto_batch_size(cfg, device)
        except PlanError as e:
            raise LoPTError(str(e)) from e
        cfg.global_batch_size = None  # resolved: the run records (and a resume reuses) the numbers
        cfg.validate()
        print(note, file=sys.stderr)
    # A resumed LoRA run restarts from the base model (its checkpoint has the adapters merged in, the
    # adapters travel in the trainer state); every other method restarts from the checkpoint's weights.
    source = str(resume_dir) if resume_dir is not None and not get_method(cfg.method).resume_from_base else cfg.model
    # FSDP: every rank loads on the CPU and fully_shard moves its shard to the device.
    load_device = torch.device("cpu") if cfg.fsdp else device
    # Where no loaded weight is kept in fp32 (bf16-true; a frozen base under bf16-mixed: lora, qlora) the model
    # loads in bf16, never holding its fp32 copy on the device.
    load_dtype = torch.bfloat16 if loads_in_bf16(cfg, device) else None
    model, tokenizer = load_model(source, gguf_file=None if source != cfg.model else cfg.gguf_file,
                                  device=load_device, dtype=load_dtype, trust_remote_code=cfg.trust_remote_code)
    examples, data_stats = build_sft_dataset(cfg.dataset, tokenizer, max_length=cfg.max_length,
                                             split=cfg.split, limit=cfg.limit, data_dir=cfg.data_dir)
    held = {}  # the held-out examples: spec -> (examples, split, their data stats)
    if cfg.val_size:  # the same seeded rows on every rank and on resume
        examples, val_examples = hold_out(examples, cfg.val_size, cfg.seed)
        held["task-loss:val"] = (val_examples, "val", {"format": data_stats["format"]})
        data_stats.update(rows=len(examples), val_rows=len(val_examples))
    if cfg.eval_dataset and main:
        eval_examples, eval_stats = build_sft_dataset(cfg.eval_dataset, tokenizer, max_length=eval_max_length(cfg),
                                                      split="test", limit=cfg.eval_limit, data_dir=cfg.data_dir)
        held[f"task-loss:{cfg.eval_dataset}"] = (eval_examples, "eval-dataset", eval_stats)
        if describe_skips(eval_stats):
            print(f"lopt: --eval-dataset: {describe_skips(eval_stats)}", file=sys.stderr)
        data_stats["eval"] = {k: eval_stats[k] for k in ("source", "format", "rows", "truncated") if k in eval_stats}
    # Retention: the base model's answers to general prompts, recorded before it is wrapped (on resume, read
    # back from the run folder: the resumed weights are not the base). Rank 0 only; not across shards.
    retention, retention_note = None, None  # the note is printed under the run's first line
    if main and cfg.retention is None:  # the default: off, and the run says so
        retention_note = RETENTION_OFF_NOTE
    elif main and cfg.retention != "none" and (cfg.fsdp or cfg.pipeline):
        retention_note = ("lopt: retention: not measured under --fsdp / --pipeline (no process holds the whole "
                          "model); run lopt eval --tasks retention-kl on the saved model")
    elif main:
        retention = RunRetention.start(cfg.retention, model, tokenizer, out_dir, resumed=resume_dir is not None,
                                       prompts=cfg.retention_prompts, max_new_tokens=cfg.retention_new_tokens,
                                       suite_limit=cfg.retention_limit, data_dir=cfg.data_dir)
    wrapped = wrap(model, config=cfg.lopt_config()).to(load_device)
    if not cfg.fsdp:  # FSDP2 wants one dtype per sharded unit: under --fsdp frozen weights stay fp32
        apply_precision(wrapped, cfg.precision, device)  # bf16 weights where --precision stores them so
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
    total_steps = count_steps(cfg, batches.batches_per_epoch)
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

    run_eval = _periodic_eval(cfg, tokenizer, device, eval_tasks, held) if main else None
    # Only rank 0 writes the log, the progress bar and the checkpoints; every rank runs the callbacks.
    run = RunLog(cfg, state, total_steps, device, main=main, resumed=resume_dir is not None, ctx=ctx,
                 callbacks=callbacks)
    if main:
        print(f"lopt: {cfg.method} on {type(model).__name__} ({wrapped.num_layers} layers, blocks "
              f"{wrapped.block_ranges}), {data_stats['rows']} examples ({data_stats['format']}"
              + (f"; {data_stats['val_rows']} more held out by --val-size" if cfg.val_size else "") + "), "
              f"{total_steps} steps on {device}" + (f", resumed at step {state.step}" if resume_dir else "")
              + (f", {world} processes ({'FSDP' if cfg.fsdp else 'data parallel'}, global batch "
                 f"{cfg.batch_size * world})" if ctx is not None else ""), file=sys.stderr)
        if retention_note:
            print(retention_note, file=sys.stderr)
    if data_stats.get("truncated") and main:
        print(f"lopt: {data_stats['truncated']} examples truncated to {cfg.max_length} tokens", file=sys.stderr)
    if describe_skips(data_stats) and main:
        print(f"lopt: {describe_skips(data_stats)}", file=sys.stderr)

    def make_state() -> dict[str, Any]:
        opt_state = dp.optimizer_state(wrapped, optimizer) if dp is not None else stepper.optimizer_state_dict()
        return {"step": state.step, "optimizer": opt_state, "scheduler": scheduler.state_dict(), "fsdp": cfg.fsdp,
                "data": batches.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "extra_state": method_extra_state(wrapped), "history": state.history,
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

    last_eval = None
    with run:
        # The agreed decision to stop. state.stop_requested is only ever read here, never overwritten: the
        # Ctrl-C handler may set it while ctx.any() is waiting, and writing the reduced value back over it
        # lost that Ctrl-C (the ranks trained on until torchrun killed them).
        stop = state.stop_requested if ctx is None else ctx.any(state.stop_requested)
        while state.step < total_steps and not stop:
            rec = stepper.step([next(batches) for _ in range(cfg.grad_accum)])
            state.step += 1
            rec = run.end_step(rec)
            if rec is not None:
                run.log(rec)
            stop = state.stop_requested
            if ctx is not None:  # every rank stops after the same step (Ctrl-C reaches them at different times)
                stop = ctx.any(stop)
            eval_now = (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == total_steps
            if run_eval and eval_now:
                last_eval = run_eval(wrapped.model)
                run.write({"step": state.step, "eval": last_eval})
            if retention is not None and eval_now:
                kept = retention.measure(wrapped.model, state.step, tokenizer)
                run.write({"step": state.step, "retention": kept})
                run.track(retention.tracker_values(kept), state.step)
            if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == total_steps):
                checkpoint()  # the last step's too: a finished run can be extended with --resume
        interrupted = stop and state.step < total_steps
        if interrupted:
            run.report_stop(checkpoint())

    extra = {"retention": retention.summary()} if retention is not None else {}
    summary = run.summary(wrapped, data_stats, interrupted, eval=last_eval, **extra)
    if not interrupted:
        model_to_save = dp.saveable(wrapped) if dp is not None else wrapped
        if main:
            save_plain_into(model_to_save, tokenizer, out_dir, run_info(cfg, wrapped, summary))
    if ctx is not None:
        ctx.barrier()
        ctx.close()
    return TrainResult(summary, wrapped, tokenizer)


def loads_in_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether every weight of the checkpoint ends up stored in bf16 under ``cfg.precision``: under
    bf16-true, and under bf16-mixed when the method trains none of them (its base is frozen)."""
    precision = resolve_precision(cfg.precision, device)
    if cfg.fsdp or not precision.startswith("bf16"):
        return False
    if precision == "bf16-true":
        return True
    if get_method(cfg.method).boundary:  # the boundary's methods train the layers above it
        return False
    t = get_method(cfg.method).trains(1, cfg.lopt_config())
    return not (t.layers or t.embedding or t.head or t.final_norm)


def eval_max_length(cfg: TrainConfig) -> int:
    """The truncation of the eval's task loss: ``--eval-max-length``, else training's ``--max-length``."""
    return cfg.eval_max_length or cfg.max_length


def check_held_out_data(cfg: TrainConfig, checked: dict[str, Any] | None = None) -> list[str]:
    """Before any model loads: the eval tasks of ``--eval-every`` (``--eval-tasks``, else the training
    dataset's own test split when neither ``--val-size`` nor ``--eval-dataset`` is given), and a
    one-line error for held-out data that cannot work: ``--eval-every`` on data with no test split,
    ``--val-size`` that leaves nothing to train on, an ``--eval-dataset`` without rows. ``checked``:
    ``preflight_train``'s result (rows counted in a local file)."""
    if cfg.val_size and checked and checked.get("checked"):
        held_out_count(cfg.val_size, checked["rows"])
    if cfg.eval_dataset:
        try:
            validate_dataset(cfg.eval_dataset, split="test", max_length=eval_max_length(cfg), data_dir=cfg.data_dir)
        except DataError as e:
            raise DataError(f"--eval-dataset: {e}") from None
    if cfg.eval_tasks:
        return list(cfg.eval_tasks)
    if not cfg.eval_every or cfg.val_size or cfg.eval_dataset:
        return []
    if has_test_split(cfg.dataset, cfg.data_dir) is False or cfg.split == "test":
        raise LoPTError(f"--eval-every: {cfg.dataset} has no test split apart from the rows it trains on; hold rows "
                        f"out with --val-size N|FRACTION, or give held-out data with --eval-dataset PATH")
    return [f"task-loss:{cfg.dataset}"]


def _periodic_eval(cfg: TrainConfig, tokenizer, device: torch.device, tasks: list[str],
                   held: dict[str, tuple[list[dict], str, dict[str, Any]]]):
    """A function model -> eval results (``--eval-every`` and after the last step), or None: the
    ``tasks``, then the task loss of each set of held-out examples in ``held``. The base model (for
    retention-kl and drift) is loaded once, only when a task needs it."""
    if not tasks and not held:
        return None

    parsed = check_tasks(tasks, has_base=True) if tasks else []
    base = None
    if any(kind in ("retention-kl", "drift") for kind, _ in parsed):
        base, _ = load_model(cfg.model, gguf_file=cfg.gguf_file, device=device,
                             trust_remote_code=cfg.trust_remote_code)
        base.eval()

    def run(model) -> dict[str, Any]:
        out = evaluate(model, tokenizer, tasks, base=base, limit=cfg.eval_limit, progress=False,
                       max_length=eval_max_length(cfg), data_dir=cfg.data_dir) if tasks else {}
        was_training = model.training
        try:
            for spec, (examples, split, stats) in held.items():
                out[spec] = examples_loss(model, tokenizer, examples, split=split, name=spec, stats=stats,
                                          max_length=cfg.max_length if split == "val" else eval_max_length(cfg))
                out[spec].pop("items", None)  # per-row losses: not for every line of metrics.jsonl
        finally:
            model.train(was_training)
        return out
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
