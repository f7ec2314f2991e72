"""Write lm-evaluation-harness task configs that run its builtin arc_easy, arc_challenge, piqa,
winogrande and lambada_openai on the official files in ../shared/data instead of the hub datasets.

Run with the Python that has lm_eval installed (it locates the builtin YAMLs there):

    /work/lmeval-venv/bin/python scripts/lmeval_tasks.py OUT_DIR
    /work/lmeval-venv/bin/lm_eval --model hf --model_args pretrained=CKPT,dtype=float32 \
        --include_path OUT_DIR --tasks lopt_arc_easy,lopt_arc_challenge,lopt_piqa,lopt_winogrande,lopt_lambada_openai \
        --limit N --batch_size 32 --device cpu --log_samples --output_path OUT_DIR/results

Each config ``include``s the builtin YAML, so prompts, choices, target and metrics are lm-eval's own;
only the data source changes (``dataset_path: json``). ARC and PIQA are rewritten into the hub's
layout (ARC: ``question`` = stem, ``choices`` = {text, label}; PIQA: ``label`` from the .lst file);
WinoGrande and LAMBADA are read as they are.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def main(out: Path) -> None:
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    _arc(DATA / "arc/ARC-Easy-Test.jsonl", out / "arc_easy.jsonl")
    _arc(DATA / "arc/ARC-Challenge-Test.jsonl", out / "arc_challenge.jsonl")
    _piqa(DATA / "piqa/valid.jsonl", DATA / "piqa/valid-labels.lst", out / "piqa.jsonl")
    specs = {  # task: (builtin yaml, data file, the split the builtin evaluates)
        "arc_easy": ("arc/arc_easy.yaml", out / "arc_easy.jsonl", "test"),
        "arc_challenge": ("arc/arc_challenge.yaml", out / "arc_challenge.jsonl", "test"),
        "piqa": ("piqa/piqa.yaml", out / "piqa.jsonl", "validation"),
        "winogrande": ("winogrande/default.yaml", DATA / "winogrande/dev.jsonl", "validation"),
        "lambada_openai": ("lambada/lambada_openai.yaml", DATA / "lambada/lambada_test.jsonl", "test"),
    }
    for task, (yaml, data, split) in specs.items():
        lines = [f"include: {builtin / yaml}", f"task: lopt_{task}", "tag: []", "dataset_path: json",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {split}: {data}",
                 "training_split: null", "fewshot_split: null"]
        lines += ["validation_split: validation", "test_split: null"] if split == "validation" else \
                 ["validation_split: null", "test_split: test"]
        (out / f"lopt_{task}.yaml").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(specs)} task configs to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lmeval-tasks"))
