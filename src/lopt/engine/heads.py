"""Local heads: the small modules that give a lower block something to learn from.

A lower block never sees the task loss. Its only training signal is a local objective computed
from its own output; the head below is the paper's feature-reconstruction probe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReconstructionHead(nn.Module):
    """LayerNorm(H) -> Linear(H, H/4) -> GELU -> Linear(H/4, H).

    Maps a block's output back to the block's input. Linear weights start Xavier-uniform with
    gain 0.1 and zero bias, so at step 0 the head predicts almost nothing and the loss is
    roughly the input's energy: the block is not jolted by a random head.
    """

    def __init__(self, hidden_size: int, bottleneck: int | None = None):
        super().__init__()
        bottleneck = bottleneck or max(1, hidden_size // 4)
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        for lin in (self.down, self.up):
            nn.init.xavier_uniform_(lin.weight, gain=0.1)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(h))))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the real (non-padding) tokens, in fp32.

    `pred`/`target` are (B, T, H); `mask` is the (B, T) attention mask or None. Padding positions
    carry states that no task ever reads, so they would only add noise to a local objective.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, T)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)
