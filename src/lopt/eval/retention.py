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

from lopt.eval.common import EvalError, chunks_of, pad_id_of
from lopt.eval.kl import answer_logprobs, base_continuations
from lopt.prompts import GENERAL_PROMPTS

__all__ = ["RetentionProbe", "RetentionSuite", "RunRetention", "RETENTION_FILE", "SUITE_FILE", "RETENTION_MEANING",
           "RETENTION_OFF_NOTE",
           "parse_retention", "DEFAULT_PROMPTS", "DEFAULT_NEW_TOKENS", "DEFAULT_SUITE", "DEFAULT_SUITE_LIMIT"]

RETENTION_FILE = "retention_base.pt"  # in the run's output folder
DEFAULT_PROMPTS = 8
DEFAULT_NEW_TOKENS = 32
DEFAULT_SUITE = ("arc-easy", "piqa")
DEFAULT_SUITE_LIMIT = 50
# What a run says when --retention was not given (off by default: records/retention-cost has the measurement).
RETENTION_OFF_NOTE = ("lopt: retention: off by default (on a 2-core CPU it cost over 5% of lopt demo's wall time); "
                      "--retention kl reports how far the model's answers to general prompts move from the base's")
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
                lp, targets, counts = answer_logprobs(hf, tokenizer, sequences, batch)
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
                lp, targets, _ = answer_logprobs(hf, pad, self.sequences, batch)
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


SUITE_FILE = "retention_suite.json"  # the suite's base scores, beside RETENTION_FILE


class RunRetention:
    """Retention for one training run, on its main process: the base record taken (or, on resume, read
    back from the run folder, so the resumed run compares against the original base model), each
    measurement, and the summary entry.

    ``start`` returns None for ``--retention none``; ``measure(model, step)`` the numbers that go to
    metrics.jsonl (``{"kl", "nll", "base_nll", "tokens", "prompts", "seconds"[, "suite"]}``);
    ``tracker_values(result)`` the series for the trackers; ``summary()`` the entry of ``lopt_run.json``."""

    def __init__(self, probe: RetentionProbe, suite: RetentionSuite | None, *, recorded: bool):
        self.probe, self.suite = probe, suite
        self.recorded = recorded  # this process took the record (not read back on resume)
        self.seconds = probe.record_seconds if recorded else 0.0
        self.last: dict[str, Any] | None = None
        self.first_step: int | None = None

    @classmethod
    def start(cls, spec: str | None, model, tokenizer, out_dir: str | Path, *, resumed: bool,
              prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_NEW_TOKENS,
              suite_limit: int = DEFAULT_SUITE_LIMIT, data_dir: str | Path | None = None,
              log=None) -> RunRetention | None:
        """Record the base (``model`` before its first step) into ``out_dir``, or on a resume
        (``resumed``) read the record the run took at its start. ``log``: where the one-line notes go
        (default: stderr). A resumed run whose folder has no record measures no retention and says so."""
        import json
        import sys

        mode, tasks = parse_retention(spec)
        if mode == "none":
            return None
        say = log or (lambda msg: print(msg, file=sys.stderr))
        out_dir = Path(out_dir)
        path, suite_path = out_dir / RETENTION_FILE, out_dir / SUITE_FILE
        if resumed:
            if not path.is_file():
                say(f"lopt: retention: {out_dir} holds no base record ({RETENTION_FILE}; the run began with "
                    f"--retention none or before lopt recorded one), so this resumed run measures no retention: "
                    f"the resumed weights are not the base")
                return None
            probe = RetentionProbe.load(path)
            suite = None
            if tasks:
                if not suite_path.is_file():
                    say(f"lopt: retention: {out_dir} holds no suite record ({SUITE_FILE}): this resumed run "
                        f"measures the KL only")
                else:
                    suite = RetentionSuite.from_state_dict(json.loads(suite_path.read_text()), data_dir)
            return cls(probe, suite, recorded=False)
        if tasks:
            RetentionSuite.check(tasks, data_dir)
        probe = RetentionProbe.record(model, tokenizer, prompts=prompts, max_new_tokens=max_new_tokens)
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.save(path)
        suite = None
        if tasks:
            t0 = time.perf_counter()
            suite = RetentionSuite.record(model, tokenizer, tasks, limit=suite_limit, data_dir=data_dir)
            probe.record_seconds += time.perf_counter() - t0
            suite_path.write_text(json.dumps(suite.state_dict()))
        elif suite_path.exists():
            suite_path.unlink()  # a fresh run: no stale suite record from an earlier run in this folder
        say(f"lopt: retention: recorded the base model's answers to {len(probe.sequences)} general prompts "
            f"({probe.tokens} tokens{', and ' + ', '.join(tasks) if tasks else ''}) in {probe.record_seconds:.1f} s; "
            f"retention KL against them at each evaluation and the end (--retention none: off)")
        return cls(probe, suite, recorded=True)

    def measure(self, model, step: int, tokenizer=None) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self.probe.measure(model, tokenizer)
        if self.suite is not None:
            out["suite"] = self.suite.measure(model, tokenizer)
        out["seconds"] = round(time.perf_counter() - t0, 3)
        self.seconds += out["seconds"]
        self.last = {"step": step, **out}
        return out

    @staticmethod
    def tracker_values(result: dict[str, Any]) -> dict[str, float]:
        """``retention/kl`` (and ``retention/nll``, ``retention/<task>`` for the suite) for the trackers."""
        values = {"retention/kl": result["kl"], "retention/nll": result["nll"]}
        for task, r in (result.get("suite") or {}).items():
            values[f"retention/{task}"] = r["score"]
        return values

    def summary(self) -> dict[str, Any]:
        """``{"kl", "step", "nll", "base_nll", "tokens", "prompts", "seconds", "meaning"[, "suite"]}`` of the
        last measurement; ``seconds``: this process's time on retention (record + measurements)."""
        last = dict(self.last or {})
        last.pop("seconds", None)
        return {**last, "seconds": round(self.seconds, 2), "record_seconds": round(self.probe.record_seconds, 2),
                "max_new_tokens": self.probe.max_new_tokens, "meaning": RETENTION_MEANING}


def retention_callback(tokenizer, *, retention: str = "kl", eval_every: int | None = None,
                       prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_NEW_TOKENS,
                       suite_limit: int = DEFAULT_SUITE_LIMIT, data_dir: str | Path | None = None,
                       trainer=None):
    """A ``transformers.TrainerCallback`` that brings ``RunRetention`` to a Trainer (TRL's included): at
    ``on_train_begin`` it records the base model into ``args.output_dir`` (or, when the trainer resumed
    a checkpoint, reads the run's record back), and after every ``eval_every``-th step (default: the
    trainer's ``eval_steps`` when it evaluates by steps) and the last it measures retention. The numbers
    go to ``metrics.jsonl``-style ``callback.history``, and, given ``trainer``, through
    ``transformers.Trainer.log`` to the trainer's ``report_to`` trackers as ``retention/kl`` etc.
    ``callback.run`` is the ``RunRetention`` (its ``summary()`` at the end). Main process only."""
    from transformers import Trainer, TrainerCallback

    class RetentionCallback(TrainerCallback):
        def __init__(self):
            self.run: RunRetention | None = None
            self.history: list[dict[str, Any]] = []
            self.trainer = trainer

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.is_world_process_zero and self.run is None:
                self.run = RunRetention.start(retention, model, tokenizer, args.output_dir,
                                              resumed=state.global_step > 0, prompts=prompts,
                                              max_new_tokens=max_new_tokens, suite_limit=suite_limit,
                                              data_dir=data_dir)

        def on_step_end(self, args, state, control, model=None, **kw):
            if self.run is None:
                return
            every = eval_every or (args.eval_steps if str(args.eval_strategy).endswith("steps") else None)
            step = state.global_step
            if not ((every and step % int(every) == 0) or step == state.max_steps):
                return
            result = self.run.measure(model, step, tokenizer)
            self.history.append({"step": step, "retention": result})
            if self.trainer is not None:
                # Trainer.log itself, not a subclass's override (TRL's GRPO log flushes its metric window).
                Trainer.log(self.trainer, RunRetention.tracker_values(result))

    return RetentionCallback()
