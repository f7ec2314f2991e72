"""Local heads: the small modules that give a lower block something to learn from.

A lower block never sees the task loss. Its only training signal is a local objective computed
from its own output; the head below is the paper's feature-reconstruction probe.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lopt.engine.loss import chunked_cross_entropy


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


# ---- the candidates of issue 29 (--local-objective): each is the paper's head or a frozen reference
# plus a few lines of loss. The paper's `recon` above stays exactly as it was.

def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the (B, T) ``values`` over the real tokens of ``mask`` (all of them when None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def batch_moments(t: torch.Tensor, mask: torch.Tensor | None, eps: float = 1e-6
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation (each (H,), fp32, detached) of the (B, T, H) ``t``
    over the real tokens of ``mask``: the statistics ``recon-std`` standardises with."""
    t = t.detach().float()
    w = torch.ones(t.shape[:2], dtype=t.dtype, device=t.device) if mask is None else mask.to(t.dtype)
    n = w.sum().clamp_min(1.0)
    mean = (t * w[..., None]).sum((0, 1)) / n
    var = ((t - mean).pow(2) * w[..., None]).sum((0, 1)) / n
    return mean, (var + eps).sqrt()


def standardised_recon_loss(head: nn.Module, h: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None
                            ) -> torch.Tensor:
    """``recon-std``: the head reads the block output and predicts the block input, both standardised
    per dimension with the batch's own statistics (real tokens only, no gradient through them).

    Why: at the boundary of a pretrained LM a few dimensions carry massive activations (SmolLM2-135M:
    one at RMS ~1,760 against ~5 for the rest). In ``recon`` they dominate the head's LayerNorm, so the
    cheapest way to a better reconstruction is to shrink them; standardised, every dimension counts
    alike on both sides. Batch statistics rather than running ones: no state to save or resume."""
    mh, sh = batch_moments(h, mask)
    mx, sx = batch_moments(x, mask)
    pred = head((h.float() - mh) / sh)
    return masked_mse(pred, (x.detach().float() - mx) / sx, mask)


def relative_anchor_loss(h: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The anchor term of ``recon+anchor``: the MSE of ``h`` to the base model's state ``ref``, divided
    by ``ref``'s mean energy (so 1.0 means an error as large as the state itself, whatever the model's
    scale). Like any MSE it is dominated by the massive first-token activations."""
    ref = ref.detach().float()
    return masked_mse(h, ref, mask) / masked_mean(ref.pow(2).mean(-1), mask).clamp_min(1e-12)


def shape_loss(h: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The anchor term of ``recon+cos``: per token, ``1 - cos(h, ref) + log(|h| / |ref|)^2``, averaged
    over the real tokens. Scale-free per token, so the ~150-norm ordinary tokens (whose rotation and
    growth is the drift that the statistics of issue 29 found) count as much as the ~24,000-norm first
    token, which dominates any MSE."""
    h, ref = h.float(), ref.detach().float()
    cos = F.cosine_similarity(h, ref, dim=-1, eps=1e-8)
    log_ratio = torch.log(h.norm(dim=-1).clamp_min(1e-12)) - torch.log(ref.norm(dim=-1).clamp_min(1e-12))
    return masked_mean(1.0 - cos + log_ratio.pow(2), mask)


def final_norm_of(model: nn.Module) -> nn.Module | None:
    """The final norm that the LM head reads after the decoder stack (``model.norm`` of Llama-like
    stacks, ``ln_f`` of GPT-2-like ones); None when there is no such module."""
    decoder = getattr(model, "base_model", None)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        m = getattr(decoder, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


class EarlyExitHead(nn.Module):
    """``early-exit``: the model's final norm and LM head, copied and frozen when the model is wrapped.

    The lower block's output goes through them and is scored by next-token cross-entropy on the
    forward's labels: the classic local-learning signal (predict the output from an intermediate
    layer). A frozen *copy*, because under LoPT the upper block trains the real head and norm: a view
    of those would make the target move with the upper block. Costs vocab x hidden weights once more
    (no gradient, no optimizer state; 28M floats for SmolLM2-135M) and, per step, one pass of the
    boundary states through the head, chunked so that the full logits are never formed."""

    def __init__(self, norm: nn.Module, head: nn.Linear, softcap: float | None = None, chunk_size: int = 1024):
        super().__init__()
        self.norm = copy.deepcopy(norm)
        self.head = copy.deepcopy(head)
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.requires_grad_(False)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        z = self.norm(h.to(w.dtype))
        return chunked_cross_entropy(z, w, labels, self.head.bias, self.chunk_size, self.softcap)
