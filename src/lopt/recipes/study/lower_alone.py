"""Train the lower half alone on LoPT's reconstruction loss and trace how far it moves.

Under LoPT (no ``--task-grad-every``) the lower half never sees the task: its update depends only
on its own weights, the local head and the data. So its whole trajectory can be reproduced without
the upper half, at half the cost, and independently of ``lopt.engine`` (no hooks, no wrapper, no
per-block optimizer step): the decoder is cut at the boundary and trained directly. If this script
moves the boundary representation as far as a full ``lopt train`` run did, the drift comes from
the objective, not from a fault in the engine.

    python -m lopt.recipes.study.lower_alone --name default --lr-lower 1e-5 --lr-head 1e-5

Records go to ``records/study-v2/results/lower-alone/NAME.json``: every ``--every`` steps the local
loss, the mean cosine of the boundary hidden state to the base model's on held-out GSM8K questions,
and the relative change of the lower half's weights.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lopt.data import Batches, build_sft_dataset, collate
from lopt.engine.heads import ReconstructionHead, masked_mse
from lopt.eval.tasks import resolve_data
from lopt.models import load_model
from lopt.recipes.study.records import write_json
from lopt.runtime.loop import cosine_with_warmup

def cut_at(model: nn.Module, boundary: int) -> nn.Module:
    """The decoder stack of ``model`` keeping layers [0, boundary) and no final norm: its
    ``last_hidden_state`` is the hidden state the upper half would receive."""
    stack = copy.deepcopy(model.model)
    stack.layers = nn.ModuleList(list(stack.layers)[:boundary])
    stack.norm = nn.Identity()
    return stack


def _forward(stack: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding output = the block's input, boundary hidden state)."""
    out = stack(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=True)
    return out.hidden_states[0], out.last_hidden_state


@torch.no_grad()
def boundary_cosine(stack: nn.Module, base: nn.Module, probe: list[dict[str, torch.Tensor]]) -> float:
    """Mean cosine of matching boundary token vectors, tuned vs base, over the probe's real tokens."""
    total, count = 0.0, 0
    for b in probe:
        real = b["attention_mask"].bool()
        h = _forward(stack, b)[1][real]
        hb = _forward(base, b)[1][real]
        total += float(F.cosine_similarity(h, hb, dim=-1).sum())
        count += int(real.sum())
    return total / count


@torch.no_grad()
def relative_change(stack: nn.Module, base: nn.Module) -> float:
    """||W - W0|| / ||W0|| over all the lower half's weights."""
    num = sum(float((p - q).pow(2).sum()) for p, q in zip(stack.parameters(), base.parameters()))
    den = sum(float(q.pow(2).sum()) for q in base.parameters())
    return math.sqrt(num / den)


def train_lower(stack: nn.Module, head: nn.Module, batches: Iterator[dict[str, torch.Tensor]], steps: int, *,
                lr_lower: float, lr_head: float, total_steps: int, warmup_steps: int, lambda_aux: float = 10.0,
                max_grad_norm: float | None = 1.0,
                on_step: Callable[[int, float], None] | None = None) -> None:
    """``steps`` optimizer steps of the cut stack and its head on ``lambda_aux`` x the reconstruction
    loss: what ``lopt train --method lopt`` does to the lower half (AdamW, no weight decay, one clip
    over the block and its head, cosine schedule with warmup), written out without the engine.
    ``on_step(step, loss)`` is called after each step."""
    opt = torch.optim.AdamW([{"params": list(stack.parameters()), "lr": lr_lower},
                             {"params": list(head.parameters()), "lr": lr_head}],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps, warmup_steps))
    params = list(stack.parameters()) + list(head.parameters())
    for step in range(1, steps + 1):
        b = next(batches)
        x, h = _forward(stack, b)
        loss = masked_mse(head(h.float()), x.detach(), b["attention_mask"])
        (loss * lambda_aux).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, loss.item())


def run(name: str, lr_lower: float, lr_head: float, steps: int, total_steps: int = 256, batch_size: int = 4,
        max_length: int = 384, rows: int = 1024, warmup_ratio: float = 0.05, every: int = 16,
        probe_rows: int = 16, seed: int = 0,
        out_dir: Path = Path("records/study-v2/results/lower-alone")) -> dict[str, Any]:
    """The study's first ``steps`` steps of the lower half (same data, order and schedule as
    ``lopt train`` in the study), traced every ``every`` steps; writes ``out_dir/NAME.json``."""
    torch.manual_seed(seed)
    model, tok = load_model(None, device="cpu")
    boundary = model.config.num_hidden_layers // 2
    stack, base = cut_at(model, boundary), cut_at(model, boundary)
    del model
    base.requires_grad_(False).eval()
    stack.train()
    head = ReconstructionHead(stack.config.hidden_size)
    gsm8k = resolve_data("gsm8k", None).parent  # DIR/gsm8k of $LOPT_DATA_DIR, as the study reads it
    examples, _ = build_sft_dataset(str(gsm8k / "train.jsonl"), tok, max_length=max_length, limit=rows)
    held_out, _ = build_sft_dataset(str(gsm8k / "test.jsonl"), tok, max_length=max_length, limit=probe_rows)
    probe = [collate(held_out[i:i + 8], tok.pad_token_id) for i in range(0, len(held_out), 8)]
    trace = [{"step": 0, "loss": None, "cos": boundary_cosine(stack, base, probe), "rel_change": 0.0}]
    losses: list[float] = []
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step % every and step != steps:
            return
        stack.eval()
        row = {"step": step, "loss": sum(losses) / len(losses), "cos": boundary_cosine(stack, base, probe),
               "rel_change": relative_change(stack, base)}
        stack.train()
        trace.append(row)
        losses.clear()
        print(f"{name}: step {step} loss {row['loss']:.5f} boundary cos {row['cos']:.4f} "
              f"weights moved {row['rel_change']:.4%} ({time.time() - t0:.0f} s)", flush=True)

    train_lower(stack, head, iter(Batches(examples, batch_size, tok.pad_token_id, seed=seed)), steps,
                lr_lower=lr_lower, lr_head=lr_head, total_steps=total_steps,
                warmup_steps=int(warmup_ratio * total_steps), on_step=on_step)
    record = {"name": name, "lr_lower": lr_lower, "lr_head": lr_head, "lambda_aux": 10.0, "steps": steps,
              "total_steps": total_steps, "batch_size": batch_size, "max_length": max_length, "boundary": boundary,
              "seconds": time.time() - t0,
              "command": f"python -m lopt.recipes.study.lower_alone --name {name} --lr-lower {lr_lower:g} "
                         f"--lr-head {lr_head:g} --steps {steps} --every {every}",
              "trace": trace}
    write_json(out_dir / f"{name}.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--lr-lower", type=float, required=True)
    p.add_argument("--lr-head", type=float, required=True)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--every", type=int, default=16)
    a = p.parse_args(argv)
    run(a.name, a.lr_lower, a.lr_head, a.steps, every=a.every)


if __name__ == "__main__":
    main()
