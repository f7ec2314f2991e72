"""What a training method is, and the registry that maps ``--method NAME`` to one.

A method says which parameters train, from which signal, and how its model is saved. The wrapper
(``lopt.engine.boundary.LoPTModel``) asks the method at a few fixed points and does the rest the
same way for every method, so all comparisons run one code path. A new method is one new file in
this folder: subclass ``Method``, decorate it with ``@register``, import it in ``__init__.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lopt.engine.config import LoPTConfig, LoPTError

_REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """The default behaviour is plain end-to-end training of the whole model."""

    name: ClassVar[str] = ""
    # Split the layers into blocks at LoPT's boundaries, detaching the hidden state at each one.
    boundary: ClassVar[bool] = False
    # The blocks below the last boundary learn from a local loss (reconstruction heads or anchors).
    local_loss: ClassVar[bool] = False
    # Default learning rate of the lower blocks, embeddings and local heads, as a multiple of lr.
    lr_lower_ratio: ClassVar[float] = 1.0
    # A resumed run reloads the base model rather than the checkpoint's weights (LoRA: the checkpoint
    # has the adapters merged in; the adapters themselves travel in the trainer state).
    resume_from_base: ClassVar[bool] = False
    # The trainable set changes during training (begin_step freezes and unfreezes parameters).
    switches_layers: ClassVar[bool] = False

    def __init__(self, config: LoPTConfig):
        self.check(config)
        self.config = config

    @classmethod
    def check(cls, config: LoPTConfig) -> None:
        """LoPTError for options this method cannot honour (called by recipes before loading a model,
        and again when the model is wrapped)."""
        if config.task_grad_every:
            raise LoPTError(f"--task-grad-every opens LoPT's boundary now and then: it needs --method lopt, "
                            f"not {cls.name}")
        if config.tied_head and not cls.boundary:
            raise LoPTError(f"--tied-head keeps a tied LM head tied across LoPT's boundary; --method {cls.name} "
                            f"has no boundary and never unties it: drop --tied-head")

    def lr_lower(self, lr: float) -> float:
        """The default learning rate of the lower blocks, embeddings and local heads."""
        return lr * self.lr_lower_ratio

    def prepare(self, model: nn.Module) -> nn.Module:
        """Change the bare model before it is wrapped (LoRA adds its adapters here)."""
        return model

    def setup(self, wrapped: Any) -> None:
        """Called once the wrapper is built: freeze what this method never trains."""

    def optimizer_parameters(self, wrapped: Any) -> list[nn.Parameter]:
        """Every parameter the optimizer must hold from the start: by default the trainable ones.
        Methods that change the trainable set over time (LISA, BAdam) return all that may ever train;
        a frozen one has no gradient, so AdamW skips it and holds no state for it."""
        return [p for p in wrapped.parameters() if p.requires_grad]

    def begin_step(self, wrapped: Any, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called by the trainers before optimizer step ``step`` (0-based): methods that change the
        trainable set over time (LISA, BAdam) switch it here."""

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The transformers model inside ``model`` (the wrapped model as prepared)."""
        return model

    def save_pretrained(self, model: nn.Module, directory: Path, **kwargs: Any) -> None:
        """Write a plain transformers checkpoint of ``model`` (as prepared)."""
        model.save_pretrained(directory, **kwargs)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors of ``model`` (as prepared) that the plain checkpoint does not hold."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What this method adds to ``lopt_run.json`` (besides the config)."""
        return {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered method class; LoPTError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoPTError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}") from None
