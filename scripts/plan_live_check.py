"""Predicted vs measured live tensor bytes of a steady training step, without the allocator.

    python scripts/plan_live_check.py --model /tmp/lopt-plan-models/llama-20m --configs e2e lopt-k2 freeze-lower lora

CPU peak RSS also holds what glibc keeps after a free and what a process sets up on its first step.
This check counts tensors instead: one warm-up step (AdamW state now exists), then one step under
``torch.profiler`` with memory profiling; the peak of (bytes allocated - bytes freed) over that step
is what CUDA's ``max_memory_allocated`` would report above the step's start. ``lopt.bench.plan``
predicts it as ``step_peak - optimizer`` (the state is already resident at the start).
"""
from __future__ import annotations

import argparse
import sys


def live_peak_mb(model_dir: str, name: str, batch: int, seq: int) -> float:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline  # private, torch 2.1+

    from lopt.bench import CONFIGS
    from lopt.boundary import wrap
    from lopt.models import load_model
    from lopt.train import Stepper, TrainConfig

    cfg = TrainConfig(model=model_dir, batch_size=batch, max_length=seq, max_steps=4, lr=1e-5, warmup_ratio=0.0,
                      progress=False, **CONFIGS[name])
    model, _ = load_model(model_dir, device="cpu")
    wrapped = wrap(model, config=cfg.lopt_config())
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()
    stepper = Stepper(wrapped, cfg, torch.device("cpu"), 4)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)

    def batch_():
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    stepper.step([batch_()])
    b = batch_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        stepper.step([b])
    live = peak = 0
    for _, action, (key, _), size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        if key.device.type == "cpu" and action in (Action.CREATE, Action.DESTROY):
            live += size if action == Action.CREATE else -size
            peak = max(peak, live)
    return peak / 2**20


def main(argv: list[str] | None = None) -> int:
    import subprocess

    from lopt.bench import CONFIGS
    from lopt.bench.plan import plan

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--configs", nargs="+", default=["e2e", "lopt-k2", "freeze-lower", "lora"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        print(f"LIVE {live_peak_mb(ns.model, ns.worker, ns.batch_size, ns.seq_len)}")
        return 0
    print("| config | live step peak MiB pred / meas | x |\n|---|---|---|")
    for name in ns.configs:
        over = CONFIGS[name]
        out = subprocess.run([sys.executable, __file__, "--model", ns.model, "--worker", name, "--batch-size",
                              str(ns.batch_size), "--seq-len", str(ns.seq_len)], capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("LIVE ")]
        if not lines:
            print(f"| {name} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1]} | |")
            continue
        meas = float(lines[0][5:])
        row = plan(ns.model, batch_size=ns.batch_size, max_length=ns.seq_len, precision="fp32",
                   methods=[{"e2e+gc": "e2e", "e2e+sel": "e2e", "lopt-k2+gc-last": "lopt-k2"}.get(name, name)],
                   num_blocks=over.get("num_blocks", 2),
                   gradient_checkpointing=over.get("gradient_checkpointing", "off"),
                   selective_checkpointing=over.get("selective_checkpointing", "off"))[0]
        pred = (row.step_peak - row.optimizer) / 2**20
        print(f"| {name} | {pred:.1f} / {meas:.1f} | {pred / meas:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
