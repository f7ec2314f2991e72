"""Compare lopt's retention suite with lm-evaluation-harness item by item.

    python scripts/lmeval_compare.py LOPT_JSON LMEVAL_OUTPUT_DIR

LOPT_JSON is a ``run_retention`` result (``scripts/retention_timing.py --json``); LMEVAL_OUTPUT_DIR
holds lm-eval's ``--log_samples`` files for the ``lopt_*`` tasks of ``scripts/lmeval_tasks.py``.
On the items lm-eval scored (its first N, lopt's first N: the same rows), prints both tools'
metrics, how many items' predictions differ, and the largest log-likelihood difference.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

LMEVAL_TASK = {"arc-easy": "lopt_arc_easy", "arc-challenge": "lopt_arc_challenge", "piqa": "lopt_piqa",
               "winogrande": "lopt_winogrande", "lambada": "lopt_lambada_openai"}


def _samples(out_dir: Path, task: str) -> list[dict]:
    files = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples_{task}_*.jsonl under {out_dir}")
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


def compare(lopt: dict, out_dir: Path) -> list[dict]:
    table = []
    for kind, task in LMEVAL_TASK.items():
        theirs = _samples(out_dir, task)
        ours = lopt["tasks"][kind]["items"][: len(theirs)]
        metrics = ["acc", "perplexity"] if kind == "lambada" else \
            ["acc"] if kind == "winogrande" else ["acc", "acc_norm"]
        row = {"task": kind, "n": len(theirs)}
        max_dll = 0.0
        for name in metrics:
            if name == "perplexity":
                lls_t = [float(r["filtered_resps"][0][0]) for r in theirs]
                lls_o = [it["loglik"] for it in ours]
                row["perplexity"] = (math.exp(-sum(lls_o) / len(lls_o)), math.exp(-sum(lls_t) / len(lls_t)))
                continue
            vals_t = [float(r[name]) for r in theirs]
            vals_o = [float(it[name]) for it in ours]
            row[name] = (sum(vals_o) / len(vals_o), sum(vals_t) / len(vals_t))
            row[f"{name}_items_differ"] = sum(a != b for a, b in zip(vals_o, vals_t))
        for r, it in zip(theirs, ours):
            lls_t = [float(x[0]) for x in r["filtered_resps"]]
            lls_o = it["loglik"] if isinstance(it["loglik"], list) else [it["loglik"]]
            max_dll = max(max_dll, max(abs(a - b) for a, b in zip(lls_o, lls_t)))
        row["max_abs_loglik_diff"] = max_dll
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lopt_json", type=Path, help="a run_retention result (scripts/retention_timing.py --json)")
    p.add_argument("lmeval_output_dir", type=Path, help="lm-eval's --output_path, with --log_samples files")
    ns = p.parse_args(argv)
    lopt = json.loads(ns.lopt_json.read_text())
    table = compare(lopt, ns.lmeval_output_dir)
    print("| task | n | metric | lopt | lm-eval | items that differ | max abs loglik diff |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        for name in ("acc", "acc_norm", "perplexity"):
            if name not in row:
                continue
            ours, theirs = row[name]
            scale = 1.0 if name == "perplexity" else 100.0
            differ = row.get(f"{name}_items_differ", "")
            print(f"| {row['task']} | {row['n']} | {name} | {ours * scale:.2f} | {theirs * scale:.2f} | "
                  f"{differ} | {row['max_abs_loglik_diff']:.2e} |")


if __name__ == "__main__":
    main()
