"""``lopt``: the paper's method. Gradient boundaries split the layers into blocks; the last block
learns from the task loss, every lower block only from its local loss (reconstruct the block's input
from its output, or stay close to the frozen pretrained block with ``local_objective="anchor"``)."""
from __future__ import annotations

from typing import Any

from lopt.engine.anatomy import split_blocks
from lopt.engine.config import LR_LOWER_RATIO
from lopt.methods.base import Method, Trains, register


@register
class LoPT(Method):
    name = "lopt"
    boundary = True
    local_loss = True
    lr_lower_ratio = LR_LOWER_RATIO

    @classmethod
    def check(cls, config: Any) -> None:
        pass  # every LoPT option applies

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        # The paper's pure local learning (--task-grad-every 0): what a closed step holds.
        blocks = tuple(split_blocks(num_layers, config.num_blocks, config.boundaries))
        return Trains(layers=tuple(range(num_layers)), blocks=blocks, local_heads=True,
                      label=f"lopt-k{len(blocks)}")

    def lr_lower(self, lr: float) -> float:
        # Under task_grad_every the lower blocks train at lr: at N x lr (N steps' worth of movement in
        # one) study v2 found them drifting further from the base than end-to-end's do, for no better
        # held-out loss (records/study-v2/RESULTS.md: lopt-tg4 against lopt-tg4-tied).
        return lr if self.config.task_grad_every else lr * self.lr_lower_ratio
