"""``lopt``: the paper's method. Gradient boundaries split the layers into blocks; the last block
learns from the task loss, every lower block only from its local loss (reconstruct the block's input
from its output, or stay close to the frozen pretrained block with ``local_objective="anchor"``)."""
from __future__ import annotations

from lopt.engine.config import LR_LOWER_RATIO, LoPTConfig
from lopt.methods.base import Method, register


@register
class LoPT(Method):
    name = "lopt"
    boundary = True
    local_loss = True
    lr_lower_ratio = LR_LOWER_RATIO

    @classmethod
    def check(cls, config: LoPTConfig) -> None:
        pass  # every LoPT option applies

    def lr_lower(self, lr: float) -> float:
        # Under task_grad_every N the lower blocks see a task gradient once every N steps: at N x lr
        # they move about as far over N steps as end-to-end's lower half does (docs/issue15-results.md).
        n = self.config.task_grad_every
        return lr * n if n else lr * self.lr_lower_ratio
