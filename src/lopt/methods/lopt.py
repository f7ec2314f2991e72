"""``lopt``: the paper's method. Gradient boundaries split the layers into blocks; the last block
learns from the task loss, every lower block only from its local loss (reconstruct the block's input
from its output, or stay close to the frozen pretrained block with ``local_objective="anchor"``)."""
from __future__ import annotations

from lopt.engine.config import LR_LOWER_RATIO
from lopt.methods.base import Method, register


@register
class LoPT(Method):
    name = "lopt"
    boundary = True
    local_loss = True
    lr_lower_ratio = LR_LOWER_RATIO
