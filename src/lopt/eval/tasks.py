"""The task registry: every ``lopt eval --task KIND[:ARG]`` kind, what argument it takes, where its
default data lies, and the function that runs it.

Each task family registers its kinds in its own module (``generation``, ``multiple_choice``,
``perplexity``, ``kl``, ``drift``, ``lm_eval_bridge``); the runner (``lopt.eval.runner``) only looks
them up. A new eval task is one ``register(Task(...))`` in the module of its family, or a new
module imported in ``lopt/eval/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lopt.eval.common import EvalError, default_data

_DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}


@dataclass
class TaskRun:
    """What a task's ``run`` function gets: the models and the options of one ``evaluate`` call.
    ``shared`` carries results that several tasks reuse (the base model's answers)."""

    model: Any
    tokenizer: Any
    base: Any = None
    base_tokenizer: Any = None
    limit: int | None = None
    batch_size: int = 8
    progress: bool = True
    max_new_tokens: int = 256
    kl_new_tokens: int = 48
    max_length: int | None = None
    boundaries: list[int] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    data_dir: str | Path | None = None  # the data folder for default files (--data-dir / $LOPT_DATA_DIR)


@dataclass(frozen=True)
class Task:
    kind: str
    usage: str  # shown in errors and --help
    run: Callable[[TaskRun, Any], dict[str, Any]]  # (run, path or arg) -> metrics
    arg: str = "optional"  # "none" | "optional" | "required"
    needs_base: bool = False
    default_data: str | None = None  # inside the data folder (--data-dir); the argument is then a path
    file_only: bool = False  # the path must be a file, not a directory
    # extra validation before any model loads: check(arg, data_dir)
    check: Callable[[str | None, str | Path | None], None] | None = None


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.kind] = task
    return task


def task_kinds() -> dict[str, str]:
    """kind -> usage line."""
    return {k: t.usage for k, t in TASKS.items()}


def parse_task(spec: str) -> tuple[str, str | None]:
    """Split ``KIND[:ARG]`` into ``(kind, arg)``; raise :class:`EvalError` for an unknown kind or a
    missing/unexpected argument. Only the first ``:`` separates, so ARG may contain colons."""
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in TASKS:
        raise EvalError(f"unknown task kind {kind!r} in --task {spec!r}; known kinds: " + ", ".join(TASKS))
    task = TASKS[kind]
    value = arg.strip() or None
    if task.arg == "required" and value is None:
        raise EvalError(f"task {kind!r} needs an argument: {task.usage}")
    if task.arg == "none" and value is not None:
        raise EvalError(f"task {kind!r} takes no argument (got {value!r}): {task.usage}")
    return kind, value


def resolve_data(kind: str, arg: str | None, data_dir: str | Path | None = None) -> Path:
    """The file or directory a file-based task reads: ``arg``, else its default in the data folder
    (``data_dir``, else ``$LOPT_DATA_DIR``); EvalError when it does not exist."""
    task = TASKS[kind]
    if arg is None:
        if task.default_data is None:
            raise EvalError(f"task {kind!r} needs a path: {task.usage}")
        return default_data(kind, task.default_data, data_dir)
    path = Path(arg).expanduser()
    if not path.exists():
        raise EvalError(f"task {kind!r}: file not found: {arg}")
    if task.file_only and not path.is_file():
        raise EvalError(f"task {kind!r}: {arg} is not a file")
    return path


def reads_data(task: Task) -> bool:
    return task.default_data is not None or task.file_only


def check_tasks(tasks: Sequence[str], *, has_base: bool,
                data_dir: str | Path | None = None) -> list[tuple[str, str | None]]:
    """Parse and validate every task spec before any model work starts (files exist, ``--base`` is
    there when needed), so a typo fails in a second rather than after an hour of scoring."""
    if not tasks:
        raise EvalError("no task given; use --task KIND[:ARG] (kinds: " + ", ".join(TASKS) + ")")
    parsed = [parse_task(t) for t in tasks]
    for kind, arg in parsed:
        task = TASKS[kind]
        if task.needs_base and not has_base:
            raise EvalError(f"task {kind!r} compares against the base model: give --base MODEL")
        if reads_data(task):
            resolve_data(kind, arg, data_dir)
        if task.check is not None:
            task.check(arg, data_dir)
    return parsed


def data_file_exists(kind: str) -> Callable[[str | None], None]:
    """A ``check`` for tasks whose argument may be a file path or a named dataset."""
    def check(arg: str | None, data_dir: str | Path | None = None) -> None:
        if arg and Path(arg).suffix.lower() in _DATA_SUFFIXES and not Path(arg).exists():
            raise EvalError(f"task {kind!r}: file not found: {arg}")
    return check
