"""Study v2, run in resumable pieces: the learning-rate sweep, the base's evaluation, every training run
(checkpointed, so a killed run continues), its evaluation, its forgetting-curve points, and the bench.

Each piece writes its record (:mod:`lopt.recipes.study.records`) as soon as it is done; calling
:func:`run_study` again skips what is recorded with the same settings. Every model is evaluated from
its saved checkpoint, as a user would load it; the weights are deleted once a run is fully measured.
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from lopt.engine.config import LoPTError
from lopt.eval.drift import drift, read_boundaries
from lopt.eval.generation import eval_gsm8k_file
from lopt.eval.kl import retention_kl
from lopt.eval.perplexity import task_loss
from lopt.eval.suite import RETENTION_KINDS, TASKS, run_retention
from lopt.data import data_dir as find_data_dir
from lopt.models import load_model
from lopt.recipes.sft import train
from lopt.recipes.study import plan
from lopt.recipes.study.plan import QUICK, V2, Budget
from lopt.recipes.study.records import (Records, cached_continuations, load_average, machine, timed_train,
                                        write_json)
from lopt.runtime.checkpoints import latest_checkpoint

Say = Callable[[str], None]

# Budget fields no record's content depends on (the sweep's grid: a sweep point depends on its own lr;
# the bench's settings: the bench record has its own spec), left out of every spec so that changing
# them does not redo finished work.
_NOT_IN_SPECS = ("sweep_lrs", "sweep_lora_lrs", "bench_steps", "bench_repeats", "bench_seq_len")


def budget_spec(budget: Budget) -> dict[str, Any]:
    return {k: v for k, v in asdict(budget).items() if k not in _NOT_IN_SPECS}


class StudyData:
    """The study's files: GSM8K train and test and the five retention files, under ``data_dir``
    (default: ``$LOPT_DATA_DIR``, as :func:`lopt.data.data_dir` resolves it)."""

    def __init__(self, data_dir: Path | None):
        try:
            root = find_data_dir(data_dir)
        except ValueError as e:  # a folder named that does not exist
            raise LoPTError(str(e)) from None
        if root is None:
            raise LoPTError("the study reads its data from a folder: pass --data-dir or set LOPT_DATA_DIR (the "
                            "folder that holds gsm8k/, arc/, piqa/, winogrande/ and lambada/)")
        self.train = root / "gsm8k" / "train.jsonl"
        self.test = self.train.with_name("test.jsonl")
        root = self.train.parent.parent
        self.retention = {k: root / TASKS[k].default for k in RETENTION_KINDS}
        for p in (self.train, self.test, *self.retention.values()):
            if not p.exists():
                raise LoPTError(f"study data not found: {p}; pass --data-dir (the folder that holds "
                                "gsm8k/, arc/, piqa/, winogrande/ and lambada/)")


class Study:
    """One invocation of the study: its budget, data, records and the base model."""

    def __init__(self, out: Path, *, quick: bool, model: str | None, data_dir: Path | None,
                 keep_models: bool, progress: bool):
        self.budget: Budget = QUICK if quick else V2
        self.quick, self.model_name, self.keep_models, self.progress = quick, model, keep_models, progress
        self.data = StudyData(data_dir)
        self.out = Path(out)
        self.records = Records(self.out / "results")
        self.runs_dir = Path(os.environ.get("LOPT_EXPERIMENT_RUNS",
                                            "runs/study-quick" if quick else "runs/study"))
        self.base, self.tokenizer = load_model(model, device="cpu" if not torch.cuda.is_available() else None)
        self.num_layers = self.base.config.num_hidden_layers
        self.common = {"budget": budget_spec(self.budget), "model": model}
        self._continuations = None

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ evaluation

    def continuations(self):
        """The base model's answers to the general prompts (retention KL and drift), made once."""
        if self._continuations is None:
            self._continuations = cached_continuations(self.runs_dir, self.base, self.tokenizer, self.budget)
        return self._continuations

    def evaluate(self, model, tokenizer, *, final: bool, boundaries: list[int] | None) -> dict[str, Any]:
        """The measurements of one model: answer loss, retention and KL; for a final model also greedy
        accuracy, the larger retention subset and drift by layer."""
        b = self.budget
        out: dict[str, Any] = {"load_average": load_average()}
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out["task_loss"] = task_loss(model, tokenizer, str(self.data.test), max_length=b.max_length,
                                         limit=b.eval_questions if final else b.curve_questions,
                                         batch_size=b.eval_batch_size // 2)
            rows = b.retention_rows if final else b.curve_retention_rows
            out["retention"] = run_retention(model, tokenizer, limit=rows, paths=self.data.retention,
                                             batch_size=b.eval_batch_size)
            out["retention_kl"] = retention_kl(model, self.base, tokenizer, sequences=self.continuations(),
                                               batch_size=b.eval_batch_size // 2)
            if final:
                out["gsm8k"] = eval_gsm8k_file(model, tokenizer, self.data.test, limit=b.acc_questions,
                                           batch_size=b.eval_batch_size, progress=False,
                                           max_new_tokens=b.gsm8k_new_tokens)
                out["drift"] = drift(model, self.base, tokenizer, sequences=self.continuations(),
                                     boundaries=boundaries, batch_size=b.eval_batch_size // 2)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out

    def evaluate_dir(self, path: Path, *, final: bool) -> dict[str, Any]:
        model, tokenizer = load_model(str(path), device="cpu" if not torch.cuda.is_available() else None)
        try:
            return self.evaluate(model, tokenizer, final=final, boundaries=read_boundaries(path))
        finally:
            del model
            gc.collect()

    # ------------------------------------------------------------------ pieces

    def sweep(self, methods: list[str]) -> dict[str, float]:
        """The learning rate of the full-parameter methods (swept on e2e) and of LoRA (swept on LoRA):
        each point trains ``sweep_steps`` steps and is scored by answer loss on the last
        ``sweep_val_rows`` rows of the train file, which no run trains on."""
        b = self.budget
        val = self._sweep_val_file()
        chosen: dict[str, float] = {}
        for method, grid in (("e2e", b.sweep_lrs), ("lora", b.sweep_lora_lrs)):
            if method == "lora" and "lora" not in methods:
                continue
            losses = {}
            for lr in grid:
                name = f"sweep/{method}-lr{lr:g}"
                spec = {"method": method, "lr": lr, "steps": b.sweep_steps, "val_rows": b.sweep_val_rows,
                        **self.common}
                rec = self.records.get(name, spec)
                if rec is None:
                    self.say(f"sweep: {method} at lr {lr:g}, {b.sweep_steps} steps")
                    run_dir = self.runs_dir / "sweep" / f"{method}-lr{lr:g}"
                    cfg = plan.train_config({"method": method}, b.seeds[0], b, lr=lr, model=self.model_name,
                                            dataset=str(self.data.train), run_dir=run_dir, steps=b.sweep_steps)
                    load = load_average()
                    t0 = time.perf_counter()
                    train(cfg)  # its result holds the model: not kept, so that memory is freed
                    seconds = time.perf_counter() - t0
                    gc.collect()
                    model, tok = load_model(str(run_dir), device="cpu" if not torch.cuda.is_available() else None)
                    with torch.no_grad():
                        val_loss = task_loss(model, tok, str(val), max_length=b.max_length, split="train",
                                             batch_size=b.eval_batch_size // 2)
                    del model
                    val_loss.pop("items", None)
                    rec = self.records.put(name, spec, {"command": plan.train_command(cfg), "val": val_loss,
                                                        "train_seconds": round(seconds, 1),
                                                        "load_average": load})
                    self._drop(run_dir)
                losses[lr] = rec["val"]["loss"]
            chosen[method] = min(losses, key=losses.get)
            edge = chosen[method] in (min(grid), max(grid)) and len(grid) > 1
            self.say(f"sweep: {method} -> lr {chosen[method]:g}" + (" (at the edge of the grid)" if edge else ""))
        return chosen

    def _sweep_val_file(self) -> Path:
        """The last ``sweep_val_rows`` rows of the train file, as a file of their own."""
        b = self.budget
        lines = [ln for ln in self.data.train.read_text().splitlines() if ln.strip()]
        if len(lines) < b.train_rows + b.sweep_val_rows:
            raise LoPTError(f"{self.data.train} has {len(lines)} rows; the study needs {b.train_rows} to train "
                            f"on and {b.sweep_val_rows} more to choose learning rates with")
        path = self.runs_dir / "sweep" / "val.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(lines[-b.sweep_val_rows:]) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return path

    def base_eval(self) -> dict[str, Any]:
        spec = {"run": "base", **self.common}
        rec = self.records.get("base/eval", spec)
        if rec is None:
            self.say("base: evaluating the untrained model")
            ev = self.evaluate(self.base, self.tokenizer, final=True, boundaries=[self.num_layers // 2])
            rec = self.records.put("base/eval", spec, {"eval": ev})
        return rec

    def run(self, run: str, name: str, seed: int, lr: float) -> None:
        """Train one run (continuing a killed one), evaluate it, read its curve points, drop its weights."""
        b = self.budget
        overrides = plan.configs()[name]
        run_dir = self.runs_dir / run
        cfg = plan.train_config(overrides, seed, b, lr=lr, model=self.model_name, dataset=str(self.data.train),
                                run_dir=run_dir)
        spec = {"run": run, "config": name, "seed": seed, "overrides": overrides, "lr": lr, **self.common}
        done = {k: self.records.get(f"{run}/{k}", spec) for k in ["train", "eval", *self._curve_names()]}
        if all(done.values()):
            self.say(f"{run}: already done")
            return
        if done["train"] is None:
            cfg.save_every = math.gcd(*b.curve_steps)
            ckpt = latest_checkpoint(run_dir)
            cfg.resume = str(ckpt) if ckpt else None
            self.say(f"{run}: training {b.steps} steps" + (f", continuing from {ckpt.name}" if ckpt else ""))
            load = load_average()
            seconds, summary, history = timed_train(cfg, run_dir)
            done["train"] = self.records.put(f"{run}/train", spec, {
                "command": plan.train_command(cfg), "train_seconds": round(seconds, 1),
                "resumed_from": ckpt.name if ckpt else None, "load_average": load,
                "load_average_end": load_average(), "summary": summary, "history": history})
            self.say(f"{run}: trained in {seconds:.0f}s")
        if done["eval"] is None:
            self.say(f"{run}: evaluating the final model")
            done["eval"] = self.records.put(f"{run}/eval", spec, {"eval": self.evaluate_dir(run_dir, final=True)})
        for step, curve in zip(b.curve_steps, self._curve_names()):
            if done[curve] is None:
                ckpt = run_dir / f"checkpoint-{step}"
                if not ckpt.is_dir():
                    raise LoPTError(f"{run}: {ckpt} is gone, so its curve point cannot be measured; delete "
                                    f"{self.records.path(run + '/train')} to train the run again")
                self.say(f"{run}: curve point at step {step}")
                done[curve] = self.records.put(f"{run}/{curve}", spec,
                                               {"step": step, "eval": self.evaluate_dir(ckpt, final=False)})
        self._drop(run_dir)

    def _curve_names(self) -> list[str]:
        return [f"curve-{s}" for s in self.budget.curve_steps]

    def _drop(self, run_dir: Path) -> None:
        """The study keeps records, not models (each run leaves about 5 GB of checkpoints)."""
        if not self.keep_models:
            shutil.rmtree(run_dir, ignore_errors=True)

    def bench(self, names: list[str]) -> dict[str, Any]:
        """Peak memory and tokens/s of every distinct step cost, each in a fresh process."""
        from lopt.bench.runner import bench_json, run_bench

        b = self.budget
        table: dict[str, dict[str, Any]] = {}
        for name in names:
            o = plan.configs()[name]
            cost = {k: o[k] for k in plan.COST_KEYS if k in o}
            if cost not in table.values():
                table[name] = cost
        spec = {"configs": table, "batch_size": b.batch_size, "seq_len": b.bench_seq_len, "steps": b.bench_steps,
                "repeats": b.bench_repeats, "model": self.model_name}
        rec = self.records.get("bench", spec)
        if rec is None:
            self.say(f"bench: {len(table)} step costs x {b.bench_repeats} repeats, a fresh process each")
            load = load_average()
            res = run_bench(list(table), [b.batch_size], model=self.model_name, seq_len=b.bench_seq_len, warmup=1,
                            steps=b.bench_steps, repeats=b.bench_repeats, progress=self.progress, table=table)
            rec = self.records.put("bench", spec, bench_json({**res, "load_average": load}))  # bytes
        return rec


def run_study(out: Path, *, quick: bool = False, model: str | None = None, only: list[str] | None = None,
              data_dir: Path | None = None, keep_models: bool = False, bench: bool = True,
              progress: bool = True, readme: Path | None = None) -> dict[str, Any]:
    """Run (or resume) study v2; write ``out/results/**.json`` and ``out/RESULTS.md``.

    ``only``: run names (``e2e``, ``e2e-seed1``, ...), configuration names (all their seeds), ``base``
    or ``bench``; the sweep runs whenever a selected run needs its learning rate. The report always
    uses every record present. ``readme``: a README whose headline table (between the report's
    markers) is refreshed from the records; never for a ``quick`` run.
    """
    from lopt.recipes.study.report import write_report

    study = Study(out, quick=quick, model=model, data_dir=data_dir, keep_models=keep_models, progress=progress)
    names = [n for n in plan.configs() if not quick or n in plan.QUICK_CONFIGS]
    todo = plan.runs(names, study.budget)
    if only:
        known = {"base", "bench"} | set(names) | {r for r, _, _ in todo}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise LoPTError(f"unknown study run(s) {unknown}: choose from {', '.join(sorted(known))}")
        todo = [(r, n, s) for r, n, s in todo if r in only or n in only]
    write_json(study.out / "results" / "meta.json",
               {"budget": asdict(study.budget), "quick": quick, "configs": {n: plan.configs()[n] for n in names},
                "model": model or "smollm2-135m-instruct (embedded)", "num_layers": study.num_layers,
                "dataset": str(study.data.train), "machine": machine()})
    if todo:
        lrs = study.sweep([n for _, n, _ in todo])
    if not only or "base" in only:
        study.base_eval()
    for i, (run, name, seed) in enumerate(todo):
        study.say(f"[{i + 1}/{len(todo)}] {run}")
        lr = lrs["lora" if plan.configs()[name]["method"] == "lora" else "e2e"]
        study.run(run, name, seed, lr)
    if bench and (not only or "bench" in only):
        study.bench(names)
    report = write_report(study.out, readme=None if quick else readme)
    study.say(f"report written to {report}")
    return {"report": str(report), "out": str(study.out)}
