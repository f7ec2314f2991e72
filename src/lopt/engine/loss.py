"""Task loss without the full logits tensor.

A causal LM's loss needs logits over the whole vocabulary for every token: for SmolLM2 (49k
vocabulary) at 4 x 256 tokens that is 200 MB in fp32, and autograd keeps several such copies
(logits, their fp32 cast, the softmax) alive until the backward. ``ChunkedCrossEntropy`` computes
the loss chunk by chunk *and its gradient in the same pass*: for each chunk of labelled tokens it
forms the logits, the loss, and the gradients with respect to the hidden states and the head weight,
then drops the logits. The backward only scales the stored gradients. Exact (same loss and
gradients as the plain computation) up to float summation order; prompt tokens, whose labels are
-100, never get logits at all. A 16-bit head (bf16/fp16) is never copied: each chunk's fp32 logit
gradient is cast to the head's dtype for both products, and the head's gradient is summed over the
chunks in the head's dtype (as a one-matmul 16-bit loss would keep it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_size: int, softcap: float | None, grad_scale: float | None):
        # hidden: (N, H) labelled positions only; labels: (N,)
        n = labels.numel()
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        # Straight into weight.grad (see chunked_cross_entropy's grad_scale), when there is one to add to.
        direct = (need_w and grad_scale is not None and weight.grad is not None
                  and weight.grad.dtype == torch.float32 and type(weight.grad) is torch.Tensor)
        ctx.direct = grad_scale if direct else None
        # A 16-bit head: products in its dtype, so that neither a copy of the head nor an fp32 gradient
        # of its size (vocabulary x hidden, GiBs for a large model) is ever allocated.
        low = weight.dtype in (torch.bfloat16, torch.float16)
        grad_h = torch.empty_like(hidden) if need_h else None
        if direct:
            grad_w, w_alpha = weight.grad, grad_scale / max(n, 1)
        else:
            acc = weight.dtype if low else torch.float32
            grad_w, w_alpha = (torch.zeros_like(weight, dtype=acc) if need_w else None), 1.0
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk_size):
            h = hidden[i:i + chunk_size]
            y = labels[i:i + chunk_size]
            rows = torch.arange(len(y), device=h.device)
            # One vocabulary-wide buffer per chunk (two with a softcap), worked on in place: the
            # logits become exp(logits - max), then the softmax, then d(sum CE)/d logits.
            logits = F.linear(h, weight, bias).float()
            if softcap:
                logits.div_(softcap).tanh_()
                dcap = 1.0 - logits.square()  # d softcap(x) / dx, in terms of the capped value
                logits.mul_(softcap)
            target = logits[rows, y]
            top = logits.amax(1, keepdim=True)
            g = logits.sub_(top).exp_()
            z = g.sum(1, keepdim=True)
            total += (z.log() + top).squeeze(1).sub_(target).sum()
            g.div_(z)
            g[rows, y] -= 1.0
            if softcap:
                g.mul_(dcap)
            if low and not direct:
                # Autocast off: it would cast a weight of the other 16-bit dtype (a head-sized copy).
                with torch.autocast(h.device.type, enabled=False):
                    g16 = g.to(weight.dtype)
                    if need_h:
                        grad_h[i:i + chunk_size] = g16 @ weight
                    if need_w:
                        grad_w.addmm_(g16.t(), h.to(weight.dtype), alpha=w_alpha)
                del g16
            else:
                if need_h:
                    grad_h[i:i + chunk_size] = (g @ weight.to(g.dtype)).to(hidden.dtype)
                if need_w:  # in place: `grad_w += g.t() @ h` would form a second vocabulary-sized matrix
                    grad_w.addmm_(g.t(), h.float(), alpha=w_alpha)
            if need_b:
                grad_b += g.sum(0)
            del logits, g  # freed before the next chunk's logits exist: one chunk's buffers at a time
            if softcap:
                del dcap
        if direct:
            grad_w = None
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.flags = (need_h, need_w and not direct, need_b)
        ctx.n = n
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.flags
        if ctx.direct is not None and not torch.allclose(grad_out.float(), torch.tensor(ctx.direct, device=grad_out.device),
                                                         rtol=1e-5, atol=0.0):
            raise RuntimeError(f"chunked_cross_entropy: the head's gradient was added to weight.grad in the forward "
                               f"for a backward of scale {ctx.direct}, but the backward brought "
                               f"{float(grad_out)}: pass the scale the loss is multiplied by, or grad_scale=None")
        s = grad_out / max(ctx.n, 1)
        # Scaled in place: these buffers are used once, and a copy of the head's gradient would be
        # one more vocabulary-sized tensor at the end of the step.
        return (grad_h.mul_(s.to(grad_h.dtype)) if need_h else None,
                grad_w.mul_(s).to(ctx.weight_dtype) if need_w else None,
                grad_b.mul_(s).to(ctx.bias_dtype) if need_b else None,
                None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_size: int = 1024,
                          softcap: float | None = None, grad_scale: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``.

    ``hidden`` is (B, T, H) — the final normed hidden states — and ``labels`` (B, T) with -100 for
    ignored tokens, unshifted (as for a transformers causal LM). Returns the mean over labelled
    tokens, exactly as ``F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)``.

    ``grad_scale``: for gradient accumulation. When the caller knows the factor the returned loss
    will be multiplied by before ``backward()`` and ``weight.grad`` already holds earlier
    micro-batches' gradient, the head's gradient is added to ``weight.grad`` during the forward,
    not kept in a second vocabulary-sized buffer until the backward; the backward checks the factor
    and raises if it differs.
    """
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = (y != -100).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if y.numel() == 0:  # same as F.cross_entropy on nothing: nan, but keep the graph connected
        return (hidden.sum() * 0.0) / 0.0
    return _ChunkedCE.apply(h, weight, bias, y, chunk_size, softcap, grad_scale)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, fp32, mean over labelled tokens (-100 is ignored)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=-100)
