"""``lopt dpo``: DPO with TRL's ``DPOTrainer``, the frozen base model as the reference, any lopt method.

    from lopt.dpo import DPORunConfig, dpo
    result = dpo(DPORunConfig(dataset="synthetic-gsm8k", method="lopt", max_steps=20))

Preference data: a local file or hub dataset with ``chosen``/``rejected`` columns and a ``prompt``
column (strings or chat messages; without ``prompt``, TRL takes the shared beginning of chosen and
rejected as the prompt), or ``synthetic-gsm8k[:PATH]``: pairs built from a GSM8K-format file, so that
DPO runs offline (see ``synthetic_gsm8k_pairs``).
"""
from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopt.data import DataError, data_file, load_records
from lopt.engine.config import LoPTError, option
from lopt.eval.common import EvalError
from lopt.eval.generation import load_gsm8k
from lopt.recipes.trl_bridge import (RLConfig, RLResult, RunState, load_and_wrap, make_trainer, prepare_trainer,
                                     resolve_resume, run_command, train_and_finish, trl_common_args)
from lopt.runtime.loop import resolve_device, set_seed


SYNTHETIC = "synthetic-gsm8k"
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
HEADLINE = {"margin": "rewards/margins", "accuracy": "rewards/accuracies", "loss": "loss"}
_DPO, _RUN = "dpo", "bookkeeping"
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass
class DPORunConfig(RLConfig):
    """Every option of ``lopt dpo`` (the shared ones are ``RLConfig``'s)."""

    output_dir: str = option("runs/dpo", "where checkpoints, metrics.jsonl and the final model go", group=_RUN)
    dataset: str = option(
        SYNTHETIC, "preference data: a file or hub dataset with prompt/chosen/rejected (strings or chat messages), "
        "or synthetic-gsm8k[:PATH] (chosen = GSM8K reference solution, rejected = same solution with a wrong "
        "final answer; default file gsm8k/train.jsonl in --data-dir or $LOPT_DATA_DIR)", group=_DPO)
    beta: float = option(0.1, "the DPO beta", group=_DPO)
    loss_type: str = option("sigmoid", f"DPO loss: {', '.join(LOSS_TYPES)}", group=_DPO)
    max_length: int | None = option(1024, "prompt + completion tokens at most (longer pairs are cut at the end)",
                                    type=int, group=_DPO)
    eval_dataset: str | None = option(
        None, "held-out preference pairs (same forms as --dataset), scored after the last step and every "
        "--eval-every steps: eval loss, reward margin and accuracy go to metrics.jsonl", group="evaluation")
    eval_limit: int | None = option(64, "use the first N held-out pairs", type=int, group="evaluation")
    eval_every: int | None = option(None, "also evaluate every N steps (needs --eval-dataset)", type=int,
                                    group="evaluation")

    def validate(self) -> None:
        super().validate()
        if self.eval_every is not None and self.eval_every < 1:
            raise LoPTError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.eval_every is not None and self.eval_dataset is None:
            raise LoPTError("eval_every needs --eval-dataset (held-out preference pairs)")
        if self.loss_type not in LOSS_TYPES:
            raise LoPTError(f"unknown loss_type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise LoPTError(f"beta must be > 0, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise LoPTError(f"max_length must be >= 2, got {self.max_length}")


# --------------------------------------------------------------------------- preference data


def wrong_answer(target: float, rng: random.Random) -> float:
    """A plausible wrong final answer for ``target``: a small offset, a doubling or a halving, never
    equal to it and never negative for a non-negative target; whole for a whole target."""
    whole = float(target).is_integer()
    cands = [target + d for d in (-10, -5, -3, -2, -1, 1, 2, 3, 5, 10)] + [target * 2]
    if whole and target % 2 == 0:
        cands.append(target / 2)
    cands = [c for c in cands if c != target and (target < 0 or c >= 0)]
    return rng.choice(cands)


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def corrupt_final_answer(solution: str, wrong: float) -> str:
    """``solution`` with its final answer replaced by ``wrong``: the number after ``####`` and the
    last place the reasoning states that number (so the rejected solution ends in the wrong result)."""
    body, sep, tail = solution.rpartition("####")
    if not sep:
        raise DataError("the solution has no '#### N' line")
    m = re.search(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", tail)
    if m is None:
        raise DataError("the solution has no number after '####'")
    old = m.group(0).strip().lstrip("$").strip()
    new_text = _number_text(wrong)
    new_tail = tail[: m.start()] + tail[m.start(): m.end()].replace(old, new_text) + tail[m.end():]
    spots = list(re.finditer(r"(?<![\d.,])" + re.escape(old) + r"(?![\d]|[.,]\d)", body))
    if spots:
        last = spots[-1]
        body = body[: last.start()] + new_text + body[last.end():]
    return body + sep + new_tail


def synthetic_gsm8k_pairs(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """A synthetic preference set from a GSM8K-format JSONL file (``question``/``answer`` ending in
    ``#### N``), as chat messages: prompt = the question; chosen = the reference solution; rejected =
    the same solution with a wrong final answer (``wrong_answer``, drawn from a generator seeded by
    ``seed`` and the row index, so the set is deterministic). GSM8K's calculator annotations
    (``<<48/2=24>>``) are removed from both."""
    try:
        rows = load_gsm8k(path, limit)
    except EvalError as e:
        raise DataError(str(e)) from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; give synthetic-gsm8k:PATH to a GSM8K-format .jsonl") from None
    pairs = []
    for i, r in enumerate(rows):
        chosen = _CALCULATOR.sub("", r["answer"]).strip()
        rng = random.Random(f"lopt-synthetic-gsm8k-{seed}-{i}")
        rejected = corrupt_final_answer(chosen, wrong_answer(r["target"], rng))
        pairs.append({"prompt": [{"role": "user", "content": r["question"]}],
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def load_preferences(source: str, tokenizer, split: str = "train", limit: int | None = None, seed: int = 0,
                     data_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows ``{'prompt', 'chosen', 'rejected'}`` for TRL, and stats. String columns become
    chat messages when the tokenizer has a chat template (as ``lopt train`` formats SFT data).
    ``synthetic-gsm8k`` without a path reads ``gsm8k/SPLIT.jsonl`` in the data folder (``data_dir``,
    else ``$LOPT_DATA_DIR``)."""
    if source == SYNTHETIC or source.startswith(SYNTHETIC + ":"):
        path = source.partition(":")[2]
        if not path:
            path = str(data_file(f"gsm8k/{split}.jsonl", data_dir, what=SYNTHETIC,
                                 alternative=f"; or give {SYNTHETIC}:PATH to a GSM8K-format .jsonl"))
        rows = synthetic_gsm8k_pairs(path, limit, seed)
        return rows, {"source": f"{SYNTHETIC}:{path}", "rows": len(rows), "synthetic": True}
    records = load_records(source, split=split, limit=limit, data_dir=data_dir)
    cols = set(records[0])
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise DataError(f"{source}: preference data needs 'chosen' and 'rejected' columns (and 'prompt', unless "
                        f"chosen/rejected are whole conversations); missing {missing}, found {sorted(cols)}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for i, r in enumerate(records, 1):
        row = {k: r[k] for k in ("prompt", "chosen", "rejected") if k in r}
        for k, v in row.items():
            if not isinstance(v, (str, list)) or not v:
                raise DataError(f"{source} row {i}: '{k}' must be a non-empty string or list of chat messages, "
                                f"got {type(v).__name__ if v is not None else 'nothing'}")
        if "prompt" in row and any(isinstance(v, list) for v in row.values()) and not all(
                isinstance(v, list) for v in row.values()):
            raise DataError(f"{source} row {i}: mix of plain-text and chat-message columns; make prompt, chosen "
                            f"and rejected all strings or all message lists")
        if chat and "prompt" in row and all(isinstance(v, str) for v in row.values()):
            row = {"prompt": [{"role": "user", "content": row["prompt"]}],
                   "chosen": [{"role": "assistant", "content": row["chosen"]}],
                   "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        rows.append(row)
    return rows, {"source": source, "rows": len(rows), "synthetic": False}


# --------------------------------------------------------------------------- the trainer


def dpo(cfg: DPORunConfig, callbacks: list | None = None) -> RLResult:
    """Run DPO; returns the summary (also in ``lopt_run.json``), the trained wrapped model and the
    tokenizer. The reference is the frozen base model (LoRA: the base with its adapters off)."""
    from trl import DPOConfig, DPOTrainer

    from lopt.plan.rl import resolve_batch_size

    resolve_batch_size(cfg, "dpo")  # --batch-size auto: lopt plan's largest DPO step for this device
    cfg.validate()
    resume_dir = resolve_resume(cfg)
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    wrapped, tokenizer, reference = load_and_wrap(cfg, device, with_reference=True)
    rows, data_stats = load_preferences(cfg.dataset, tokenizer, cfg.split, cfg.limit, cfg.seed, cfg.data_dir)
    eval_rows = None
    if cfg.eval_dataset:
        eval_rows, eval_stats = load_preferences(cfg.eval_dataset, tokenizer, "test", cfg.eval_limit, cfg.seed,
                                                 cfg.data_dir)
        data_stats["eval"] = eval_stats

    import datasets

    evaluation = {}
    if eval_rows is not None:
        # The Trainer also evaluates after the last step when it is not a multiple of eval_steps.
        evaluation = dict(eval_strategy="steps", eval_steps=cfg.eval_every or 10 ** 9,
                          per_device_eval_batch_size=cfg.batch_size)
    args = DPOConfig(**trl_common_args(cfg, device), beta=cfg.beta, loss_type=[cfg.loss_type],
                     max_length=cfg.max_length, precompute_ref_log_probs=False, **evaluation)
    run = RunState(cfg=cfg, command="dpo", device=device, extra_info={"data": data_stats})
    trainer = make_trainer(
        DPOTrainer, cfg, wrapped, run, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows is not None else None,
        processing_class=tokenizer)
    prepare_trainer(trainer, run, wrapped, ("loss", "rewards/margins"), callbacks)
    print(f"lopt dpo: {cfg.method} on {type(wrapped.plain_model()).__name__} ({wrapped.num_layers} layers, "
          f"blocks {wrapped.block_ranges}), {len(rows)} preference pairs from {data_stats['source']}"
          f"{' (synthetic)' if data_stats['synthetic'] else ''}, beta {cfg.beta}, on {device}"
          + (f", resuming {resume_dir}" if resume_dir else ""), file=sys.stderr)
    return train_and_finish(trainer, run, resume_dir, wrapped, tokenizer, HEADLINE)


def cmd_dpo(cfg: DPORunConfig, callbacks: list | None = None) -> int:
    """The CLI command: run, print the summary table; 130 when interrupted."""
    return run_command(dpo, cfg, callbacks, HEADLINE)


__all__ = ["DPORunConfig", "dpo", "cmd_dpo", "synthetic_gsm8k_pairs", "corrupt_final_answer", "wrong_answer",
           "load_preferences"]
