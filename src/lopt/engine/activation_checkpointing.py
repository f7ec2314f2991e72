"""Activation checkpointing scopes: which layers recompute in the backward, in full or selectively.
"""
from __future__ import annotations

from typing import Any
import torch

from lopt.engine.config import CHECKPOINT_SCOPES, LoPTError


def keep_matmul_outputs() -> tuple[Any, Any]:
    """Selective checkpointing policy: a checkpointed layer keeps what its matrix multiplications and
    attention computed, and recomputes everything else (element-wise, memory-bound, cheap)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            keep.add(getattr(aten, name).default)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)
