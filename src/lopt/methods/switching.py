"""What LISA and BAdam share: a method whose trainable decoder layers change every K optimizer steps.

The layers that train at step ``s`` are a pure function of ``(seed, s // K)`` (``active_layers``), so
a resumed run trains the same layers as the uninterrupted one. The optimizer holds every parameter
that may ever train (``optimizer_parameters``); a frozen one has no gradient, so AdamW skips it and
holds no state for it. At each switch the state of the layers that stop training is freed, and at the
start of every period the state of all switchable layers is reset (LMFlow rebuilds its optimizer, and
BAdam resets Adam's state, at a switch). Both depend only on the step, so they resume exactly too.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lopt.methods.base import Method


class LayerSwitching(Method):
    """Base class: subclasses define ``interval`` and ``active_layers(step, num_layers)``."""

    switches_layers = True
    # Parameters outside the decoder layers (embeddings, final norm, LM head) train all the time.
    train_outside_layers: ClassVar[bool] = False

    @property
    def interval(self) -> int:
        raise NotImplementedError

    def active_layers(self, step: int, num_layers: int) -> list[int]:
        """The decoder layers that train at optimizer step ``step`` (sorted)."""
        raise NotImplementedError

    # ---- parameter sets
    def _layers(self, wrapped: Any) -> nn.ModuleList:
        return wrapped.model.get_submodule(wrapped.layers_name)

    def _outside(self, wrapped: Any) -> list[nn.Parameter]:
        layer_ids = {id(p) for p in self._layers(wrapped).parameters()}
        return [p for p in wrapped.model.parameters() if id(p) not in layer_ids]

    def optimizer_parameters(self, wrapped: Any) -> list[nn.Parameter]:
        params = list(self._layers(wrapped).parameters())
        return params + (self._outside(wrapped) if self.train_outside_layers else [])

    def setup(self, wrapped: Any) -> None:
        wrapped.model.requires_grad_(False)
        for p in self.optimizer_parameters(wrapped):
            p.requires_grad_(True)
        self._apply(wrapped, 0, None)

    def begin_step(self, wrapped: Any, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._apply(wrapped, step, optimizer)

    def _apply(self, wrapped: Any, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        layers = self._layers(wrapped)
        active = set(self.active_layers(step, len(layers)))
        new_period = step % self.interval == 0
        # Under bf16-mixed (lopt.runtime.precision.apply_precision) a layer that trains gets an fp32 master
        # copy of its bf16 weights, and a layer that stops goes back to bf16, as BAdam keeps its blocks.
        dtypes = getattr(wrapped, "weight_dtypes", None)
        for i, layer in enumerate(layers):
            on = i in active
            for p in layer.parameters():
                if dtypes is not None and p.is_floating_point():
                    p.data = p.data.to(dtypes[0] if on else dtypes[1])
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                if optimizer is not None and (new_period or not on):
                    optimizer.state.pop(p, None)  # frees the layer's AdamW moments
        self.active = sorted(active)
        self.on_switch(wrapped, self.active)

    def on_switch(self, wrapped: Any, active: list[int]) -> None:
        """Called after the trainable layers are set for a step."""

    def describe(self) -> dict[str, Any]:
        return {"active_layers": getattr(self, "active", None)}
