"""Multiple-choice tasks scored by log-likelihood.

``mc:FILE``: JSONL rows with ``context`` (or ``question``), ``choices`` and ``answer`` (an index);
``acc`` and ``acc_norm`` as lm-evaluation-harness defines them. ``mmlu-redux[:DIR_OR_FILE]``: the
MMLU-Redux CSV files, rows judged ``ok`` only, in the standard zero-shot MMLU prompt; per-subject and
overall accuracy. Default: ``mmlu-redux/`` in the data folder (``--data-dir`` / ``$LOPT_DATA_DIR``).
"""
from __future__ import annotations

import ast
import csv
import io
from pathlib import Path
from typing import Any, Sequence

from lopt.eval.common import EvalError, read_text
from lopt.eval.scoring import join_choice, mc_accuracy, mc_loglikelihoods
from lopt.eval.tasks import Task, register
from lopt.eval.common import read_jsonl


def load_mc_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"context", "choices", "answer"}`` from a JSONL file (``question`` is accepted for
    ``context``); EvalError names the file and line of a bad row."""
    path = Path(path)
    rows = []
    for lineno, row in read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        context = row.get("context", row.get("question"))
        choices = row.get("choices")
        answer = row.get("answer")
        if not isinstance(context, str):
            raise EvalError(f"{path} line {lineno}: needs a string 'context' (or 'question')")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise EvalError(f"{path} line {lineno}: 'choices' must be a non-empty list of strings")
        if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise EvalError(f"{path} line {lineno}: 'answer' must be the index of the right choice")
        if not 0 <= answer < len(choices):
            raise EvalError(f"{path} line {lineno}: answer index {answer} out of range "
                            f"for {len(choices)} choices")
        rows.append({"context": context, "choices": choices, "answer": answer})
    return rows


def _eval_mc(model, tokenizer, path: Path, *, limit, batch_size, progress) -> dict[str, Any]:
    rows = load_mc_jsonl(path, limit)
    lls = mc_loglikelihoods(model, tokenizer,
                            [(r["context"], [join_choice(c) for c in r["choices"]]) for r in rows],
                            batch_size=batch_size, progress=progress, desc=f"mc {path.name}")
    return mc_accuracy(lls, [r["choices"] for r in rows], [r["answer"] for r in rows])


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _delimiter(text: str) -> str:
    header = text.split("\n", 1)[0]
    return max((",", ";", "\t"), key=header.count)


def mmlu_prompt(subject: str, question: str, choices: Sequence[str]) -> str:
    """The standard zero-shot MMLU prompt (as in lm-evaluation-harness); the choices to score are
    ``" A"``, ``" B"``, ..."""
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "",
             question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(_LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def load_mmlu_redux(dir_or_file: str | Path, only_ok: bool = True
                    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read MMLU-Redux CSV files (a directory of ``mmlu_<subject>.csv`` or one file).

    The files are not uniform: the delimiter (comma or semicolon) is detected per file, columns are
    read by header name, empty extra columns are ignored, a file that is not UTF-8 is read as
    cp1252, and rows without an ``answer`` are skipped and counted. ``choices`` is a Python list
    literal. With ``only_ok`` only rows whose ``error_type`` is ``ok`` (any case) are kept.

    Returns ``(rows, counts)``: rows are dicts with subject, question, choices, answer, error_type,
    file and row (1-based data row); counts has files, rows, ok, no_answer, skipped_not_ok, kept.
    """
    path = Path(dir_or_file)
    if not path.exists():
        raise EvalError(f"MMLU-Redux data not found: {path}")
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise EvalError(f"no .csv files in {path}")
    rows: list[dict[str, Any]] = []
    counts = {"files": len(files), "rows": 0, "ok": 0, "no_answer": 0, "skipped_not_ok": 0, "kept": 0}
    for f in files:
        text = read_text(f)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
        header = [h.strip().lower() for h in next(reader, [])]
        col = {name: i for i, name in reversed(list(enumerate(header))) if name}
        missing = [c for c in ("question", "choices", "answer", "error_type") if c not in col]
        if missing:
            raise EvalError(f"{f}: missing column(s) {', '.join(missing)} (header: {header})")
        subject = f.stem.removeprefix("mmlu_").replace("_", " ")
        for n, rec in enumerate(reader, start=1):
            if not any(field.strip() for field in rec):
                continue  # a blank line or a row of bare delimiters
            get = lambda name: rec[col[name]].strip() if col[name] < len(rec) else ""  # noqa: E731
            counts["rows"] += 1
            ok = get("error_type").lower() == "ok"
            counts["ok"] += ok
            answer_text = get("answer")
            if not answer_text:
                counts["no_answer"] += 1
                continue
            if only_ok and not ok:
                counts["skipped_not_ok"] += 1
                continue
            try:
                answer = int(float(answer_text))
            except ValueError:
                raise EvalError(f"{f} row {n}: answer {answer_text!r} is not a choice index") from None
            try:
                choices = ast.literal_eval(get("choices"))
            except (ValueError, SyntaxError):
                raise EvalError(f"{f} row {n}: choices is not a list literal") from None
            if not isinstance(choices, (list, tuple)) or not choices:
                raise EvalError(f"{f} row {n}: choices is not a non-empty list")
            if not 0 <= answer < len(choices):
                raise EvalError(f"{f} row {n}: answer index {answer} out of range for "
                                f"{len(choices)} choices")
            rows.append({"subject": subject, "question": get("question"),
                         "choices": [str(c) for c in choices], "answer": answer,
                         "error_type": get("error_type"), "file": f.name, "row": n})
    counts["kept"] = len(rows)
    return rows, counts


def _spread(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` rows taken round-robin over subjects, so a limited run still covers
    every subject (the first N rows of the sorted files would be a handful of subjects)."""
    if limit is None or limit >= len(rows):
        return rows
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < limit:
        for group in by_subject.values():
            if depth < len(group) and len(picked) < limit:
                picked.append(group[depth])
        depth += 1
    return picked


def _eval_mmlu_redux(model, tokenizer, path: Path, *, limit, batch_size, progress) -> dict[str, Any]:
    rows, counts = load_mmlu_redux(path)
    rows = _spread(rows, limit)
    requests = [(mmlu_prompt(r["subject"], r["question"], r["choices"]),
                 [" " + _LETTERS[k] for k in range(len(r["choices"]))]) for r in rows]
    lls = mc_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress,
                            desc="mmlu-redux")
    per: dict[str, list[int]] = {}
    for r, ll in zip(rows, lls):
        pred = max(range(len(ll)), key=lambda k: (ll[k], -k))
        per.setdefault(r["subject"], []).append(int(pred == r["answer"]))
    n = sum(len(v) for v in per.values())
    subjects = {s: {"acc": sum(v) / len(v), "n": len(v)} for s, v in sorted(per.items())}
    return {"acc": sum(sum(v) for v in per.values()) / n if n else 0.0,
            "acc_macro": sum(s["acc"] for s in subjects.values()) / len(subjects) if subjects else 0.0,
            "n": n, "subjects": subjects, "data": counts}


register(Task("mc", "mc:FILE multiple choice (JSONL: context|question, choices, answer)", arg="required",
              file_only=True, run=lambda r, path: _eval_mc(r.model, r.tokenizer, path, limit=r.limit,
                                                           batch_size=r.batch_size, progress=r.progress)))
register(Task("mmlu-redux", "mmlu-redux[:DIR_OR_FILE] MMLU-Redux CSVs, ok rows", default_data="mmlu-redux",
              run=lambda r, path: _eval_mmlu_redux(r.model, r.tokenizer, path, limit=r.limit,
                                                   batch_size=r.batch_size, progress=r.progress)))
