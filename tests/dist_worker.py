"""Runs under ``torchrun`` for tests/test_distributed.py: several short training runs in one launch
(process start-up is the expensive part), each described in a JSON job list.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py JOBS.json

Each job is ``{"name", "config": {TrainConfig fields}, "stop_on_rank": R, "stop_at": S}``, optionally
with ``"ctrl_c_in_reduce": [R, S]`` (on rank R, a Ctrl-C lands while the ranks agree whether to stop
after step S: the flag is set after this rank has read it), ``"copy": [SRC, DST]`` (a directory
copied) and ``"truncate": FILE`` (cut to half its size), done by rank 0 before the job starts. After a
job every rank writes ``OUT/rank{r}.pt``: its trainable parameters by name (the pipeline: its own
block's plain state), so the test can check that the ranks agree and what each rank trained.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


@contextmanager
def ctrl_c_in_reduce(callbacks: list, at: int):
    """While the run lasts, DistContext.any sets ``stop_requested`` during the reduce after step ``at``,
    as lopt's SIGINT handler does when Ctrl-C arrives while a rank waits there (a callback added to
    ``callbacks`` hands it the run's state)."""
    from lopt.parallel.context import DistContext

    seen, orig = {}, DistContext.any

    def any_(self, flag):
        out = orig(self, flag)
        state = seen.get("state")
        if state is not None and state.step == at and not seen.get("fired"):
            seen["fired"] = state.stop_requested = True
        return out

    callbacks.append(lambda rec, state: seen.setdefault("state", state))
    DistContext.any = any_
    try:
        yield
    finally:
        DistContext.any = orig


def main(path: str) -> int:
    from lopt.recipes.sft import TrainConfig, train

    torch.set_num_threads(1)
    # The group is created here, so train() uses it and leaves it open for the next job. The CUDA
    # tests ask for NCCL (tests/test_cuda.py), which needs this process's GPU chosen first.
    backend = os.environ.get("LOPT_TEST_BACKEND", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    rank = dist.get_rank()
    for job in json.loads(Path(path).read_text()):
        if rank == 0 and "copy" in job:
            shutil.copytree(*job["copy"])
        if rank == 0 and "truncate" in job:
            f = Path(job["truncate"])
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        dist.barrier()
        cfg = TrainConfig(**job["config"])
        callbacks = []
        if job.get("stop_on_rank") == rank:
            def stop(rec, state, at=job["stop_at"]):
                if rec["step"] >= at:
                    state.stop_requested = True  # only this rank asks; the ranks must agree to stop
            callbacks.append(stop)
        rank_at = job.get("ctrl_c_in_reduce")
        with ctrl_c_in_reduce(callbacks, rank_at[1]) if rank_at and rank_at[0] == rank else nullcontext():
            res = train(cfg, callbacks)
        if cfg.pipeline:  # this rank's block: the plain model's trainable (non-meta) entries
            own = {n: p.detach().clone() for n, p in res.model.plain_model().named_parameters()
                   if p.requires_grad}
        else:
            own = {n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                   for n, p in res.model.named_parameters() if p.requires_grad}
        torch.save({"params": own, "summary": res.summary}, f"{cfg.output_dir}/rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
