"""``lopt eval --model M [--base B] --task KIND[:ARG] ... --json OUT``: any number of tasks on one model.

The runner is generic: it looks each kind up in :data:`lopt.eval.tasks.TASKS` (filled by the task
family modules) and calls it with the models and options in a ``TaskRun``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lopt.eval.common import EVAL_FILE, EvalError
from lopt.jsonout import json_help, write_json
# The task families register their kinds on import, in this order (the order --help lists them).
from lopt.eval import generation, multiple_choice, perplexity, kl, drift, lm_eval_bridge, suite  # noqa: F401,I001
from lopt.eval.drift import read_boundaries
from lopt.eval.suite import PRIMARY
from lopt.eval.tasks import TASKS, TaskRun, check_tasks, parse_task, reads_data, resolve_data, task_kinds
from lopt.models import load_model
from lopt.runtime.checkpoints import RUN_FILE


def evaluate(model, tokenizer, tasks: list[str], *, base=None, base_tokenizer=None,
             limit: int | None = None, batch_size: int = 8, boundaries: list[int] | None = None,
             progress: bool = True, max_new_tokens: int = 256, kl_new_tokens: int = 48,
             max_length: int | None = None, data_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Run ``tasks`` (specs ``KIND[:ARG]``, see :data:`lopt.eval.tasks.TASKS`) on ``model``; returns
    ``{spec: {metric: value, ...}}``, JSON-serialisable, each with its wall time in ``seconds``.

    ``base``/``base_tokenizer``: the model before post-training (retention-kl, drift; the base
    tokenizer defaults to ``tokenizer``). ``limit``: at most this many questions / prompts /
    examples per task (ppl reads the whole file; MMLU-Redux takes them round-robin over subjects).
    ``boundaries``: layer indices to mark in drift (default: read from the model's
    ``lopt_run.json`` when it was loaded from a trainer checkpoint). ``max_new_tokens``:
    GSM8K answer budget; ``kl_new_tokens``: length of the base answers for retention-kl and drift;
    ``max_length``: task-loss truncation (default: the run's, else 512). ``data_dir``: the folder
    holding the tasks' default files (default ``$LOPT_DATA_DIR``; see :func:`lopt.data.data_dir`).
    The model is put in eval mode for the duration and restored afterwards.
    """
    parsed = check_tasks(tasks, has_base=base is not None, data_dir=data_dir)
    if boundaries is None:
        boundaries = read_boundaries(model)
    run = TaskRun(model, tokenizer, base, base_tokenizer or tokenizer, limit, batch_size, progress,
                  max_new_tokens, kl_new_tokens, max_length, boundaries, data_dir=data_dir)
    modes = [(m, m.training) for m in (model, base) if m is not None]
    results: dict[str, dict[str, Any]] = {}
    try:
        for m, _ in modes:
            m.eval()
        for spec, (kind, arg) in zip(tasks, parsed):
            t0 = time.perf_counter()
            task = TASKS[kind]
            res = task.run(run, resolve_data(kind, arg, data_dir) if reads_data(task) else arg)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            results[spec] = res
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return results


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lopt eval``."""
    parser.description = ("Evaluate a model on one or more tasks. Task kinds: "
                          + "; ".join(task_kinds().values()) + ".")
    parser.add_argument("--model", default=None,
                        help="hub id, checkpoint dir, .gguf file or alias (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--base", default=None,
                        help="the model before post-training, for retention-kl and drift "
                             "('embedded' for the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--task", action="append", default=None, metavar="KIND[:ARG]",
                        help="a task to run; repeat for several (kinds: " + ", ".join(TASKS) + ")")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N questions / prompts / examples per task (MMLU-Redux: spread "
                             "over the subjects)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K answer length budget")
    parser.add_argument("--kl-new-tokens", type=int, default=48,
                        help="length of the base model's answers for retention-kl and drift")
    parser.add_argument("--boundaries", type=int, nargs="+", default=None, metavar="LAYER",
                        help="layer indices to mark in drift (default: from the run's lopt_run.json)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="the folder holding the tasks' default files (gsm8k/, mmlu-redux/, arc/, piqa/, "
                             "winogrande/, lambada/) (default: $LOPT_DATA_DIR; without either, give each "
                             "task its file as KIND:PATH)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help=json_help("the results", f"MODEL/{EVAL_FILE} when --model is a checkpoint "
                                                      "directory", memory=False))
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the loader's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")


EMBEDDED_NAME = "smollm2-135m-instruct"  # lopt.models' name for the embedded default model


def is_embedded(name: str | None) -> bool:
    """Whether a --model/--base value means the embedded SmolLM2-135M-Instruct."""
    if name is None:
        return True
    name = str(name).strip().lower()
    return name in ("embedded", "default", EMBEDDED_NAME) or name.startswith("embedded:")


def run_eval_cli(args: argparse.Namespace) -> int:
    """``lopt eval``: load the model(s), run the tasks, print a summary, write the JSON."""
    tasks = getattr(args, "task", None) or []
    base_name = getattr(args, "base", None)
    data_dir = getattr(args, "data_dir", None)
    try:
        check_tasks(tasks, has_base=base_name is not None, data_dir=data_dir)
    except EvalError as e:
        if base_name is None and "--base" in str(e) and getattr(args, "model", None):
            trained_from = _trained_from(args.model)
            if trained_from is not None:
                raise EvalError(f"{e} (this run was trained from {trained_from}: "
                                f"--base {trained_from})") from None
        raise

    device = getattr(args, "device", None)
    model, tokenizer = load_model(args.model, gguf_file=getattr(args, "gguf_file", None), device=device)
    base = base_tokenizer = None
    if base_name is not None:
        base, base_tokenizer = load_model(None if is_embedded(base_name) else base_name, device=device)
    boundaries = getattr(args, "boundaries", None)
    if boundaries is None and args.model:
        boundaries = read_boundaries(args.model)
    t0 = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, base=base, base_tokenizer=base_tokenizer,
                       limit=args.limit, batch_size=args.batch_size, boundaries=boundaries,
                       progress=getattr(args, "progress", True),
                       max_new_tokens=getattr(args, "max_new_tokens", 256),
                       kl_new_tokens=getattr(args, "kl_new_tokens", 48), data_dir=data_dir)
    record = {"model": args.model or EMBEDDED_NAME, "base": base_name,
              "tasks": tasks, "limit": args.limit, "results": results,
              "seconds": round(time.perf_counter() - t0, 2), "units": {"time": "seconds"},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = args.json
    # `--json -`: standard output holds the JSON only; the table goes to stderr
    print(_summary_table(results), file=sys.stderr if out == "-" else sys.stdout)
    if out is None and args.model and Path(args.model).is_dir():
        out = str(Path(args.model) / EVAL_FILE)
    if out:
        where = write_json(out, record)
        if out != "-":
            print(f"results written to {where}")
    return 0


def _trained_from(model_dir: str) -> str | None:
    f = Path(model_dir) / RUN_FILE
    if not f.is_file():
        return None
    try:
        options = json.loads(f.read_text()).get("options", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    return options.get("model") or "embedded"


def _summary_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for spec, metrics in results.items():
        for name, value in headline_metrics(spec, metrics).items():
            lines.append(f"| {spec} | {name} | {format_value(value)} |")
    return "\n".join(lines)


# The metrics a comparison shows for each kind (the rest stays in the JSON).
_HEADLINE = {"gsm8k": ("acc", "unparseable"), "mc": ("acc", "acc_norm"), "mmlu-redux": ("acc", "acc_macro"),
             "ppl": ("ppl", "bits_per_byte"), "task-loss": ("loss",), "retention-kl": ("kl", "nll"),
             "drift": ("mean_cka", "min_cka", "mean_cos"), "arc-easy": ("acc", "acc_norm"),
             "arc-challenge": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"), "winogrande": ("acc",),
             "lambada": ("acc", "perplexity")}


LOWER_IS_BETTER = {"unparseable", "ppl", "bits_per_byte", "loss", "kl", "nll", "perplexity"}


def headline_metrics(spec: str, metrics: dict[str, Any]) -> dict[str, float]:
    try:
        kind = parse_task(spec)[0]
    except EvalError:
        kind = None
    if kind == "lm-eval" and isinstance(metrics.get("results"), dict):
        return {f"{task}/{k}": v for task, m in metrics["results"].items() for k, v in m.items()
                if isinstance(v, (int, float)) and not k.endswith("_stderr")}
    if kind == "retention" and isinstance(metrics.get("tasks"), dict):
        out = {f"{k}/{PRIMARY[k]}": r[PRIMARY[k]] for k, r in metrics["tasks"].items() if k in PRIMARY}
        if isinstance(metrics.get("macro"), dict) and "value" in metrics["macro"]:
            out["macro"] = metrics["macro"]["value"]
        return out
    names = _HEADLINE.get(kind) or [k for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and k != "seconds"]
    return {k: metrics[k] for k in names if isinstance(metrics.get(k), (int, float))}


def format_value(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"
