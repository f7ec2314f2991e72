"""Task loss without the full logits tensor.

A causal LM's loss needs logits over the whole vocabulary for every token: for SmolLM2 (49k
vocabulary) at 4 x 256 tokens that is 200 MB in fp32, and autograd keeps several such copies
(logits, their fp32 cast, the softmax) alive until the backward. ``ChunkedCrossEntropy`` computes
the loss chunk by chunk *and its gradient in the same pass*: for each chunk of labelled tokens it
forms the logits, the loss, and the gradients with respect to the hidden states and the head weight,
then drops the logits. The backward only scales the stored gradients. Exact (same loss and
gradients as the plain computation) up to float summation order; prompt tokens, whose labels are
-100, never get logits at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_size: int, softcap: float | None):
        # hidden: (N, H) labelled positions only; labels: (N,)
        n = labels.numel()
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk_size):
            h = hidden[i:i + chunk_size]
            y = labels[i:i + chunk_size]
            raw = F.linear(h, weight, bias).float()
            logits = softcap * torch.tanh(raw / softcap) if softcap else raw
            logp = torch.log_softmax(logits, dim=-1)
            total -= logp.gather(1, y[:, None]).sum()
            # d(sum CE)/d logits = softmax - onehot
            g = logp.exp_()
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if softcap:
                g *= 1.0 - (logits / softcap) ** 2
            if need_h:
                grad_h[i:i + chunk_size] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            if need_w:  # in place: `grad_w += g.t() @ h` would form a second vocabulary-sized matrix
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.flags = (need_h, need_w, need_b)
        ctx.n = n
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.flags
        s = grad_out / max(ctx.n, 1)
        # Scaled in place: these buffers are used once, and a copy of the head's gradient would be
        # one more vocabulary-sized tensor at the end of the step.
        return (grad_h.mul_(s.to(grad_h.dtype)) if need_h else None,
                grad_w.mul_(s).to(ctx.weight_dtype) if need_w else None,
                grad_b.mul_(s).to(ctx.bias_dtype) if need_b else None,
                None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_size: int = 1024,
                          softcap: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``.

    ``hidden`` is (B, T, H) — the final normed hidden states — and ``labels`` (B, T) with -100 for
    ignored tokens, unshifted (as for a transformers causal LM). Returns the mean over labelled
    tokens, exactly as ``F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)``.
    """
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = (y != -100).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if y.numel() == 0:  # same as F.cross_entropy on nothing: nan, but keep the graph connected
        return (hidden.sum() * 0.0) / 0.0
    return _ChunkedCE.apply(h, weight, bias, y, chunk_size, softcap)

