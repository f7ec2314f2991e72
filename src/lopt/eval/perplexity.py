"""Language-modelling tasks: ``ppl:FILE``, perplexity of a text file in non-overlapping windows of the
model's context; ``task-loss:DATASET``, held-out SFT loss (mean over answer tokens) with the
trainer's data formats (``lopt.data.build_sft_dataset``, split ``test``; ``DATASET`` may be
``arithmetic``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any
import torch
import torch.nn.functional as F

from lopt.data import build_sft_dataset, collate, has_test_split
from lopt.eval.common import EvalError, chunks_of, model_device, encode_texts, max_positions_of, pad_id_of, run_rows
from lopt.runtime.checkpoints import RUN_FILE
from lopt.eval.tasks import Task, TaskRun, data_file_exists, register
from lopt.eval.common import progress_bar


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, window: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``text`` in non-overlapping windows (no stride): the token stream, after a BOS
    (or EOS) start token, is cut into windows of the model's context (capped at 2048); every token
    is predicted exactly once, from the tokens before it in its own window. Also reports bits per
    byte and word perplexity as lm-evaluation-harness does for its rolling tasks."""
    model.eval()
    device = model_device(model)
    ids = encode_texts(tokenizer, [text])[0]
    if not ids:
        raise EvalError("perplexity: the text is empty")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    seq = ([int(start)] if start is not None else []) + ids
    size = window or max_positions_of(model, cap=2048)
    # Window k feeds seq[s:s+size] and predicts seq[s+1:s+size+1]; without a start token the first
    # text token cannot be predicted and is left out of the count.
    spans = [(s, min(s + size, len(seq) - 1)) for s in range(0, len(seq) - 1, size)]
    per_pass = max(1, min(batch_size, 4096 // size))  # bound the (rows, size, vocab) logits
    total_nll, total_tokens = 0.0, 0
    groups = list(chunks_of(spans, per_pass))
    for group in progress_bar(groups, total=len(groups), desc="ppl", enabled=progress):
        logits, _, _ = run_rows(model, [seq[a:b] for a, b in group], keep="all")
        for r, (a, b) in enumerate(group):
            target = torch.tensor(seq[a + 1: b + 1], device=device)
            total_nll += float(F.cross_entropy(logits[r, : b - a].float(), target, reduction="sum"))
            total_tokens += b - a
    n_bytes = len(text.encode("utf-8"))
    n_words = len(re.split(r"\s+", text.strip()))
    return {"ppl": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens,
            "tokens": total_tokens, "windows": len(spans), "window": size, "mode": "non-overlapping",
            "bits_per_byte": total_nll / n_bytes / math.log(2), "byte_ppl": math.exp(total_nll / n_bytes),
            "word_ppl": math.exp(total_nll / n_words)}


@torch.inference_mode()
def task_loss(model, tokenizer, dataset: str, *, split: str = "test", max_length: int = 512,
              limit: int | None = None, batch_size: int = 8, progress: bool = False,
              data_dir: str | Path | None = None) -> dict[str, Any]:
    """Mean cross-entropy over the answer tokens (labels != -100) of a held-out SFT set built with
    the trainer's own data code (:func:`lopt.data.build_sft_dataset`), token-weighted. A single file
    has no splits: its result says ``"split": "file"``."""

    examples, stats = build_sft_dataset(dataset, tokenizer, max_length=max_length, split=split,
                                        limit=limit, data_dir=data_dir)
    if has_test_split(dataset, data_dir) is False and Path(dataset).expanduser().is_file():
        split = "file"
    return examples_loss(model, tokenizer, examples, split=split, max_length=max_length, batch_size=batch_size,
                         progress=progress, name=dataset, stats=stats)


@torch.inference_mode()
def examples_loss(model, tokenizer, examples: list[dict], *, split: str, max_length: int | None = None,
                  batch_size: int = 8, progress: bool = False, name: str = "examples",
                  stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """``task_loss`` of examples already tokenized (``build_sft_dataset``'s), labelled ``split``
    (where they came from: ``test``, ``val``, ...)."""
    stats = stats or {}
    model.eval()
    device = model_device(model)
    if not examples:
        raise EvalError(f"task-loss: no examples in {name!r} (split {split})")
    # Similar lengths together: less padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    total, count = 0.0, 0
    per_item: list[list[float]] = [[0.0, 0] for _ in examples]  # [summed nll, answer tokens], file order
    batches = list(chunks_of(order, batch_size))
    for batch in progress_bar(batches, total=len(batches), desc="task-loss", enabled=progress):
        b = collate([examples[i] for i in batch], pad_id_of(tokenizer))
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        # Labels are aligned with input_ids (the transformers convention): position t predicts t+1.
        logits = out.logits[:, :-1].float()
        labels = b["labels"][:, 1:].to(device)
        keep = labels != -100
        nll = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~keep, 0), reduction="none")
        nll = (nll * keep).sum(dim=1)
        for row, i in enumerate(batch):
            per_item[i] = [float(nll[row]), int(keep[row].sum())]
        total += float(nll.sum())
        count += int(keep.sum())
    if count == 0:
        raise EvalError(f"task-loss: {name!r} has no answer tokens to score")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "n": len(examples),
            "split": split, "max_length": max_length, "format": stats.get("format"),
            "truncated": stats.get("truncated"),
            "items": [{"id": i, "nll": n, "tokens": t} for i, (n, t) in enumerate(per_item)]}


def _run_max_length(model) -> int:
    """The training run's max_length (from its lopt_run.json), else the trainer's default 512."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and (Path(name) / RUN_FILE).is_file():
        try:
            value = json.loads((Path(name) / RUN_FILE).read_text()).get("options", {}).get("max_length")
            if isinstance(value, int) and value > 0:
                return value
        except (json.JSONDecodeError, AttributeError):
            pass
    return 512


def _run_ppl(r: TaskRun, path: Path) -> dict[str, Any]:
    res = perplexity(r.model, r.tokenizer, path.read_text(encoding="utf-8", errors="replace"),
                     batch_size=r.batch_size, progress=r.progress)
    return {**res, "file": str(path)}


register(Task("ppl", "ppl:FILE perplexity of a text file", arg="required", file_only=True, run=_run_ppl))
register(Task("task-loss", "task-loss:DATASET held-out SFT loss (a file or 'arithmetic')", arg="required",
              check=data_file_exists("task-loss"), run=lambda r, arg: task_loss(
                  r.model, r.tokenizer, arg, max_length=r.max_length or _run_max_length(r.model),
                  limit=r.limit, batch_size=r.batch_size, progress=r.progress, data_dir=r.data_dir)))
