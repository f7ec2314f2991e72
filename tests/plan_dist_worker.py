"""Runs under ``torchrun`` for tests/test_plan_distributed.py: real DDP / FSDP2 training steps on
tiny models, each rank measuring its own memory.

    torchrun --standalone --nproc_per_node 2 tests/plan_dist_worker.py JOBS.json OUT.json

On CPU (gloo) by default; with ``LOPT_PLAN_DEVICE=cuda`` each rank runs on its GPU over NCCL and measures
``torch.cuda.max_memory_allocated`` (tests/test_cuda.py).

Each job is ``{"name", "model": {config dict}, "train": {TrainConfig fields}, "batch": rows per rank,
"seq": tokens}``. One warm-up step (AdamW state exists after it), then the measured steps under the
live-bytes profiler and again under the saved-tensor tracker: a whole ``--task-grad-every 4`` cycle
(its open step included) for lopt's default recipe, one step for the others (their steps are alike). Rank r writes, per job: resident bytes before the measured steps, the live
peak above them, the saved-activation peak, and how many frees the profiler missed (0: see
``settle_collectives``).
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_measure import LivePeak, live_bytes, resident_bytes, state_tensors  # noqa: E402


def param_views_excluded(tracker_cls):
    """The saved-tensor tracker, also leaving out views of parameters: under FSDP2 a layer's unsharded
    weights are parameters made in the forward (not known up front), whose storage is freed after the
    forward and gathered again for the backward, so they are weights, not activations."""
    from torch import nn

    from lopt.engine.memory import _Packed

    class Tracker(tracker_cls):
        def _pack(self, t):
            if isinstance(t._base, nn.Parameter):
                return _Packed(t, None, self)
            return super()._pack(t)
    return Tracker


def settle_collectives() -> None:
    """Make every collective's tensors die on the calling (profiled) thread.

    gloo runs a collective on a worker thread that holds the work, and with it the collective's input
    and output tensors, until just after it marks the work done. Whichever thread drops the last
    reference frees the tensors, and the profiler records frees only on the threads it profiles: when
    the worker is last (a race, run to run), FSDP2's all-gather outputs and reduce-scatter inputs are
    freed unseen and the live bytes grow by them until their address is reused. Here each collective
    is waited for at once and this thread yields, so that the worker lets go (it does right after finishing):
    so the reference that FSDP2 (or lopt's GradSync) drops is the last: the free is recorded where the
    program frees it. Waiting early changes no allocation on this thread, only when it blocks."""
    import time

    for name in ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather_into_tensor",
                 "reduce_scatter_tensor"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def settled(*args, _fn=fn, async_op=False, **kwargs):
            work = _fn(*args, async_op=True, **kwargs)
            work.wait()
            # gloo's worker lets go of the work right after finishing it; a bare yield (sleep(0)) was not
            # always enough on a loaded machine (CI missed a free in three cycles running), 2 ms is.
            time.sleep(0.002)
            return work if async_op else None
        setattr(dist, name, settled)


def run_job(job: dict, ctx) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lopt.engine.config import fill_recipe_defaults
    from lopt.engine.memory import SavedTensorTracker
    from lopt.methods import wrap
    from lopt.parallel.data_parallel import DataParallel
    from lopt.recipes.sft import TrainConfig
    from lopt.runtime.loop import Stepper

    data = dict(job["model"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data),
                                             dtype=torch.float32)
    cfg = TrainConfig(**{"progress": False, "max_steps": 9, "warmup_ratio": 0.0, "lr": 1e-4, **job["train"]})
    fill_recipe_defaults(cfg)
    cfg.validate()
    dev = ctx.device
    if not cfg.fsdp:  # as lopt train: DDP loads on the device, FSDP on the CPU (fully_shard moves the shards)
        model = model.to(dev)
    wrapped = wrap(model, config=cfg.lopt_config())
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()
    dp = DataParallel(ctx, fsdp=cfg.fsdp)
    wrapped = dp.prepare_model(wrapped)
    stepper = Stepper(wrapped, cfg, dev, 9, dist=dp)
    g = torch.Generator().manual_seed(1)
    vocab, rows, seq = job["model"]["vocab_size"], job["batch"] * ctx.world_size, job["seq"]

    def batch():
        ids = torch.randint(0, vocab, (rows, seq), generator=g)
        return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]

    stepper.step(batch())
    resident = resident_bytes(state_tensors(wrapped, stepper.optimizer) + list(wrapped.buffers()))
    # lopt's default recipe is measured over a whole --task-grad-every 4 cycle; the others' steps are alike.
    steps = 4 if cfg.task_grad_every else 1
    if dev.type == "cuda":  # the caching allocator's own count: every free is seen, whichever thread makes it
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            stepper.step(batch())
        torch.cuda.synchronize()
        live = LivePeak()
        live.peak = torch.cuda.max_memory_allocated() - base
    for _ in range(5 if dev.type != "cuda" else 0):  # measured again (a whole cycle later) when a free went unrecorded: rare, see settle_collectives
        # Each step under a fresh collection: FSDP2's step leaves reference cycles (hooks on the autograd
        # graph) whose tensors Python's collector frees at a moment of its choosing, not the step's.
        gc.collect()
        with live_bytes() as live:
            for _ in range(steps):
                stepper.step(batch())
                gc.collect()
        # Every rank measures again or none does (the steps are collectives).
        missed = torch.tensor([live.missed_frees])
        dist.all_reduce(missed)
        if not missed.item():
            break
    with param_views_excluded(SavedTensorTracker)([p.to_local() if hasattr(p, "to_local") else p for p in wrapped.parameters()]) as tracker:
        for _ in range(steps):
            stepper.step(batch())
    return {"resident": resident, "live": live.peak, "saved": tracker.peak_bytes, "missed_frees": live.missed_frees}


def main(jobs_path: str, out_path: str) -> int:
    from lopt.parallel.context import init_distributed

    torch.set_num_threads(1)
    device = os.environ.get("LOPT_PLAN_DEVICE", "cpu")
    if device == "cpu":
        settle_collectives()
    ctx = init_distributed(device)
    out = {}
    for job in json.loads(Path(jobs_path).read_text()):
        out[job["name"]] = run_job(job, ctx)
        dist.barrier()
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, out)
    if ctx.rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.barrier()
    ctx.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and the group is closed. Skip the interpreter's teardown: with the profiler's
    # and gloo's threads still alive it sometimes aborts ("terminate called without an active exception",
    # seen here about once in ten runs), which would fail a measurement that has already finished.
    os._exit(code)
