"""``LoPTConfig`` (the engine's options plus every registered method's), ``wrap`` (PEFT's
``get_peft_model`` for lopt: any transformers causal LM in, a ``LoPTModel`` out) and the option checks
that need to know the methods.

Imported by ``lopt.methods`` after every method has registered, so ``LoPTConfig`` holds them all.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass, make_dataclass
from typing import Any, Sequence

from torch import nn

from lopt.engine.boundary import LoPTModel
from lopt.engine.config import CHECKPOINT_SCOPES, EngineConfig, LoPTError
from lopt.methods.base import get_method, method_names, registered_methods


def method_option_classes() -> list[type]:
    """The option dataclasses of the registered methods, in registration order."""
    out: list[type] = []
    for cls in registered_methods():
        opts = cls.options
        if opts is None or opts in out:
            continue
        if not is_dataclass(opts):
            raise TypeError(f"{cls.__name__}.options must be a dataclass, got {opts!r}")
        out.append(opts)
    return out


def compose_config(name: str, base: type, doc: str) -> type:
    """A dataclass ``name`` with ``base``'s fields, then every registered method's options (all have
    defaults)."""
    seen: dict[str, str] = {f.name: base.__name__ for f in fields(base)}
    option_classes = method_option_classes()
    for opts in option_classes:
        for f in fields(opts):
            if f.name in seen:
                raise TypeError(f"option {f.name!r} of {opts.__name__} is already declared by {seen[f.name]}")
            seen[f.name] = opts.__name__
    cls = make_dataclass(name, [], bases=(*reversed(option_classes), base))  # base's fields first
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


LoPTConfig = compose_config("LoPTConfig", EngineConfig, "Everything that defines how a model is trained: the "
                            "boundary's options (``EngineConfig``) and each method's own; saved with each "
                            "checkpoint.")


def wrap(model: nn.Module, num_blocks: int = 2, lambda_aux: float | None = None, schedule: str = "blockwise",
         *, method: str = "lopt", boundaries: Sequence[int] | None = None, config: Any = None,
         **options: Any) -> LoPTModel:
    """Wrap a transformers causal LM for LoPT (or a baseline) training.

    >>> wrapped = lopt.wrap(model)                      # LoPT, boundary at the midpoint
    >>> wrapped = lopt.wrap(model, task_grad_every=4)   # the task gradient reaches the lower half every 4th step
    >>> wrapped = lopt.wrap(model, boundaries=[8, 16])  # three blocks
    >>> wrapped = lopt.wrap(model, method="e2e")        # same code path, no boundary

    ``options`` are further ``LoPTConfig`` fields (``lora_r``, ``lisa_layers``, ...). ``lambda_aux``
    defaults to 10 (0 under ``task_grad_every``). Call ``wrapped.begin_step(step)`` before each
    optimizer step: it opens the boundary on the steps that ``task_grad_every`` names.
    """
    if config is None:
        unknown = sorted(set(options) - {f.name for f in fields(LoPTConfig)})
        if unknown:
            raise LoPTError(f"lopt.wrap: unknown option {unknown[0]!r}; the options are LoPTConfig's fields")
        config = LoPTConfig(method=method, num_blocks=num_blocks, lambda_aux=lambda_aux, schedule=schedule,
                            boundaries=list(boundaries) if boundaries is not None else None, **options)
    if isinstance(model, LoPTModel):
        raise LoPTError("this model is already wrapped by lopt.wrap; wrap the plain model (wrapped.model)")
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "config")):
        raise LoPTError(f"lopt.wrap expects a transformers causal LM, got {type(model).__name__}")
    return LoPTModel(model, get_method(config.method)(config))


def check_checkpointing(cfg: Any) -> None:
    """LoPTError for a gradient_checkpointing / selective_checkpointing value that cannot work."""
    for name in ("gradient_checkpointing", "selective_checkpointing"):
        value = getattr(cfg, name)
        if value not in CHECKPOINT_SCOPES:
            raise LoPTError(f"{name} must be one of {', '.join(CHECKPOINT_SCOPES)}, got {value!r}")
        if value in ("last-block", "lower-blocks") and not get_method(cfg.method).boundary:
            with_boundary = ", ".join(m for m in method_names() if get_method(m).boundary)
            raise LoPTError(f"{name}={value} needs a method with a boundary ({with_boundary})")
