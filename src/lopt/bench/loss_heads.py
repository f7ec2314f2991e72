"""The task-loss head alone, timed: lopt's chunked cross-entropy, the plain full-logits loss, and
TRL's fused LM head as ``SFTTrainer`` calls it (log-probabilities, entropy and top-1 for its metrics).

    python -m lopt.bench.loss_heads --dataset gsm8k --batch-size 4 --seq-len 256

The batches are ``lopt bench``'s (``bench_batches``: the real padding and prompt masks of the
dataset); the hidden states are random and the head is the model's (shapes are all that matter for
the time). Each variant runs forward + backward (gradients of the hidden states and of the head)
``--repeats`` times after one warm-up; the median is reported, with the number of token positions
each variant projects through the vocabulary-sized head.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lopt.engine.loss import causal_lm_loss, chunked_cross_entropy


def _lopt_chunked(h, w, labels):
    return chunked_cross_entropy(h, w, labels), int((labels[:, 1:] != -100).sum())


def _full_logits(h, w, labels):
    return causal_lm_loss(F.linear(h, w), labels), h.shape[0] * h.shape[1]


def _trl_fused(h, w, labels):
    # What trl's add_fused_lm_head does for SFTTrainer (outputs log_probs, entropy, is_top1): on a
    # device without Triton every position is projected, the ignored ones are masked afterwards.
    from trl.kernels.chunked_logprob import _use_triton
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    hs, y = h[:, :-1], labels[:, 1:]
    mask = y != -100
    compact = _use_triton(h.device)
    hh = hs[mask] if compact else hs.reshape(-1, hs.size(-1))
    yy = y[mask] if compact else y.clamp(min=0).reshape(-1)
    logp, entropy, _, _, top1 = ChunkedLogProbFunction.apply(
        hh, w, None, yy, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy", "is_top1"))
    if not compact:
        logp = logp.view(mask.shape).masked_fill(~mask, 0)
    loss = -logp.sum() / mask.sum().clamp(min=1)
    # SFTTrainer logs these every step (one host sync each)
    float(entropy.detach().sum()), float(top1.sum())
    return loss, hh.shape[0]


VARIANTS: dict[str, Callable[..., Any]] = {"lopt-chunked": _lopt_chunked, "full-logits": _full_logits,
                                           "trl-fused": _trl_fused}


def time_heads(batches: list[dict[str, torch.Tensor]], weight: torch.Tensor, variants: list[str],
               repeats: int = 3) -> list[dict[str, Any]]:
    """Median forward+backward time of each variant over ``batches``, the variants interleaved
    (one untimed pass of each first), so that machine drift hits them alike."""
    hidden_size = weight.shape[1]
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(*b["labels"].shape, hidden_size, generator=g) for b in batches]
    times: dict[str, list[float]] = {v: [] for v in variants}
    projected: dict[str, int] = {}
    for r in range(repeats + 1):
        for name in variants:
            t0 = time.perf_counter()
            n_proj = 0
            for h0, b in zip(hs, batches):
                h = h0.clone().requires_grad_()
                w = weight.detach().clone().requires_grad_()
                loss, n = VARIANTS[name](h, w, b["labels"])
                loss.backward()
                n_proj += n
            if r:
                times[name].append(time.perf_counter() - t0)
            projected[name] = n_proj
    return [{"variant": v, "seconds_per_batch": statistics.median(times[v]) / len(batches),
             "min_s": min(times[v]) / len(batches), "max_s": max(times[v]) / len(batches),
             "projected_positions_per_batch": projected[v] / len(batches)} for v in variants]


def main(argv: list[str] | None = None) -> int:
    from lopt.bench.runner import BenchSpec, bench_batches
    from lopt.models import load_model

    p = argparse.ArgumentParser(prog="python -m lopt.bench.loss_heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None, help="as lopt bench --dataset (default: random tokens)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    model, tok = load_model(ns.model, device="cpu")
    spec = BenchSpec(name="heads", overrides={}, model=ns.model, batch_size=ns.batch_size, seq_len=ns.seq_len,
                     warmup=0, steps=ns.batches - 1, dataset=ns.dataset)
    batches = bench_batches(spec, tok, model.get_input_embeddings().weight.shape[0])[:ns.batches]
    weight = model.get_output_embeddings().weight
    real = statistics.fmean(int(b["attention_mask"].sum()) for b in batches)
    labelled = statistics.fmean(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    padded = statistics.fmean(b["labels"].numel() for b in batches)
    rows = time_heads(batches, weight, ns.variants, ns.repeats)
    print(f"{ns.dataset or 'random tokens'}: {padded:.0f} padded positions per batch, {real:.0f} real tokens, "
          f"{labelled:.0f} labelled; head {tuple(weight.shape)}; {torch.get_num_threads()} threads")
    print("| variant | s per batch, fwd+bwd (min-max) | positions projected |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds_per_batch']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
              f"{r['projected_positions_per_batch']:.0f} |")
    if ns.json:
        from pathlib import Path

        Path(ns.json).write_text(json.dumps({"rows": rows, "real_tokens": real, "labelled": labelled,
                                             "positions": padded}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
