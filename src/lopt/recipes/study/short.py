"""Study v1, the short budget (``make experiment ARGS="--budget short"``): 20 steps of 4 examples per
configuration, written to docs/short-budget/RESULTS.md. Study v2 (:mod:`lopt.recipes.study.run`) replaced
it as the project's evidence; this one stays as the short-budget appendix.

Every configuration fine-tunes the embedded SmolLM2-135M-Instruct on the same GSM8K examples in the
same order for the same number of optimizer steps, then is measured the same way: held-out GSM8K
answer loss and accuracy, MMLU-Redux, retention KL and layer-wise drift (CKA) against the untrained
base, and, from ``lopt bench`` in fresh processes, peak memory and tokens/s. Each run's raw record
goes to ``<out>/results/<name>.json`` as soon as it is done, so an interrupted study resumes where it
stopped (records whose settings changed are redone). The report is regenerated from those records.

    python -m lopt.recipes.experiment --budget short            # about 80 minutes on 2 CPU cores
    python -m lopt.recipes.experiment --budget short --quick    # the pipeline in minutes, not a result
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lopt.bench.runner import run_bench
from lopt.engine.config import LoPTError, engine_defaults
from lopt.eval.drift import drift
from lopt.eval.generation import _eval_gsm8k
from lopt.eval.kl import base_continuations, retention_kl
from lopt.eval.multiple_choice import _eval_mmlu_redux
from lopt.eval.perplexity import task_loss
from lopt.eval.tasks import resolve_data
from lopt.models import load_model
from lopt.recipes.sft import TrainConfig, train
from lopt.recipes.study.plan import train_command as plan_train_command
from lopt.recipes.study.records import machine, same_spec, write_json, write_text
from lopt.recipes.study.report import memory_speed_plot


@dataclass(frozen=True)
class Budget:
    """How much every configuration gets; the same for all of them."""

    # Sized so the whole study (14 runs + the base) takes about 80 minutes on 2 CPU cores: 20 steps at
    # lr 5e-5 move the weights about as far as the 60 steps at 2e-5 of the quick check in issue 8.
    steps: int = 20  # optimizer steps
    batch_size: int = 4
    max_length: int = 384  # 3% of GSM8K train examples are longer with the chat template (cut at the end)
    lr: float = 5e-5
    lr_lora: float = 5e-4  # LoRA's usual learning rate is ~10x full fine-tuning's
    warmup_ratio: float = 0.05
    eval_questions: int = 40  # the first N GSM8K test questions (answer loss)
    acc_questions: int = 30  # the first N of them also answered by greedy generation (accuracy)
    gsm8k_new_tokens: int = 160
    mmlu_questions: int = 57  # MMLU-Redux ok rows, spread round-robin over the 57 subjects
    kl_prompts: int = 32  # general prompts answered by the base (retention-kl and drift)
    kl_new_tokens: int = 48
    eval_batch_size: int = 32
    bench_steps: int = 4  # a whole number of --lower-every 4 cycles
    bench_repeats: int = 2  # interleaved, each in a fresh process: the figure is the median
    bench_seq_len: int = 256
    seeds: tuple[int, ...] = (0, 1)  # the configurations in NOISE_CONFIGS are run once per seed


FULL = Budget()
QUICK = Budget(steps=2, batch_size=2, max_length=192, eval_questions=4, acc_questions=4, gsm8k_new_tokens=24,
               mmlu_questions=8, kl_prompts=4, kl_new_tokens=8, eval_batch_size=4, bench_steps=1,
               bench_repeats=1, bench_seq_len=64, seeds=(0, 1))

NOISE_CONFIGS = ("e2e", "lopt-k2")  # repeated with every seed in Budget.seeds to show run-to-run noise


def study_configs(num_layers: int) -> dict[str, dict[str, Any]]:
    """name -> TrainConfig overrides. ``lopt-k2`` is the paper's setting (lambda_aux 10, lr_lower = lr,
    reconstruction objective, boundary at the midpoint); each ``lopt-*`` variant changes one thing."""
    quarter, three_quarters = num_layers // 4, (3 * num_layers) // 4
    return {
        "e2e": {"method": "e2e"},
        "freeze-lower": {"method": "freeze-lower"},
        "lora": {"method": "lora"},
        "lopt-k2": {"method": "lopt", "num_blocks": 2},
        "lopt-k4": {"method": "lopt", "num_blocks": 4},
        f"lopt-b{quarter}": {"method": "lopt", "boundaries": [quarter]},
        f"lopt-b{three_quarters}": {"method": "lopt", "boundaries": [three_quarters]},
        "lopt-k2-lambda0": {"method": "lopt", "num_blocks": 2, "lambda_aux": 0.0},
        "lopt-k2-lambda1": {"method": "lopt", "num_blocks": 2, "lambda_aux": 1.0},
        "lopt-k2-lrlow10": {"method": "lopt", "num_blocks": 2, "lr_lower_ratio": 0.1},
        "lopt-k2-anchor": {"method": "lopt", "num_blocks": 2, "local_objective": "anchor"},
        "lopt-k2-every4": {"method": "lopt", "num_blocks": 2, "lower_every": 4},
        # the two changes that helped, together: lopt's defaults from this study on (lr_lower) and the speed option
        "lopt-k2-lrlow10-every4": {"method": "lopt", "num_blocks": 2, "lr_lower_ratio": 0.1, "lower_every": 4},
    }


QUICK_CONFIGS = ("e2e", "lopt-k2", "freeze-lower")

# Settings that change what a step costs (memory, time); the rest (lambda, lr) only change numbers.
_COST_KEYS = ("method", "num_blocks", "boundaries", "local_objective", "lower_every")


# --------------------------------------------------------------------------- one configuration


def _train_config(name: str, overrides: dict[str, Any], seed: int, budget: Budget, *, model: str | None,
                  dataset: str, run_dir: Path):

    o = dict(overrides)
    # lr_lower is always explicit: the library's default (lr / 10 under LoPT) is a finding of this study,
    # and the paper's setting (lr_lower = lr) must stay what lopt-k2 runs.
    ratio = o.pop("lr_lower_ratio", None)
    lr = budget.lr_lora if o.get("method") == "lora" else budget.lr
    return TrainConfig(model=model, dataset=dataset, max_length=budget.max_length, output_dir=str(run_dir),
                       lr=lr, lr_lower=lr * (1.0 if ratio is None else ratio), batch_size=budget.batch_size,
                       max_steps=budget.steps, warmup_ratio=budget.warmup_ratio, seed=seed, progress=False,
                       log_every=1, **engine_defaults(o))


# Written out even at their defaults, so the commands stay the study's if a default changes.
_PINNED = ("method", "num_blocks", "lambda_aux", "local_objective", "lower_every", "task_grad_every", "batch_size",
           "lr", "lr_lower", "seed")
_LOPT_ONLY = ("num_blocks", "lambda_aux", "local_objective", "lower_every", "task_grad_every")


def train_command(name: str, overrides: dict[str, Any], seed: int, budget: Budget, *, model: str | None,
                  dataset: str, run_dir: Path) -> str:
    """The ``lopt train`` command line of one study run: every option that differs from the default."""

    cfg = _train_config(name, overrides, seed, budget, model=model, dataset=dataset, run_dir=run_dir)

    def pinned(field: str) -> bool:
        return (field in _PINNED and not (field == "num_blocks" and cfg.boundaries)
                and (cfg.method == "lopt" or field not in _LOPT_ONLY))

    return plan_train_command(cfg, pinned)


def evaluate_model(model, tokenizer, base, continuations, boundaries: list[int] | None, budget: Budget,
                   *, gsm8k_test: Path, mmlu_dir: Path) -> dict[str, Any]:
    """The study's measurements of one model (a transformers model or a LoPT wrapper in eval mode)."""

    out: dict[str, Any] = {}
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out["task_loss"] = task_loss(model, tokenizer, str(gsm8k_test), max_length=budget.max_length,
                                     limit=budget.eval_questions, batch_size=budget.eval_batch_size // 2)
        out["gsm8k"] = _eval_gsm8k(model, tokenizer, gsm8k_test, limit=budget.acc_questions,
                                   batch_size=budget.eval_batch_size, progress=False,
                                   max_new_tokens=budget.gsm8k_new_tokens)

        out["mmlu_redux"] = _eval_mmlu_redux(model, tokenizer, mmlu_dir, limit=budget.mmlu_questions,
                                             batch_size=budget.eval_batch_size, progress=False)
        out["mmlu_redux"].pop("subjects", None)  # keep the record small
        out["retention_kl"] = retention_kl(model, base, tokenizer, sequences=continuations,
                                           batch_size=budget.eval_batch_size // 2)
        out["drift"] = drift(model, base, tokenizer, sequences=continuations, boundaries=boundaries,
                             batch_size=budget.eval_batch_size // 2)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _record_path(results_dir: Path, run: str) -> Path:
    return results_dir / f"{run}.json"


def _spec_key(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a training run's record depends on: the cost phase's budget (bench_*) is not part of it."""
    if not spec or not isinstance(spec.get("budget"), dict):
        return spec
    return {**spec, "budget": {k: v for k, v in spec["budget"].items() if not k.startswith("bench_")}}


def _load_record(path: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """A finished record with these settings, else None (redo it)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if same_spec(_spec_key(rec.get("spec")), _spec_key(spec)) else None


# --------------------------------------------------------------------------- the study


def run_study(out: Path, *, quick: bool = False, model: str | None = None, only: list[str] | None = None,
              data_dir: Path | None = None, keep_models: bool = False, bench: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study; write ``out/results/*.json`` and ``out/RESULTS.md``."""

    budget = QUICK if quick else FULL
    gsm8k_train = (data_dir / "gsm8k" / "train.jsonl") if data_dir else resolve_data("gsm8k", None).with_name("train.jsonl")
    gsm8k_test = gsm8k_train.with_name("test.jsonl")
    mmlu_dir = (data_dir / "mmlu-redux") if data_dir else resolve_data("mmlu-redux", None)
    for p in (gsm8k_train, gsm8k_test, mmlu_dir):
        if not p.exists():
            raise LoPTError(f"study data not found: {p}; put ../shared/data beside the repository or "
                            "pass --data-dir")
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(os.environ.get("LOPT_EXPERIMENT_RUNS", "runs/experiment-quick" if quick else "runs/experiment"))

    def say(msg: str) -> None:
        if progress:
            print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    base, tokenizer = load_model(model, device="cpu" if not torch.cuda.is_available() else None)
    num_layers = base.config.num_hidden_layers
    configs = study_configs(num_layers)
    names = [n for n in configs if not quick or n in QUICK_CONFIGS]
    if only:
        unknown = [n for n in only if n not in configs and n != "base"]
        if unknown:
            raise LoPTError(f"unknown study configuration(s) {unknown}: choose from base, {', '.join(configs)}")
        names = [n for n in names if n in only]
    seeds = budget.seeds if not quick else budget.seeds[:1]
    runs = [(n, s) for s in seeds for n in names if s == seeds[0] or n in NOISE_CONFIGS]
    meta = {"budget": asdict(budget), "quick": quick, "model": model or "smollm2-135m-instruct (embedded)",
            "num_layers": num_layers, "dataset": str(gsm8k_train), "machine": machine()}
    say(f"{len(runs)} training runs + the base; records in {results_dir}")

    continuations = None
    common = {"budget": asdict(budget), "model": model}

    def conts():
        nonlocal continuations
        if continuations is None:
            say("base answers to the general prompts (retention-kl, drift)")
            continuations = base_continuations(base, tokenizer, limit=budget.kl_prompts,
                                               max_new_tokens=budget.kl_new_tokens,
                                               batch_size=budget.eval_batch_size, progress=False)
        return continuations

    # The cost phase first: it wants a quiet machine, which a long study is least likely to have later.
    bench_rec = None
    if bench:
        bench_rec = _bench_phase(results_dir, {n: configs[n] for n in names}, budget, model, say)
    elif (results_dir / "bench.json").is_file():
        bench_rec = json.loads((results_dir / "bench.json").read_text())

    records: dict[str, dict[str, Any]] = {}
    if not only or "base" in only:
        spec = {"name": "base", **common}
        path = _record_path(results_dir, "base")
        rec = _load_record(path, spec)
        if rec is None:
            say("evaluating the untrained base")
            rec = {"spec": spec, "name": "base", "seed": None,
                   "eval": evaluate_model(base, tokenizer, base, conts(), [num_layers // 2], budget,
                                          gsm8k_test=gsm8k_test, mmlu_dir=mmlu_dir)}
            write_json(path, rec)
        records["base"] = rec

    for i, (name, seed) in enumerate(runs):
        run = name if seed == seeds[0] else f"{name}-seed{seed}"
        spec = {"name": name, "seed": seed, "overrides": configs[name], **common}
        path = _record_path(results_dir, run)
        rec = _load_record(path, spec)
        if rec is not None:
            say(f"[{i + 1}/{len(runs)}] {run}: already done")
            records[run] = rec
            continue
        say(f"[{i + 1}/{len(runs)}] {run}: training {budget.steps} steps")
        cfg = _train_config(name, configs[name], seed, budget, model=model, dataset=str(gsm8k_train),
                            run_dir=runs_dir / run)
        t0 = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t0
        wrapped = result.model
        hist_path = Path(cfg.output_dir) / "metrics.jsonl"
        history = [json.loads(line) for line in hist_path.read_text().splitlines() if line.strip()] \
            if hist_path.is_file() else []
        say(f"[{i + 1}/{len(runs)}] {run}: trained in {train_s:.0f}s, evaluating")
        boundaries = wrapped.boundaries or None
        ev = evaluate_model(wrapped, result.tokenizer, base, conts(), boundaries, budget,
                            gsm8k_test=gsm8k_test, mmlu_dir=mmlu_dir)
        summary = {k: v for k, v in result.summary.items() if k not in ("data", "output_dir", "eval")}
        rec = {"spec": spec, "name": name, "run": run, "seed": seed, "train_seconds": round(train_s, 1),
               "train": summary, "history": [{k: h.get(k) for k in ("step", "loss", "aux_loss", "grad_norm")}
                                             for h in history],
               "boundaries": boundaries, "eval": ev}
        write_json(path, rec)
        records[run] = rec
        del result, wrapped
        gc.collect()
        if not keep_models:
            _remove_weights(Path(cfg.output_dir))

    records = _all_records(results_dir, configs, seeds)
    report = write_report(out, records, bench_rec, meta, configs)
    say(f"report written to {report}")
    return {"records": records, "bench": bench_rec, "report": str(report)}


def _all_records(results_dir: Path, configs: dict[str, dict[str, Any]], seeds) -> dict[str, dict[str, Any]]:
    """Every record present (also those of earlier invocations), base first, then in study order."""
    order = ["base"] + list(configs) + [f"{n}-seed{s}" for s in seeds[1:] for n in NOISE_CONFIGS]
    found = {p.stem: json.loads(p.read_text()) for p in results_dir.glob("*.json") if p.stem != "bench"}
    return {r: found[r] for r in order if r in found}


def _remove_weights(run_dir: Path) -> None:
    """The study keeps records, not models: drop the weights (several hundred MB a run)."""
    for f in list(run_dir.glob("*.safetensors")) + list(run_dir.glob("checkpoint-*/*.safetensors")):
        f.unlink()


def _bench_phase(results_dir: Path, configs: dict[str, dict[str, Any]], budget: Budget, model: str | None,
                 say) -> dict[str, Any]:
    """Peak memory and tokens/s of every distinct step cost, each in a fresh process (``lopt bench``)."""

    table: dict[str, dict[str, Any]] = {}
    for name, o in configs.items():
        cost = {k: o[k] for k in _COST_KEYS if k in o}
        if cost not in table.values():
            table[name] = cost
    spec = {"configs": table, "batch_size": budget.batch_size, "seq_len": budget.bench_seq_len,
            "steps": budget.bench_steps, "repeats": budget.bench_repeats, "model": model}
    path = results_dir / "bench.json"
    rec = _load_record(path, spec)
    if rec is not None:
        say("bench: already done")
        return rec
    say(f"bench: {len(table)} step costs x {budget.bench_repeats} repeats, fresh process each")
    res = run_bench(list(table), [budget.batch_size], model=model, seq_len=budget.bench_seq_len, warmup=1,
                    steps=budget.bench_steps, repeats=budget.bench_repeats, progress=True, table=table)
    rec = {"spec": spec, **res}
    write_json(path, rec)
    return rec


# --------------------------------------------------------------------------- the report


def _metrics(rec: dict[str, Any]) -> dict[str, Any]:
    ev = rec["eval"]
    drift_layers = ev["drift"].get("layers", [])
    return {"task_loss": ev["task_loss"]["loss"], "gsm8k_acc": ev["gsm8k"]["acc"],
            "mmlu_acc": ev["mmlu_redux"]["acc"], "kl": ev["retention_kl"]["kl"],
            "cka": [layer["cka"] for layer in drift_layers], "cos": [layer["cos"] for layer in drift_layers],
            "cka_boundary": _at_boundary(rec, "cka"), "cos_boundary": _at_boundary(rec, "cos"), "train_s": rec.get("train_seconds"),
            "loss_last": (rec.get("train") or {}).get("loss_last")}


def _at_boundary(rec: dict[str, Any], key: str) -> float | None:
    """Drift (``key``: cka or cos) to the base of the hidden state that crosses the (first) boundary:
    the lower block's output."""
    layers = rec["eval"]["drift"].get("layers", [])
    b = (rec.get("boundaries") or [None])[0]
    if b is None:  # no boundary (e2e, LoRA, the base): the midpoint, where LoPT's k=2 boundary sits
        b = (len(layers) - 1) // 2
    if not 0 <= b < len(layers):
        return None
    return layers[b][key]


def _fmt(x: Any, spec: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return spec.format(x)


def write_report(out: Path, records: dict[str, dict[str, Any]], bench: dict[str, Any] | None,
                 meta: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Path:
    """docs/RESULTS.md (or ``out/RESULTS.md``) from the run records, with its plots beside them."""
    results_dir = out / "results"
    m = {run: _metrics(rec) for run, rec in records.items()}
    base = m.get("base")
    bench_rows = {r["name"]: r for r in (bench or {}).get("rows", [])}
    b = meta["budget"]
    lines = ["# LoPT at small scale: the study behind the README's claims", ""]
    if meta["quick"]:
        lines += ["**This is a `--quick` run: a tiny budget that exercises the pipeline. Its numbers mean "
                  "nothing.**", ""]
    lines += [
        "Generated by `make experiment ARGS=\"--budget short\"` (`python -m lopt.recipes.experiment --budget short`) "
        "from the records in `results/`; "
        "edit the code, not this file.", "",
        "## Setup", "",
        f"- Model: {meta['model']} ({meta['num_layers']} decoder layers), fp32.",
        f"- Task: SFT on `{Path(meta['dataset']).name}` (GSM8K train), the same examples in the same order "
        f"for every configuration: {b['steps']} AdamW steps of {b['batch_size']} examples "
        f"(max length {b['max_length']}), lr {b['lr']} (LoRA {b['lr_lora']}, r 16, alpha 32), cosine "
        f"schedule, warm-up {b['warmup_ratio']:.0%}, clipping at 1.0, seed {b['seeds'][0]} "
        f"(e2e and lopt-k2 also with seed {', '.join(map(str, b['seeds'][1:]))}).",
        f"- Held-out task: the first {b['eval_questions']} GSM8K test questions: answer loss (cross-entropy "
        f"of the reference solution given the question); the first {b['acc_questions']} also for accuracy "
        f"(greedy, {b['gsm8k_new_tokens']} new tokens, the number after '####' or else the last number).",
        f"- Retention: MMLU-Redux, {b['mmlu_questions']} sound ('ok') questions spread over the 57 subjects "
        f"(zero-shot, letter log-likelihood); retention KL: KL(base || tuned) over the base model's own "
        f"{b['kl_new_tokens']}-token answers to {b['kl_prompts']} general prompts (`lopt.prompts`).",
        "- Drift: linear CKA, and the mean per-token cosine similarity, between the tuned and the base hidden "
        "states at every layer input, on the same text; the boundary value is that of the state the lower "
        "block hands to the upper one.",
        f"- Cost: `lopt bench`, batch {b['batch_size']} x {b['bench_seq_len']} tokens, {b['bench_steps']} "
        f"timed step(s) after one warm-up, {b['bench_repeats']} repeat(s) interleaved, each in a fresh "
        "process; peak RSS of the step and tokens/s (medians; for --lower-every runs the mean over "
        "whole cycles).",
        f"- Machine: {meta['machine']['cpus']} CPU(s) ({meta['machine']['platform']}), no GPU; torch "
        f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}, Python "
        f"{meta['machine']['python']}.", "",
        "## Results", "",
        "| run | what changes | held-out loss | x e2e | GSM8K acc | MMLU-Redux | MMLU drop | retention KL "
        "| x e2e | CKA at boundary* | cos at boundary* | peak MiB | tok/s | x e2e |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    e2e = m.get("e2e")
    ref_bench = bench_rows.get("e2e")
    for run, x in m.items():
        rec = records[run]
        name = rec.get("name", run)
        what = _describe(configs.get(name)) if name != "base" else "untrained"
        br = _bench_row_for(name, configs, bench_rows)
        lines.append(
            f"| {run} | {what} | {_fmt(x['task_loss'])} | "
            f"{_fmt(x['task_loss'] / e2e['task_loss'] if e2e else None, '{:.2f}')} | "
            f"{_fmt(x['gsm8k_acc'], '{:.1%}')} | {_fmt(x['mmlu_acc'], '{:.1%}')} | "
            f"{_fmt((base['mmlu_acc'] - x['mmlu_acc']) * 100 if base else None, '{:+.1f} pt')} | "
            f"{_fmt(x['kl'], '{:.4f}')} | "
            f"{_fmt(x['kl'] / e2e['kl'] if e2e and e2e['kl'] else None, '{:.2f}')} | "
            f"{_fmt(x['cka_boundary'])} | {_fmt(x['cos_boundary'])} | {_fmt(br and br['peak_step_mb'], '{:.0f}')} | "
            f"{_fmt(br and br['tokens_per_s'], '{:.0f}')} | "
            f"{_fmt(br and ref_bench and br['tokens_per_s'] / ref_bench['tokens_per_s'], '{:.2f}')} |")
    lines += ["", "*the CKA and mean cosine to the base of the state entering the first upper layer (the midpoint layer for runs "
              "without a boundary). Peak MiB and tok/s come from the bench (a configuration that differs from another only "
              "in lambda or learning rate costs the same and shares its bench row).", ""]
    lines += _noise_lines(m, records)
    lines += _target_lines(m, bench_rows, configs)
    plots = _plots(results_dir, m, records, bench_rows, configs)
    if plots:
        lines += ["## Plots", ""] + [f"![{t}](results/{p})" for t, p in plots] + [""]
    notes = out / "results" / "notes.md"
    if notes.is_file():
        lines += ["## Discussion", "", notes.read_text().strip(), ""]
    lines += ["## Reproduce", "", "```", "python -m lopt.recipes.experiment --budget short            # all runs; resumes from results/*.json",
              "python -m lopt.recipes.experiment --budget short --only e2e lopt-k2   # some of them", "```", "",
              "Delete a record in `docs/results/` to redo that run. Each training run is this `lopt train` "
              "command (the study calls the same function in-process, then evaluates the model in memory):", "",
              "```"]
    budget = Budget(**{**meta["budget"], "seeds": tuple(meta["budget"]["seeds"])})
    for run, rec in records.items():
        if run != "base" and rec.get("name") in configs:
            lines.append(train_command(rec["name"], configs[rec["name"]], rec.get("seed") or 0, budget,
                                       model=(rec.get("spec") or {}).get("model"), dataset=meta["dataset"],
                                       run_dir=Path("runs/experiment") / run))
    lines += ["```", ""]
    path = out / "RESULTS.md"
    write_text(path, "\n".join(lines))
    return path


def _describe(o: dict[str, Any] | None) -> str:
    if not o:
        return "-"
    parts = []
    for k, v in o.items():
        if k == "method":
            continue
        key = {"num_blocks": "k", "boundaries": "boundary at layer", "lambda_aux": "lambda_aux",
               "lr_lower_ratio": "lr_lower = lr x", "local_objective": "objective",
               "lower_every": "lower every"}.get(k, k)
        parts.append(f"{key} {v[0] if isinstance(v, list) and len(v) == 1 else v}")
    return o["method"] + (": " + ", ".join(parts) if parts else "")


def _bench_row_for(name: str, configs: dict[str, dict[str, Any]], rows: dict[str, dict[str, Any]]):
    if name not in configs:
        return None
    cost = {k: configs[name][k] for k in _COST_KEYS if k in configs[name]}
    for bname, row in rows.items():
        if bname in configs and {k: configs[bname][k] for k in _COST_KEYS if k in configs[bname]} == cost:
            return row
    return None


def _noise_lines(m: dict[str, dict[str, Any]], records) -> list[str]:
    out = []
    for name in NOISE_CONFIGS:
        runs = [r for r in m if records[r].get("name") == name]
        if len(runs) < 2:
            continue
        vals = {k: [m[r][k] for r in runs] for k in ("task_loss", "gsm8k_acc", "mmlu_acc", "kl")}
        out.append(f"| {name} | {len(runs)} | " + " | ".join(
            f"{_fmt(min(v), f)}-{_fmt(max(v), f)}" for v, f in
            ((vals['task_loss'], '{:.3f}'), (vals['gsm8k_acc'], '{:.1%}'), (vals['mmlu_acc'], '{:.1%}'),
             (vals['kl'], '{:.4f}'))) + " |")
    if not out:
        return []
    return ["### Run-to-run noise (seeds)", "",
            "| config | runs | held-out loss | GSM8K acc | MMLU-Redux | retention KL |", "|---|---|---|---|---|---|",
            *out, "", "Differences smaller than these ranges are not findings.", ""]


def _target_lines(m: dict[str, dict[str, Any]], bench_rows: dict[str, dict[str, Any]],
                  configs: dict[str, dict[str, Any]]) -> list[str]:
    """The paper's claims as measurable targets, each checked for the paper's setting and for every
    LoPT configuration of the study (the best is named, never shown alone)."""
    e2e, base = m.get("e2e"), m.get("base")
    if not e2e or not base:
        return []
    lopt_runs = [r for r in m if r.startswith("lopt-") and "-seed" not in r]
    lines = ["## The paper's claims, checked", "",
             "| run | loss / e2e (target <= 1.05) | MMLU drop / e2e's (<= 0.5) | KL / e2e's (<= 0.5) "
             "| CKA at boundary (>= 0.95) | cos at boundary | tok/s / e2e (>= 1.2) |", "|---|---|---|---|---|---|---|"]
    e2e_drop = base["mmlu_acc"] - e2e["mmlu_acc"]
    ref = bench_rows.get("e2e")
    lines.append(f"| e2e | 1.00 | 1.00 | 1.00 | {_fmt(e2e['cka_boundary'])} | {_fmt(e2e['cos_boundary'])} | 1.00 |")
    for r in lopt_runs:
        x = m[r]
        drop = base["mmlu_acc"] - x["mmlu_acc"]
        br = _bench_row_for(r, configs, bench_rows)
        lines.append(
            f"| {r} | {_fmt(x['task_loss'] / e2e['task_loss'], '{:.2f}')} | "
            f"{_fmt(drop / e2e_drop if e2e_drop > 0 else None, '{:.2f}')} | "
            f"{_fmt(x['kl'] / e2e['kl'] if e2e['kl'] else None, '{:.2f}')} | {_fmt(x['cka_boundary'])} | "
            f"{_fmt(x['cos_boundary'])} | "
            f"{_fmt(br['tokens_per_s'] / ref['tokens_per_s'] if br and ref else None, '{:.2f}')} |")
    lines += ["", "MMLU drop / e2e's is left blank when e2e did not lose MMLU accuracy (nothing to halve). "
              "CKA and cosine are taken at the run's first boundary, and at the midpoint layer for runs without one.", ""]
    return lines


def _plots(results_dir: Path, m, records, bench_rows, configs) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "cka", "linear CKA to the base"), (axes[1], "cos", "mean cosine to the base")):
        for run, x in m.items():
            if run == "base" or not x[key]:
                continue
            style = "-" if run.startswith("lopt") else "--"
            ax.plot(range(len(x[key])), x[key], style, label=run, linewidth=1.2)
            for layer in records[run].get("boundaries") or []:
                if layer < len(x[key]):
                    ax.plot([layer], [x[key][layer]], "o", color=ax.lines[-1].get_color(), markersize=4)
        ax.set_xlabel("layer input (hidden_states index); dots: boundary")
        ax.set_ylabel(label)
        ax.set_title(f"Drift by layer: {label.split(' to')[0]}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(results_dir / "drift.png", dpi=110)
    plt.close(fig)
    made.append(("drift by layer", "drift.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    for run, x in m.items():
        ax.scatter(x["kl"], x["task_loss"], s=20)
        ax.annotate(run, (x["kl"], x["task_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("retention KL to the base (lower: more retained)")
    ax.set_ylabel("held-out GSM8K answer loss (lower: better)")
    ax.set_title("Task loss against retention")
    fig.tight_layout()
    fig.savefig(results_dir / "loss-vs-retention.png", dpi=110)
    plt.close(fig)
    made.append(("task loss against retention", "loss-vs-retention.png"))

    if bench_rows:
        made.append(memory_speed_plot(results_dir, bench_rows))
    return made
