"""``freeze-lower``: the boundary without a local loss. Everything below the last boundary (lower
layers and input embeddings) is frozen; the last block, final norm and LM head train on the task.
The cheapest baseline LoPT has to beat. With ``tied_head`` the input embedding is the LM head, so it
trains with the head (from the task loss only)."""
from __future__ import annotations

from typing import Any

from lopt.engine.anatomy import split_blocks
from lopt.methods.base import Method, Trains, register


@register
class FreezeLower(Method):
    name = "freeze-lower"
    boundary = True

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        blocks = tuple(split_blocks(num_layers, config.num_blocks, config.boundaries))
        return Trains(layers=tuple(range(blocks[-1][0], num_layers)), embedding=False, blocks=blocks)

    def setup(self, wrapped: Any) -> None:
        for p in wrapped.lower_parameters():
            p.requires_grad_(False)
