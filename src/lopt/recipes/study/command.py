"""``lopt study``: which post-training method, decided on the user's own model and data.

For every method it sweeps the learning rate on short runs (a grid around a per-method starting
point, scored by held-out task loss), trains the method at 1-3 rates around the best one, evaluates
every run (held-out task loss, retention KL on lopt's general prompts, boundary drift, optionally the
retention suite), measures each method's cost with ``lopt bench`` on the same model, batch and device,
and writes a report (:mod:`lopt.recipes.study.summary`): loss-vs-retention curves, retention at
matched task skill (:mod:`lopt.recipes.study.matched`) and a rules-based "which method when"
(:mod:`lopt.recipes.study.rules`).

Every piece (the bench, the base's evaluation, a sweep point, a run's training, its evaluation) writes
one record under ``OUT/results`` as soon as it is done (:mod:`lopt.recipes.study.records`); calling
the study again skips every piece recorded with the same settings, and a killed run continues from
its last checkpoint.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lopt.config import PRECISIONS, TrainConfig
from lopt.engine.config import LoPTError, option
from lopt.methods import METHODS
from lopt.recipes.study.records import Records, load_average, machine, timed_train, write_json, write_text

_WHAT, _PLAN, _EVAL, _RUN = "what to train", "the study's plan", "evaluation", "bookkeeping"

DEFAULT_METHODS = ("e2e", "lopt", "freeze-lower", "lora", "lisa", "badam")
# Where each method's learning-rate grid is centred: study v2's sweep on SmolLM2-135M chose 1e-4 for the
# full-parameter methods (grid 1e-5..3e-4) and 1e-3 for LoRA (grid 1e-4..3e-3). The layer-switching
# methods (LISA, BAdam) update full layers with AdamW, so they start where the full-parameter ones do.
# QLoRA trains the same adapters as LoRA (over a 4-bit base), so it starts where LoRA does.
START_LR = {"e2e": 1e-4, "lopt": 1e-4, "freeze-lower": 1e-4, "lisa": 1e-4, "badam": 1e-4, "lora": 1e-3,
            "qlora": 1e-3}
# The rates each method is trained at, as multiples of its sweep's best: the best, then gentler ones,
# which move the model less (lower retention KL, higher loss): the curve a matched-skill reading needs.
RATE_FACTORS = (1.0, 0.3, 0.1)


@dataclass
class StudyOptions:
    """The options of ``lopt study`` (its flags, --help and YAML keys are generated from these fields)."""

    model: str | None = option(None, "the model (default: the embedded SmolLM2-135M-Instruct)", group=_WHAT)
    gguf_file: str | None = option(None, "GGUF file name inside --model", group=_WHAT)
    dataset: str | None = option(None, "the training data: a .jsonl/.json/.parquet/.csv file, a preset or a hub "
                                 "id, as lopt train reads it (required)", group=_WHAT)
    eval_dataset: str | None = option(
        None, "held-out data for the task loss (its test split); default: a slice of --dataset the runs "
        "never train on", group=_WHAT)
    data_dir: str | None = option(None, "the data folder for presets and the retention suite (default: "
                                  "$LOPT_DATA_DIR)", group=_WHAT)
    methods: list[str] = option(factory=lambda: list(DEFAULT_METHODS), help="the methods to compare",
                                nargs="+", choices=METHODS, metavar="METHOD", group=_WHAT)
    steps: int = option(256, "optimizer steps of every run", group=_PLAN)
    batch_size: int = option(4, "examples per step (every run, and the bench)", group=_PLAN)
    max_length: int = option(512, "truncate examples to this many tokens", group=_PLAN)
    warmup_ratio: float = option(0.05, "fraction of steps with linear warm-up before the cosine decay",
                                 group=_PLAN)
    val_size: int = option(100, "rows of --dataset held out to score the sweep (and, without "
                           "--eval-dataset, as many more to evaluate the runs)", group=_PLAN)
    sweep_steps: int | None = option(None, "steps of each sweep run (default: a quarter of --steps)", type=int,
                                     group=_PLAN)
    lr_factors: list[float] = option(
        factory=lambda: [0.3, 1.0, 3.0], help="the sweep's grid: each method's starting rate (lopt.recipes."
        "study.command.START_LR) times these", nargs="+", type=float, metavar="X", group=_PLAN)
    sweep_extend: int = option(2, "when a method's best rate is the lowest or highest of its grid, sweep up "
                               "to this many more rates beyond it (x3 each) until one is worse, so the best is "
                               "bracketed; 0: the grid as given", group=_PLAN)
    start_lr: list[str] = option(factory=list, help="another starting rate for a method, e.g. lora=2e-4",
                                 nargs="+", metavar="METHOD=LR", group=_PLAN)
    rates: int = option(2, "rates each method is trained at: its sweep's best, then 0.3x and 0.1x of it",
                        choices=(1, 2, 3), group=_PLAN)
    method_rates: list[str] = option(factory=list, help="another number of rates for a method, e.g. e2e=3",
                                     nargs="+", metavar="METHOD=N", group=_PLAN)
    seeds: list[int] = option(factory=lambda: [0], help="seeds: every run with the first; each method's best "
                              "rate again with the others (the seed noise)", nargs="+", type=int, group=_PLAN)
    seed_methods: list[str] = option(factory=list, help="only these methods' best rates are repeated with the other "
                                     "--seeds (default: every method's)", nargs="+", metavar="METHOD", group=_PLAN)
    precision: str = option(
        "auto", "every run's and the bench's --precision (as lopt train: auto is fp32 on CPU, bf16-mixed on CUDA); "
        "a study is worth running at the fastest precision whose quality you have checked against fp32",
        choices=PRECISIONS, group=_PLAN)
    adapt_schedules: bool = option(
        True, "set BAdam's switch interval and LISA's redraw interval so every layer gets a turn within a run's "
        "steps (--no-adapt-schedules: their library defaults, 50 and 20 steps)", group=_PLAN)
    retention_prompts: int = option(16, "general prompts the retention KL and drift average over", group=_EVAL)
    retention_new_tokens: int = option(32, "length of the base model's answers to them", group=_EVAL)
    retention_suite: str | None = option(None, "also the retention suite: comma-separated tasks (arc-easy,"
                                         "arc-challenge,piqa,winogrande,lambada)", group=_EVAL)
    limit: int = option(50, "--retention-suite: items per task", group=_EVAL)
    eval_limit: int = option(200, "rows of --eval-dataset evaluated", group=_EVAL)
    eval_batch_size: int = option(8, "batch size of the evaluations", group=_EVAL)
    bench_steps: int = option(2, "timed steps per method in lopt bench", group=_EVAL)
    bench_repeats: int = option(2, "lopt bench's processes per method, interleaved: the first measures memory, the "
                                   "others time the steps (with 1, its CPU step times are slowed by the memory "
                                   "measurement and the estimate with them)", group=_EVAL)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda when available)", group=_RUN)
    output_dir: str = option("runs/study", "the study's folder: results/ (its records), RESULTS.md, study.json, "
                             "the plots", group=_RUN)
    keep_models: bool = option(False, "keep each run's weights (default: records only)", group=_RUN)
    dry_run: bool = option(False, "check the input, bench the methods, print the plan and the time estimate; "
                           "train nothing", group=_RUN)
    progress: bool = option(True, "show the study's progress and ETA", group=_RUN)


# --------------------------------------------------------------------------- the plan (pure)


def start_rates(opts: StudyOptions) -> dict[str, float]:
    """Each method's starting rate: START_LR, with --start-lr's overrides (one-line errors)."""
    out = {m: START_LR[m] for m in opts.methods}
    for item in opts.start_lr:
        method, _, value = item.partition("=")
        if method not in opts.methods:
            raise LoPTError(f"--start-lr {item}: {method!r} is not one of --methods ({' '.join(opts.methods)})")
        try:
            out[method] = float(value)
        except ValueError:
            raise LoPTError(f"--start-lr {item}: give METHOD=LR, e.g. lora=2e-4") from None
        if not out[method] > 0:
            raise LoPTError(f"--start-lr {item}: the rate must be > 0")
    return out


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def grids(opts: StudyOptions) -> dict[str, list[float]]:
    """The sweep's learning rates per method: the starting rate times each of --lr-factors."""
    return {m: sorted({_round(lr * f) for f in opts.lr_factors}) for m, lr in start_rates(opts).items()}


EXTEND = 3.0  # the step of a grid extension beyond an edge whose rate is best


def walk_grid(grid: list[float], loss: Callable[[float], float | None], extend: int
              ) -> tuple[list[float], dict[float, float]] | None:
    """Score ``grid`` with ``loss`` (a sweep point; None: not recorded), then, while the best rate is
    the lowest or highest so far, one more rate x3 beyond it, up to ``extend`` more. Returns the walked
    grid and its losses, or None at the first point ``loss`` cannot give."""
    grid, losses = sorted(grid), {}
    for lr in grid:
        if (v := loss(lr)) is None:
            return None
        losses[lr] = v
    for _ in range(extend if len(grid) > 1 else 0):
        finite = {lr: v for lr, v in losses.items() if v == v}
        if not finite:
            break
        best = min(finite, key=finite.get)
        if best == grid[-1]:
            lr = _round(best * EXTEND)
        elif best == grid[0]:
            lr = _round(best / EXTEND)
        else:
            break  # bracketed
        if (v := loss(lr)) is None:
            return None
        losses[lr] = v
        grid = sorted(grid + [lr])
    return grid, losses


def final_rates(best: float, rates: int) -> list[float]:
    """The rates a method is trained at, from its sweep's best (RATE_FACTORS)."""
    return [_round(best * f) for f in RATE_FACTORS[:rates]]


def schedule(method: str, num_layers: int, steps: int, adapt: bool) -> tuple[dict[str, Any], str]:
    """The options a layer-switching method gets for a run of ``steps`` steps, and the sentence that
    says why. BAdam trains one layer at a time in turn; LISA draws one at random every interval."""
    if method not in ("badam", "lisa"):
        return {}, ""
    if not adapt:
        return {}, (f"{method}: its library default (BAdam switches every 50 steps, LISA redraws every 20), "
                    "as --no-adapt-schedules asks")
    every = max(1, steps // num_layers)
    if method == "badam":
        turns = min(num_layers, math.ceil(steps / every))
        what = (f"all {num_layers} layers get a turn" if turns == num_layers else
                f"only {turns} of {num_layers} layers get a turn (fewer steps than layers)")
        return {"badam_switch_every": every}, (
            f"badam: switch every {every} steps, so {what} in {steps} steps (the default, 50, would train "
            f"{min(num_layers, math.ceil(steps / 50))})")
    draws = math.ceil(steps / every)
    covered = 1 - (1 - 1 / num_layers) ** draws
    return {"lisa_interval": every}, (
        f"lisa: a layer drawn every {every} steps, {draws} draws for {num_layers} layers in {steps} steps "
        f"(random draws: about {covered:.0%} of the layers get a turn; the default, 20, would draw "
        f"{math.ceil(steps / 20)} times)")


def rates_of(opts: StudyOptions) -> dict[str, int]:
    """How many rates each method is trained at: --rates, with --method-rates' overrides (one-line errors)."""
    out = dict.fromkeys(opts.methods, opts.rates)
    for item in opts.method_rates:
        method, _, value = item.partition("=")
        if method not in opts.methods:
            raise LoPTError(f"--method-rates {item}: {method!r} is not one of --methods ({' '.join(opts.methods)})")
        if value not in ("1", "2", "3"):
            raise LoPTError(f"--method-rates {item}: give METHOD=N with N 1, 2 or 3, e.g. e2e=3")
        out[method] = int(value)
    return out


def run_name(method: str, lr: float, seed: int, first_seed: int) -> str:
    return f"{method}-lr{lr:g}" + (f"-seed{seed}" if seed != first_seed else "")


def repeat_seeds(opts: StudyOptions, method: str) -> list[int]:
    """The seeds beyond the first that ``method``'s best rate runs again with."""
    return list(opts.seeds[1:]) if not opts.seed_methods or method in opts.seed_methods else []


def final_runs(best: dict[str, float], opts: StudyOptions) -> list[dict[str, Any]]:
    """``[{"run", "method", "lr", "seed"}]``: every method at its rates with the first seed, then its
    best rate with each other seed."""
    out, rates = [], rates_of(opts)
    for m in opts.methods:
        if m not in best:
            continue
        out += [{"run": run_name(m, lr, opts.seeds[0], opts.seeds[0]), "method": m, "lr": lr, "seed": opts.seeds[0]}
                for lr in final_rates(best[m], rates[m])]
        out += [{"run": run_name(m, best[m], s, opts.seeds[0]), "method": m, "lr": _round(best[m]), "seed": s}
                for s in repeat_seeds(opts, m)]
    return out


def check_options(opts: StudyOptions) -> None:
    """The options alone, before any data or model is read (one-line errors)."""
    if not opts.dataset:
        raise LoPTError("--dataset is required: the data to train on (a file, a preset or a hub id)")
    if not opts.methods:
        raise LoPTError("--methods: name at least one method")
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise LoPTError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if len(set(opts.methods)) != len(opts.methods):
        raise LoPTError(f"--methods names a method twice: {' '.join(opts.methods)}")
    for name in ("steps", "batch_size", "max_length", "val_size", "retention_prompts", "retention_new_tokens",
                 "limit", "eval_limit", "eval_batch_size", "bench_steps", "bench_repeats"):
        if getattr(opts, name) < 1:
            raise LoPTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.rates not in (1, 2, 3):
        raise LoPTError(f"--rates must be 1, 2 or 3, got {opts.rates}")
    if opts.sweep_steps is not None and not 1 <= opts.sweep_steps <= opts.steps:
        raise LoPTError(f"--sweep-steps must be 1..--steps ({opts.steps}), got {opts.sweep_steps}")
    if opts.sweep_extend < 0:
        raise LoPTError(f"--sweep-extend must be >= 0 (0: the grid as given), got {opts.sweep_extend}")
    if not opts.lr_factors or any(not f > 0 for f in opts.lr_factors):
        raise LoPTError("--lr-factors: give one or more factors > 0")
    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        raise LoPTError(f"--seeds: give one or more distinct seeds, got {opts.seeds}")
    stray = [m for m in opts.seed_methods if m not in opts.methods]
    if stray:
        raise LoPTError(f"--seed-methods {stray[0]}: not one of --methods ({' '.join(opts.methods)})")
    start_rates(opts)
    rates_of(opts)
    suite_tasks(opts)


def suite_tasks(opts: StudyOptions) -> tuple[str, ...]:
    if not opts.retention_suite:
        return ()
    from lopt.eval.retention import parse_retention
    from lopt.eval.common import EvalError

    try:
        return parse_retention("suite:" + opts.retention_suite)[1]
    except EvalError as e:
        raise LoPTError(str(e).replace("--retention suite:", "--retention-suite ")) from None


def sweep_steps(opts: StudyOptions) -> int:
    return opts.sweep_steps or max(1, opts.steps // 4)


def as_trained(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with the options ``lopt train`` fills in when they are unset (the recipes' defaults:
    under lopt the boundary open every 4th step, a tied head kept tied, no local loss) written out:
    ``lopt bench`` fills the engine's instead (pure local learning, an untied head), so a bench row
    of the bare overrides would measure another method than the runs train."""
    cfg = TrainConfig(**overrides)
    return {**overrides, "task_grad_every": cfg.task_grad_every, "tied_head": cfg.tied_head,
            "lambda_aux": cfg.lambda_aux}


# --------------------------------------------------------------------------- the data


class StudyData:
    """The study's three files under ``OUT/data``: ``train.jsonl`` (the rows every run trains on, in
    order: steps x batch size of them), ``sweep-val.jsonl`` (held out of --dataset: scores the sweep)
    and ``eval.jsonl`` (--eval-dataset's test rows, else another slice held out of --dataset)."""

    def __init__(self, opts: StudyOptions, folder: Path):
        from lopt.data import DataError, hold_out, load_records

        need = opts.steps * opts.batch_size
        try:
            rows = load_records(opts.dataset, split="train", data_dir=opts.data_dir)
            held = opts.val_size * (1 if opts.eval_dataset else 2)
            if len(rows) <= held:
                raise LoPTError(f"no held-out split possible: {opts.dataset} has {len(rows)} rows and the study "
                                f"holds out {held} (--val-size {opts.val_size}"
                                + ("" if opts.eval_dataset else " for the sweep and as many for the evaluation")
                                + "); give a smaller --val-size, more data or --eval-dataset")
            pool, val = hold_out(rows, held, seed=0)
            if len(pool) < need:
                raise LoPTError(f"{opts.dataset} is too small for the budget: {len(pool)} rows are left to train "
                                f"on after holding out {held}, and --steps {opts.steps} x --batch-size "
                                f"{opts.batch_size} needs {need} (one pass); lower --steps or --val-size")
            sweep_val, evals = val[:opts.val_size], val[opts.val_size:]
            if opts.eval_dataset:
                evals = load_records(opts.eval_dataset, split="test", limit=opts.eval_limit, data_dir=opts.data_dir)
                self.eval_note = (f"the task loss is measured on the first {len(evals)} rows of "
                                  f"{opts.eval_dataset} (its test split)")
            else:
                evals = evals[:opts.eval_limit]
                self.eval_note = (f"no --eval-dataset: {held} rows of {opts.dataset} are held out (drawn with "
                                  f"seed 0) and never trained on; the task loss is measured on {len(evals)} of them")
        except DataError as e:
            raise LoPTError(str(e)) from None
        self.rows, self.train_rows = len(rows), need
        self.sweep_note = f"the sweep is scored on {len(sweep_val)} other held-out rows of {opts.dataset}"
        self.train, self.sweep_val, self.eval = (folder / "train.jsonl", folder / "sweep-val.jsonl",
                                                 folder / "eval.jsonl")
        self._texts = {p: "".join(json.dumps(r, default=str) + "\n" for r in part)
                       for p, part in ((self.train, pool[:need]), (self.sweep_val, sweep_val), (self.eval, evals))}
        self.digest = hashlib.sha1("".join(self._texts.values()).encode()).hexdigest()[:16]

    def write(self) -> None:
        """Write the three files (only when their content changed, so a resumed study keeps them)."""
        for path, text in self._texts.items():
            if not path.is_file() or path.read_text() != text:
                write_text(path, text)

    def describe(self) -> dict[str, Any]:
        return {"rows": self.rows, "train_rows": self.train_rows, "digest": self.digest,
                "eval": self.eval_note, "sweep": self.sweep_note}


# --------------------------------------------------------------------------- progress


class Progress:
    """A bar and an ETA for the whole study: every piece has an estimate (from the bench's step times,
    scaled by how long the pieces already run here took against their estimates)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.total = self.done = 0.0
        self.measured = self.estimated_measured = 0.0
        self.t0 = time.perf_counter()

    def add(self, estimate: float) -> None:
        self.total += estimate

    def finish(self, estimate: float, seconds: float | None) -> None:
        """A piece is done: ``seconds`` it took here, or None when its record already existed."""
        self.done += estimate
        if seconds is not None and estimate > 0:
            self.measured += seconds
            self.estimated_measured += estimate

    def eta(self) -> float:
        scale = self.measured / self.estimated_measured if self.estimated_measured else 1.0
        return max(0.0, self.total - self.done) * scale

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total if self.total else 0.0
        bar = "#" * round(20 * frac) + "-" * (20 - round(20 * frac))
        eta = _hms(self.eta()) if self.total else "?"  # no estimate before the bench has timed a step
        print(f"[study {bar} {frac:4.0%} ETA {eta}] {msg}", file=sys.stderr, flush=True)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- the study


class Study:
    """One invocation of ``lopt study``: its options, data, records, base model and estimates."""

    def __init__(self, opts: StudyOptions):
        check_options(opts)
        self.opts = opts
        self.out = Path(opts.output_dir)
        self.data = StudyData(opts, self.out / "data")
        self.tasks = suite_tasks(opts)
        if self.tasks:
            from lopt.eval.common import EvalError
            from lopt.eval.retention import RetentionSuite

            try:
                RetentionSuite.check(self.tasks, opts.data_dir)
            except EvalError as e:
                raise LoPTError(str(e)) from None
        self.records = Records(self.out / "results")
        self.runs_dir = self.out / "models"
        self.cache_dir = self.out / "cache"  # the base's answers to the general prompts (retention KL)
        self.progress = Progress(opts.progress)
        self.executed: list[str] = []  # pieces run by this call (a resumed study runs none twice)
        self._base = self._probe = self._suite = None
        self._scales: dict[int, float] = {}
        self.num_layers = self._num_layers()
        self.grids = grids(opts)
        self.swept: dict[str, list[float]] = {}  # each method's grid as swept: with the rates beyond an edge
        self.schedules = {m: schedule(m, self.num_layers, opts.steps, opts.adapt_schedules) for m in opts.methods}
        self.common = {"model": opts.model, "gguf_file": opts.gguf_file, "data": self.data.digest,
                       "batch_size": opts.batch_size, "max_length": opts.max_length,
                       "warmup_ratio": opts.warmup_ratio, "device": opts.device}
        self.eval_spec = {"prompts": opts.retention_prompts, "new_tokens": opts.retention_new_tokens,
                          "suite": list(self.tasks), "limit": opts.limit if self.tasks else None}

    def _num_layers(self) -> int:
        """The model's decoder layers (the base is loaded once: the probe and drift need it anyway)."""
        return self._load_base()[0].config.num_hidden_layers

    def _load_base(self):
        from lopt.models import load_model

        if self._base is None:
            self._base = load_model(self.opts.model, gguf_file=self.opts.gguf_file, device=self._device())
        return self._base

    def _device(self) -> str:
        return self.opts.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # ------------------------------------------------------------------ configurations

    def overrides(self, method: str, steps: int) -> dict[str, Any]:
        # The precision only when it is not auto: records made before the option existed stay valid.
        prec = {} if self.opts.precision == "auto" else {"precision": self.opts.precision}
        return {"method": method, **prec, **schedule(method, self.num_layers, steps, self.opts.adapt_schedules)[0]}

    def train_config(self, method: str, lr: float, seed: int, steps: int, run_dir: Path,
                     extra: dict[str, Any] | None = None) -> TrainConfig:
        """The run's ``lopt train`` options; ``extra``: more of them (a run's variant of its method)."""
        o = self.opts
        return TrainConfig(model=o.model, gguf_file=o.gguf_file, dataset=str(self.data.train),
                           limit=steps * o.batch_size, max_length=o.max_length, output_dir=str(run_dir), lr=lr,
                           batch_size=o.batch_size, max_steps=steps, warmup_ratio=o.warmup_ratio, seed=seed,
                           device=o.device, progress=False, log_every=1,
                           **{**self.overrides(method, steps), **(extra or {})})

    @staticmethod
    def command(cfg: TrainConfig) -> str:
        from lopt.recipes.study.plan import train_command

        pinned = ("method", "lr", "batch_size", "seed", "max_steps", "limit", "max_length")
        return train_command(cfg, lambda name: name in pinned)

    # ------------------------------------------------------------------ estimates

    def step_seconds(self, method: str) -> float | None:
        rec = self.records.read("bench")
        for row in (rec or {}).get("rows", []):
            if row["name"] == method:
                return row["step_time_s"]
        return None

    def length_scale(self, steps: int) -> float:
        """How much longer a run's batches are than the bench's. ``lopt bench`` times the first few
        batches a run of ``--steps`` draws; a run of ``steps`` draws its own, and a step's time follows
        its padded tokens."""
        if steps not in self._scales:
            from lopt.data import Batches, build_sft_dataset

            o = self.opts
            tok = self._load_base()[1]

            def padded(limit: int, first: int, count: int) -> float:
                examples, _ = build_sft_dataset(str(self.data.train), tok, max_length=o.max_length, limit=limit)
                it = Batches(examples, o.batch_size, tok.pad_token_id, seed=o.seeds[0])
                sizes = [next(it)["input_ids"].numel() for _ in range(first + count)][first:]
                return sum(sizes) / len(sizes)

            bench = padded(o.steps * o.batch_size, 1, o.bench_steps)  # the bench: 1 warm-up batch, then timed
            self._scales[steps] = padded(steps * o.batch_size, 0, steps) / bench
        return self._scales[steps]

    def train_estimate(self, method: str, steps: int) -> float:
        step = self.step_seconds(method)
        if step is None:
            return 0.0
        return steps * step * self.length_scale(steps) + 2.0  # loading and saving: seconds on the embedded model

    def eval_estimate(self) -> float:
        """The base's evaluation as measured, once it is; before, a forward pass at about a third of a
        training step (no backward, no optimizer), in fp32 (the evaluation runs in the model's dtype)."""
        o = self.opts
        base = self.records.read("base/eval")
        if base is not None:
            # The base's also records the probe's answers (generation, cached after): an upper bound.
            return base["eval"]["seconds"]
        step = self.step_seconds(o.methods[0]) or 0.0
        rows = self.data.eval.read_text().count("\n") if self.data.eval.is_file() else o.eval_limit
        items = len(self.tasks) * o.limit * 4  # the suite: about 4 choices an item
        batches = (rows / o.eval_batch_size + 2 * o.retention_prompts / o.eval_batch_size
                   + items / o.eval_batch_size)
        # Timed in bf16 on a CPU, a step is about half of fp32's (records/precision: 2.14x tokens/s).
        fp32 = 2.0 if o.precision.startswith("bf16") and self._device() == "cpu" else 1.0
        return batches * step / 3 * (o.eval_batch_size / o.batch_size) * fp32 + 2.0

    def estimates(self) -> dict[str, float]:
        """Seconds of each phase of the whole study (done or not; :meth:`left` is what remains)."""
        o = self.opts
        per_run_eval = self.eval_estimate()
        sweep = sum(self.train_estimate(m, sweep_steps(o)) + per_run_eval * 0.3
                    for m in o.methods for _ in self.grids[m] if len(self.grids[m]) > 1)
        rates = rates_of(o)
        runs = sum((self.train_estimate(m, o.steps) + per_run_eval) * (rates[m] + len(repeat_seeds(o, m)))
                   for m in o.methods)
        return {"sweep": sweep, "runs": runs, "base": per_run_eval}

    def left(self) -> float:
        """Seconds of the pieces that have no record yet: what a resumed study still has to run."""
        o = self.opts
        ev = self.eval_estimate()
        left = 0.0 if self.records.read("base/eval") else ev
        for m in o.methods:
            if len(self.grids[m]) > 1:
                left += sum(self.train_estimate(m, sweep_steps(o)) + ev * 0.3 for lr in self.grids[m]
                            if self.records.get(f"sweep/{m}-lr{lr:g}", self.sweep_spec(m, lr)) is None)
        best = self.recorded_best()
        if best is None:
            return left + self.estimates()["runs"]
        for run in final_runs(best, o):
            spec = self.run_spec(run)
            if self.records.get(f"runs/{run['run']}/train", spec) is None:
                left += self.train_estimate(run["method"], o.steps)
            if self.records.get(f"runs/{run['run']}/eval", {**spec, "eval": self.eval_spec}) is None:
                left += ev
        return left

    # ------------------------------------------------------------------ pieces

    def _piece(self, name: str, spec: Any, estimate: float, make: Callable[[], dict[str, Any]],
               what: str) -> dict[str, Any]:
        rec = self.records.get(name, spec)
        if rec is not None:
            self.progress.finish(estimate, None)
            return rec
        self.progress.say(what)
        t0, load0 = time.perf_counter(), load_average()
        # the 1-minute load at the start and the end: another job sharing the machine shows in either
        rec = self.records.put(name, spec, {**make(), "load_average_start": load0, "load_average": load_average()})
        self.executed.append(name)
        self.progress.finish(estimate, time.perf_counter() - t0)
        return rec

    def bench_table(self) -> dict[str, dict[str, Any]]:
        """The bench's rows: name -> ``lopt train`` options, each method exactly as its runs train it."""
        return {m: as_trained(self.overrides(m, self.opts.steps)) for m in self.opts.methods}

    def bench(self) -> dict[str, Any]:
        """Each method's step time and peak memory: ``lopt bench`` on the model, the batch size and the
        training rows of the runs, a fresh process per method."""
        from lopt.bench.runner import bench_json, run_bench

        o = self.opts
        table = self.bench_table()
        # "times": lopt bench takes step times from processes of their own; a record made before, whose
        # times came from the memory process (up to twice as slow on CPU), is redone.
        spec = {"table": table, "steps": o.bench_steps, "repeats": o.bench_repeats, "times": "own-processes",
                **self.common}

        def make():
            t0 = time.perf_counter()
            try:
                res = run_bench(list(table), [o.batch_size], model=o.model, gguf_file=o.gguf_file, seq_len=o.max_length,
                                warmup=1, steps=o.bench_steps, repeats=o.bench_repeats, device=o.device,
                                progress=False, table=table, dataset=str(self.data.train),
                                limit=o.steps * o.batch_size)
            except RuntimeError as e:  # a child's failure: its last line says why (max length, memory, ...)
                raise LoPTError(f"lopt bench, before any training: {e}") from None
            return {**bench_json(res), "wall_s": round(time.perf_counter() - t0, 1)}

        rec = self._piece("bench", spec, 0.0, make, f"bench: {len(table)} methods, a fresh process each")
        # The rows in MiB for the estimates and the report, whatever unit the file holds.
        from lopt.bench.runner import load_bench_json

        return load_bench_json(rec)

    def base(self):
        model, tok = self._load_base()
        return model, tok

    def probe(self):
        """The base model's answers to the general prompts and its log-probs (retention KL), made once."""
        from lopt.eval.retention import RetentionProbe

        if self._probe is None:
            o = self.opts
            # Named by the model too: another --model in the same folder must not read this base's answers.
            key = hashlib.sha1(f"{o.model}|{o.gguf_file}".encode()).hexdigest()[:12]
            path = self.cache_dir / f"probe-{o.retention_prompts}x{o.retention_new_tokens}-{key}.pt"
            if path.is_file():
                self._probe = RetentionProbe.load(path)
            else:
                model, tok = self.base()
                self._probe = RetentionProbe.record(model, tok, prompts=o.retention_prompts,
                                                    max_new_tokens=o.retention_new_tokens,
                                                    batch_size=o.eval_batch_size)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._probe.save(path)
        return self._probe

    def evaluate(self, model, tok, boundaries: list[int] | None) -> dict[str, Any]:
        """Held-out task loss, retention KL, drift by layer (cosine at the boundary), the suite's change."""
        from lopt.eval.drift import drift
        from lopt.eval.perplexity import task_loss

        o = self.opts
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            loss = task_loss(model, tok, str(self.data.eval), max_length=o.max_length, batch_size=o.eval_batch_size)
            loss.pop("items", None)
            kl = self.probe().measure(model, tok)
            base, _ = self.base()
            layers = drift(model, base, tok, sequences=self.probe().sequences, boundaries=boundaries,
                           batch_size=o.eval_batch_size)
        b = (boundaries or [self.num_layers // 2])[0]
        out = {"task_loss": loss, "retention_kl": {k: v for k, v in kl.items() if k != "items"},
               "drift": {"boundary": b, "cos_at_boundary": layers["layers"][b]["cos"],
                         "layers": [{"cos": x["cos"], "cka": x.get("cka")} for x in layers["layers"]]}}
        if self.tasks:
            out["suite"] = self.suite().measure(model, tok)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out

    def suite(self):
        from lopt.eval.retention import RetentionSuite

        if self._suite is None:
            rec = self.base_eval()
            self._suite = RetentionSuite(self.tasks, rec["base_scores"], limit=self.opts.limit,
                                         data_dir=self.opts.data_dir)
        return self._suite

    def base_eval(self) -> dict[str, Any]:
        from lopt.eval.retention import RetentionSuite

        spec = {"run": "base", "eval": self.eval_spec, **self.common}

        def make():
            model, tok = self.base()
            scores = (RetentionSuite.record(model, tok, self.tasks, limit=self.opts.limit,
                                            data_dir=self.opts.data_dir).base_scores if self.tasks else {})
            self._suite = RetentionSuite(self.tasks, scores, limit=self.opts.limit, data_dir=self.opts.data_dir)
            return {"base_scores": scores, "eval": self.evaluate(model, tok, [self.num_layers // 2])}

        return self._piece("base/eval", spec, self.eval_estimate(), make, "base: evaluating the untrained model")

    def sweep_spec(self, method: str, lr: float) -> dict[str, Any]:
        steps = sweep_steps(self.opts)
        return {"method": method, "lr": lr, "steps": steps, "overrides": self.overrides(method, steps),
                "val_size": self.opts.val_size, **self.common}

    def recorded_best(self) -> dict[str, float] | None:
        """Each method's best rate when its whole sweep is recorded with these settings (nothing trains),
        else None: so that a --dry-run or a restart does not make a finished study's report partial."""
        best = {}
        for m in self.opts.methods:
            if len(self.grids[m]) == 1:  # nothing to choose: no sweep
                best[m] = self.grids[m][0]
                continue
            def recorded(lr: float, m: str = m) -> float | None:
                rec = self.records.get(f"sweep/{m}-lr{lr:g}", self.sweep_spec(m, lr))
                return None if rec is None else rec["val"]["loss"]

            walked = walk_grid(self.grids[m], recorded, self.opts.sweep_extend)
            if walked is None:
                return None
            finite = {lr: v for lr, v in walked[1].items() if v == v}
            if not finite:
                return None
            self.swept[m] = walked[0]  # with the rates recorded beyond it
            best[m] = min(finite, key=finite.get)
        return best

    def sweep(self, method: str) -> float:
        """``method``'s best rate on the grid: short runs scored by held-out loss on the sweep rows."""
        from lopt.eval.perplexity import task_loss
        from lopt.models import load_model
        from lopt.recipes.sft import train

        o = self.opts
        steps = sweep_steps(o)
        if len(self.grids[method]) == 1:  # a one-rate grid (--lr-factors 1) has nothing to choose: no sweep runs
            return self.grids[method][0]
        planned = set(self.grids[method])

        def point(lr: float) -> float:
            run_dir = self.runs_dir / "sweep" / f"{method}-lr{lr:g}"
            cfg = self.train_config(method, lr, o.seeds[0], steps, run_dir)
            spec = self.sweep_spec(method, lr)

            def make(cfg=cfg, run_dir=run_dir):
                t0 = time.perf_counter()
                train(cfg)  # its result (the model, the optimizer) is not kept
                seconds = time.perf_counter() - t0
                gc.collect()  # the trained model's hooks and optimizer state form cycles
                model, tok = load_model(str(run_dir), device=self._device())
                with torch.no_grad():
                    val = task_loss(model, tok, str(self.data.sweep_val), max_length=o.max_length,
                                    batch_size=o.eval_batch_size)
                val.pop("items", None)
                del model
                self._drop(run_dir)
                return {"command": self.command(cfg), "val": val, "train_seconds": round(seconds, 1)}

            est = self.train_estimate(method, steps) + self.eval_estimate() * 0.3
            if lr not in planned:  # an extension: not in the study's first estimate
                self.progress.add(est)
            edge = "" if lr in planned else " (beyond the grid: its edge rate was best)"
            rec = self._piece(f"sweep/{method}-lr{lr:g}", spec, est, make,
                              f"sweep: {method} at lr {lr:g}, {steps} steps{edge}")
            return rec["val"]["loss"]

        self.swept[method], losses = walk_grid(self.grids[method], point, o.sweep_extend)
        finite = {lr: v for lr, v in losses.items() if v == v}
        if not finite:
            raise LoPTError(f"sweep: every rate of {method} diverged (NaN loss); give lower --start-lr {method}=LR")
        return min(finite, key=finite.get)

    def run_spec(self, run: dict[str, Any]) -> dict[str, Any]:
        overrides = {**self.overrides(run["method"], self.opts.steps), **run.get("extra", {})}
        return {**run, "steps": self.opts.steps, "overrides": overrides, **self.common}

    def run(self, run: dict[str, Any]) -> None:
        """Train one run (continuing a killed one from its last checkpoint), then evaluate it."""
        from lopt.eval.drift import read_boundaries
        from lopt.models import load_model
        from lopt.runtime.checkpoints import latest_checkpoint

        o = self.opts
        name, method = run["run"], run["method"]
        run_dir = self.runs_dir / name
        cfg = self.train_config(method, run["lr"], run["seed"], o.steps, run_dir, run.get("extra"))
        spec = self.run_spec(run)

        def make_train():
            cfg.save_every = max(1, o.steps // 4)
            cfg.save_total_limit = 1
            ckpt = latest_checkpoint(run_dir)
            if ckpt is not None and not same_run(ckpt, cfg):  # left by a run with other settings: start afresh
                shutil.rmtree(run_dir)
                ckpt = None
            cfg.resume = str(ckpt) if ckpt else None
            seconds, summary, history = timed_train(cfg, run_dir, keys=("step", "loss"))
            cfg.save_every = cfg.save_total_limit = cfg.resume = None  # the command is the run, not its bookkeeping
            return {"command": self.command(cfg), "train_seconds": round(seconds, 1),
                    "resumed_from": ckpt.name if ckpt else None, "summary": summary,
                    "history": history}

        self._piece(f"runs/{name}/train", spec, self.train_estimate(method, o.steps), make_train,
                    f"{name}: training {o.steps} steps")

        def make_eval():
            model, tok = load_model(str(run_dir), device=self._device())
            try:
                return {"eval": self.evaluate(model, tok, read_boundaries(run_dir))}
            finally:
                del model  # a loaded model holds no cycles: freed here, no gc pass needed

        rec = self.records.get(f"runs/{name}/eval", {**spec, "eval": self.eval_spec})
        if rec is None and not (run_dir / "config.json").is_file():
            raise LoPTError(f"{name}: its trained model ({run_dir}) is gone, so it cannot be evaluated; delete "
                            f"{self.records.path('runs/' + name + '/train')} to train it again")
        self._piece(f"runs/{name}/eval", {**spec, "eval": self.eval_spec}, self.eval_estimate(), make_eval,
                    f"{name}: evaluating")
        self._drop(run_dir)

    def _drop(self, run_dir: Path) -> None:
        if not self.opts.keep_models:
            shutil.rmtree(run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ the plan, said

    def plan_lines(self, bench: dict[str, Any] | None, best: dict[str, float] | None = None) -> list[str]:
        o = self.opts
        d = self.data.describe()
        lines = [f"lopt study: {o.model or 'smollm2-135m-instruct (embedded)'} ({self.num_layers} layers) on "
                 f"{o.dataset}, methods {' '.join(o.methods)}",
                 f"data: {d['train_rows']} of {d['rows']} rows trained on ({o.steps} steps x {o.batch_size}); "
                 f"{d['eval']}; {d['sweep']}",
                 f"sweep: {sweep_steps(o)} steps a run; grids (starting rate x "
                 f"{', '.join(f'{f:g}' for f in o.lr_factors)}"
                 + (f"; where the best is an edge, up to {o.sweep_extend} more x{EXTEND:g} beyond it" if o.sweep_extend
                    else "") + "):"]
        lines += [f"  {m}: " + ", ".join(f"{lr:g}" for lr in self.swept.get(m, self.grids[m]))
                  + (" (one rate: no sweep)" if len(self.grids[m]) == 1 else "") for m in o.methods]
        rates = rates_of(o)
        counts = ", ".join(f"{m} {n}" for m, n in rates.items())
        lines.append(f"runs: each method at its rates (its sweep's best, then 0.3x, then 0.1x of it: {counts})"
                     + (f", the best again with seeds {' '.join(map(str, o.seeds[1:]))}" if len(o.seeds) > 1 else "")
                     + (f" ({', '.join(o.seed_methods)} only)" if len(o.seeds) > 1 and o.seed_methods else "")
                     + f": {sum(n + len(repeat_seeds(o, m)) for m, n in rates.items())} runs of {o.steps} steps")
        if best:
            lines += [f"  {r['run']}" for r in final_runs(best, o)]
        lines += [f"schedule: {note}" for m, (_, note) in self.schedules.items() if note]
        lines.append("evaluation of every run: held-out task loss, retention KL on "
                     f"{o.retention_prompts} general prompts, drift by layer"
                     + (f", the retention suite ({', '.join(self.tasks)}, {o.limit} items each)" if self.tasks else ""))
        if bench:
            est = self.estimates()
            lines.append("cost (lopt bench, " + ", ".join(
                f"{r['name']} {r['step_time_s']:.2f} s/step" for r in bench["rows"]) + ")")
            total = sum(est.values())
            lines.append(f"estimate: {_hms(total)} in all (sweep {_hms(est['sweep'])}, runs {_hms(est['runs'])}, "
                         f"base evaluation {_hms(est['base'])}); one run of {o.methods[0]}: "
                         f"{_hms(self.train_estimate(o.methods[0], o.steps) + self.eval_estimate())}")
            left = self.left()
            if left == 0:
                lines.append("still to run: nothing (every piece has its record)")
            elif left < total - 1:
                lines.append(f"still to run: {_hms(left)} (the pieces without a record)")
        return lines

    def meta(self, best: dict[str, float] | None) -> None:
        o = self.opts
        write_json(self.records.path("meta"), {
            # what the study is; how this call shows it (a dry run, the bar) is not
            "options": {k: v for k, v in asdict(o).items() if k not in ("dry_run", "progress")},
            "num_layers": self.num_layers, "data": self.data.describe(),
            "grids": {m: self.swept.get(m, g) for m, g in self.grids.items()}, "start_lr": start_rates(o),
            "rate_factors": list(RATE_FACTORS[:max(rates_of(o).values())]), "rates": rates_of(o),
            "schedules": {m: n for m, (_, n) in self.schedules.items() if n}, "sweep_steps": sweep_steps(o),
            "best": best, "runs": final_runs(best, o) if best else None, "suite": list(self.tasks),
            "machine": machine()})


# The options that make a checkpoint this run's (the rest are bookkeeping: save_every, resume, ...).
_RUN_KEYS = ("model", "gguf_file", "method", "lr", "seed", "max_steps", "batch_size", "max_length", "limit",
             "warmup_ratio", "badam_switch_every", "lisa_interval", "precision", "task_grad_every", "lr_lower",
             "lambda_aux", "local_objective", "anchor_weight")


def same_run(ckpt: Path, cfg: TrainConfig) -> bool:
    """Whether ``ckpt`` was written by a run with ``cfg``'s settings (its recorded options), so that
    resuming it continues this run; a checkpoint without a record is not trusted."""
    from lopt.runtime.resume_options import find_recorded_run

    rec = find_recorded_run(ckpt.parent, str(ckpt))
    if rec is None:
        return False
    return all(rec.options.get(k) == getattr(cfg, k) for k in _RUN_KEYS)


def study_command(opts: StudyOptions) -> int:
    """``lopt study``: run (or resume) the study, or with ``--dry-run`` print its plan and estimate."""
    from lopt.models import quiet_progress
    from lopt.recipes.study.summary import write_summary

    with quiet_progress():  # the study's bar, not one per model its pieces load and save
        study = Study(opts)  # every input check, before any training
        study.data.write()
        study.meta(study.recorded_best())
        bench = study.bench()
        if opts.dry_run:
            print("\n".join(study.plan_lines(bench, study.recorded_best())))
            return 0
        run_study(study, bench)
    paths = write_summary(study.out)
    print(f"lopt study: report {paths['markdown']} ({len(study.executed)} pieces run now)")
    return 0


def run_study(study: Study, bench: dict[str, Any] | None = None) -> list[str]:
    """Every piece not yet recorded: the base's evaluation, the sweep, the runs; returns what ran."""
    opts = study.opts
    bench = bench or study.bench()
    for line in study.plan_lines(bench):
        study.progress.say(line)
    est = study.estimates()
    for v in est.values():
        study.progress.add(v)
    study.base_eval()
    best = {m: study.sweep(m) for m in opts.methods}
    study.meta(best)
    for run in final_runs(best, opts):
        study.run(run)
    study.progress.say("done")
    return study.executed
