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
    missed_frees: int = 0  # blocks whose free the profiler did not record (see ``live_bytes``)


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
    # The profiler records a free only on a thread it profiles: a block whose last reference a
    # process-group worker thread drops (gloo's, holding a collective's tensors) is freed unseen. The
    # allocator hands out an address again only once it is free, so an allocation at an address still
    # counted live closes the earlier block there; ``missed_frees`` counts them (a caller that needs
    # exact figures measures again, or makes such frees happen on its own thread).
    sizes: dict[int, int] = {}
    live = peak = missed = 0
    for _, ptr, size in sorted(allocs, key=lambda a: a[0]):
        if size > 0:
            if ptr in sizes:
                live -= sizes.pop(ptr)
                missed += 1
            sizes[ptr] = size
            live += size
        else:
            live -= sizes.pop(ptr, -size)
        peak = max(peak, live)
    out.peak, out.missed_frees = peak, missed


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


def stored_bytes(params: list[torch.Tensor]) -> int:
    """Bytes of ``params`` as stored, a 4-bit weight's quantization state (absmax, codes, the second
    level's absmax and offset) included; each storage once."""
    tensors = list(params)
    for p in params:
        q = getattr(p, "quant_state", None)
        if q is not None:
            tensors += [q.absmax, q.code] + ([q.state2.absmax, q.state2.code, q.offset] if q.nested else [])
    return sum({t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in tensors}.values())
