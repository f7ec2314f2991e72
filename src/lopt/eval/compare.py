"""``lopt compare RUN_OR_JSON ...``: the results of several runs side by side as a markdown table, with
a bar chart (when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from lopt.eval.common import EVAL_FILE, EvalError
from lopt.eval.runner import LOWER_IS_BETTER, format_value, headline_metrics, is_embedded
from lopt.eval.suite import RETENTION_KINDS, format_differences_table, retention_differences
from lopt.jsonout import json_help, write_json


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lopt compare``."""
    parser.description = ("Print the eval results of several runs side by side (markdown), with each "
                          "run's change from the baseline (the base model where one is among them, else the "
                          "first run), and draw a bar chart.")
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_JSON",
                        help=f"an eval JSON written by `lopt eval`, or a run dir holding {EVAL_FILE}")
    parser.add_argument("--baseline", default=None, metavar="NAME_OR_INDEX",
                        help="the column to take deltas against (default: the run that is the others' "
                             "--base if one is, else the first)")
    parser.add_argument("--png", default="lopt_compare.png", help="bar chart file ('' for none)")
    parser.add_argument("--json", default=None, metavar="PATH", help=json_help("the table (one row per task "
                                                                               "and metric, a value per run)",
                                                                               memory=False))


def load_eval_record(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(label, record)`` from an eval JSON or a run directory holding one."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / EVAL_FILE] + sorted(p.glob("eval*.json"))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise EvalError(f"{p} holds no {EVAL_FILE}; run `lopt eval --model {p} --task ...` first")
        label, p = p.name, found
    elif p.is_file():
        label = p.parent.name if p.name == EVAL_FILE else p.stem
    else:
        raise EvalError(f"not found: {path}")
    try:
        record = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{p} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise EvalError(f"{p} is not an eval result")
    if "results" not in record:  # a bare {task: metrics} mapping, e.g. evaluate()'s return value
        record = {"results": record}
    return label, record


def _same_model(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    if is_embedded(a) and is_embedded(b):
        return True
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve() or str(a) == str(b)
    except OSError:
        return str(a) == str(b)


def run_compare_cli(args: argparse.Namespace) -> int:
    """``lopt compare``: a markdown table of several runs' eval results (with deltas to the base
    model's column when there is one) and a bar chart PNG when matplotlib is installed."""
    loaded = [load_eval_record(r) for r in args.runs]
    labels = _unique_labels([label for label, _ in loaded])
    records = [rec for _, rec in loaded]
    base_col = _baseline_column(args.baseline, labels, records)
    rows: dict[tuple[str, str], list[Any]] = {}  # (task, metric) -> one value per run
    for col, rec in enumerate(records):
        for spec, metrics in rec.get("results", {}).items():
            if not isinstance(metrics, dict):
                continue
            for name, value in headline_metrics(spec, metrics).items():
                rows.setdefault((spec, name), [None] * len(records))[col] = value
    header = ["task", "metric"] + [f"{lab} (base)" if i == base_col else lab for i, lab in enumerate(labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (spec, name), values in rows.items():
        cells = []
        for i, v in enumerate(values):
            if v is None:
                cells.append("–")
                continue
            cell = format_value(v)
            ref = values[base_col] if base_col is not None else None
            if ref is not None and i != base_col:
                delta = v - ref
                cell += f" ({delta:+d})" if isinstance(delta, int) else f" ({delta:+.4f})"
            cells.append(cell)
        lines.append(f"| {spec} | {name} | " + " | ".join(cells) + " |")
    json_out = getattr(args, "json", None)
    out = sys.stderr if json_out == "-" else sys.stdout  # `--json -`: standard output holds the JSON only
    print("\n".join(lines), file=out)
    if base_col is not None:
        print(f"\ndeltas are against {labels[base_col]}; lower is better for "
              + ", ".join(sorted(LOWER_IS_BETTER)), file=out)
    if base_col is not None:
        for line in _paired_retention(labels, records, base_col):
            print(line, file=out)
    if args.png:
        note = _bar_chart(rows, labels, args.png)
        print(note, file=out)
    if json_out:
        where = write_json(json_out, {
            "runs": labels, "baseline": labels[base_col] if base_col is not None else None,
            "lower_is_better": sorted(LOWER_IS_BETTER),
            "rows": [{"task": spec, "metric": name, "values": dict(zip(labels, values))}
                     for (spec, name), values in rows.items()]})
        if json_out != "-":
            print(f"table written to {where}", file=out)
    return 0


def _paired_retention(labels: list[str], records: list[dict[str, Any]], base_col: int) -> list[str]:
    """For retention tasks scored on the same items in the baseline and another run: each task's change
    of its primary metric with the standard error of the paired difference."""
    def retention_parts(rec: dict[str, Any]) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        for spec, m in rec.get("results", {}).items():
            if isinstance(m, dict) and isinstance(m.get("tasks"), dict):
                parts.update({k: v for k, v in m["tasks"].items() if isinstance(v, dict) and "items" in v})
            elif isinstance(m, dict) and m.get("task") in RETENTION_KINDS and "items" in m:
                parts[m["task"]] = m
        return parts
    base = retention_parts(records[base_col])
    out: list[str] = []
    for col, rec in enumerate(records):
        tuned = retention_parts(rec)
        common = {k: base[k] for k in base if k in tuned and len(base[k]["items"]) == len(tuned[k]["items"])}
        if col == base_col or not common:
            continue
        diff = retention_differences(common, {k: tuned[k] for k in common})
        out += ["", f"retention change, {labels[col]} vs {labels[base_col]} (paired over the same items):",
                format_differences_table(diff)]
    return out


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


def _baseline_column(choice: str | None, labels: list[str], records: list[dict[str, Any]]) -> int | None:
    if choice is not None:
        if choice.isdigit() and int(choice) < len(labels):
            return int(choice)
        if choice in labels:
            return labels.index(choice)
        raise EvalError(f"--baseline {choice!r} is neither a column index nor one of: {', '.join(labels)}")
    bases = {rec.get("base") for rec in records if rec.get("base")}
    for i, rec in enumerate(records):
        if any(_same_model(rec.get("model"), b) for b in bases):
            return i
    # `lopt compare base.json tuned.json`: read as written, the first is what the others changed from.
    return 0 if len(records) > 1 else None


def _bar_chart(rows: dict[tuple[str, str], list[float | None]], labels: list[str], png: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"(no chart: matplotlib is not installed; pip install matplotlib to get {png})"
    if not rows:
        return "(no chart: no metrics to plot)"
    items = list(rows.items())
    ncols = min(3, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, ((spec, name), values) in zip(axes.flat, items):
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [values[i] for i in xs], color=[colors[i % len(colors)] for i in xs])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        direction = "lower is better" if name in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{spec}\n{name} ({direction})", fontsize=8)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"chart written to {png}"
