"""Memory accounting: what autograd keeps alive for the backward, and the process's peak.

``SavedTensorTracker`` counts the bytes autograd saves for the backward (the activation memory
that LoPT's blockwise schedule frees early), excluding parameters, which are resident anyway.
A storage saved by several graph nodes is counted once; bytes are released when the last node
that saved it is freed, so ``peak_bytes`` is the true high-water mark of saved activations.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Iterable

import torch
from torch import nn


class _Packed:
    __slots__ = ("tensor", "key", "tracker", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: int | None, tracker: "SavedTensorTracker"):
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self):
        if self.key is not None:
            self.tracker._release(self.key)


class SavedTensorTracker:
    """Context manager: ``with SavedTensorTracker(model.parameters()) as t: ...; t.peak_bytes``."""

    def __init__(self, params: Iterable[torch.Tensor] = ()):
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [refcount, nbytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0  # everything saved during the context, freed or not
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or storage.nbytes() == 0 or isinstance(t, nn.Parameter):
            return _Packed(t, None, self)
        ref = self._refs.get(ptr)
        if ref is None:
            self._refs[ptr] = [1, storage.nbytes()]
            self.current_bytes += storage.nbytes()
            self.total_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            ref[0] += 1
        return _Packed(t, ptr, self)

    @staticmethod
    def _unpack(p: _Packed) -> torch.Tensor:
        return p.tensor

    def _release(self, ptr: int) -> None:
        ref = self._refs.get(ptr)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.current_bytes -= ref[1]
            del self._refs[ptr]

    def __enter__(self) -> "SavedTensorTracker":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (CPU)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except Exception:  # pragma: no cover - psutil is a dependency, but stay usable without it
        return float("nan")


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak allocated memory on CUDA, peak resident memory of the process on CPU, in MiB."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
