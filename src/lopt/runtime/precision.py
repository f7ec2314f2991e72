"""What ``--precision`` means for the weights, the autocast and the update.

* ``fp32``: everything in fp32, no autocast.
* ``bf16-mixed`` (``bf16``): what trains keeps fp32 master weights, gradients and AdamW state, and the
  forward runs under bf16 autocast; what is frozen (LoRA's base, freeze-lower's lower half, LISA's and
  BAdam's inactive layers, the anchors, a GRPO/DPO reference model) is *stored* in bf16, since autocast
  would round it to bf16 for every matrix multiply anyway. LISA and BAdam move a layer to fp32 when it
  starts training and back to bf16 when it stops (``lopt.methods.switching``), as BAdam does.
* ``bf16-true``: every weight, gradient and optimizer state in bf16, no autocast. The AdamW update is
  compensated (``--bf16-update``, ``lopt.runtime.loop.make_optimizer``). The local reconstruction heads
  stay fp32: their loss is computed in fp32 (``lopt.engine.boundary``) and they are a hidden x hidden
  matrix per lower block.
* ``fp16``: fp32 weights under fp16 autocast with a grad scaler (unchanged).
* ``auto``: ``bf16-mixed`` on CUDA, ``fp32`` elsewhere.

Only parameters change dtype; buffers (rotary frequencies) keep theirs.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from lopt.engine.config import LoPTError

ALIASES = {"bf16": "bf16-mixed"}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32``, ``bf16-mixed``, ``bf16-true`` or ``fp16``: ``auto`` and the ``bf16`` alias resolved
    for ``device``."""
    device = torch.device(device)
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return ALIASES.get(precision, precision)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: bf16 for bf16-mixed, fp16 for fp16, None
    (no autocast) for fp32 and bf16-true, whose weights are already bf16."""
    p = resolve_precision(precision, device)
    return {"bf16-mixed": torch.bfloat16, "fp16": torch.float16}.get(p)


def weight_dtypes(precision: str, device: torch.device | str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the weights that train, dtype of the frozen ones) under ``precision``."""
    p = resolve_precision(precision, device)
    if p == "bf16-true":
        return torch.bfloat16, torch.bfloat16
    if p == "bf16-mixed":
        return torch.float32, torch.bfloat16
    return torch.float32, torch.float32


def check_precision_device(precision: str, device: torch.device | str) -> None:
    """LoPTError (one line) for a precision the device cannot run: bf16 on a CUDA GPU without bf16
    (pre-Ampere cards such as the V100 and T4 have fp16 only)."""
    device = torch.device(device)
    p = resolve_precision(precision, device)
    if p.startswith("bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise LoPTError(f"--precision {precision}: {name} has no bf16 support; use --precision fp16 or fp32")


def check_method_precision(method: Any, precision: str, device: torch.device | str) -> None:
    """LoPTError (one line) for a method that computes in bf16 only (qlora) under fp32 or fp16."""
    p = resolve_precision(precision, device)
    if getattr(method, "bf16_only", False) and not p.startswith("bf16"):
        raise LoPTError(f"--method {method.name} computes in bf16 (its 4-bit base): --precision {precision} is {p} "
                        f"here; use --precision bf16-true (bf16 adapters) or bf16-mixed (fp32 adapter masters)")


def cast_parameters(params: Iterable[nn.Parameter], dtype: torch.dtype) -> None:
    """Store floating-point ``params`` in ``dtype``, in place (the Parameter objects stay the same, so
    optimizers and hooks that hold them keep working). Gradients are dropped when their dtype changes."""
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            if p.grad is not None and p.grad.dtype != dtype:
                p.grad = None


def apply_precision(wrapped: Any, precision: str, device: torch.device | str, bf16_update: str | None = None) -> None:
    """Store ``wrapped``'s weights as ``precision`` asks (a ``lopt.wrap`` model, after the method's
    setup froze what it never trains): under bf16-true every weight of the model and anchors in bf16
    (the local heads stay fp32), under bf16-mixed the frozen weights in bf16. The method's switching
    (LISA, BAdam) reads ``wrapped.weight_dtypes`` to move layers between the two at each switch.
    ``bf16_update`` (``--bf16-update``) is recorded as ``wrapped.bf16_update`` under bf16-true, for the
    optimizers built elsewhere (``lopt.integrations.trl``'s)."""
    check_precision_device(precision, device)
    check_method_precision(wrapped.method_impl, precision, device)
    train_dtype, frozen_dtype = weight_dtypes(precision, device)
    wrapped.weight_dtypes = (train_dtype, frozen_dtype)
    wrapped.bf16_update = bf16_update if resolve_precision(precision, device) == "bf16-true" else None
    if train_dtype == frozen_dtype == torch.float32:
        return
    if train_dtype != frozen_dtype:  # a checkpoint gets one dtype, the trained weights' (lopt.methods.base)
        wrapped.method_impl.save_dtype = train_dtype
    head_ids = {id(p) for p in wrapped.heads.parameters()}
    for p in wrapped.parameters():
        if id(p) in head_ids or getattr(p, "quant_state", None) is not None:  # 4-bit weights keep their packing
            continue
        cast_parameters([p], train_dtype if p.requires_grad else frozen_dtype)


def cast_reference(reference: nn.Module | None, precision: str, device: torch.device | str) -> nn.Module | None:
    """A frozen reference model (GRPO's, DPO's) stored in the frozen dtype of ``precision``."""
    if reference is not None:
        cast_parameters(reference.parameters(), weight_dtypes(precision, device)[1])
    return reference


def save_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of a saved checkpoint: the dtype the trained weights are kept in (fp32 masters, or bf16
    under bf16-true), so a plain transformers load gets one dtype throughout."""
    return weight_dtypes(precision, device)[0]


def check_device_options(cfg: Any, device: torch.device | str) -> None:
    """LoPTError (one line) for a precision or optimizer this device cannot run, before anything trains:
    bf16 on a GPU without it, ``paged-adamw-8bit`` off CUDA (bitsandbytes pages its state through CUDA
    unified memory)."""
    device = torch.device(device)
    check_precision_device(cfg.precision, device)
    kind = getattr(cfg, "optimizer", "adamw")
    if kind == "paged-adamw-8bit" and device.type != "cuda":
        raise LoPTError(f"--optimizer paged-adamw-8bit pages its state through CUDA unified memory and needs a CUDA "
                        f"device, not {device.type}; use --optimizer adamw-8bit")
