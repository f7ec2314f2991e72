"""``lopt bench``: training configurations side by side, each in a fresh process.

For every configuration (method x gradient checkpointing x batch size x memory tricks) a child
process loads the model, runs warm-up steps and timed steps of the real training step (``Stepper``:
forward, backward, AdamW, schedule), then one extra step under ``SavedTensorTracker`` to measure the
autograd-saved activation bytes. Configurations are interleaved over repeats so that machine drift
hits them all alike; the table reports medians with min and max, and ratios to the first
configuration (by default end-to-end without checkpointing).

On CPU, memory and time are measured in different processes. The first process of each configuration
measures memory, with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``: otherwise glibc keeps
freed activation-sized blocks in its heap and the resident size overstates live memory). That setting
maps and zero-fills every large block afresh, which on this project's CPU made a step up to twice as
slow, so the step times come from the other ``repeats - 1`` processes, which run with glibc's defaults
as users' training does; with ``repeats == 1`` the memory process's times are reported, and the table
says they are slowed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lopt.bench.peer import PEER_CONFIGS, PEERS
from lopt.jsonout import MIB, json_help, write_json
from lopt.methods import wrap
from lopt.engine.config import LoPTError, engine_defaults
from lopt.engine.memory import SavedTensorTracker, current_rss_mb, peak_rss_mb
from lopt.models import load_model
from lopt.config import TrainConfig
from lopt.runtime.loop import Stepper, resolve_device, set_seed
from lopt.runtime.precision import apply_precision

# name -> TrainConfig overrides. The memory tricks (blockwise, chunked CE, per-block step) are on by
# default; the "-no-*" variants switch one off for the comparison.
CONFIGS: dict[str, dict[str, Any]] = {
    "e2e": {"method": "e2e"},
    "e2e+gc": {"method": "e2e", "gradient_checkpointing": "all"},
    "e2e+sel": {"method": "e2e", "selective_checkpointing": "all"},
    # lopt train's default under --method lopt (the boundary opens every 4th step, a tied head stays tied)
    "lopt-default": {"method": "lopt", "num_blocks": 2, "task_grad_every": 4, "tied_head": None},
    "lopt-k2": {"method": "lopt", "num_blocks": 2},
    "lopt-k2+gc-last": {"method": "lopt", "num_blocks": 2, "gradient_checkpointing": "last-block"},
    "lopt-k2+gc": {"method": "lopt", "num_blocks": 2, "gradient_checkpointing": "all"},
    "lopt-k2+sel-last": {"method": "lopt", "num_blocks": 2, "selective_checkpointing": "last-block"},
    "lopt-k4": {"method": "lopt", "num_blocks": 4},
    "lopt-k4+gc-last": {"method": "lopt", "num_blocks": 4, "gradient_checkpointing": "last-block"},
    "lopt-k2-joint": {"method": "lopt", "num_blocks": 2, "schedule": "joint"},
    "lopt-k2-no-block-step": {"method": "lopt", "num_blocks": 2, "per_block_step": "off"},
    "lopt-k2-full-logits": {"method": "lopt", "num_blocks": 2, "chunked_ce": False},
    "e2e-full-logits": {"method": "e2e", "chunked_ce": False},
    "lopt-k2-anchor": {"method": "lopt", "num_blocks": 2, "local_objective": "anchor"},
    "lopt-k2-every4": {"method": "lopt", "num_blocks": 2, "lower_every": 4},
    # the task gradient reaches the lower half every 4th step (lambda_aux 0 by default)
    "lopt-k2-tg4": {"method": "lopt", "num_blocks": 2, "task_grad_every": 4},
    # the LM head kept tied to the input embedding across the boundary: no head copy, gradient or state
    "lopt-k2+tied": {"method": "lopt", "num_blocks": 2, "tied_head": True},
    "lopt-k2-tg4+tied": {"method": "lopt", "num_blocks": 2, "task_grad_every": 4, "tied_head": True},
    "freeze-lower+tied": {"method": "freeze-lower", "tied_head": True},
    "freeze-lower": {"method": "freeze-lower"},
    "lora": {"method": "lora"},
    "lisa": {"method": "lisa"},  # LMFlow's defaults: 1 random layer (+ embeddings, norm, head) for 20 steps
    "badam": {"method": "badam"},  # LLaMA-Factory's example: one layer at a time, ascending, 50 steps each
    # Optimizer-side memory: the last block's step inside the backward, 8-bit AdamW states (bitsandbytes).
    "e2e+oib": {"method": "e2e", "optimizer_in_backward": True},
    "e2e+gc+oib": {"method": "e2e", "gradient_checkpointing": "all", "optimizer_in_backward": True},
    "lopt-k2+sel": {"method": "lopt", "num_blocks": 2, "selective_checkpointing": "all"},
    "lopt-k2+sel+oib": {"method": "lopt", "num_blocks": 2, "selective_checkpointing": "all",
                        "optimizer_in_backward": True},
    "lopt-k2+gc+oib": {"method": "lopt", "num_blocks": 2, "gradient_checkpointing": "all",
                       "optimizer_in_backward": True},
    "lopt-k2+oib": {"method": "lopt", "num_blocks": 2, "optimizer_in_backward": True},
    "lopt-k4+oib": {"method": "lopt", "num_blocks": 4, "optimizer_in_backward": True},
    "e2e+8bit": {"method": "e2e", "optimizer": "adamw-8bit"},
    "lopt-k2+8bit": {"method": "lopt", "num_blocks": 2, "optimizer": "adamw-8bit"},
    "lopt-k2+oib+8bit": {"method": "lopt", "num_blocks": 2, "optimizer_in_backward": True,
                         "optimizer": "adamw-8bit"},
    "e2e+paged8bit": {"method": "e2e", "optimizer": "paged-adamw-8bit"},  # CUDA only
    # --precision (lopt.runtime.precision): bf16-mixed keeps fp32 masters of what trains under bf16 autocast and
    # stores frozen weights in bf16; bf16-true keeps everything in bf16 (stochastically rounded update by default).
    "e2e+bf16": {"method": "e2e", "precision": "bf16-mixed"},
    "e2e+bf16-true": {"method": "e2e", "precision": "bf16-true"},
    "e2e+bf16-true-kahan": {"method": "e2e", "precision": "bf16-true", "bf16_update": "kahan"},
    "e2e+bf16-true-plain": {"method": "e2e", "precision": "bf16-true", "bf16_update": "plain"},
    "e2e+bf16-true+oib": {"method": "e2e", "precision": "bf16-true", "optimizer_in_backward": True},
    "e2e+bf16-true+8bit": {"method": "e2e", "precision": "bf16-true", "optimizer": "adamw-8bit",
                           "bf16_update": "plain"},
    "lopt-default+bf16": {"method": "lopt", "num_blocks": 2, "task_grad_every": 4, "tied_head": None,
                          "precision": "bf16-mixed"},
    "lopt-default+bf16-true": {"method": "lopt", "num_blocks": 2, "task_grad_every": 4, "tied_head": None,
                               "precision": "bf16-true"},
    "lora+bf16": {"method": "lora", "precision": "bf16-mixed"},
    "lora+bf16-true": {"method": "lora", "precision": "bf16-true"},
    "qlora": {"method": "qlora", "precision": "bf16-true"},  # a 4-bit NF4 base (bitsandbytes), bf16 adapters
}
DEFAULT_CONFIGS = ["e2e", "e2e+gc", "e2e+sel", "lopt-default", "lopt-k2", "lopt-k2+gc-last", "lopt-k4", "lopt-k2-joint",
                   "freeze-lower", "lora"]


@dataclass
class BenchSpec:
    """One child process's job."""

    name: str
    overrides: dict[str, Any]
    model: str | None = None
    gguf_file: str | None = None
    batch_size: int = 4
    seq_len: int = 256
    warmup: int = 1
    steps: int = 2
    measure_saved: bool = True  # the memory process: saved activations, and on CPU the fixed mmap threshold
    device: str | None = None
    seed: int = 0
    dataset: str | None = None  # None: random tokens; else what lopt train reads (file, preset, ...)
    limit: int | None = None
    data_dir: str | None = None  # the data folder for a preset --dataset (else $LOPT_DATA_DIR)
    extra: dict[str, Any] = field(default_factory=dict)


def rss_reset_peak() -> bool:
    """Linux lets a process reset its peak-RSS mark ('5' to clear_refs), so the peak of the steps is
    not hidden behind the model load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass

    return peak_rss_mb()


def bench_batches(spec: BenchSpec, tokenizer, vocab: int) -> list[dict[str, torch.Tensor]]:
    """The ``warmup + steps + 1`` batches of a bench run (the last feeds the saved-activation step):
    random tokens, every one labelled and none padded (no ``spec.dataset``), or the first batches
    ``lopt train`` would draw from ``spec.dataset`` (prompts unlabelled, rows padded to the longest)."""
    n = spec.warmup + spec.steps + 1
    if spec.dataset is None:
        g = torch.Generator().manual_seed(spec.seed)
        out = []
        for _ in range(n):
            ids = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return out
    from lopt.data import Batches, build_sft_dataset

    examples, _ = build_sft_dataset(spec.dataset, tokenizer, max_length=spec.seq_len, limit=spec.limit,
                                    data_dir=spec.data_dir)
    it = Batches(examples, spec.batch_size, tokenizer.pad_token_id, seed=spec.seed)
    return [next(it) for _ in range(n)]


def bench_config(spec: BenchSpec) -> TrainConfig:
    """The training configuration a bench row measures: its overrides over the engine's defaults (a
    configuration names every mechanism it uses: no recipe default is added)."""
    return TrainConfig(model=spec.model, gguf_file=spec.gguf_file, batch_size=spec.batch_size,
                       max_length=spec.seq_len, max_steps=spec.warmup + spec.steps + _cycle(spec.overrides), lr=1e-5,
                       warmup_ratio=0.0, progress=False, device=spec.device, **engine_defaults(spec.overrides))


def run_one(spec: BenchSpec) -> dict[str, Any]:
    """Measure one configuration in this process (the parent runs it in a fresh child)."""
    set_seed(spec.seed)
    device = resolve_device(spec.device)
    peer = spec.overrides.get("peer")
    cfg = None
    if peer is None:
        cfg = bench_config(spec)
        cfg.validate()
    model, tokenizer = load_model(spec.model, gguf_file=spec.gguf_file, device=device)
    if device.type == "cpu":
        # transformers maps safetensors files without reading them; unread weight pages would become
        # resident during the first step, after the baseline, and count as the step's memory.
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
    batches = bench_batches(spec, tokenizer, model.get_input_embeddings().weight.shape[0])
    if peer == "trl":
        from lopt.bench.peer import run_trl

        res = run_trl(spec, model, tokenizer, batches, device, rss_reset_peak, rss_peak_mb, current_rss_mb)
    elif cfg is not None:
        res = _run_lopt(spec, cfg, model, batches, device)
    else:
        raise LoPTError(f"unknown peer trainer {peer!r}")
    timed = batches[spec.warmup:spec.warmup + spec.steps]
    res["tokens_per_step"] = statistics.fmean(int(b["attention_mask"].sum()) for b in timed)
    res["memory_process"] = spec.measure_saved
    return res


def _run_lopt(spec: BenchSpec, cfg: TrainConfig, model, batches: list[dict[str, torch.Tensor]],
              device: torch.device) -> dict[str, Any]:
    wrapped = wrap(model, config=cfg.lopt_config()).to(device)
    apply_precision(wrapped, cfg.precision, device)  # as lopt train stores the weights
    wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
    wrapped.train()
    stepper = Stepper(wrapped, cfg, device, cfg.max_steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mb = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else current_rss_mb()
    reset_ok = device.type == "cuda" or rss_reset_peak()
    times, losses = [], []
    for i, b in enumerate(batches[:-1]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rec = stepper.step([b])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(rec["loss"])
        if i >= spec.warmup:
            times.append(dt)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_peak_mb())
    saved = None
    if spec.measure_saved:
        # A whole cycle of a periodic schedule (--lower-every, --task-grad-every): the peak of its steps.
        with SavedTensorTracker(wrapped.parameters()) as tr:
            for _ in range(_cycle(spec.overrides)):
                stepper.step([batches[-1]])
        saved = tr.peak_bytes
    return {"name": spec.name, "overrides": spec.overrides, "batch_size": spec.batch_size,
            "seq_len": spec.seq_len, "step_times": times, "first_loss": losses[0],
            "peak_step_mb": peak_mb - base_mb if reset_ok else None, "peak_total_mb": peak_mb,
            "base_mb": base_mb, "saved_activation_mb": saved / 2**20 if saved is not None else None,
            "device": str(device),
            "trainable_params": sum(p.numel() for p in wrapped.parameters() if p.requires_grad)}


def _cycle(overrides: dict[str, Any]) -> int:
    """Steps in one cycle of the configuration's periodic schedule (1 if it has none)."""
    return max(1, overrides.get("lower_every", 1), overrides.get("task_grad_every", 0))


def _child(spec: BenchSpec, timeout: float | None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec.measure_saved:
        # The memory process: a fixed mmap threshold stops glibc from raising it after each large free,
        # after which freed activation-sized blocks stay resident in its heap and RSS overstates live
        # memory. The timing processes keep glibc's defaults (the fixed threshold slows every step).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run([sys.executable, "-m", "lopt.bench", "--worker", json.dumps(spec.__dict__)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("LOPT_BENCH_RESULT "):
            return json.loads(line[len("LOPT_BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"configuration {spec.name} failed: {tail[0]}")


def run_bench(configs: list[str], batch_sizes: list[int], *, model: str | None = None,
              gguf_file: str | None = None, seq_len: int = 256, warmup: int = 1, steps: int = 1,
              repeats: int = 2, device: str | None = None, progress: bool = True,
              timeout: float | None = None, table: dict[str, dict[str, Any]] | None = None,
              dataset: str | None = None, limit: int | None = None,
              data_dir: str | None = None) -> dict[str, Any]:
    """Run every (configuration, batch size) ``repeats`` times, interleaved, each in a fresh process.

    ``table``: name -> TrainConfig overrides to look the names up in (default :data:`CONFIGS` and the
    peer trainers' rows, :data:`lopt.bench.peer.PEER_CONFIGS`). ``dataset``: train on the batches
    ``lopt train`` would draw from it (default: random tokens); ``data_dir``: the data folder for a
    preset ``dataset`` (default ``$LOPT_DATA_DIR``, else the hub).

    The result is in MiB (``units``, :data:`BENCH_UNITS`), as the table prints it; the JSON file of
    ``lopt bench --json`` is in bytes (:func:`bench_json`), and :func:`load_bench_json` reads either."""

    table = {**CONFIGS, **PEER_CONFIGS} if table is None else table
    unknown = [c for c in configs if c not in table]
    if unknown:
        raise LoPTError(f"unknown bench configuration(s) {unknown}: choose from {', '.join(table)}")
    timed = whole_cycles(configs, table, steps)
    jobs = [(c, b) for b in batch_sizes for c in configs]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {j: [] for j in jobs}
    total = len(jobs) * repeats
    t_start = time.perf_counter()
    for r in range(repeats):
        for c, b in jobs:
            spec = BenchSpec(name=c, overrides=table[c], model=model, gguf_file=gguf_file, batch_size=b,
                             seq_len=seq_len, warmup=warmup, steps=timed[c], measure_saved=(r == 0),
                             device=device, dataset=dataset, limit=limit, data_dir=data_dir)
            done = sum(len(v) for v in runs.values())
            if progress:
                print(f"[{done + 1}/{total}] {c} batch {b} (repeat {r + 1}/{repeats}, "
                      f"{time.perf_counter() - t_start:.0f}s elapsed)", file=sys.stderr, flush=True)
            runs[(c, b)].append(_child(spec, timeout))
    rows = [_aggregate(c, b, runs[(c, b)]) for c, b in jobs]
    ref = {b: next(r for r in rows if r["batch_size"] == b) for b in batch_sizes}
    for row in rows:
        base = ref[row["batch_size"]]
        row["ratio_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ratio_peak_step_mb"] = (row["peak_step_mb"] / base["peak_step_mb"]
                                     if row["peak_step_mb"] and base["peak_step_mb"] else None)
        row["ratio_saved_activation"] = (row["saved_activation_mb"] / base["saved_activation_mb"]
                                         if row["saved_activation_mb"] and base["saved_activation_mb"] else None)
    import platform

    import transformers

    return {"units": dict(BENCH_UNITS), "rows": rows, "reference": configs[0], "seq_len": seq_len,
            "dataset": dataset or "random tokens", "warmup": warmup, "steps": steps, "timed_steps": timed,
            "repeats": repeats, "model": model or "smollm2-135m-instruct (embedded)",
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "wall_s": time.perf_counter() - t_start}


def whole_cycles(configs: list[str], table: dict[str, dict[str, Any]], steps: int) -> dict[str, int]:
    """Timed steps per process for each configuration: ``steps`` rounded up to whole cycles of its
    periodic schedule (``--task-grad-every``, ``--lower-every``), so that a cycle's open step and its
    closed ones are all in the mean; says so in one line when it rounds any."""
    if steps < 1:
        raise LoPTError(f"--steps must be >= 1, got {steps}")
    cycles = {c: _cycle(table[c]) for c in configs}
    timed = {c: -(-steps // n) * n for c, n in cycles.items()}
    rounded = [c for c in configs if timed[c] != steps]
    if rounded:
        print(f"lopt bench: timing whole cycles of the periodic schedules: --steps {steps} rounded up to "
              + ", ".join(f"{timed[c]} for {c} (a cycle of {cycles[c]})" for c in rounded), file=sys.stderr)
    return timed


def _aggregate(name: str, batch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    # Memory from the memory process; times from the timing processes (the memory process has a slower
    # allocator on CPU) when any ran.
    memory = [r for r in runs if r.get("memory_process", True)] or runs
    timing = [r for r in runs if not r.get("memory_process", True)]
    times = [t for r in (timing or runs) for t in r["step_times"]]
    # Steps that skip the lower update (lower_every N) or keep the boundary closed (task_grad_every N)
    # are cheaper: a median would report only those. The mean over the timed steps (use a multiple of N)
    # is the honest cost of the cycle.
    cyclic = _cycle(runs[0]["overrides"]) > 1
    med = statistics.fmean(times) if cyclic else statistics.median(times)
    peaks = [r["peak_step_mb"] for r in memory if r["peak_step_mb"] is not None]
    tokens = runs[0]["tokens_per_step"]
    return {"name": name, "batch_size": batch, "overrides": runs[0]["overrides"],
            "step_time_s": med, "step_time_min_s": min(times), "step_time_max_s": max(times),
            "tokens_per_s": tokens / med, "tokens_per_s_min": tokens / max(times),
            "tokens_per_s_max": tokens / min(times),
            "peak_step_mb": statistics.median(peaks) if peaks else None,
            "peak_total_mb": statistics.median(r["peak_total_mb"] for r in memory),
            "saved_activation_mb": next((r["saved_activation_mb"] for r in runs
                                         if r["saved_activation_mb"] is not None), None),
            "first_loss": runs[0]["first_loss"], "first_losses": [r["first_loss"] for r in runs],
            "trainable_params": runs[0]["trainable_params"], "n_steps": len(times),
            "time_processes": len(timing or runs),
            # on CPU with one process a configuration, its times ran under the memory process's allocator
            "times_slowed": not timing and runs[0].get("device", "cpu").startswith("cpu")}


# --------------------------------------------------------------------------- the bench JSON

DEFAULT_OUTPUT_DIR = "runs/bench"  # lopt bench's JSON and PNG, unless --output-dir / --json / --plot say otherwise
BENCH_JSON, BENCH_PLOT = "bench.json", "bench.png"

# run_bench's result (and the table) has memory in MiB under keys ending in _mb; the JSON file has it
# in bytes under _bytes keys, and says so in "units". Ratios (ratio_*) have no unit.
BENCH_UNITS = {"memory": "MiB", "time": "seconds", "throughput": "tokens/s"}
JSON_UNITS = {"memory": "bytes", "time": "seconds", "throughput": "tokens/s"}
_MEMORY_KEY = re.compile(r"^(?!ratio_)(.*)_(mb|bytes)(_.*)?$")


def _memory(obj: Any, to: str) -> Any:
    """``obj`` with every memory value moved to ``to`` ("bytes": _mb keys become _bytes, in bytes;
    "mb": the reverse, in MiB), at any depth."""
    if isinstance(obj, list):
        return [_memory(v, to) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for k, v in obj.items():
        m = _MEMORY_KEY.match(k) if isinstance(k, str) else None
        if m and m.group(2) != to and not isinstance(v, (dict, bool)):
            def conv(x):
                if not isinstance(x, (int, float)) or isinstance(x, bool):
                    return x
                return int(round(x * MIB)) if to == "bytes" else x / MIB
            out[f"{m.group(1)}_{to}{m.group(3) or ''}"] = [conv(x) for x in v] if isinstance(v, list) else conv(v)
        else:
            out[k] = _memory(v, to)
    return out


def bench_json(result: dict[str, Any]) -> dict[str, Any]:
    """A ``run_bench`` result as ``lopt bench --json`` writes it: memory in bytes (``*_bytes`` keys),
    ``units`` first."""
    rec = _memory({k: v for k, v in result.items() if k != "units"}, "bytes")
    return {"units": dict(JSON_UNITS), **rec}


def load_bench_json(source: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
    """A bench record (a path, or the parsed JSON) in ``run_bench``'s form: memory in MiB under ``*_mb``
    keys, ``units`` = :data:`BENCH_UNITS`. Reads the JSON of ``lopt bench --json`` (bytes, with
    ``units``) and the older records written before it said its units (MiB, no ``units``). None
    stays None."""
    if source is None:
        return None
    data = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    if not isinstance(data, dict):
        raise LoPTError(f"{source} is not a bench record (a JSON object with rows)")
    memory = (data.get("units") or {}).get("memory", "MiB")  # older records: MiB, no units
    if memory not in ("MiB", "bytes"):
        raise LoPTError(f"bench record with memory in {memory!r}: only bytes and MiB are known")
    rec = _memory({k: v for k, v in data.items() if k != "units"}, "mb") if memory == "bytes" else \
        {k: v for k, v in data.items() if k != "units"}
    return {"units": dict(BENCH_UNITS), **rec}


def format_table(result: dict[str, Any]) -> str:
    """Markdown table; ratios are against the first configuration at the same batch size."""
    head = ("| config | batch | step s (min-max) | tokens/s | x ref | peak step MiB | x ref | peak RSS MiB | "
            "saved act. MiB | x ref | first loss |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['step_time_s']:.2f} ({r['step_time_min_s']:.2f}-"
            f"{r['step_time_max_s']:.2f}) | {r['tokens_per_s']:.0f} | {r['ratio_tokens_per_s']:.2f} | "
            f"{f(r['peak_step_mb'], '{:.0f}')} | {f(r['ratio_peak_step_mb'], '{:.2f}')} | "
            f"{f(r['peak_total_mb'], '{:.0f}')} | {f(r['saved_activation_mb'], '{:.0f}')} | "
            f"{f(r['ratio_saved_activation'], '{:.2f}')} | "
            f"{r['first_loss']:.4f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> bool:
    """Tokens/s against peak step memory, one colour per method: the Pareto view."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lopt bench: matplotlib is not installed; skipping the plot (pip install matplotlib)",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, Any] = {}
    for r in result["rows"]:
        mem = r["peak_step_mb"] or r["peak_total_mb"]
        method = r["overrides"].get("peer") or r["overrides"].get("method", "lopt")
        c = colours.setdefault(method, f"C{len(colours)}")
        ax.scatter(mem, r["tokens_per_s"], color=c, label=method if method not in ax.get_legend_handles_labels()[1] else None)
        ax.annotate(f"{r['name']} b{r['batch_size']}", (mem, r["tokens_per_s"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("peak memory of the step (MiB)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"lopt bench: {result['model']}, seq {result['seq_len']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model to benchmark (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="NAME",
                   help=f"configurations, the first is the reference for ratios (default: {' '.join(DEFAULT_CONFIGS)}; "
                        f"all: {' '.join([*CONFIGS, *PEER_CONFIGS])})")
    p.add_argument("--peer", nargs="+", default=[], choices=sorted(PEERS), metavar="TRAINER",
                   help=f"also run another trainer on the same model, batches and steps: {', '.join(PEERS)} "
                        f"(rows {', '.join(PEER_CONFIGS)}; name them in --configs to pick)")
    p.add_argument("--dataset", default=None,
                   help="train on the batches lopt train would draw from this dataset (file, preset, ...; "
                        "default: random tokens, every one labelled)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows of --dataset")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the data folder for a preset --dataset (gsm8k reads DIR/gsm8k/train.jsonl; default: "
                        "$LOPT_DATA_DIR, else the hub)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[4], metavar="B")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=1,
                   help="timed steps per process, rounded up to whole cycles of a configuration's "
                        "--task-grad-every / --lower-every (lopt-default: 4)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per configuration, interleaved")
    p.add_argument("--device", default=None)
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"where {BENCH_JSON} and {BENCH_PLOT} go unless --json / --plot name other paths "
                        f"(default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--json", default=None, metavar="PATH",
                   help=json_help("the full results", f"DIR/{BENCH_JSON} under --output-dir"))
    p.add_argument("--plot", default=None, metavar="PATH",
                   help=f"write the tokens/s vs memory plot (PNG) here (default: DIR/{BENCH_PLOT} under --output-dir)")


def run_bench_cli(ns: argparse.Namespace) -> int:
    configs = list(ns.configs) + [c for p in ns.peer for c in PEERS[p] if c not in ns.configs]
    json_path, plot_path = bench_outputs(ns)  # a path that cannot be written fails now, not after the bench
    result = run_bench(configs, ns.batch_sizes, model=ns.model, gguf_file=ns.gguf_file, seq_len=ns.seq_len,
                       warmup=ns.warmup, steps=ns.steps, repeats=ns.repeats, device=ns.device,
                       dataset=ns.dataset, limit=ns.limit, data_dir=getattr(ns, "data_dir", None))
    out = sys.stderr if ns.json == "-" else sys.stdout  # `--json -`: standard output holds the JSON only
    print(format_table(result), file=out)
    rounded = [f"{c} {n}" for c, n in (result.get("timed_steps") or {}).items() if n != result["steps"]]
    print(f"\nratios against {result['reference']}; {result['dataset']}; {result['repeats']} processes x {result['steps']} timed "
          f"steps per configuration" + (f" (whole cycles: {', '.join(rounded)})" if rounded else "")
          + f"; {result['machine']['cpus']} CPUs, torch {result['versions']['torch']}; {result['wall_s']:.0f}s", file=out)
    if any(r.get("times_slowed") for r in result["rows"]):
        print("step times from the memory process, whose fixed mmap threshold slows CPU steps (up to 2x here): "
              "--repeats 2 or more times them in processes of their own", file=out)
    elif result["repeats"] > 1:
        print(f"memory from the first process of each configuration, step times from the other "
              f"{result['repeats'] - 1}", file=out)
    where = write_json(json_path, bench_json(result))
    if json_path != "-":
        print(f"results written to {where} (memory in bytes)", file=out)
    Path(plot_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if plot(result, plot_path):
        print(f"plot written to {plot_path}", file=out)
    return 0


def bench_outputs(ns: argparse.Namespace) -> tuple[str, str]:
    """Where ``lopt bench`` writes its JSON and PNG: ``--json`` / ``--plot`` when given, else
    ``bench.json`` / ``bench.png`` in ``--output-dir`` (default ``runs/bench``, never the source tree);
    PreflightError when a folder cannot be made there; nothing is created yet."""
    from lopt.runtime.preflight import check_output_dir

    out = Path(getattr(ns, "output_dir", None) or DEFAULT_OUTPUT_DIR).expanduser()
    json_path = ns.json or str(out / BENCH_JSON)
    plot_path = ns.plot or str(out / BENCH_PLOT)
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        if path != "-":
            check_output_dir(Path(path).expanduser().parent, f"{option} {path}: the folder")
    return json_path, plot_path


def worker_main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--worker":  # `python -m lopt.bench [options]`: the bench itself
        parser = argparse.ArgumentParser(prog="lopt bench")
        add_bench_arguments(parser)
        return run_bench_cli(parser.parse_args(argv))
    spec = BenchSpec(**json.loads(argv[1]))
    res = run_one(spec)
    print("LOPT_BENCH_RESULT " + json.dumps(res), flush=True)
    return 0

