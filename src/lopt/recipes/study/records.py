"""The study's records: one JSON file per finished piece of work (a sweep point, a training run, an
evaluation, a curve point, the bench), written whole under a temporary name and renamed into place.

A piece is redone only when its record is missing or was made with other settings (its ``spec``), so
an interrupted study resumes where it stopped and a record is committed as soon as it exists.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, default=float))


def same_spec(a: Any, b: Any) -> bool:
    """Compare as JSON sees it: a tuple in a budget comes back from the file as a list."""
    return json.loads(json.dumps(a, default=float)) == json.loads(json.dumps(b, default=float))


class Records:
    """The folder of records: ``get(name, spec)`` returns a finished record made with ``spec``, else
    None; ``put(name, spec, record)`` stores one. ``name`` is a relative path without ``.json``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def get(self, name: str, spec: Any) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return rec if same_spec(rec.get("spec"), spec) else None

    def read(self, name: str) -> dict[str, Any] | None:
        """The record, whatever its spec (for the report)."""
        try:
            return json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None

    def put(self, name: str, spec: Any, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"spec": spec, **record}
        write_json(self.path(name), rec)
        return rec


def machine() -> dict[str, Any]:
    """The machine and versions a record was made on."""
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def load_average() -> float | None:
    """The 1-minute load average when a piece starts: a loaded machine makes its timings slower."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def timed_train(cfg: Any, run_dir: Path, keys: tuple[str, ...] = ("step", "loss", "aux_loss", "grad_norm")
                ) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    """Train one study run (``lopt.recipes.sft.train``): its wall seconds, its summary (without the data,
    output dir and eval, which the study records itself) and its logged steps (``keys`` of each)."""
    from lopt.recipes.sft import train  # the records stay importable without the training stack

    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    summary = {k: v for k, v in result.summary.items() if k not in ("data", "output_dir", "eval")}
    del result  # the model and optimizer: freed before the next run loads its own
    gc.collect()
    hist = Path(run_dir) / "metrics.jsonl"
    history = [json.loads(ln) for ln in hist.read_text().splitlines() if ln.strip()] if hist.is_file() else []
    return seconds, summary, [{k: h.get(k) for k in keys} for h in history if "loss" in h]


def cached_continuations(runs_dir: Path, base: Any, tokenizer: Any, budget: Any) -> list[tuple[list[int], list[int]]]:
    """The base model's greedy answers to lopt's general prompts (the text of retention KL and drift) at
    ``budget``'s prompts, tokens and batch, made once per ``runs_dir`` and read back from its cache."""
    cache = Path(runs_dir) / f"continuations-{budget.kl_prompts}x{budget.kl_new_tokens}.json"
    if cache.is_file():
        return [tuple(x) for x in json.loads(cache.read_text())]
    from lopt.eval.kl import base_continuations

    sequences = base_continuations(base, tokenizer, limit=budget.kl_prompts, max_new_tokens=budget.kl_new_tokens,
                                   batch_size=budget.eval_batch_size, progress=False)
    write_json(cache, sequences)
    return sequences
