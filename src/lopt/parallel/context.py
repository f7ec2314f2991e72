"""Joining the process group that a launcher set up (torchrun, ``accelerate launch``): rank, world size,
device, and the few collectives the trainers need (barrier, any-rank flags).

Launch with ``torchrun --nproc_per_node N -m lopt train ...``: the launcher sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR, and ``lopt train`` joins the group (gloo on CPU, nccl on CUDA with device
``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Sequence
import torch
import torch.distributed as dist


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started more than one process, or started
    one and the caller already set up its process group for lopt to use (a 1-GPU NCCL run)."""
    if "WORLD_SIZE" in os.environ and dist.is_available() and dist.is_initialized():
        return True
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False  # this object initialised the group (and destroys it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where point-to-point messages must live: the device under NCCL; the host under gloo, whose
        send/recv take CPU tensors only (gloo carries CUDA runs whose processes share a GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Sum (or max) a few numbers across ranks; float64 so token counts stay exact."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (the agreed stop flag)."""
        return self.all_reduce([1.0 if flag else 0.0], op="max")[0] > 0

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def exit_worker(code: int) -> None:
    """End a launcher's worker process (torchrun, accelerate launch) with ``code``, without the C++
    teardown: after the process group is gone, gloo's or the launcher store's threads are sometimes still
    joinable when their static objects are destroyed, and the process aborts ("terminate called without
    an active exception", exit -6) after a run that succeeded, which torchrun reports as a failed run.
    Python's own exit work runs first (atexit handlers: trackers, loggers), then streams are flushed."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def init_distributed(device: str | None = None, timeout_min: float | None = None) -> DistContext | None:
    """Join the process group the launcher describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Returns None for a single process. The backend is nccl when the device is CUDA (device
    ``cuda:LOCAL_RANK`` unless ``device`` names one) and gloo otherwise, or when several processes
    share one GPU (NCCL cannot); a group the caller already initialised is used as it is. ``timeout_min`` bounds how
    long a collective waits (default 60 min, or ``$LOPT_DIST_TIMEOUT_MIN``): ranks wait there while
    rank 0 saves a checkpoint.
    """
    if not launched_distributed():
        return None
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev, shared = _rank_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"; NVIDIA/nccl#418): processes that share
    # a GPU (a pipeline tried out on one card) talk through gloo, whose messages go via the host.
    backend = dist.get_backend() if dist.is_initialized() else "gloo" if dev.type != "cuda" or shared else "nccl"
    if shared and rank == 0 and backend == "gloo":
        print(f"lopt: {world} processes share {dev}: NCCL cannot run two ranks on one GPU, so they communicate "
              f"through gloo via host memory", file=sys.stderr)
    owns = False
    if not dist.is_initialized():
        minutes = timeout_min if timeout_min is not None else float(os.environ.get("LOPT_DIST_TIMEOUT_MIN", "60"))
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=minutes))
        owns = True
    if rank != 0:  # one progress bar per run (model loading, checkpoint writing), not one per process
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Processes on one machine share its cores; oversubscribed threads spin and slow everyone.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistContext(rank, world, local_rank, dev, backend, owns)


def _rank_device(device: str | None, local_rank: int, local_world: int) -> tuple[torch.device, bool]:
    """This process's device (``cuda:LOCAL_RANK`` unless ``device`` names one; ranks beyond the GPU
    count wrap around) and whether other processes on this machine use the same GPU."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device:
        dev = torch.device(device)
        explicit = dev.index is not None
        if dev.type == "cuda" and not explicit:
            dev = torch.device("cuda", local_rank % max(1, n_gpu))
    else:
        explicit = False
        dev = torch.device("cuda", local_rank % n_gpu) if n_gpu else torch.device("cpu")
    shared = dev.type == "cuda" and local_world > 1 and (explicit or local_world > n_gpu)
    return dev, shared
