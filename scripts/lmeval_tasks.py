"""Write lm-evaluation-harness task configs that run its builtin arc_easy, arc_challenge, piqa,
winogrande and lambada_openai on the official files of the retention suite instead of the hub datasets.

Run with a Python that has lm_eval installed (``pip install -e ".[eval]"``; it locates the builtin
YAMLs there). DATA_DIR is the folder that holds arc/, piqa/, winogrande/ and lambada/ (as
``lopt eval --data-dir``; default: $LOPT_DATA_DIR):

    python scripts/lmeval_tasks.py OUT_DIR --data-dir DATA_DIR
    lm_eval --model hf --model_args pretrained=CKPT,dtype=float32 \
        --include_path OUT_DIR --tasks lopt_arc_easy,lopt_arc_challenge,lopt_piqa,lopt_winogrande,lopt_lambada_openai \
        --limit N --batch_size 32 --device cpu --log_samples --output_path OUT_DIR/results

Each config ``include``s the builtin YAML, so prompts, choices, target and metrics are lm-eval's own;
only the data source changes (``dataset_path: json``). ARC and PIQA are rewritten into the hub's
layout (ARC: ``question`` = stem, ``choices`` = {text, label}; PIQA: ``label`` from the .lst file);
WinoGrande and LAMBADA are read as they are.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _arc(src: Path, dst: Path) -> None:
    with src.open() as fin, dst.open("w") as fout:
        for line in fin:
            row = json.loads(line)
            q = row["question"]
            fout.write(json.dumps({"id": row["id"], "question": q["stem"],
                                   "choices": {"text": [c["text"] for c in q["choices"]],
                                               "label": [c["label"] for c in q["choices"]]},
                                   "answerKey": row["answerKey"]}) + "\n")


def _piqa(src: Path, labels: Path, dst: Path) -> None:
    marks = labels.read_text().split()
    with src.open() as fin, dst.open("w") as fout:
        for line, mark in zip(fin, marks, strict=True):
            row = json.loads(line)
            fout.write(json.dumps({**row, "label": int(mark)}) + "\n")


def main(out: Path, data: Path) -> None:
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    _arc(data / "arc/ARC-Easy-Test.jsonl", out / "arc_easy.jsonl")
    _arc(data / "arc/ARC-Challenge-Test.jsonl", out / "arc_challenge.jsonl")
    _piqa(data / "piqa/valid.jsonl", data / "piqa/valid-labels.lst", out / "piqa.jsonl")
    specs = {  # task: (builtin yaml, data file, the split the builtin evaluates)
        "arc_easy": ("arc/arc_easy.yaml", out / "arc_easy.jsonl", "test"),
        "arc_challenge": ("arc/arc_challenge.yaml", out / "arc_challenge.jsonl", "test"),
        "piqa": ("piqa/piqa.yaml", out / "piqa.jsonl", "validation"),
        "winogrande": ("winogrande/default.yaml", data / "winogrande/dev.jsonl", "validation"),
        "lambada_openai": ("lambada/lambada_openai.yaml", data / "lambada/lambada_test.jsonl", "test"),
    }
    for task, (yaml, data, split) in specs.items():
        lines = [f"include: {builtin / yaml}", f"task: lopt_{task}", "tag: []", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {split}: {data}",
                 "training_split: null", "fewshot_split: null"]
        lines += ["validation_split: validation", "test_split: null"] if split == "validation" else \
                 ["validation_split: null", "test_split: test"]
        (out / f"lopt_{task}.yaml").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(specs)} task configs to {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="where the task configs (and the rewritten ARC/PIQA files) go")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("LOPT_DATA_DIR"),
                   help="the folder holding arc/, piqa/, winogrande/ and lambada/ (default: $LOPT_DATA_DIR)")
    ns = p.parse_args(argv)
    if ns.data_dir is None:
        p.error("give --data-dir DIR or set LOPT_DATA_DIR")
    ns.data_dir = Path(ns.data_dir)
    if not ns.data_dir.is_dir():
        p.error(f"--data-dir {ns.data_dir}: no such folder")
    return ns


if __name__ == "__main__":
    args = parse_args()
    main(args.out, args.data_dir)
    sys.exit(0)
