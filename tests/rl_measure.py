"""Measuring one GRPO or DPO step (TRL's trainer, as ``lopt grpo``/``lopt dpo`` run it) for the planner's
tests: the bytes resident when the step starts (policy parameters, gradients, optimizer state, the
reference model) and the live tensor bytes above them during the step (``plan_measure.live_bytes``), or
``torch.cuda.max_memory_allocated`` on CUDA. The step measured is the last of ``max_steps`` (2: the
optimizer state exists already, as in a steady step)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from plan_measure import live_bytes, resident_bytes, state_tensors

QUESTIONS = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
             for a in range(1, 9) for b in range(1, 5)]  # single digits: every prompt the same length


def preference_rows(n: int = 16) -> list[dict[str, Any]]:
    """Plain-text pairs whose prompt, chosen and rejected have the same token counts in every row (no
    padding), so that the step is the planner's "every position a real token"."""
    return [{"prompt": f"Add {a} and {b}.", "chosen": f"The sum is {a + b % 2}.", "rejected": f"The sum is {b}."}
            for a, b in zip([1, 2, 3, 4, 5, 6, 7, 8] * 4, [2, 3, 4, 5, 6, 7, 8, 9] * 4)][:n]


class StepMeter(TrainerCallback):
    """Measures the last step: resident bytes at its start, the live peak above them."""

    def __init__(self, last_step: int, cuda: bool = False):
        self.last, self.cuda = last_step, cuda
        self.trainer: Any = None
        self.resident = self.live = 0
        self._cm = None
        self.calls: list[tuple[tuple[int, ...], bool, int]] = []  # (input shape, with grad, labelled per row)
        self._hook = None

    def _resident(self, model, optimizer) -> int:
        tensors = state_tensors(self.trainer.lopt_model, getattr(optimizer, "optimizer", optimizer))
        ref = getattr(self.trainer, "ref_model", None)
        if ref is not None:
            tensors += list(ref.parameters())
        return resident_bytes(tensors)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 != self.last:
            return
        self.resident = self._resident(model, optimizer)

        def record(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            labels = kwargs.get("labels")
            scored = int((labels[:, 1:] != -100).sum(1).max()) if labels is not None else 0
            if ids is not None:
                self.calls.append((tuple(ids.shape), torch.is_grad_enabled(), scored))

        self._hook = self.trainer.model.register_forward_pre_hook(record, with_kwargs=True)
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._cm = live_bytes()
            self._meter = self._cm.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.last:
            return
        self._hook.remove()
        if self.cuda:
            torch.cuda.synchronize()
            self.live = torch.cuda.max_memory_allocated() - self.base
        else:
            self._cm.__exit__(None, None, None)
            self.live = self._meter.peak

    def lengths(self) -> dict[str, int]:
        """The step's sizes as the plan takes them: the trained forward's rows and tokens, its completion
        (labelled) tokens per row, and (GRPO) the prompt tokens of generation's first call."""
        (rows, seq), _, scored = next(c for c in self.calls if c[1])
        return {"rows": rows, "seq": seq, "completion": scored, "prompt": seq - scored}

    @property
    def peak(self) -> int:
        return self.resident + self.live


def _capture(module: Any, meter: StepMeter, monkeypatch: Any) -> None:
    original = module.prepare_trainer

    def prepare(trainer, *a, **kw):
        meter.trainer = trainer
        return original(trainer, *a, **kw)

    monkeypatch.setattr(module, "prepare_trainer", prepare)


def measure_grpo(model_dir: Path | str, out: Path, monkeypatch: Any, *, method: str = "e2e", batch_size: int = 4,
                 num_generations: int = 4, completion: int = 16, beta: float = 0.04, cuda: bool = False,
                 **kw: Any) -> tuple[StepMeter, Any]:
    """One measured GRPO step (the second of two); returns the meter and the run's result."""
    from lopt.recipes import grpo as recipe
    from conftest import write_jsonl

    meter = StepMeter(2, cuda)
    _capture(recipe, meter, monkeypatch)
    data = write_jsonl(out.parent / f"{out.name}-qa.jsonl", QUESTIONS)
    opts = dict(model=str(model_dir), task=str(data), output_dir=str(out), batch_size=batch_size,
                num_generations=num_generations, max_completion_length=completion, max_steps=2, lr=1e-3,
                progress=False, beta=beta, method=method, reward=["format"], device="cuda" if cuda else "cpu")
    opts.update(kw)
    res = recipe.grpo(recipe.GRPORunConfig(**opts), callbacks=[meter])
    return meter, res


def measure_dpo(model_dir: Path | str, out: Path, monkeypatch: Any, *, method: str = "e2e", batch_size: int = 2,
                cuda: bool = False, **kw: Any) -> tuple[StepMeter, Any]:
    """One measured DPO step (the second of two)."""
    from lopt.recipes import dpo as recipe
    from conftest import write_jsonl

    meter = StepMeter(2, cuda)
    _capture(recipe, meter, monkeypatch)
    data = write_jsonl(out.parent / f"{out.name}-pairs.jsonl", preference_rows())
    opts = dict(model=str(model_dir), dataset=str(data), output_dir=str(out), batch_size=batch_size, max_steps=2,
                lr=1e-3, progress=False, method=method, device="cuda" if cuda else "cpu")
    opts.update(kw)
    res = recipe.dpo(recipe.DPORunConfig(**opts), callbacks=[meter])
    return meter, res
