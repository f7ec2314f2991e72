"""What a training method is, and the registry that maps ``--method NAME`` to one.

A method says which parameters train, from which signal, and how its model is saved. The wrapper
(``lopt.engine.boundary.LoPTModel``) asks the method at a few fixed points and does the rest the
same way for every method, so all comparisons run one code path. A new method is one new file in
this folder: subclass ``Method``, give it its options (a dataclass of ``option`` fields, named with
the method's prefix: they become ``LoPTConfig`` fields, ``lopt train`` flags and YAML keys), say what
it trains for the memory planner (``trains``), decorate it with ``@register`` and import it in
``__init__.py``. A method in another package registers through the entry-point group
``lopt.methods`` instead of the import (``load_plugins``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lopt.engine.config import LoPTError

_REGISTRY: dict[str, type["Method"]] = {}
PLUGIN_GROUP = "lopt.methods"


@dataclass(frozen=True)
class Trains:
    """What a method trains on a model of ``n`` decoder layers, as ``lopt plan`` costs it. Methods that
    switch layers describe their worst case (the lowest layers active: every layer above passes the
    gradient down)."""

    layers: tuple[int, ...]  # decoder layers whose weights train in full
    embedding: bool = True
    head: bool = True  # the LM head (with its bias)
    final_norm: bool = True  # and whatever else sits outside the layers, embedding and head
    lora_r: int = 0  # adapters of this rank on every linear map of every layer, the base frozen
    # A gradient boundary: the blocks as (start, end) layer ranges. The LM head is untied; the lower
    # blocks learn from local reconstruction heads when ``local_heads``, else they are frozen.
    blocks: tuple[tuple[int, int], ...] | None = None
    local_heads: bool = False
    label: str = ""  # the plan row's name when it is not the method's
    # Bits per weight of the frozen base when the method fixes them (qlora: 4, bitsandbytes NF4 with its
    # double-quantized constants); None: the base is stored as --precision stores frozen weights.
    base_bits: int | None = None


class Method:
    """The default behaviour is plain end-to-end training of the whole model."""

    name: ClassVar[str] = ""
    # Split the layers into blocks at LoPT's boundaries, detaching the hidden state at each one.
    boundary: ClassVar[bool] = False
    # The blocks below the last boundary learn from a local loss (reconstruction heads or anchors).
    local_loss: ClassVar[bool] = False
    # Default learning rate of the lower blocks, embeddings and local heads, as a multiple of lr.
    lr_lower_ratio: ClassVar[float] = 1.0
    # The method computes in bf16 only (qlora's 4-bit base): --precision must be a bf16 one.
    bf16_only: ClassVar[bool] = False
    # A resumed run reloads the base model rather than the checkpoint's weights (LoRA: the checkpoint
    # has the adapters merged in; the adapters themselves travel in the trainer state).
    resume_from_base: ClassVar[bool] = False
    # The trainable set changes during training (begin_step freezes and unfreezes parameters).
    switches_layers: ClassVar[bool] = False
    # The method's own options: a dataclass of ``lopt.engine.config.option`` fields, each named with
    # the method's prefix (lisa_layers). None: the method has none.
    options: ClassVar[type | None] = None
    # The one dtype a saved checkpoint holds when the weights are stored in two (bf16-mixed keeps frozen
    # weights in bf16 and what trains in fp32: lopt.runtime.precision.apply_precision sets it); None: as stored.
    save_dtype: torch.dtype | None = None

    def __init__(self, config: Any):
        self.check(config)
        self.config = config

    @classmethod
    def check(cls, config: Any) -> None:
        """LoPTError for options this method cannot honour (called by recipes before loading a model,
        and again when the model is wrapped)."""
        if config.task_grad_every:
            raise LoPTError(f"--task-grad-every opens LoPT's boundary now and then: it needs --method lopt, "
                            f"not {cls.name}")
        if config.tied_head and not cls.boundary:
            raise LoPTError(f"--tied-head keeps a tied LM head tied across LoPT's boundary; --method {cls.name} "
                            f"has no boundary and never unties it: drop --tied-head")

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        """What this method trains on a ``num_layers``-layer model under ``config`` (a ``LoPTConfig``),
        for the memory planner; by default everything."""
        return Trains(layers=tuple(range(num_layers)))

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
        """Write a plain transformers checkpoint of ``model`` (as prepared), in ``save_dtype`` throughout
        when it is set."""
        if self.save_dtype is None:
            model.save_pretrained(directory, **kwargs)
            return
        model.save_pretrained(directory, state_dict=cast_state_dict(model.state_dict(), self.save_dtype), **kwargs)
        set_saved_dtype(directory, self.save_dtype)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors of ``model`` (as prepared) that the plain checkpoint does not hold."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What this method adds to ``lopt_run.json`` (besides the config)."""
        return {}


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with every floating-point tensor in ``dtype``; the cast copies go to the CPU (the device
    keeps its memory), and a tensor shared by two keys (a tied head) stays shared."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dtype != dtype:
            if id(v) not in cast:
                cast[id(v)] = v.detach().to("cpu", dtype)
            v = cast[id(v)]
        out[k] = v
    return out


def set_saved_dtype(directory: Path, dtype: torch.dtype) -> None:
    """Record ``dtype`` in a saved checkpoint's config.json (transformers writes the first weight's dtype,
    which under bf16-mixed may be a frozen embedding's bf16), so a plain load with ``dtype="auto"`` gets
    the dtype the weights were saved in."""
    import json

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"method {cls.name!r} is registered twice ({old.__module__} and "
                        f"{cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Import the methods other packages register under the entry-point group ``lopt.methods``
    (``[project.entry-points."lopt.methods"] mymethod = "mypackage.mymethod"``): importing the module
    registers its method."""
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:  # one broken plugin must not take lopt down; say which and why
            warnings.warn(f"lopt method plugin {ep.name!r} ({ep.value}) failed to load: {e}; its method is "
                          f"not available (uninstall the package that provides it to silence this)", stacklevel=2)


def registered_methods() -> tuple[type[Method], ...]:
    """Every registered method class, in registration order."""
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered method class; LoPTError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoPTError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}") from None
