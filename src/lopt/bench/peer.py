"""Peer rows for ``lopt bench``: another trainer on the same model, batches and step count.

``trl``: TRL's ``SFTTrainer`` with its own defaults (gradient checkpointing on, its fused LM head,
entropy and token-accuracy metrics, logging every 10 steps), except what the comparison pins: fp32
(``bf16=False``; TRL turns bf16 on by default), PyTorch's fused AdamW, the bench's learning rate,
batch size, maximum length and number of steps. ``trl-no-gc`` is the same with gradient
checkpointing off, the setting lopt's own rows use.

The batches are lopt's own (``lopt.bench.runner.bench_batches``), handed to TRL as a pre-tokenized
dataset (``input_ids`` and ``labels`` per row, in order, sampled sequentially), so TRL's collator
rebuilds the very same padded batches and the first-step loss must equal lopt's ``e2e`` row's. A
step's time runs from the end of one optimizer step to the end of the next: TRL's whole loop
(data loading, forward, backward, clipping, AdamW, schedule, logging), as its users get it.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

# name -> what the child runs: "peer" names the trainer, the rest are that trainer's config overrides.
PEER_CONFIGS: dict[str, dict[str, Any]] = {
    "trl": {"peer": "trl"},
    "trl-no-gc": {"peer": "trl", "gradient_checkpointing": False},
}
PEERS = {"trl": ["trl"]}  # --peer NAME adds these rows


def run_trl(spec: Any, model, tokenizer, batches: list[dict[str, torch.Tensor]], device: torch.device,
            rss_reset, rss_peak, current_rss) -> dict[str, Any]:
    """One ``SFTTrainer`` run of ``spec.warmup + spec.steps`` steps over ``batches`` (the last one
    only feeds the saved-activation measurement). Returns ``lopt.bench.runner.run_one``'s fields."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lopt.engine.memory import SavedTensorTracker

    n_steps = spec.warmup + spec.steps
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for b in batches[:n_steps]:
        for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            n = int(mask.sum())  # lopt pads on the right
            rows["input_ids"].append(ids[:n].tolist())
            rows["labels"].append(labels[:n].tolist())
    overrides = {k: v for k, v in spec.overrides.items() if k != "peer"}
    clock: dict[str, Any] = {"ends": [], "losses": [], "base": None, "reset": False}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            # The optimizer state does not exist yet (AdamW makes it at its first step), as in lopt's rows.
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                clock["base"] = torch.cuda.memory_allocated() / 2**20
            else:
                clock["base"] = current_rss()
                clock["reset"] = rss_reset()
            clock["ends"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock["ends"].append(time.perf_counter())

    class Trainer(SFTTrainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            clock["losses"].append(float(loss))
            return loss

    with tempfile.TemporaryDirectory(prefix="lopt-bench-trl-") as out:
        cfg = SFTConfig(output_dir=out, per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1,
                        max_steps=n_steps, learning_rate=1e-5, warmup_steps=0, max_length=spec.seq_len,
                        bf16=False, fp16=False, optim="adamw_torch_fused", train_sampling_strategy="sequential",
                        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                        seed=spec.seed, use_cpu=device.type == "cpu", **overrides)
        trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
                          callbacks=[Clock()])
        trainer.train()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_peak()
        saved = None
        if spec.measure_saved:
            last = batches[n_steps]
            inputs = trainer._prepare_inputs({k: last[k] for k in ("input_ids", "attention_mask", "labels")})
            model.train()
            with SavedTensorTracker(model.parameters()) as tr:
                trainer.training_step(model, inputs)
            saved = tr.peak_bytes
    steps = [b - a for a, b in zip(clock["ends"], clock["ends"][1:])]
    import trl

    return {"name": spec.name, "overrides": spec.overrides, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
            "step_times": steps[spec.warmup:], "first_loss": clock["losses"][0],
            "peak_step_mb": peak_mb - clock["base"] if clock["reset"] or device.type == "cuda" else None,
            "peak_total_mb": peak_mb, "base_mb": clock["base"],
            "saved_activation_mb": saved / 2**20 if saved is not None else None,
            "device": str(device), "trl_version": trl.__version__,
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
