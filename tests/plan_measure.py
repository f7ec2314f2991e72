"""Measuring a training step's memory on CPU for the planner's tests: live tensor bytes (what CUDA's
``max_memory_allocated`` counts) from the profiler's allocation events, and the bytes resident before
a step (parameters, gradients, optimizer state; local shards under FSDP)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch


class LivePeak:
    """``with live_bytes() as m: ...; m.peak``: the largest sum of CPU tensor bytes allocated and not
    yet freed during the block, above what was alive when it started."""

    peak: int = 0


@contextmanager
def live_bytes() -> Iterator[LivePeak]:
    from torch.profiler import ProfilerActivity, profile

    out = LivePeak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    # Allocation events with their addresses, from every thread the profiler saw: a block is freed
    # once, whichever thread frees it (gloo's worker threads drop tensors the main thread made).
    from torch._C._profiler import _EventType

    allocs = []

    def walk(nodes):
        for e in nodes:
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                allocs.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    sizes: dict[int, int] = {}
    live = peak = 0
    for _, ptr, size in sorted(allocs, key=lambda a: a[0]):
        if size > 0:
            sizes[ptr] = size
            live += size
        else:
            live -= sizes.pop(ptr, -size)
        peak = max(peak, live)
    out.peak = peak


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        s = _local(t.detach()).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def state_tensors(model: torch.nn.Module, optimizer: Any) -> list[torch.Tensor]:
    """Parameters, their gradients and the optimizer's state tensors."""
    params = list(model.parameters())
    out = params + [p.grad for p in params if p.grad is not None]
    for opt in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]):
        out += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return out
