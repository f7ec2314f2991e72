"""The retention suite: ARC-Easy, ARC-Challenge, PIQA, WinoGrande and LAMBADA on one model.

``run_benchmark(kind, model, tokenizer)`` scores one benchmark file, ``run_retention`` all five;
every metric comes with its standard error and every item with its own scores, so two models can
be compared item by item (``paired_difference``, ``retention_differences``).

The primary metric of each task, the one the macro average takes, is the one usually quoted for
small models: ``acc_norm`` for ARC and PIQA (the length-normalised choice), ``acc`` for WinoGrande
(partial scoring has no length to normalise) and LAMBADA.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from lopt.eval.benchmarks import (Doc, aggregate, item_scores, load_arc, load_lambada, load_piqa,
                                  load_winogrande, piqa_labels_path, score_docs)
from lopt.eval.common import EvalError, default_data
from lopt.eval.tasks import Task, TaskRun, register

__all__ = [
    "BenchmarkTask", "TASKS", "RETENTION_KINDS", "METRICS", "PRIMARY", "resolve_path",
    "run_benchmark", "run_retention", "paired_difference", "retention_differences",
    "format_retention_table", "format_differences_table",
]


class BenchmarkTask(NamedTuple):
    """A task kind: its file reader ``loader(path, limit) -> list[Doc]`` (None for the suite), its
    default file inside the data folder (``--data-dir`` / ``$LOPT_DATA_DIR``), and the usage line shown
    in errors and --help."""
    loader: Callable[..., list[Doc]] | None
    default: str | None
    usage: str


TASKS: dict[str, BenchmarkTask] = {
    "arc-easy": BenchmarkTask(load_arc, "arc/ARC-Easy-Test.jsonl",
                              "arc-easy[:FILE] ARC-Easy test, acc/acc_norm as lm-eval's arc_easy"),
    "arc-challenge": BenchmarkTask(load_arc, "arc/ARC-Challenge-Test.jsonl",
                                   "arc-challenge[:FILE] ARC-Challenge test, as lm-eval's arc_challenge"),
    "piqa": BenchmarkTask(load_piqa, "piqa/valid.jsonl",
                          "piqa[:FILE] PIQA validation (labels from FILE's -labels.lst), as lm-eval's piqa"),
    "winogrande": BenchmarkTask(load_winogrande, "winogrande/dev.jsonl",
                                "winogrande[:FILE] WinoGrande 1.1 dev, partial scoring as lm-eval's winogrande"),
    "lambada": BenchmarkTask(load_lambada, "lambada/lambada_test.jsonl",
                             "lambada[:FILE] LAMBADA (OpenAI) last-word acc and perplexity, as lambada_openai"),
    "retention": BenchmarkTask(None, None,
                               "retention all five above at their default files, with a macro average"),
}
RETENTION_KINDS = ("arc-easy", "arc-challenge", "piqa", "winogrande", "lambada")
METRICS: dict[str, tuple[str, ...]] = {
    "arc-easy": ("acc", "acc_norm"), "arc-challenge": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"),
    "winogrande": ("acc",), "lambada": ("acc", "perplexity"),
}
PRIMARY: dict[str, str] = {"arc-easy": "acc_norm", "arc-challenge": "acc_norm", "piqa": "acc_norm",
                           "winogrande": "acc", "lambada": "acc"}
LOWER_IS_BETTER = {"perplexity"}


def _check_kind(kind: str) -> None:
    if kind not in METRICS:
        raise EvalError(f"unknown benchmark {kind!r}; known: {', '.join(METRICS)}")


def resolve_path(kind: str, path: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """The file a benchmark reads: ``path``, or its default in the data folder (``data_dir``, else
    ``$LOPT_DATA_DIR``; see :func:`lopt.data.data_dir`). EvalError, before any model work, when the
    file (or PIQA's labels file beside it) is missing."""
    _check_kind(kind)
    if path is None:
        found = default_data(kind, TASKS[kind].default, data_dir)
        if not found.is_file():
            raise EvalError(f"task {kind!r}: {found} is not a file")
    else:
        found = Path(path).expanduser()
        if not found.is_file():
            raise EvalError(f"task {kind!r}: file not found: {path}")
    if kind == "piqa" and not piqa_labels_path(found).is_file():
        raise EvalError(f"task 'piqa': labels file not found: {piqa_labels_path(found)} "
                        f"(PIQA's labels are read from the -labels.lst file beside the data)")
    return found


def run_benchmark(kind: str, model, tokenizer, path: str | Path | None = None, *,
                  limit: int | None = None, batch_size: int = 32, progress: bool = False,
                  data_dir: str | Path | None = None) -> dict[str, Any]:
    """Score one benchmark (``arc-easy``, ``arc-challenge``, ``piqa``, ``winogrande``, ``lambada``).

    ``limit`` keeps the first N rows in file order. Returns ``{"task", "file", "n", <metric>,
    <metric>_stderr, ..., "primary", "items", "seconds"}``; ``items`` holds one record per row
    (``id``, ``acc``, ``acc_norm``, ``pred``, ``gold``, ``loglik``, ...) for item-by-item comparison.
    ``kind="retention"`` (no path) is :func:`run_retention`.
    """
    if kind == "retention":
        if path is not None:
            raise EvalError(f"task 'retention' takes no path (got {path}); give a task's own file "
                            f"with e.g. --task piqa:PATH")
        return run_retention(model, tokenizer, limit=limit, batch_size=batch_size, progress=progress,
                             data_dir=data_dir)
    file = resolve_path(kind, path, data_dir)
    t0 = time.perf_counter()
    docs = TASKS[kind].loader(file, limit)
    if not docs:
        raise EvalError(f"task {kind!r}: no rows in {file}")
    was_training = model.training
    try:
        scores = score_docs(model, tokenizer, docs, batch_size=batch_size, progress=progress, desc=kind)
    finally:
        model.train(was_training)
    items = [item_scores(doc, s) for doc, s in zip(docs, scores)]
    result: dict[str, Any] = {"task": kind, "file": str(file)}
    result.update(aggregate(items, METRICS[kind]))
    result["primary"] = PRIMARY[kind]
    result["items"] = items
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def run_retention(model, tokenizer, *, limit: int | None = None,
                  paths: Mapping[str, str | Path] | None = None, batch_size: int = 32,
                  progress: bool = False, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the five retention benchmarks. ``paths`` overrides a task's file (by kind), the others are
    read from the data folder (``data_dir``, else ``$LOPT_DATA_DIR``); ``limit`` is
    the first N rows of each. Returns ``{"tasks": {kind: run_benchmark result}, "macro": {"value",
    "stderr", "metrics"}, "seconds"}``: the macro average of the tasks' primary metrics, its
    standard error from theirs (independent item sets)."""
    paths = dict(paths or {})
    unknown = set(paths) - set(RETENTION_KINDS)
    if unknown:
        raise EvalError(f"no retention task {sorted(unknown)[0]!r}; tasks: {', '.join(RETENTION_KINDS)}")
    files = {kind: resolve_path(kind, paths.get(kind), data_dir) for kind in RETENTION_KINDS}  # fail early
    t0 = time.perf_counter()
    tasks = {kind: run_benchmark(kind, model, tokenizer, files[kind], limit=limit,
                                 batch_size=batch_size, progress=progress) for kind in RETENTION_KINDS}
    return {"tasks": tasks, "macro": _macro(tasks), "seconds": round(time.perf_counter() - t0, 2)}


def _macro(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    values = {k: r[PRIMARY[k]] for k, r in tasks.items()}
    ses = [r.get(f"{PRIMARY[k]}_stderr") for k, r in tasks.items()]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(ses)
    return {"value": sum(values.values()) / len(values), "stderr": se,
            "metrics": {k: PRIMARY[k] for k in tasks}}


# --------------------------------------------------------------------------- paired comparison


def paired_difference(items_a: Sequence[Any], items_b: Sequence[Any], metric: str = "acc"
                      ) -> dict[str, Any]:
    """Mean change ``b - a`` over the same items and the standard error of the paired difference
    (the sample standard deviation of the per-item differences over sqrt(n)).

    Items are per-item records (dicts with ``id`` and ``metric``), matched by ``id``, or plain
    numbers, matched by position. EvalError when the two do not cover the same items.
    """
    if len(items_a) != len(items_b):
        raise EvalError(f"paired difference needs the same items: {len(items_a)} vs {len(items_b)}; "
                        f"run both models with the same --limit and files")
    if items_a and isinstance(items_a[0], Mapping):
        by_id = {it["id"]: it for it in items_b}
        if len(by_id) != len(items_b) or any(it["id"] not in by_id for it in items_a):
            raise EvalError("paired difference needs the same items: the item ids differ; run both "
                            "models on the same files")
        pairs = [(float(it[metric]), float(by_id[it["id"]][metric])) for it in items_a]
    else:
        pairs = [(float(a), float(b)) for a, b in zip(items_a, items_b)]
    diffs = [b - a for a, b in pairs]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {"delta": mean, "stderr": se, "n": n,
            "a": sum(a for a, _ in pairs) / n if n else 0.0, "b": sum(b for _, b in pairs) / n if n else 0.0}


def retention_differences(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> dict[str, Any]:
    """Per task, the paired change of its primary metric from ``base`` to ``tuned`` (two
    :func:`run_retention` results, or ``{kind: run_benchmark result}`` mappings), and the macro
    average of the changes with its standard error."""
    a, b = base.get("tasks", base), tuned.get("tasks", tuned)
    out: dict[str, Any] = {}
    for kind in RETENTION_KINDS:
        if kind in a and kind in b:
            out[kind] = {"metric": PRIMARY[kind],
                         **paired_difference(a[kind]["items"], b[kind]["items"], PRIMARY[kind])}
    if not out:
        raise EvalError("no retention task in common between the two results")
    ses = [d["stderr"] for d in out.values()]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(ses)
    return {"tasks": out, "macro": {"delta": sum(d["delta"] for d in out.values()) / len(out), "stderr": se}}


# --------------------------------------------------------------------------- tables


def _pm(value: float, se: float | None, scale: float = 100.0, digits: int = 1) -> str:
    text = f"{value * scale:.{digits}f}"
    return text if se is None else f"{text} ± {se * scale:.{digits}f}"


def format_retention_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per task (n, every metric ± stderr, accuracies in points, the primary
    marked *) and the macro average of the primary metrics."""
    tasks = result.get("tasks", result)
    lines = ["| task | n | acc | acc_norm | perplexity |", "|---|---|---|---|---|"]
    for kind, r in tasks.items():
        cells = []
        for name in ("acc", "acc_norm", "perplexity"):
            if name not in r:
                cells.append("–")
                continue
            scale, digits = (1.0, 2) if name == "perplexity" else (100.0, 1)
            cell = _pm(r[name], r.get(f"{name}_stderr"), scale, digits)
            cells.append(cell + (" *" if PRIMARY.get(kind) == name else ""))
        lines.append(f"| {kind} | {r['n']} | " + " | ".join(cells) + " |")
    if "macro" in result:
        m = result["macro"]
        lines.append(f"| macro average (*) | {sum(r['n'] for r in tasks.values())} | "
                     f"{_pm(m['value'], m['stderr'])} | | |")
    return "\n".join(lines)


def format_differences_table(diff: Mapping[str, Any]) -> str:
    """Markdown for :func:`retention_differences`: per task the base and tuned primary metric and
    the paired change ± its standard error, in points."""
    lines = ["| task | metric | n | base | tuned | change (paired) |", "|---|---|---|---|---|---|"]
    for kind, d in diff["tasks"].items():
        lines.append(f"| {kind} | {d['metric']} | {d['n']} | {d['a'] * 100:.1f} | {d['b'] * 100:.1f} | "
                     f"{'+' if d['delta'] >= 0 else ''}{_pm(d['delta'], d['stderr'])} |")
    m = diff["macro"]
    lines.append(f"| macro average | | | | | {'+' if m['delta'] >= 0 else ''}{_pm(m['delta'], m['stderr'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- lopt eval task kinds


def _run_kind(kind: str):
    def run(r: TaskRun, arg: str | None) -> dict[str, Any]:
        return run_benchmark(kind, r.model, r.tokenizer, arg, limit=r.limit, batch_size=max(r.batch_size, 16),
                             progress=r.progress, data_dir=r.data_dir)
    return run


def _check_kind_path(kind: str):
    def check(arg: str | None, data_dir: str | Path | None = None) -> None:
        if kind == "retention":
            for k in RETENTION_KINDS:
                resolve_path(k, None, data_dir)
        else:
            resolve_path(kind, arg, data_dir)
    return check


for _kind, _task in TASKS.items():
    register(Task(_kind, _task.usage, run=_run_kind(_kind), arg="none" if _kind == "retention" else "optional",
                  check=_check_kind_path(_kind)))
