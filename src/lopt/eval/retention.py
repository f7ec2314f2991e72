"""Retention measured during training: how far the model's answers to general prompts moved from the
base model's, for any model and tokenizer.

``RetentionProbe.record(model, tokenizer)`` runs once, before the first optimizer step: the base model
answers the first ``prompts`` of lopt's general prompts (:mod:`lopt.prompts`) greedily, and its
next-token log-probabilities over those answers are kept. ``probe.kl(model)`` later gives the mean
per-token KL(base || model) over the same answers, in nats: the definition of ``lopt eval --tasks
retention-kl`` (:mod:`lopt.eval.kl`), so the number equals ``lopt eval --tasks retention-kl --base BASE
--limit PROMPTS --kl-new-tokens MAX_NEW_TOKENS`` on the saved model. 0 means the answers' distributions
are unchanged.

What is kept: the full next-token distributions (float32, on the CPU) at the answer tokens, at most
``prompts x max_new_tokens`` rows of the vocabulary. The full rows, not the top-k, because KL(base ||
model) weighs every token the base gives mass to, and a truncated base distribution would make another
metric than ``lopt eval``'s. The default 8 prompts x 32 tokens keeps this at <= 256 rows: <= 50 MB for
SmolLM2's 49k vocabulary, <= 156 MB for Qwen's 152k. ``save`` / ``load`` write it to the run folder, so a
resumed run compares against the original base model, not the weights it resumed from.

``RetentionSuite`` (``--retention suite:TASKS``) adds a few lm-eval-exact multiple-choice benchmarks
(:mod:`lopt.eval.suite`) scored on their first ``limit`` items: the base model's score is recorded
once, and each measurement reports the model's score and the change.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lopt.eval.common import EvalError, chunks_of, model_device, pad_id_of, right_pad
from lopt.eval.kl import base_continuations
from lopt.prompts import GENERAL_PROMPTS

__all__ = ["RetentionProbe", "RetentionSuite", "RETENTION_FILE", "RETENTION_MEANING", "parse_retention",
           "DEFAULT_PROMPTS", "DEFAULT_NEW_TOKENS", "DEFAULT_SUITE", "DEFAULT_SUITE_LIMIT"]

RETENTION_FILE = "retention_base.pt"  # in the run's output folder
DEFAULT_PROMPTS = 8
DEFAULT_NEW_TOKENS = 32
DEFAULT_SUITE = ("arc-easy", "piqa")
DEFAULT_SUITE_LIMIT = 50
RETENTION_MEANING = ("retention KL: how far the model's answers to general prompts moved from the base "
                     "model's (mean per-token KL(base || model) in nats; 0 = unchanged)")


def parse_retention(spec: str | None) -> tuple[str, tuple[str, ...]]:
    """``--retention none|kl|suite[:TASK,TASK...]`` -> ``(mode, suite_tasks)``; a one-line EvalError
    for anything else. ``suite`` measures the KL too, and adds the tasks (default: arc-easy, piqa)."""
    from lopt.eval.suite import RETENTION_KINDS

    text = "none" if spec is None else str(spec).strip().lower()
    mode, _, rest = text.partition(":")
    if mode in ("none", "kl") and not rest:
        return mode, ()
    if mode == "suite":
        tasks = tuple(t.strip() for t in rest.split(",") if t.strip()) if rest else DEFAULT_SUITE
        bad = [t for t in tasks if t not in RETENTION_KINDS]
        if bad:
            raise EvalError(f"--retention suite:{rest}: no task {bad[0]!r}; tasks: {', '.join(RETENTION_KINDS)}")
        return mode, tasks
    raise EvalError(f"--retention must be none, kl or suite[:TASK,...], got {spec!r}")


def _unwrap(model):
    """The Hugging Face model inside a lopt wrapper (``LoPTModel.model``), else the model itself."""
    inner = getattr(model, "model", None)
    return inner if hasattr(model, "block_ranges") and inner is not None else model


def _answer_logprobs(model, tokenizer, sequences: Sequence[tuple[list[int], list[int]]],
                     batch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One batch of ``sequences`` (indices ``batch``), right-padded as :func:`lopt.eval.kl.retention_kl`
    pads them: the model's float32 log-probabilities at the positions that predict an answer token
    (rows in batch order), the answer tokens, and each sequence's row count."""
    device = model_device(model)
    seqs = [sequences[i][0] + sequences[i][1] for i in batch]
    ids, mask = right_pad(seqs, pad_id_of(tokenizer))
    score = torch.zeros_like(mask, dtype=torch.bool)
    for r, i in enumerate(batch):
        p, c = len(sequences[i][0]), len(sequences[i][1])
        score[r, p - 1: p - 1 + c] = True
    targets = torch.roll(ids, -1, dims=1)[score]
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    lp = F.log_softmax(logits[score.to(device)].float(), dim=-1)
    return lp, targets.to(device), [len(sequences[i][1]) for i in batch]


class RetentionProbe:
    """The base model's answers to general prompts and its next-token log-probabilities over them.

    Typical use, for any causal LM and its tokenizer::

        probe = RetentionProbe.record(model, tokenizer)   # before the first step
        ...                                               # train
        probe.kl(model)                                   # later: 0.0 = unchanged

    ``measure(model)`` gives the KL with the model's NLL on the answers and the seconds it took.
    The model's train/eval mode is restored after each measurement."""

    def __init__(self, sequences: list[tuple[list[int], list[int]]], base_logprobs: torch.Tensor,
                 base_nll: float, *, max_new_tokens: int, batch_size: int = 8, seconds: float = 0.0):
        self.sequences = sequences
        self.base_logprobs = base_logprobs  # [answer tokens, vocab], sequences in index order
        self.base_nll = base_nll
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.record_seconds = seconds
        starts, n = [], 0
        for _, c in sequences:
            starts.append(n)
            n += len(c)
        self._starts, self.tokens = starts, n

    @classmethod
    @torch.inference_mode()
    def record(cls, model, tokenizer, *, prompts: int | Sequence[str] = DEFAULT_PROMPTS,
               max_new_tokens: int = DEFAULT_NEW_TOKENS, batch_size: int = 8) -> RetentionProbe:
        """Let ``model`` (the base, before any step) answer the first ``prompts`` general prompts (or
        the given prompts) with up to ``max_new_tokens`` greedy tokens each, and keep its log-probs."""
        if isinstance(prompts, int) and not 1 <= prompts <= len(GENERAL_PROMPTS):
            raise EvalError(f"retention prompts must be 1..{len(GENERAL_PROMPTS)}, got {prompts}")
        if max_new_tokens < 1:
            raise EvalError(f"retention max_new_tokens must be >= 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        hf = _unwrap(model)
        was_training = hf.training
        try:
            texts = list(GENERAL_PROMPTS[:prompts]) if isinstance(prompts, int) else list(prompts)
            sequences = base_continuations(hf, tokenizer, texts, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
            if not any(c for _, c in sequences):
                raise EvalError("retention: the base model produced no answer tokens")
            n = sum(len(c) for _, c in sequences)
            rows: list[torch.Tensor | None] = [None] * len(sequences)
            nll = 0.0
            for batch in chunks_of(cls._order(sequences), batch_size):
                lp, targets, counts = _answer_logprobs(hf, tokenizer, sequences, batch)
                nll -= float(lp.gather(1, targets[:, None]).sum())
                for i, part in zip(batch, lp.split(counts)):
                    rows[i] = part.cpu()
            base = torch.cat([r for r in rows if r is not None]) if n else torch.empty(0)
        finally:
            hf.train(was_training)
        return cls(sequences, base, nll / n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   seconds=time.perf_counter() - t0)

    @staticmethod
    def _order(sequences) -> list[int]:
        # lopt.eval.kl's batching: longest first, so the same rows share a batch (and its padding).
        return sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))

    @property
    def vocab_size(self) -> int:
        return int(self.base_logprobs.shape[-1])

    @torch.inference_mode()
    def measure(self, model, tokenizer=None) -> dict[str, Any]:
        """KL(base || ``model``) per answer token (``kl``), ``model``'s NLL of the base answers
        (``nll``, ``base_nll`` for scale), the answer ``tokens``, ``prompts`` and ``seconds``.
        ``tokenizer`` only supplies the pad id (default: pad with 0; padding is masked out)."""
        t0 = time.perf_counter()
        hf = _unwrap(model)
        was_training = hf.training
        hf.eval()
        kl_sum = nll_sum = 0.0
        pad = _PadOnly(tokenizer)
        try:
            for batch in chunks_of(self._order(self.sequences), self.batch_size):
                lp, targets, _ = _answer_logprobs(hf, pad, self.sequences, batch)
                if lp.shape[-1] != self.vocab_size:
                    raise EvalError(f"retention: the model has {lp.shape[-1]} output tokens, its base record "
                                    f"{self.vocab_size}; retention needs the same tokenizer")
                base = torch.cat([self.base_logprobs[self._starts[i]: self._starts[i] + len(self.sequences[i][1])]
                                  for i in batch]).to(lp.device)
                kl_sum += float((base.exp() * (base - lp)).sum())
                nll_sum -= float(lp.gather(1, targets[:, None]).sum())
        finally:
            hf.train(was_training)
        return {"kl": kl_sum / self.tokens, "nll": nll_sum / self.tokens, "base_nll": self.base_nll,
                "tokens": self.tokens, "prompts": len(self.sequences), "max_new_tokens": self.max_new_tokens,
                "seconds": round(time.perf_counter() - t0, 3)}

    def kl(self, model, tokenizer=None) -> float:
        """Mean per-token KL(base || ``model``) in nats over the base answers; 0.0 = unchanged."""
        return self.measure(model, tokenizer)["kl"]

    # ---- persistence: the run folder keeps the original base's record across resumes
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "sequences": self.sequences, "base_logprobs": self.base_logprobs,
                "base_nll": self.base_nll, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "record_seconds": self.record_seconds}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> RetentionProbe:
        return cls([(list(p), list(c)) for p, c in sd["sequences"]], sd["base_logprobs"], float(sd["base_nll"]),
                   max_new_tokens=int(sd["max_new_tokens"]), batch_size=int(sd.get("batch_size", 8)),
                   seconds=float(sd.get("record_seconds", 0.0)))

    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` (a file, or a folder: ``FOLDER/retention_base.pt``), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / RETENTION_FILE
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RetentionProbe:
        """A record written by :meth:`save` (a file, or the folder holding ``retention_base.pt``)."""
        path = Path(path)
        if path.is_dir():
            path = path / RETENTION_FILE
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            return cls.from_state_dict(sd)
        except FileNotFoundError:
            raise
        except Exception as e:  # a damaged file: say which, in one line
            raise EvalError(f"{path} is not a readable retention record ({type(e).__name__}): delete it to "
                            f"record the base again (from the base model, not resumed weights)") from None


class _PadOnly:
    """The tokenizer's pad id for right-padding, or 0 without a tokenizer (padded positions are masked)."""

    def __init__(self, tokenizer):
        self.pad_token_id = 0 if tokenizer is None else pad_id_of(tokenizer)
        self.eos_token_id = None


class RetentionSuite:
    """A few lm-eval-exact benchmarks (:mod:`lopt.eval.suite`) on their first ``limit`` items: the base
    model's primary metric recorded once, then the model's and the change at each measurement."""

    def __init__(self, tasks: Sequence[str], base_scores: dict[str, float], *, limit: int,
                 data_dir: str | Path | None = None):
        self.tasks, self.base_scores, self.limit, self.data_dir = tuple(tasks), dict(base_scores), limit, data_dir

    @staticmethod
    def check(tasks: Sequence[str], data_dir: str | Path | None = None) -> None:
        """Before any model loads: each task's file exists (a one-line EvalError naming it otherwise)."""
        from lopt.eval.suite import resolve_path

        for kind in tasks:
            resolve_path(kind, None, data_dir)

    @classmethod
    def record(cls, model, tokenizer, tasks: Sequence[str] = DEFAULT_SUITE, *, limit: int = DEFAULT_SUITE_LIMIT,
               data_dir: str | Path | None = None) -> RetentionSuite:
        return cls(tasks, cls._scores(model, tokenizer, tasks, limit, data_dir), limit=limit, data_dir=data_dir)

    @staticmethod
    def _scores(model, tokenizer, tasks, limit, data_dir) -> dict[str, float]:
        from lopt.eval.suite import PRIMARY, resolve_path, run_benchmark

        hf = _unwrap(model)
        was_training = hf.training
        hf.eval()
        try:
            return {kind: float(run_benchmark(kind, hf, tokenizer, resolve_path(kind, None, data_dir),
                                              limit=limit)[PRIMARY[kind]]) for kind in tasks}
        finally:
            hf.train(was_training)

    def measure(self, model, tokenizer) -> dict[str, Any]:
        """``{task: {"score", "base", "change"}}`` of the primary metrics (lopt.eval.suite.PRIMARY)."""
        now = self._scores(model, tokenizer, self.tasks, self.limit, self.data_dir)
        return {k: {"score": v, "base": self.base_scores[k], "change": v - self.base_scores[k], "n": self.limit}
                for k, v in now.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "base_scores": self.base_scores, "limit": self.limit}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], data_dir: str | Path | None = None) -> RetentionSuite:
        return cls(sd["tasks"], sd["base_scores"], limit=int(sd["limit"]), data_dir=data_dir)
