"""``badam``: block coordinate descent with Adam (Luo et al. 2024, arXiv:2404.02827).

The decoder layers are split into blocks of ``badam_block_size`` layers; one block trains for
``badam_switch_every`` optimizer steps, then the next, in ``badam_order`` (ascending, descending, or
random: a fresh permutation every pass over the blocks). Adam's state exists for the active block
only and is reset at each switch. The defaults are those of LLaMA-Factory's BAdam example
(``examples/extras/badam/llama3_full_sft.yaml``: ``badam_mode: layer``, ``badam_switch_mode:
ascending``, ``badam_switch_interval: 50``); in that layer mode every decoder layer is one block and
the embeddings, final norm and LM head are frozen (BAdam's ``BlockOptimizer`` defaults
``include_embedding=False, include_lm_head=False``), as here.

lopt adds its boundary just below the active block: the layers under it run without autograd (they
are frozen and so is the embedding, so autograd would record nothing there anyway: see
docs/performance.md ("BAdam: what the boundary adds") for the measurement).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from lopt.engine.config import LoPTError, option
from lopt.methods.base import Trains, register
from lopt.methods.switching import LayerSwitching

BADAM_ORDERS = ("ascending", "descending", "random")  # the order in which the blocks take turns
_GROUP = "method: badam"


@dataclass
class BAdamOptions:
    badam_switch_every: int = option(50, "steps before the next block trains (LLaMA-Factory's example: 50)",
                                     group=_GROUP)
    badam_order: str = option("ascending", "order of the blocks", choices=BADAM_ORDERS, group=_GROUP)
    badam_block_size: int = option(1, "decoder layers per block (LLaMA-Factory's layer mode: 1)", group=_GROUP)


@register
class BAdam(LayerSwitching):
    name = "badam"
    options = BAdamOptions

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        # Embedding, head and final norm stay frozen, as BAdam's default.
        return Trains(layers=tuple(range(min(config.badam_block_size, num_layers))), embedding=False, head=False,
                      final_norm=False)

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        for key in ("badam_switch_every", "badam_block_size"):
            value = getattr(config, key)
            if not isinstance(value, int) or value < 1:
                raise LoPTError(f"{key} must be an integer >= 1, got {value!r}")
        if config.badam_order not in BADAM_ORDERS:
            raise LoPTError(f"unknown badam_order {config.badam_order!r}: choose one of {', '.join(BADAM_ORDERS)}")

    @property
    def interval(self) -> int:
        return self.config.badam_switch_every

    def blocks(self, num_layers: int) -> list[list[int]]:
        size = self.config.badam_block_size
        return [list(range(s, min(s + size, num_layers))) for s in range(0, num_layers, size)]

    def active_block(self, step: int, num_blocks: int) -> int:
        """The index of the block that trains at optimizer step ``step``."""
        period = step // self.interval
        order = self.config.badam_order
        if order == "ascending":
            return period % num_blocks
        if order == "descending":
            return (num_blocks - 1 - period) % num_blocks
        rng = random.Random(f"lopt-badam/{self.config.seed}/{period // num_blocks}")
        return rng.sample(range(num_blocks), num_blocks)[period % num_blocks]

    def active_layers(self, step: int, num_layers: int) -> list[int]:
        blocks = self.blocks(num_layers)
        return blocks[self.active_block(step, len(blocks))]

    def setup(self, wrapped: Any) -> None:
        self._start = 0
        super().setup(wrapped)
        for i, layer in enumerate(self._layers(wrapped)):
            wrapped._hooks.append(layer.register_forward_pre_hook(self._below_hook(wrapped, i)))

    def on_switch(self, wrapped: Any, active: list[int]) -> None:
        self._start = active[0]

    def _below_hook(self, wrapped: Any, index: int):
        # The boundary below the active block: in a training forward (inside the wrapper's step scope,
        # which restores the grad mode on exit) the layers under it run without autograd.
        def hook(module, args):
            step = wrapped._step
            if step is None or not wrapped.training or self._start == 0:
                return
            if index == 0 and torch.is_grad_enabled():
                step["badam_below"] = True
                torch.set_grad_enabled(False)
            elif index == self._start and step.pop("badam_below", False):
                torch.set_grad_enabled(True)
        return hook

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"badam": {"switch_every": c.badam_switch_every, "order": c.badam_order,
                          "block_size": c.badam_block_size, "active_layers": getattr(self, "active", None)}}
