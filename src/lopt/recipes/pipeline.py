"""The block-parallel training loop (``lopt train --pipeline``, WORLD_SIZE = number of blocks).

``train_pipeline`` is ``lopt.recipes.sft.train``'s loop for the pipeline: the same outputs
(``metrics.jsonl``, ``checkpoint-N/``, the final plain checkpoint), ``--resume`` and Ctrl-C, with the
same ``lopt.runtime.RunLog``. The mechanism - each rank's stage, the hidden states sent down the
pipeline, one rank's step, the numbers relayed to rank 0 - is ``lopt.parallel.pipeline``.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lopt.data import Batches, build_sft_dataset, describe_skips
from lopt.engine.config import LoPTError
from lopt.parallel.context import DistContext
from lopt.parallel.fsdp import GatheredModel
from lopt.parallel.pipeline import PipelineStepper, StatsRelay, build_stage
from lopt.runtime.checkpoints import (STATE_FILE, save_plain_into, clean_stale_temporaries, run_info,
                                      save_training_checkpoint)
from lopt.runtime.loop import set_seed
from lopt.runtime.resume import CheckpointError, CorruptStateError, find_resume, load_state, resume_on_all_ranks
from lopt.runtime.state import Callback, RunLog, TrainResult, TrainState, count_steps

# The keys a --pipeline run's trainer_state.pt must hold (each of "ranks": optimizer, scheduler, rng, heads).
PIPELINE_STATE_KEYS = ("pipeline", "ranks", "step", "data")


def load_pipeline_state(checkpoint: Path, world_size: int) -> dict[str, Any]:
    """The resume state of a ``--pipeline`` checkpoint, loaded without running code from it; a
    CheckpointError when another number of processes (or no pipeline) wrote it."""
    ts = load_state(checkpoint / STATE_FILE, required=("step",))
    if ts.get("pipeline") != world_size:
        raise CheckpointError(f"{checkpoint} was not written by a {world_size}-process --pipeline run; "
                              f"resume it the way it was started")
    missing = [k for k in PIPELINE_STATE_KEYS if k not in ts]
    if not missing and (not isinstance(ts["ranks"], list) or len(ts["ranks"]) != world_size):
        missing = ["one state per rank"]
    if missing:
        raise CorruptStateError(checkpoint / STATE_FILE, f"it lacks {', '.join(missing)}")
    return ts


def train_pipeline(cfg: Any, ctx: DistContext, callbacks: list[Callback] | None = None) -> TrainResult:
    """``lopt train --pipeline``: the block-parallel run (one LoPT block per process). Same outputs as
    ``lopt.recipes.sft.train``: ``metrics.jsonl``, ``checkpoint-N/``, the final plain checkpoint (the
    ranks' blocks gathered on rank 0), ``--resume`` and Ctrl-C. Only rank 0 reads data, logs, runs the
    callbacks and saves. Returns a ``TrainResult`` whose model is this rank's stage (other blocks inert)."""

    if cfg.method != "lopt":
        raise LoPTError(f"--pipeline trains LoPT blocks independently; it needs --method lopt, not {cfg.method}")
    if cfg.local_objective != "recon":
        raise LoPTError("--pipeline supports --local-objective recon only")
    if cfg.eval_every or cfg.val_size or cfg.eval_dataset:
        raise LoPTError("--eval-every, --val-size and --eval-dataset need the whole model in one process; evaluate "
                        "the saved checkpoint "
                        "with lopt eval after a --pipeline run")
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if ctx.is_main:
        clean_stale_temporaries(out_dir)
    resume_dir, ts = None, None
    if cfg.resume:  # rank 0 picks the checkpoint (falling back past incomplete ones); every rank loads it
        def load(path: Path) -> dict[str, Any]:
            return load_pipeline_state(path, ctx.world_size)
        resume_dir, ts = resume_on_all_ranks(ctx, lambda: find_resume(out_dir, cfg.resume, [STATE_FILE], load),
                                             load)
    stage, tokenizer = build_stage(cfg, ctx, resume_dir)
    wrapped = stage.wrapped
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()
    main = ctx.is_main
    batches, data_stats, total_steps = None, None, 0
    if main:  # only rank 0 reads the data; the micro-batches travel down the pipeline
        try:
            examples, data_stats = build_sft_dataset(cfg.dataset, tokenizer, max_length=cfg.max_length,
                                                     split=cfg.split, limit=cfg.limit, data_dir=cfg.data_dir)
            if describe_skips(data_stats):
                print(f"lopt: {describe_skips(data_stats)}", file=sys.stderr)
            batches = Batches(examples, cfg.batch_size, tokenizer.pad_token_id, seed=cfg.seed)
            total_steps = count_steps(cfg, batches.batches_per_epoch)
        except Exception:
            dist.broadcast_object_list([-1], src=0)  # the other ranks wait for the step count: release them
            raise
    sizes = [total_steps]
    dist.broadcast_object_list(sizes, src=0)
    if sizes[0] < 0:
        raise LoPTError("rank 0 could not read the dataset (its error is above)")
    total_steps = sizes[0]
    stepper = PipelineStepper(stage, cfg, total_steps)
    state = TrainState()
    if ts is not None:
        mine = ts["ranks"][ctx.rank]
        if mine["heads"]:
            wrapped.heads.load_state_dict(mine["heads"], strict=False)
        stepper.optimizer.load_state_dict(mine["optimizer"])
        stepper.scheduler.load_state_dict(mine["scheduler"])
        if stepper.scaler is not None and mine.get("scaler"):
            stepper.scaler.load_state_dict(mine["scaler"])
        if batches is not None:
            batches.load_state_dict(ts["data"])
        state.step, state.history = ts["step"], ts.get("history", [])
        random.setstate(mine["rng"]["python"])
        torch.set_rng_state(mine["rng"]["torch"])
        del ts

    # Rank 0 logs, runs the callbacks and saves; the other ranks send it their numbers (StatsRelay).
    run = RunLog(cfg, state, total_steps, ctx.device, main=main, resumed=resume_dir is not None, ctx=ctx,
                 callbacks=callbacks if main else None,
                 sigint_message="\nlopt: interrupt received, stopping all ranks after this step and saving "
                                "a checkpoint (Ctrl-C again to abort)")
    if main:
        print(f"lopt: pipeline of {ctx.world_size} processes, blocks {wrapped.block_ranges} (one per rank), "
              f"{data_stats['rows']} examples, {total_steps} steps on {ctx.device}"
              + (f", resumed at step {state.step}" if resume_dir else ""), file=sys.stderr)

    def rank_state() -> dict[str, Any]:
        return {"optimizer": stepper.optimizer.state_dict(), "scheduler": stepper.scheduler.state_dict(),
                "scaler": stepper.scaler.state_dict() if stepper.scaler else None,
                "heads": {k: v for k, v in wrapped.heads.state_dict().items()
                          if k.startswith(f"{ctx.rank}.")} if ctx.rank < ctx.world_size - 1 else {},
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}

    def gather_and_save(checkpoint: bool, final_info: dict[str, Any] | None = None) -> Path | None:
        """Collective: every rank's block (and trainer state) to rank 0, which writes ``checkpoint-N``
        (``checkpoint``) or the final model into OUT/ itself."""
        if main:  # the history saved with the checkpoint must hold every step before it
            for r in relay.ready(block=True):
                run.log(r)
        full = stage.gather_state()
        states: list[Any] = [None] * ctx.world_size if main else None
        dist.gather_object(rank_state() if checkpoint and not cfg.save_only_model else None, states, dst=0)
        path = None
        if main:
            last = state.history[-1] if state.history else None
            info = final_info or run_info(cfg, wrapped, last)
            info["pipeline"] = {"processes": ctx.world_size}
            model = GatheredModel(wrapped.plain_model(), full)
            if not checkpoint:
                save_plain_into(model, tokenizer, out_dir, info)
            else:
                train_state = None if cfg.save_only_model else {
                    "pipeline": ctx.world_size, "ranks": states, "step": state.step, "history": state.history,
                    "data": batches.state_dict()}
                path = save_training_checkpoint(model, tokenizer, out_dir, state.step, info, train_state,
                                                total_limit=cfg.save_total_limit)
        ctx.barrier()
        return path

    relay = StatsRelay(ctx)
    stopped = False
    with run:
        while state.step < total_steps:
            # Rank 0 heads the pipeline, so its decision to stop reaches every rank before the same step.
            if main and state.stop_requested:
                stage.send_stop()
                stopped = True
                break
            rec = stepper.step([next(batches) for _ in range(cfg.grad_accum)] if main else None)
            if rec is None:
                stopped = True
                break
            state.step += 1
            own = run.end_step(rec)
            if own is not None:
                relay.post(own) if main else relay.send(own)
            if main:
                for r in relay.ready():
                    run.log(r)
            if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == total_steps):
                gather_and_save(checkpoint=True)  # the last step's too, as lopt train
        stage.wait_sends()
        relay.close()
        if main:
            for r in relay.ready(block=True):
                run.log(r)
        interrupted = stopped and state.step < total_steps
        if interrupted:
            run.report_stop(gather_and_save(checkpoint=True))

    summary = run.summary(wrapped, data_stats, interrupted)
    if not interrupted:
        gather_and_save(checkpoint=False, final_info=run_info(cfg, wrapped, summary) if main else None)
    return TrainResult(summary, wrapped, tokenizer)
