"""Per-process memory and throughput of the multi-process modes against one process.

    python -m lopt.bench.distbench --json distbench.json
    python -m lopt.bench.distbench --modes single ddp pipeline --batch-size 4 --seq-len 256 --steps 3

Every mode trains the same model (default: the embedded SmolLM2-135M-Instruct) with LoPT on the
same global batch of random tokens (``--batch-size`` rows of ``--seq-len``, fp32, AdamW, the real
training step of ``lopt train``): ``single`` is one process, ``ddp`` and ``fsdp`` are N processes
with ``batch-size / N`` rows each, ``pipeline`` is one process per block, each seeing the whole
batch. Each mode runs in fresh processes (launched with ``torch.distributed.run``); each rank
reports its peak resident memory (VmHWM) while loading the model and, separately (the mark is reset
after loading), during the training steps; ``peak RSS`` is the larger, i.e. the whole process. And
the time of each step. Throughput is ``global tokens x timed steps / wall time of the timed steps`` on the last
rank (for the pipeline: where the steps end). CPU threads: the machine's cores split evenly between
the processes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lopt.bench.runner import rss_peak_mb, bench_json
from lopt.jsonout import json_help, write_json
from lopt.bench.runner import rss_reset_peak as reset_rss_peak
from lopt.methods import wrap
from lopt.engine.memory import current_rss_mb
from lopt.models import load_model
from lopt.parallel.context import init_distributed
from lopt.parallel.data_parallel import DataParallel
from lopt.parallel.pipeline import PipelineStepper, build_stage
from lopt.config import TrainConfig
from lopt.runtime.loop import Stepper, set_seed

MODES = ("single", "ddp", "fsdp", "pipeline")


def _vmhwm_mb() -> float:
    return rss_peak_mb()


def rss_reset_peak() -> bool:
    return reset_rss_peak()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one mode's share in this process (under torchrun for the multi-process modes)."""
    mode = spec["mode"]
    ctx = init_distributed(None) if mode != "single" else None
    world = ctx.world_size if ctx is not None else 1
    mb = spec.get("micro_batches", 1)
    rows = spec["batch_size"] // mb  # global rows per micro-batch
    per_rank = rows // world if mode in ("ddp", "fsdp") else rows
    total = spec["warmup"] + spec["steps"]
    cfg = TrainConfig(model=spec.get("model"), batch_size=per_rank, max_length=spec["seq_len"], grad_accum=mb,
                      max_steps=total, lr=1e-5, warmup_ratio=0.0, progress=False, method="lopt",
                      task_grad_every=0, tied_head=False,
                      num_blocks=spec.get("num_blocks", 2), boundaries=spec.get("boundaries"),
                      fsdp=mode == "fsdp", pipeline=mode == "pipeline",
                      gradient_checkpointing=spec.get("gradient_checkpointing", "off"),
                      selective_checkpointing=spec.get("selective_checkpointing", "off"))
    set_seed(0)
    t_load = time.perf_counter()
    if mode == "pipeline":
        stage, _ = build_stage(cfg, ctx)
        wrapped = stage.wrapped
        wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
        wrapped.train()
        stepper: Any = PipelineStepper(stage, cfg, total)
        device = ctx.device
    else:
        device = ctx.device if ctx is not None else torch.device("cpu")
        model, _ = load_model(cfg.model, device="cpu" if cfg.fsdp else device)
        wrapped = wrap(model, config=cfg.lopt_config()).to("cpu" if cfg.fsdp else device)
        wrapped.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing)
        wrapped.train()
        dp = DataParallel(ctx, fsdp=cfg.fsdp) if ctx is not None else None
        if dp is not None:
            wrapped = dp.prepare_model(wrapped)
        stepper = Stepper(wrapped, cfg, device, total, dist=dp)
    load_s = time.perf_counter() - t_load
    loaded_mb = current_rss_mb()
    load_peak_mb = _vmhwm_mb()
    # From here the peak is the training steps' (Linux lets a process reset its VmHWM mark).
    reset_ok = rss_reset_peak()
    vocab = wrapped.model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ends, losses = [], []
    for _ in range(total):
        ids = torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=g)
        micro = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
                 for x in ids.split(rows)]
        rec = stepper.step(None if mode == "pipeline" and ctx.rank > 0 else micro)
        ends.append(time.perf_counter())
        losses.append(rec["loss"] if rec else None)
    t0 = ends[spec["warmup"] - 1] if spec["warmup"] else t_load
    wall = ends[-1] - t0
    peak = max(load_peak_mb, _vmhwm_mb())
    out = {"mode": mode, "peak_rss_mb": peak, "rank": ctx.rank if ctx else 0, "world_size": world, "per_rank_batch": per_rank,
           "micro_batches": mb,
           "train_peak_rss_mb": _vmhwm_mb() if reset_ok else None, "load_peak_rss_mb": load_peak_mb,
           "loaded_rss_mb": loaded_mb, "load_s": load_s,
           "timed_wall_s": wall, "step_ends": [e - ends[0] for e in ends], "losses": losses,
           "threads": torch.get_num_threads(), "block_ranges": wrapped.block_ranges,
           "trainable_params": sum(p.numel() for p in wrapped.parameters() if p.requires_grad)}
    if ctx is not None:
        if mode == "pipeline":
            stage.wait_sends()
        ctx.barrier()  # nobody leaves while a neighbour still waits for its hidden states
        ctx.close()
    return out


def run_mode(mode: str, spec: dict[str, Any], nproc: int, timeout: float | None = None) -> list[dict[str, Any]]:
    """Launch one mode in fresh processes and collect every rank's report."""
    import tempfile

    report_dir = tempfile.mkdtemp(prefix="lopt-distbench-")
    spec = dict(spec, mode=mode, report_dir=report_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cores = os.cpu_count() or 1
    if mode == "single":
        cmd = [sys.executable, "-m", "lopt.bench.distbench", "--worker", json.dumps(spec)]
        env["OMP_NUM_THREADS"] = str(cores)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "lopt.bench.distbench", "--worker", json.dumps(spec)]
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    reports = [json.loads(f.read_text()) for f in Path(report_dir).glob("rank*.json")]
    if proc.returncode != 0 or len(reports) != (1 if mode == "single" else nproc):
        raise RuntimeError(f"{mode} failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return sorted(reports, key=lambda r: r["rank"])


def summarise(mode: str, reports: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    last = reports[-1]
    tokens = spec["batch_size"] * spec["seq_len"] * spec["steps"]
    return {"mode": mode, "label": spec.get("label", mode), "processes": len(reports),
            "per_rank_batch": last["per_rank_batch"], "micro_batches": last["micro_batches"],
            "boundaries": spec.get("boundaries"),
            "block_ranges": last["block_ranges"],
            "tokens_per_s": tokens / last["timed_wall_s"],
            "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in reports],
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in reports),
            "loaded_rss_mb_per_process": [r["loaded_rss_mb"] for r in reports],
            "train_peak_rss_mb_per_process": [r["train_peak_rss_mb"] for r in reports],
            "load_peak_rss_mb_per_process": [r["load_peak_rss_mb"] for r in reports],
            "trainable_params_per_process": [r["trainable_params"] for r in reports],
            "first_loss": next((l for r in reversed(reports) for l in r["losses"][:1] if l is not None), None),
            "threads_per_process": last["threads"], "reports": reports}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def format_table(rows: list[dict[str, Any]], ref: str | None = None) -> str:
    """One line per mode: medians over the repeats (each repeat's range in brackets when there are
    several), ratios of the medians to the reference mode's."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {lab: [r for r in rows if r["label"] == lab] for lab in labels}

    def stat(lab: str, key: str) -> float:
        return _median([r[key] for r in by[lab]])

    def spread(lab: str, key: str) -> str:
        vals = [r[key] for r in by[lab]]
        return f" ({min(vals):.0f}-{max(vals):.0f})" if len(vals) > 1 else ""
    has_ref = ref in by
    lines = ["| mode | processes x threads | rows per process x micro-batches | blocks | tokens/s | x ref | peak RSS MiB per "
             "process | max x ref |", "|---|---|---|---|---|---|---|---|"]
    for lab in labels:
        r = by[lab][0]
        per_proc = [_median(list(x)) for x in zip(*(q["peak_rss_mb_per_process"] for q in by[lab]))]
        x_t = stat(lab, "tokens_per_s") / stat(ref, "tokens_per_s") if has_ref else None
        x_m = stat(lab, "peak_rss_mb_max") / stat(ref, "peak_rss_mb_max") if has_ref else None
        lines.append(f"| {lab} | {r['processes']} x {r['threads_per_process']} | {r['per_rank_batch']} x {r['micro_batches']} | "
                     f"{r['block_ranges']} | {stat(lab, 'tokens_per_s'):.0f}{spread(lab, 'tokens_per_s')} | "
                     f"{'-' if x_t is None else f'{x_t:.2f}'} | "
                     f"{' / '.join(f'{m:.0f}' for m in per_proc)}{spread(lab, 'peak_rss_mb_max')} | "
                     f"{'-' if x_m is None else f'{x_m:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        spec = json.loads(argv[1])
        res = worker(spec)
        # One file per rank: the ranks' stdout lines would interleave.
        Path(spec["report_dir"], f"rank{res['rank']}.json").write_text(json.dumps(res))
        return 0
    p = argparse.ArgumentParser(prog="python -m lopt.bench.distbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--modes", nargs="+", default=["single", "ddp", "pipeline"],
                   help=f"any of {', '.join(MODES)}, optionally with options: 'pipeline:b=19,mb=2,gc=all,sel=last-block' "
                        f"= boundary at layer 19, the global batch in 2 micro-batches, gradient checkpointing of "
                        f"all layers (scopes as --gradient-checkpointing), selective checkpointing of the last "
                        f"block (as --selective-checkpointing) (default: single ddp pipeline)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="global batch (rows)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the list of modes this many times, interleaved (the table shows medians and ranges)")
    p.add_argument("--reference", default="ddp", help="mode the ratios are against")
    p.add_argument("--json", default=None, metavar="PATH", help=json_help("the rows"))
    ns = p.parse_args(argv)
    t_start = time.perf_counter()
    specs = []
    for m in ns.modes:
        mode, _, opts = m.partition(":")
        kv = dict(o.split("=", 1) for o in opts.split(",") if o)
        if mode not in MODES or set(kv) - {"b", "mb", "gc", "sel"}:
            p.error(f"unknown mode {m}")
        specs.append((mode, {"model": ns.model, "batch_size": ns.batch_size, "seq_len": ns.seq_len,
                             "warmup": ns.warmup, "steps": ns.steps, "label": m,
                             "boundaries": [int(kv["b"])] if "b" in kv else None,
                             "micro_batches": int(kv.get("mb", 1)), "gradient_checkpointing": kv.get("gc", "off"),
                             "selective_checkpointing": kv.get("sel", "off")}))
    rows = []
    for rep in range(ns.repeats):  # interleaved, so a slow spell of the machine hits every mode alike
        for mode, spec in specs:
            m = spec["label"]
            print(f"[{m}] ...", file=sys.stderr, flush=True)
            rows.append({**summarise(mode, run_mode(mode, spec, 1 if mode == "single" else ns.nproc), spec),
                         "repeat": rep})
            print(f"[{m}] {rows[-1]['tokens_per_s']:.0f} tokens/s, peak RSS {rows[-1]['peak_rss_mb_per_process']} MiB",
                  file=sys.stderr, flush=True)
    print(format_table(rows, ns.reference))
    import platform

    result = {"rows": rows, "args": vars(ns), "wall_s": time.perf_counter() - t_start,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "versions": {"torch": torch.__version__}}
    if ns.json:  # memory in bytes, as every --json; load_bench_json reads it back in MiB
        write_json(ns.json, bench_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
