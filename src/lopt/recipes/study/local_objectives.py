"""Issue 29's runs: every candidate local objective as pure local learning (``--task-grad-every 0``) at
study v2's budget, evaluated like the study's runs; resumable, a finished run is never redone.

Each run is ``lopt train`` with the study's data, order, schedule and upper rate (1e-4, the study's
swept e2e rate), ``--local-objective X`` and the lower half at one of the study's two lower rates
(lr, the paper's; lr / 10, lopt's former default). It is evaluated from its saved checkpoint on:
held-out answer loss (first 300 GSM8K test questions), retention KL to the base (32 general prompts,
the base's greedy answers: the study's exact text), the boundary cosine and per-layer drift on that
text, and its training time. ``recon`` itself is not rerun: the study's lopt-paper and lopt-default
are its two runs, and freeze-lower is the bar (records/study-v2/results).

    python -m lopt.recipes.study.local_objectives            # all candidates, lr first, then lr / 10
    python -m lopt.recipes.study.local_objectives --only early-exit-lr0.0001

Records: ``records/local-objectives/results/NAME/{train,eval}.json`` and a table in
``records/local-objectives/RESULTS.md`` regenerated from them (and the study's reference runs).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lopt.engine.config import LoPTError
from lopt.recipes.study import plan
from lopt.recipes.study.records import (Records, cached_continuations, load_average, machine, timed_train,
                                        write_text)

OUT = Path("records/local-objectives")
STUDY = Path("records/study-v2/results")
LR = 1e-4  # the study's swept rate (records/study-v2/results/sweep): the upper half's in every run
LOWER_RATIOS = (1.0, 0.1)  # the study's grid for the lower half: lr (lopt-paper), lr / 10 (lopt-default)
# In the order they run: the classic local-learning signal first, then the anchored reconstructions.
CANDIDATES = ("early-exit", "recon+cos", "recon+anchor", "recon-std")
# The study's runs that frame the candidates: the bar (freeze-lower) and recon at both lower rates.
REFERENCES = {"freeze-lower": "freeze-lower (the bar)", "lopt-paper": "recon, lr_lower = lr (lopt-paper)",
              "lopt-default": "recon, lr_lower = lr / 10 (lopt-default)", "e2e": "e2e"}


@dataclass(frozen=True)
class Budget:
    """The study's training budget and the part of its evaluation that issue 29 asks for."""

    steps: int = 256
    eval_questions: int = 300
    kl_prompts: int = 32
    kl_new_tokens: int = 48
    eval_batch_size: int = 32
    save_every: int = 64  # a killed run continues from its last checkpoint


FULL = Budget()
PILOT = Budget(steps=8, eval_questions=8, kl_prompts=4, kl_new_tokens=8, eval_batch_size=8, save_every=4)


def run_names(candidates: tuple[str, ...] = CANDIDATES) -> list[tuple[str, str, float]]:
    """``(run name, objective, lr_lower)`` in the order they run: every candidate at the first lower
    rate, then every candidate at the next."""
    return [(f"{c}-lr{LR * r:g}", c, LR * r) for r in LOWER_RATIOS for c in candidates]


class Runner:
    def __init__(self, out: Path, budget: Budget, data_dir: str | None, model: str | None, keep_models: bool):
        from lopt.models import load_model
        from lopt.recipes.study.run import StudyData

        self.out, self.budget, self.model_name, self.keep_models = Path(out), budget, model, keep_models
        self.data = StudyData(Path(data_dir) if data_dir else None)
        self.records = Records(self.out / "results")
        self.runs_dir = Path(os.environ.get("LOPT_EXPERIMENT_RUNS", "runs/local-objectives"))
        self.base, self.tokenizer = load_model(model, device="cpu" if not torch.cuda.is_available() else None)
        self.common = {"budget": asdict(budget), "study_budget": {k: v for k, v in asdict(plan.V2).items()
                                                                  if k in ("batch_size", "train_rows", "max_length",
                                                                           "warmup_ratio")},
                       "model": model}
        self._continuations = None

    def say(self, msg: str) -> None:
        print(f"[local-objectives {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def continuations(self):
        """The base's greedy answers to the general prompts: the study's retention-KL text (same
        function, same settings, so the same tokens), made once and cached."""
        if self._continuations is None:
            self._continuations = cached_continuations(self.runs_dir, self.base, self.tokenizer, self.budget)
        return self._continuations

    def evaluate(self, path: Path) -> dict[str, Any]:
        from lopt.eval.drift import drift, read_boundaries
        from lopt.eval.kl import retention_kl
        from lopt.eval.perplexity import task_loss
        from lopt.models import load_model

        b = self.budget
        model, tok = load_model(str(path), device="cpu" if not torch.cuda.is_available() else None)
        model.eval()
        t0 = time.perf_counter()
        out: dict[str, Any] = {"load_average": load_average()}
        with torch.no_grad():
            loss = task_loss(model, tok, str(self.data.test), max_length=plan.V2.max_length,
                             limit=b.eval_questions, batch_size=b.eval_batch_size // 2)
            loss.pop("items", None)
            out["task_loss"] = loss
            out["retention_kl"] = retention_kl(model, self.base, tok, sequences=self.continuations(),
                                               batch_size=b.eval_batch_size // 2)
            boundaries = read_boundaries(path)
            out["drift"] = drift(model, self.base, tok, sequences=self.continuations(), boundaries=boundaries,
                                 batch_size=b.eval_batch_size // 2)
        out["boundary_cos"] = [x["cos"] for x in out["drift"]["layers"] if x["boundary"]]
        out["seconds"] = round(time.perf_counter() - t0, 1)
        del model
        gc.collect()
        return out

    def run(self, name: str, objective: str, lr_lower: float, anchor_weight: float | None = None) -> None:
        """Train one run (continuing a killed one), evaluate it, drop its weights; skip it if recorded."""
        from lopt.runtime.checkpoints import latest_checkpoint

        b = self.budget
        overrides = {"method": "lopt", "num_blocks": 2, "lambda_aux": 10.0, "lr_lower_ratio": lr_lower / LR,
                     "local_objective": objective}
        if anchor_weight is not None:
            overrides["anchor_weight"] = anchor_weight
        spec = {"run": name, "overrides": overrides, "lr": LR, "seed": 0, **self.common}
        run_dir = self.runs_dir / name
        done = {k: self.records.get(f"{name}/{k}", spec) for k in ("train", "eval")}
        if all(done.values()):
            self.say(f"{name}: already done")
            return
        if done["train"] is None:
            cfg = plan.train_config(overrides, 0, plan.V2, lr=LR, model=self.model_name, dataset=str(self.data.train),
                                    run_dir=run_dir, steps=b.steps)
            cfg.save_every = b.save_every
            # The run's own retention KL (lopt train's default since issue 28) would add its base answers and
            # evaluations to the training time; the runner measures retention itself, on the study's text.
            cfg.retention = "none"
            ckpt = latest_checkpoint(run_dir)
            cfg.resume = str(ckpt) if ckpt else None
            self.say(f"{name}: training {b.steps} steps" + (f", continuing from {ckpt.name}" if ckpt else ""))
            load = load_average()
            seconds, summary, history = timed_train(cfg, run_dir)
            done["train"] = self.records.put(f"{name}/train", spec, {
                "command": plan.train_command(cfg), "train_seconds": round(seconds, 1),
                "resumed_from": ckpt.name if ckpt else None, "load_average": load,
                "load_average_end": load_average(), "machine": machine(), "summary": summary,
                "history": history})
            self.say(f"{name}: trained in {seconds:.0f}s")
        if done["eval"] is None:
            if not run_dir.is_dir():
                raise LoPTError(f"{name}: {run_dir} is gone, so it cannot be evaluated; delete "
                                f"{self.records.path(name + '/train')} to train it again")
            self.say(f"{name}: evaluating")
            self.records.put(f"{name}/eval", spec, {"eval": self.evaluate(run_dir)})
        if not self.keep_models:
            shutil.rmtree(run_dir, ignore_errors=True)


def _reference_rows(study: Path) -> list[list[str]]:
    rows = []
    for name, label in REFERENCES.items():
        try:
            ev = json.loads((study / name / "eval.json").read_text())["eval"]
            tr = json.loads((study / name / "train.json").read_text())
        except (OSError, ValueError):
            continue
        cos = [x["cos"] for x in ev["drift"]["layers"] if x["boundary"]]
        rows.append([label, f"{ev['task_loss']['loss']:.4f}", f"{ev['retention_kl']['kl']:.4f}",
                     f"{cos[0]:.3f}" if cos else "-", f"{tr['train_seconds']:.0f}",
                     f"{tr['summary'].get('tokens_per_s', float('nan')):.0f}", "study v2"])
    return rows


def write_results(out: Path, study: Path = STUDY) -> Path:
    """``out/RESULTS.md``: one row per recorded run beside the study's reference runs."""
    records = Records(out / "results")
    rows = []
    for name, objective, lr_lower in run_names():
        tr, ev = records.read(f"{name}/train"), records.read(f"{name}/eval")
        if tr is None or ev is None:
            rows.append([f"{objective}, lr_lower {lr_lower:g}", "not run yet", "", "", "", "", ""])
            continue
        e = ev["eval"]
        rows.append([f"{objective}, lr_lower {lr_lower:g}", f"{e['task_loss']['loss']:.4f}",
                     f"{e['retention_kl']['kl']:.4f}", f"{e['boundary_cos'][0]:.3f}", f"{tr['train_seconds']:.0f}",
                     f"{tr['summary'].get('tokens_per_s', float('nan')):.0f}",
                     f"steps {tr['spec']['budget']['steps']}"])
    head = ["run", "held-out loss", "retention KL", "boundary cos", "train s", "tokens/s", "note"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(r) + " |" for r in _reference_rows(study) + rows]
    text = ("# Local objectives (issue 29): results\n\nGenerated by `python -m lopt.recipes.study.local_objectives` "
            "from `results/` and the study's reference runs (records/study-v2/results); do not edit. The bar: held-out "
            "loss below freeze-lower's at retention KL no higher than freeze-lower's, at LoPT's cost or less. Upper "
            f"lr {LR:g} in every run; lambda 10; seed 0; this project's shared 2-core CPU.\n\n" + "\n".join(table) + "\n")
    path = out / "RESULTS.md"
    write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [n for n, _, _ in run_names()]
    p.add_argument("--only", nargs="+", metavar="RUN", help=f"runs to do (default all): {', '.join(names)}")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--data-dir", help="the folder holding gsm8k/, arc/, ... (default: $LOPT_DATA_DIR)")
    p.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--pilot", action="store_true", help=f"{PILOT.steps} steps and a tiny evaluation: proves the "
                   "runner end to end (give another --out: its records are not the study's)")
    p.add_argument("--keep-models", action="store_true")
    a = p.parse_args(argv)
    unknown = [n for n in a.only or [] if n not in names]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}: choose from {', '.join(names)}")
    if a.pilot and a.out.resolve() == OUT.resolve():
        raise SystemExit(f"--pilot writes pilot records: give --out another folder than {OUT}")
    runner = Runner(a.out, PILOT if a.pilot else FULL, a.data_dir, a.model, a.keep_models)
    todo = [(n, o, lr) for n, o, lr in run_names() if not a.only or n in a.only]
    for i, (name, objective, lr_lower) in enumerate(todo):
        runner.say(f"[{i + 1}/{len(todo)}] {name}")
        runner.run(name, objective, lr_lower)
        write_results(a.out)
    print(write_results(a.out))


if __name__ == "__main__":
    main()
