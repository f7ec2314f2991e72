"""Evaluation: task skill, retention of general behaviour, and representation drift.

``lopt eval --model M [--base B] --task KIND[:ARG] ... --json OUT`` runs any number of tasks on one
model. The task kinds:

``gsm8k[:FILE]``
    Generation accuracy on GSM8K-style JSONL (``question``, ``answer`` ending in ``#### N``): greedy
    decoding of the question formatted with the chat template, batched with left padding; the
    prediction is the number after ``####`` or, failing that, the last number in the output.
    Default file: ``../shared/data/gsm8k/test.jsonl``.
``mc:FILE``
    Multiple choice by log-likelihood on JSONL rows with ``context`` (or ``question``), ``choices``
    and ``answer`` (an index). Reports ``acc`` and ``acc_norm`` as lm-evaluation-harness defines them.
``mmlu-redux[:DIR_OR_FILE]``
    The MMLU-Redux CSV files, rows judged ``ok`` only, in the standard zero-shot MMLU prompt;
    per-subject and overall accuracy. Default: ``../shared/data/mmlu-redux``.
``ppl:FILE``
    Perplexity of a text file in non-overlapping windows of the model's context.
``task-loss:DATASET``
    Held-out SFT loss (mean over answer tokens), with the trainer's data formats
    (``lopt.data.build_sft_dataset``, split ``test``); ``DATASET`` may be ``arithmetic``.
``retention-kl`` (needs ``--base``)
    The base model answers the built-in general prompts (:mod:`lopt.prompts`) greedily; reported are
    the mean per-token KL(base || tuned) over those answers and the tuned model's NLL on them.
``drift`` (needs ``--base``)
    Linear CKA and mean cosine similarity between base and tuned hidden states at every layer, on the
    retention-kl text, with the LoPT block boundaries marked.
``lm-eval:TASK[,TASK...]``
    lm-evaluation-harness tasks on the in-memory model, when ``lm_eval`` is installed
    (``pip install 'lopt[eval]'``).

``lopt compare RUN_OR_JSON ...`` prints the results of several runs side by side as a markdown table
and draws a bar chart (when matplotlib is installed).

Scoring is batched. A multiple-choice question's context is run once: its key/value cache is
expanded to one row per choice and the choices are scored as a batch continuing from it; the
longest token prefix shared by a whole batch of contexts (the MMLU preamble) is likewise run once.
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import inspect
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "EvalError", "TASK_KINDS", "parse_task", "check_tasks", "evaluate", "extract_answer",
    "mc_loglikelihoods", "mc_accuracy", "load_mc_jsonl", "load_mmlu_redux", "mmlu_prompt",
    "load_gsm8k", "generate_greedy", "perplexity", "task_loss", "base_continuations",
    "retention_kl", "drift", "linear_cka", "read_boundaries", "add_eval_arguments", "run_eval_cli",
    "add_compare_arguments", "run_compare_cli", "load_eval_record",
]


class EvalError(ValueError):
    """A bad task spec, a missing or malformed file, or a missing option; the message is one line."""


# kind -> usage shown in errors and --help
TASK_KINDS: dict[str, str] = {
    "gsm8k": "gsm8k[:FILE] generation accuracy on GSM8K-style JSONL",
    "mc": "mc:FILE multiple choice (JSONL: context|question, choices, answer)",
    "mmlu-redux": "mmlu-redux[:DIR_OR_FILE] MMLU-Redux CSVs, ok rows",
    "ppl": "ppl:FILE perplexity of a text file",
    "task-loss": "task-loss:DATASET held-out SFT loss (a file or 'arithmetic')",
    "retention-kl": "retention-kl KL(base||tuned) on base answers to general prompts (needs --base)",
    "drift": "drift per-layer CKA and cosine to the base model (needs --base)",
    "lm-eval": "lm-eval:TASK[,TASK...] lm-evaluation-harness tasks (needs lopt[eval])",
}
_NEEDS_ARG = {"mc", "ppl", "task-loss", "lm-eval"}
_NO_ARG = {"retention-kl", "drift"}
_NEEDS_BASE = {"retention-kl", "drift"}
_DEFAULT_DATA = {"gsm8k": "gsm8k/test.jsonl", "mmlu-redux": "mmlu-redux"}
_DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}

RUN_FILE = "lopt_run.json"  # written by the trainer into each checkpoint dir
EVAL_FILE = "eval.json"  # where `lopt eval` writes by default when --model is a checkpoint dir


# --------------------------------------------------------------------------- task specs


def parse_task(spec: str) -> tuple[str, str | None]:
    """Split ``KIND[:ARG]`` into ``(kind, arg)``; raise :class:`EvalError` for an unknown kind or a
    missing/unexpected argument. Only the first ``:`` separates, so ARG may contain colons."""
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in TASK_KINDS:
        raise EvalError(f"unknown task kind {kind!r} in --task {spec!r}; known kinds: "
                        + ", ".join(TASK_KINDS))
    value = arg.strip() or None
    if kind in _NEEDS_ARG and value is None:
        raise EvalError(f"task {kind!r} needs an argument: {TASK_KINDS[kind]}")
    if kind in _NO_ARG and value is not None:
        raise EvalError(f"task {kind!r} takes no argument (got {value!r}): {TASK_KINDS[kind]}")
    return kind, value


def _shared_data_candidates(rel: str) -> list[Path]:
    # ../shared/data relative to the working directory (the documented place), then relative to
    # this source tree, so `lopt eval` also works when started from elsewhere in a checkout.
    here = Path(__file__).resolve()
    return [Path.cwd().parent / "shared" / "data" / rel,
            here.parents[3] / "shared" / "data" / rel if len(here.parents) > 3 else Path(rel)]


def _resolve_data(kind: str, arg: str | None) -> Path:
    """The file or directory a file-based task reads; EvalError when it does not exist."""
    if arg is None:
        candidates = _shared_data_candidates(_DEFAULT_DATA[kind])
        for c in candidates:
            if c.exists():
                return c
        raise EvalError(f"task {kind!r}: default data not found at {candidates[0]}; "
                        f"give the path as {kind}:PATH")
    path = Path(arg).expanduser()
    if not path.exists():
        raise EvalError(f"task {kind!r}: file not found: {arg}")
    if kind in ("gsm8k", "mc", "ppl") and not path.is_file():
        raise EvalError(f"task {kind!r}: {arg} is not a file")
    return path


def check_tasks(tasks: Sequence[str], *, has_base: bool) -> list[tuple[str, str | None]]:
    """Parse and validate every task spec before any model work starts (files exist, ``--base`` is
    there when needed), so a typo fails in a second rather than after an hour of scoring."""
    if not tasks:
        raise EvalError("no task given; use --task KIND[:ARG] (kinds: " + ", ".join(TASK_KINDS) + ")")
    parsed = [parse_task(t) for t in tasks]
    for spec, (kind, arg) in zip(tasks, parsed):
        if kind in _NEEDS_BASE and not has_base:
            raise EvalError(f"task {kind!r} compares against the base model: give --base MODEL")
        if kind in ("gsm8k", "mc", "ppl", "mmlu-redux"):
            _resolve_data(kind, arg)
        elif kind == "task-loss" and Path(arg).suffix.lower() in _DATA_SUFFIXES and not Path(arg).exists():
            raise EvalError(f"task 'task-loss': file not found: {arg}")
    return parsed


# --------------------------------------------------------------------------- model plumbing


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model, cap: int | None = None) -> int:
    """The model's context length (from its config), optionally capped."""
    cfg = model.config
    n = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            break
    n = n if isinstance(n, int) and n > 0 else 2048
    return min(n, cap) if cap else n


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens added: chat templates bring their own, and plain-text
    scoring follows lm-evaluation-harness, which adds none for causal models."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model) -> frozenset[str]:
    """Names of the model's forward arguments (cached per class)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMS:
        try:
            _FORWARD_PARAMS[cls] = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            _FORWARD_PARAMS[cls] = frozenset()
    return _FORWARD_PARAMS[cls]


def _cache_arg(model) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x; use whichever this model takes.
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _run_rows(model, rows: Sequence[Sequence[int]], *, past=None, past_mask: torch.Tensor | None = None,
              start: torch.Tensor | None = None, keep: str = "last", use_cache: bool = False):
    """One forward over right-padded ``rows``, optionally continuing from a KV cache.

    ``past_mask`` (B, P) marks the real tokens in the cache (a cache built from right-padded rows has
    holes); ``start`` (B,) is each row's count of real earlier tokens, i.e. the position of its
    first new token. ``keep="last"`` returns the logits at each row's last real token (B, V), computing
    the LM head only there; ``keep="all"`` returns (B, S, V).
    Returns ``(logits, cache or None, attention mask covering cache + rows)``.
    """
    device = _device(model)
    bsz, width = len(rows), max(len(r) for r in rows)
    ids = torch.zeros((bsz, width), dtype=torch.long)  # any id will do under the mask
    mask = torch.zeros((bsz, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    if start is None:
        start = torch.zeros(bsz, dtype=torch.long)
    # Real positions continue each row's own sequence; padding positions are clamped so learned
    # position tables (GPT-2) are never indexed out of range.
    positions = (start[:, None] + torch.arange(width)[None, :]).clamp(max=_max_positions(model) - 1)
    full_mask = mask if past_mask is None else torch.cat([past_mask, mask], dim=1)
    kwargs: dict[str, Any] = dict(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                                  position_ids=positions.to(device), use_cache=use_cache)
    if past is not None:
        kwargs[_cache_arg(model)] = past
    lengths = torch.tensor([len(r) for r in rows])
    if keep == "last":
        last = lengths - 1
        if "logits_to_keep" in _forward_params(model):
            # The LM head over a 50k vocabulary costs as much as several layers: apply it only at
            # the distinct last positions of the batch.
            wanted = torch.unique(last)
            out = model(**kwargs, logits_to_keep=wanted.to(device))
            logits = out.logits[torch.arange(bsz), torch.searchsorted(wanted, last).to(device)]
        else:
            out = model(**kwargs)
            logits = out.logits[torch.arange(bsz), last.to(device)]
    else:
        out = model(**kwargs)
        logits = out.logits
    cache = None
    if use_cache:
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
    return logits, cache, full_mask


def _cache_repeat(cache, repeats: int):
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return cache
    return tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in cache)


def _cache_take(cache, index: torch.Tensor):
    """A cache holding rows ``index`` of ``cache``, which stays as it was (so it can be taken from
    again): the copy shares nothing that the selection changes, as layers re-bind their tensors."""
    if hasattr(cache, "layers") and hasattr(cache, "batch_select_indices"):
        taken = copy.copy(cache)
        taken.layers = [copy.copy(layer) for layer in cache.layers]
        taken.batch_select_indices(index)
        return taken
    return tuple(tuple(t[index] for t in layer) for layer in cache)


def _progress(iterable: Iterable, *, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but progress bars are never worth a crash
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), max(1, size)):
        yield seq[i: i + size]


# --------------------------------------------------------------------------- log-likelihood scoring


def _encode_pairs(tokenizer, requests: Sequence[tuple[str, Sequence[str]]]
                  ) -> list[tuple[list[int], list[list[int]]]]:
    """Tokenize (context, continuations) the way lm-evaluation-harness does.

    Trailing whitespace of the context moves to the front of each continuation; the continuation's
    tokens are those of ``context + continuation`` after the first ``len(tokens(context))`` ones,
    so the model sees ``tokens(context) + continuation tokens``. An empty context becomes the
    BOS (or EOS) token.
    """
    ctx_texts, whole_texts, shape = [], [], []
    for context, conts in requests:
        stripped = context.rstrip()
        moved = context[len(stripped):]
        ctx_texts.append(stripped)
        shape.append(len(conts))
        whole_texts.extend(stripped + moved + c for c in conts)
    ctx_ids = _encode(tokenizer, ctx_texts)
    whole_ids = _encode(tokenizer, whole_texts)
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out, k = [], 0
    for (context, conts), ctx, n in zip(requests, ctx_ids, shape):
        wholes = whole_ids[k: k + n]
        k += n
        if not ctx:
            if start_token is None:
                raise EvalError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
            ctx = [int(start_token)]
            out.append((ctx, [list(w) for w in wholes]))
        else:
            out.append((ctx, [list(w[len(ctx):]) for w in wholes]))
    return out


@torch.inference_mode()
def mc_loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], *,
                      batch_size: int = 8, share_prefix: bool = True, progress: bool = False,
                      desc: str = "scoring", return_greedy: bool = False
                      ) -> list[list[float]] | list[list[tuple[float, bool]]]:
    """Summed log-probability of each continuation given its context.

    ``requests`` is a list of ``(context, [continuation, ...])``; the result has the same shape.
    With ``return_greedy`` each entry is ``(loglik, is_greedy)``, ``is_greedy`` telling whether
    every continuation token is the argmax of the model's distribution (lm-evaluation-harness's
    greedy match, e.g. LAMBADA's accuracy).
    Contexts are sorted by length and run ``batch_size`` at a time. Each context is run once: for
    one-token continuations (``" A"``) the scores are read off its last logits; longer ones continue
    from its KV cache, expanded to one row per continuation. With ``share_prefix`` the longest
    token prefix common to a whole batch of contexts is run once and shared as well.
    Contexts longer than the model's window lose tokens on the left.
    """
    model.eval()
    pairs = _encode_pairs(tokenizer, requests)
    limit = _max_positions(model)
    for i, (ctx, conts) in enumerate(pairs):
        room = limit - max((len(c) for c in conts), default=0)
        if len(ctx) > room:
            pairs[i] = (ctx[-max(1, room):], conts)
    results: list[list[float]] = [[0.0] * len(conts) for _, conts in pairs]
    greedy = [[True] * len(conts) for _, conts in pairs] if return_greedy else None
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]), reverse=True)
    batches = list(_chunks(order, batch_size))
    for batch in _progress(batches, total=len(batches), desc=desc, enabled=progress):
        _score_batch(model, [pairs[i] for i in batch], [results[i] for i in batch], share_prefix,
                     greedy=None if greedy is None else [greedy[i] for i in batch])
    if greedy is not None:
        return [list(zip(lls, gs)) for lls, gs in zip(results, greedy)]
    return results


# Continuation tokens scored per forward in the second (multi-token) pass: bounds the logits memory.
_CONT_TOKENS_PER_PASS = 2048


def _score_batch(model, items: list[tuple[list[int], list[list[int]]]], out: list[list[float]],
                 share_prefix: bool, *, greedy: list[list[bool]] | None = None,
                 skips: list[list[int]] | None = None) -> None:
    """Fill ``out`` (one list per item) with the continuations' summed log-probabilities.

    ``greedy`` (shaped like ``out``), when given, is filled with whether every scored token is the
    argmax. ``skips`` (shaped like ``out``) gives, per continuation, a number of leading tokens that
    are run but not scored: they extend the context (WinoGrande's options, whose contexts differ
    after a shared prefix while the scored continuation is the same)."""
    device = _device(model)
    ctxs = [ctx for ctx, _ in items]
    bsz = len(items)
    ctx_len = torch.tensor([len(c) for c in ctxs])
    multi = any(len(c) > 1 for _, conts in items for c in conts)

    # 1. The longest token prefix shared by every context of the batch, run once (each context keeps
    #    at least one token of its own, whose logits score the first continuation token).
    shared = 0
    if share_prefix and bsz > 1:
        shortest = min(len(c) for c in ctxs)
        while shared < shortest - 1 and all(c[shared] == ctxs[0][shared] for c in ctxs):
            shared += 1
    past, past_mask, start = None, None, None
    if shared >= 2:
        _, past, past_mask = _run_rows(model, [ctxs[0][:shared]], use_cache=True)
        past = _cache_repeat(past, bsz)
        past_mask = past_mask.expand(bsz, -1)
        start = torch.full((bsz,), shared, dtype=torch.long)
    else:
        shared = 0

    # 2. The rest of each context, batched; its last logits score every first continuation token.
    last_logits, past, mask = _run_rows(model, [c[shared:] for c in ctxs], past=past,
                                        past_mask=past_mask, start=start, keep="last",
                                        use_cache=multi)
    first = F.log_softmax(last_logits.float(), dim=-1)
    top = first.argmax(dim=-1) if greedy is not None else None
    for r, (_, conts) in enumerate(items):
        for j, cont in enumerate(conts):
            scored = bool(cont) and not (skips and skips[r][j])
            out[r][j] = float(first[r, cont[0]]) if scored else 0.0
            if greedy is not None:
                greedy[r][j] = bool(top[r] == cont[0]) if scored else True
    if not multi:
        return

    # 3. Continuations of two or more tokens continue from the cache expanded to one row per
    #    continuation: feed tokens 0..m-2, score tokens 1..m-1.
    rows = [(r, j) for r, (_, conts) in enumerate(items) for j, c in enumerate(conts) if len(c) > 1]
    width = max(len(items[r][1][j]) - 1 for r, j in rows)
    per_pass = max(1, _CONT_TOKENS_PER_PASS // width)  # bounds the (rows, width, vocab) logits
    for part in _chunks(rows, per_pass):
        index = torch.tensor([r for r, _ in part])
        logits, _, _ = _run_rows(model, [items[r][1][j][:-1] for r, j in part],
                                 past=_cache_take(past, index.to(device)), past_mask=mask[index],
                                 start=ctx_len[index], keep="all")
        logp = F.log_softmax(logits.float(), dim=-1)
        for n, (r, j) in enumerate(part):
            cont = items[r][1][j]
            # row k of logp predicts cont[k + 1]; the first `skip` tokens are context, not scored
            k0 = max(0, skips[r][j] - 1) if skips else 0
            targets = torch.tensor(cont[1 + k0:], device=device)
            out[r][j] += float(logp[n, torch.arange(k0, len(cont) - 1, device=device), targets].sum())
            if greedy is not None:
                hit = bool((logp[n, k0: len(cont) - 1].argmax(dim=-1) == targets).all())
                greedy[r][j] = greedy[r][j] and hit


def mc_accuracy(loglikelihoods: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                answers: Sequence[int]) -> dict[str, float]:
    """``acc``: the highest log-likelihood is the answer; ``acc_norm``: the highest log-likelihood
    divided by the choice's length in UTF-8 bytes (the choice string itself, without the joining
    space). Ties go to the first choice (numpy's argmax). Returns acc, acc_norm and n."""
    n = len(answers)
    acc = acc_norm = 0
    for lls, chs, gold in zip(loglikelihoods, choices, answers):
        pred = max(range(len(lls)), key=lambda k: (lls[k], -k))
        normed = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, chs)]
        pred_norm = max(range(len(normed)), key=lambda k: (normed[k], -k))
        acc += int(pred == gold)
        acc_norm += int(pred_norm == gold)
    return {"acc": acc / n if n else 0.0, "acc_norm": acc_norm / n if n else 0.0, "n": n}


def _join_choice(choice: str) -> str:
    # lm-evaluation-harness joins context and choice with one space (its target delimiter).
    return choice if choice[:1].isspace() else " " + choice


# --------------------------------------------------------------------------- mc JSONL


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path} line {lineno}: expected a JSON object")
            yield lineno, row


def load_mc_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"context", "choices", "answer"}`` from a JSONL file (``question`` is accepted for
    ``context``); EvalError names the file and line of a bad row."""
    path = Path(path)
    rows = []
    for lineno, row in _read_jsonl(path):
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
                            [(r["context"], [_join_choice(c) for c in r["choices"]]) for r in rows],
                            batch_size=batch_size, progress=progress, desc=f"mc {path.name}")
    return mc_accuracy(lls, [r["choices"] for r in rows], [r["answer"] for r in rows])


# --------------------------------------------------------------------------- MMLU-Redux

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # One MMLU-Redux file (moral_scenarios) is Windows-1252; latin-1 never fails as a last resort.
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


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
        text = _read_text(f)
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


# --------------------------------------------------------------------------- GSM8K

# A number: an optional "$" and minus sign in either order ("-$5", "$-5"), then digits with optional
# thousands commas and decimals, or a bare decimal (".5"). A match may not start right after a letter,
# digit or point, so the hyphen in "5-3" or "x-1" is never read as a sign.
_NUMBER = re.compile(r"(?<![\w.])(?:\$\s?)?(-)?\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def extract_answer(text: str) -> float | None:
    """The numeric answer in a model output: the first number after the last ``####`` when there is
    one with a number after it, else the last number in the text; None when there is no number.
    Handles ``1,234``, ``-5``, ``3.75``, ``$12`` and trailing words or punctuation."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return _number_value(m)
    matches = list(_NUMBER.finditer(text))
    return _number_value(matches[-1]) if matches else None


def _number_value(m: re.Match) -> float:
    value = float(m.group(2).replace(",", ""))
    return -value if m.group(1) else value


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """GSM8K JSONL rows with a parsed numeric ``target`` (from the ``#### N`` line of ``answer``)."""
    path = Path(path)
    rows = []
    for lineno, row in _read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise EvalError(f"{path} line {lineno}: needs string 'question' and 'answer'")
        if "####" not in answer or extract_answer(answer.rsplit("####", 1)[1]) is None:
            raise EvalError(f"{path} line {lineno}: the reference answer has no '#### N' line")
        rows.append({"question": question, "answer": answer,
                     "target": extract_answer(answer.rsplit("####", 1)[1])})
    return rows


def _chat_prompt(tokenizer, user_text: str) -> str:
    """``user_text`` as one user turn in the chat template, ready for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    return user_text + "\n"  # a base model without a template: plain text


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256,
                    batch_size: int = 8, progress: bool = False, desc: str = "generating"
                    ) -> list[tuple[list[int], list[int]]]:
    """Greedy continuations of already-formatted prompts, batched with left padding (prompts sorted
    by length to waste little). Returns ``(prompt_ids, new_ids)`` per prompt in input order;
    ``new_ids`` stops after the first EOS token (which it includes)."""
    from transformers import GenerationConfig

    model.eval()
    device = _device(model)
    encoded = _encode(tokenizer, prompts)
    room = _max_positions(model) - max_new_tokens
    if room < 1:
        raise EvalError(f"max_new_tokens={max_new_tokens} leaves no room in the model's context")
    encoded = [ids[-room:] for ids in encoded]
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=eos or None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[tuple[list[int], list[int]]] = [([], [])] * len(encoded)
    batches = list(_chunks(order, batch_size))
    for batch in _progress(batches, total=len(batches), desc=desc, enabled=progress):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(encoded[i])
            ids[r, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
            mask[r, width - n:] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)
        for r, i in enumerate(batch):
            new = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos), None)
            results[i] = (encoded[i], new if cut is None else new[: cut + 1])
    return results


def _eval_gsm8k(model, tokenizer, path: Path, *, limit, batch_size, progress, max_new_tokens
                ) -> dict[str, Any]:
    rows = load_gsm8k(path, limit)
    outputs = generate_greedy(model, tokenizer, [_chat_prompt(tokenizer, r["question"]) for r in rows],
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              progress=progress, desc="gsm8k")
    correct = unparseable = 0
    examples = []
    for r, (_, new) in zip(rows, outputs):
        text = tokenizer.decode(new, skip_special_tokens=True)
        pred = extract_answer(text)
        unparseable += pred is None
        ok = pred is not None and math.isclose(pred, r["target"], rel_tol=1e-9, abs_tol=1e-6)
        correct += ok
        if len(examples) < 3:
            examples.append({"question": r["question"], "output": text, "pred": pred,
                             "target": r["target"], "correct": ok})
    n = len(rows)
    return {"acc": correct / n if n else 0.0, "correct": correct, "n": n, "unparseable": unparseable,
            "max_new_tokens": max_new_tokens, "examples": examples}


# --------------------------------------------------------------------------- perplexity


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, window: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``text`` in non-overlapping windows (no stride): the token stream, after a BOS
    (or EOS) start token, is cut into windows of the model's context (capped at 2048); every token
    is predicted exactly once, from the tokens before it in its own window. Also reports bits per
    byte and word perplexity as lm-evaluation-harness does for its rolling tasks."""
    model.eval()
    device = _device(model)
    ids = _encode(tokenizer, [text])[0]
    if not ids:
        raise EvalError("perplexity: the text is empty")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    seq = ([int(start)] if start is not None else []) + ids
    size = window or _max_positions(model, cap=2048)
    # Window k feeds seq[s:s+size] and predicts seq[s+1:s+size+1]; without a start token the first
    # text token cannot be predicted and is left out of the count.
    spans = [(s, min(s + size, len(seq) - 1)) for s in range(0, len(seq) - 1, size)]
    per_pass = max(1, min(batch_size, 4096 // size))  # bound the (rows, size, vocab) logits
    total_nll, total_tokens = 0.0, 0
    groups = list(_chunks(spans, per_pass))
    for group in _progress(groups, total=len(groups), desc="ppl", enabled=progress):
        logits, _, _ = _run_rows(model, [seq[a:b] for a, b in group], keep="all")
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


# --------------------------------------------------------------------------- held-out SFT loss


@torch.inference_mode()
def task_loss(model, tokenizer, dataset: str, *, split: str = "test", max_length: int = 512,
              limit: int | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Mean cross-entropy over the answer tokens (labels != -100) of a held-out SFT set built with
    the trainer's own data code (:func:`lopt.data.build_sft_dataset`), token-weighted."""
    from .data import build_sft_dataset, collate

    model.eval()
    device = _device(model)
    examples, stats = build_sft_dataset(dataset, tokenizer, max_length=max_length, split=split,
                                        limit=limit)
    if not examples:
        raise EvalError(f"task-loss: no examples in {dataset!r} (split {split})")
    # Similar lengths together: less padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    total, count = 0.0, 0
    batches = list(_chunks(order, batch_size))
    for batch in _progress(batches, total=len(batches), desc="task-loss", enabled=progress):
        b = collate([examples[i] for i in batch], _pad_id(tokenizer))
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        # Labels are aligned with input_ids (the transformers convention): position t predicts t+1.
        logits = out.logits[:, :-1].float()
        labels = b["labels"][:, 1:].to(device)
        keep = labels != -100
        total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    if count == 0:
        raise EvalError(f"task-loss: {dataset!r} has no answer tokens to score")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "n": len(examples),
            "split": split, "max_length": max_length, "format": stats.get("format"),
            "truncated": stats.get("truncated")}


# --------------------------------------------------------------------------- retention and drift


def _vocab_size(model) -> int | None:
    head = model.get_output_embeddings()
    return None if head is None else int(head.weight.shape[0])


def _check_pair(model, base) -> None:
    """KL and hidden-state comparisons need both models to read the same token ids."""
    v_model, v_base = _vocab_size(model), _vocab_size(base)
    if v_model is not None and v_base is not None and v_model != v_base:
        raise EvalError(f"the tuned and base models have different vocabularies ({v_model} vs "
                        f"{v_base} tokens); retention-kl and drift need the same tokenizer")


def base_continuations(base, tokenizer, prompts: Sequence[str] | None = None, *,
                       max_new_tokens: int = 48, batch_size: int = 8, limit: int | None = None,
                       progress: bool = False) -> list[tuple[list[int], list[int]]]:
    """The base model's greedy answers to the general prompts (default: :mod:`lopt.prompts`), each
    formatted with the chat template: ``(prompt_ids, continuation_ids)`` pairs. Runs offline."""
    from .prompts import general_prompts

    prompts = list(prompts) if prompts is not None else general_prompts(limit)
    return generate_greedy(base, tokenizer, [_chat_prompt(tokenizer, p) for p in prompts],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                           desc="base answers")


def _right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _pair_sequences(model, base, tokenizer, sequences, prompts, **gen) -> Sequence[tuple[list[int], list[int]]]:
    """Shared set-up of retention-kl and drift: both models in eval mode, checked to be comparable,
    and the base model's answers (unless given)."""
    model.eval()
    base.eval()
    _check_pair(model, base)
    return sequences if sequences is not None else base_continuations(base, tokenizer, prompts, **gen)


@torch.inference_mode()
def retention_kl(model, base, tokenizer, *, sequences: Sequence[tuple[list[int], list[int]]] | None = None,
                 prompts: Sequence[str] | None = None, max_new_tokens: int = 48, batch_size: int = 8,
                 limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """How far the tuned ``model`` has moved from ``base`` on the base model's own answers.

    ``sequences`` are ``(prompt_ids, continuation_ids)`` (default: :func:`base_continuations`).
    ``kl`` is the mean over continuation tokens of KL(p_base || p_tuned) of the next-token
    distributions, in nats; ``nll`` is the tuned model's mean negative log-likelihood of the
    continuation tokens (``base_nll`` the base model's own, for scale).
    """
    sequences = _pair_sequences(model, base, tokenizer, sequences, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, limit=limit, progress=progress)
    device = _device(model)
    kl_sum = nll_sum = base_nll_sum = 0.0
    count = 0
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    batches = list(_chunks(order, batch_size))
    for batch in _progress(batches, total=len(batches), desc="retention-kl", enabled=progress):
        seqs = [sequences[i][0] + sequences[i][1] for i in batch]
        ids, mask = _right_pad(seqs, _pad_id(tokenizer))
        # score[r, t] is True where position t predicts a continuation token (at t + 1).
        score = torch.zeros_like(mask, dtype=torch.bool)
        for r, i in enumerate(batch):
            p, c = len(sequences[i][0]), len(sequences[i][1])
            score[r, p - 1: p - 1 + c] = True
        targets = torch.roll(ids, -1, dims=1)[score].to(device)
        score = score.to(device)
        lp_base = F.log_softmax(base(input_ids=ids.to(device), attention_mask=mask.to(device)
                                     ).logits[score].float(), dim=-1)
        lp_model = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)
                                       ).logits[score].float(), dim=-1)
        kl_sum += float((lp_base.exp() * (lp_base - lp_model)).sum())
        nll_sum -= float(lp_model.gather(1, targets[:, None]).sum())
        base_nll_sum -= float(lp_base.gather(1, targets[:, None]).sum())
        count += int(targets.numel())
    if count == 0:
        raise EvalError("retention-kl: the base model produced no continuation tokens")
    return {"kl": kl_sum / count, "nll": nll_sum / count, "ppl": math.exp(min(nll_sum / count, 50.0)),
            "base_nll": base_nll_sum / count, "tokens": count, "prompts": len(sequences),
            "max_new_tokens": max_new_tokens}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between representations ``x`` (n, d1) and ``y`` (n, d2) of
    the same n examples: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred.
    1 for identical (or rotated, or isotropically scaled) representations; in float64."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    xc = x.double() - x.double().mean(0, keepdim=True)
    yc = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    denom = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(cross / denom) if denom > 0 else float("nan")


class _CKAStats:
    """Running sums for linear CKA over many batches, in the feature space (d x d), so the token
    count never has to fit in memory: with S = sum x x^T and m the mean, Xc^T Xc = S - n m m^T."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.xx = self.yy = self.yx = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.xx, self.yy, self.yx = x.T @ x, y.T @ y, y.T @ x
        else:
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.xx += x.T @ x
            self.yy += y.T @ y
            self.yx += y.T @ x
        self.n += x.shape[0]

    def value(self) -> float:
        mx, my = self.sx / self.n, self.sy / self.n
        xx = self.xx - self.n * torch.outer(mx, mx)
        yy = self.yy - self.n * torch.outer(my, my)
        yx = self.yx - self.n * torch.outer(my, mx)
        denom = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
        return float(torch.linalg.matrix_norm(yx) ** 2 / denom) if denom > 0 else float("nan")


def read_boundaries(model_or_path: Any) -> list[int] | None:
    """Block boundaries (layer indices where a block starts, the first block excluded) from the
    ``lopt_run.json`` the trainer writes into its checkpoints; None when there is none. Accepts a
    directory or a model whose config remembers the directory it was loaded from."""
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
    else:
        name = getattr(model_or_path, "name_or_path", None) or getattr(
            getattr(model_or_path, "config", None), "_name_or_path", None)
        if not name:
            return None
        path = Path(name)
    run_file = path / RUN_FILE if path.is_dir() else None
    if run_file is None or not run_file.is_file():
        return None
    try:
        ranges = json.loads(run_file.read_text()).get("block_ranges")
        return [int(r[0]) for r in ranges[1:]] if ranges else None
    except (json.JSONDecodeError, TypeError, ValueError, IndexError, AttributeError):
        return None


@torch.inference_mode()
def drift(model, base, tokenizer, *, sequences: Sequence[tuple[list[int], list[int]]] | None = None,
          prompts: Sequence[str] | None = None, boundaries: Sequence[int] | None = None,
          max_new_tokens: int = 48, batch_size: int = 8, limit: int | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Per-layer similarity of the tuned model's hidden states to the base model's on the same text
    (default: the retention-kl text, prompts plus base answers), over non-pad tokens.

    ``layers[i]`` describes ``hidden_states[i]``: the input of decoder layer i, so index 0 is the
    embeddings and index L the final output (after the final norm, as transformers returns it).
    A boundary b (a block starting at layer b) marks index b: the representation the lower block
    hands over, where LoPT's local loss applies. Reports linear CKA and the mean cosine similarity
    of matching token vectors at each index, and their means.
    """
    sequences = _pair_sequences(model, base, tokenizer, sequences, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, limit=limit, progress=progress)
    device = _device(model)
    stats: list[_CKAStats] = []
    cos_sum: list[float] = []
    count = 0
    batches = list(_chunks(list(range(len(sequences))), batch_size))
    for batch in _progress(batches, total=len(batches), desc="drift", enabled=progress):
        ids, mask = _right_pad([sequences[i][0] + sequences[i][1] for i in batch], _pad_id(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        hs_base = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hs_model = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if len(hs_base) != len(hs_model):
            raise EvalError(f"drift: the models have different depths ({len(hs_model) - 1} vs "
                            f"{len(hs_base) - 1} layers)")
        if not stats:
            stats = [_CKAStats() for _ in hs_base]
            cos_sum = [0.0] * len(hs_base)
        real = mask.bool()
        for i, (hb, hm) in enumerate(zip(hs_base, hs_model)):
            xb, xm = hb[real].float(), hm[real].float()
            stats[i].update(xb, xm)
            cos_sum[i] += float(F.cosine_similarity(xb, xm, dim=-1).sum())
        count += int(real.sum())
    marks = sorted({int(b) for b in boundaries}) if boundaries else []
    layers = [{"index": i, "cka": s.value(), "cos": c / count, "boundary": i in marks}
              for i, (s, c) in enumerate(zip(stats, cos_sum))]
    ckas = [entry["cka"] for entry in layers]
    return {"mean_cka": sum(ckas) / len(ckas), "min_cka": min(ckas),
            "mean_cos": sum(e["cos"] for e in layers) / len(layers), "final_cka": ckas[-1],
            "boundaries": marks, "layers": layers, "tokens": count, "prompts": len(sequences)}


# --------------------------------------------------------------------------- lm-evaluation-harness


def _eval_lm_eval(model, tokenizer, names: str, *, limit, batch_size) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise EvalError("task 'lm-eval' needs lm-evaluation-harness, which is not installed: "
                        "pip install 'lopt[eval]' (or lm-eval)") from None
    tasks = [t.strip() for t in names.split(",") if t.strip()]
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False)
    except Exception as e:  # noqa: BLE001 - whatever lm-eval raises becomes one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"lm-eval could not run {','.join(tasks)}: {type(e).__name__}: {msg} "
                        "(its task data comes from the Hugging Face Hub: this needs internet access "
                        "or a filled HF cache)") from None
    results: dict[str, Any] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                clean[key.replace(",none", "")] = value
        results[task] = clean
    return {"results": results}


# --------------------------------------------------------------------------- the entry point


def evaluate(model, tokenizer, tasks: list[str], *, base=None, base_tokenizer=None,
             limit: int | None = None, batch_size: int = 8, boundaries: list[int] | None = None,
             progress: bool = True, max_new_tokens: int = 256, kl_new_tokens: int = 48,
             max_length: int | None = None) -> dict[str, dict[str, Any]]:
    """Run ``tasks`` (specs ``KIND[:ARG]``, see :data:`TASK_KINDS`) on ``model``; returns
    ``{spec: {metric: value, ...}}``, JSON-serialisable, each with its wall time in ``seconds``.

    ``base``/``base_tokenizer``: the model before post-training (retention-kl, drift; the base
    tokenizer defaults to ``tokenizer``). ``limit``: at most this many questions / prompts /
    examples per task (ppl reads the whole file; MMLU-Redux takes them round-robin over subjects).
    ``boundaries``: layer indices to mark in drift (default: read from the model's
    ``lopt_run.json`` when it was loaded from a trainer checkpoint). ``max_new_tokens``:
    GSM8K answer budget; ``kl_new_tokens``: length of the base answers for retention-kl and drift;
    ``max_length``: task-loss truncation (default: the run's, else 512).
    The model is put in eval mode for the duration and restored afterwards.
    """
    parsed = check_tasks(tasks, has_base=base is not None)
    base_tokenizer = base_tokenizer or tokenizer
    if boundaries is None:
        boundaries = read_boundaries(model)
    modes = [(m, m.training) for m in (model, base) if m is not None]
    results: dict[str, dict[str, Any]] = {}
    continuations = None  # the base answers, shared by retention-kl and drift
    try:
        for m, _ in modes:
            m.eval()
        for spec, (kind, arg) in zip(tasks, parsed):
            t0 = time.perf_counter()
            if kind == "gsm8k":
                res = _eval_gsm8k(model, tokenizer, _resolve_data(kind, arg), limit=limit,
                                  batch_size=batch_size, progress=progress, max_new_tokens=max_new_tokens)
            elif kind == "mc":
                res = _eval_mc(model, tokenizer, _resolve_data(kind, arg), limit=limit,
                               batch_size=batch_size, progress=progress)
            elif kind == "mmlu-redux":
                res = _eval_mmlu_redux(model, tokenizer, _resolve_data(kind, arg), limit=limit,
                                       batch_size=batch_size, progress=progress)
            elif kind == "ppl":
                path = _resolve_data(kind, arg)
                res = perplexity(model, tokenizer, path.read_text(encoding="utf-8", errors="replace"),
                                 batch_size=batch_size, progress=progress)
                res["file"] = str(path)
            elif kind == "task-loss":
                res = task_loss(model, tokenizer, arg, max_length=max_length or _run_max_length(model),
                                limit=limit, batch_size=batch_size, progress=progress)
            elif kind in ("retention-kl", "drift"):
                if continuations is None:
                    continuations = base_continuations(base, base_tokenizer, max_new_tokens=kl_new_tokens,
                                                       batch_size=batch_size, limit=limit,
                                                       progress=progress)
                if kind == "retention-kl":
                    res = retention_kl(model, base, base_tokenizer, sequences=continuations,
                                       batch_size=batch_size, progress=progress)
                    res["max_new_tokens"] = kl_new_tokens
                else:
                    res = drift(model, base, base_tokenizer, sequences=continuations,
                                boundaries=boundaries, batch_size=batch_size, progress=progress)
            else:  # lm-eval
                res = _eval_lm_eval(model, tokenizer, arg, limit=limit, batch_size=batch_size)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            results[spec] = res
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return results


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


# --------------------------------------------------------------------------- CLI: eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lopt eval``."""
    parser.description = ("Evaluate a model on one or more tasks. Task kinds: "
                          + "; ".join(TASK_KINDS.values()) + ".")
    parser.add_argument("--model", default=None,
                        help="hub id, checkpoint dir, .gguf file or alias (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--base", default=None,
                        help="the model before post-training, for retention-kl and drift "
                             "('embedded' for the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--task", action="append", default=None, metavar="KIND[:ARG]",
                        help="a task to run; repeat for several (kinds: " + ", ".join(TASK_KINDS) + ")")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N questions / prompts / examples per task (MMLU-Redux: spread "
                             "over the subjects)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K answer length budget")
    parser.add_argument("--kl-new-tokens", type=int, default=48,
                        help="length of the base model's answers for retention-kl and drift")
    parser.add_argument("--boundaries", type=int, nargs="+", default=None, metavar="LAYER",
                        help="layer indices to mark in drift (default: from the run's lopt_run.json)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help=f"write the results here (default: MODEL/{EVAL_FILE} when --model is a "
                             "checkpoint directory)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the loader's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")


EMBEDDED_NAME = "smollm2-135m-instruct"  # lopt.models' name for the embedded default model


def _is_embedded(name: str | None) -> bool:
    """Whether a --model/--base value means the embedded SmolLM2-135M-Instruct."""
    if name is None:
        return True
    name = str(name).strip().lower()
    return name in ("embedded", "default", EMBEDDED_NAME) or name.startswith("embedded:")


def run_eval_cli(args: argparse.Namespace) -> int:
    """``lopt eval``: load the model(s), run the tasks, print a summary, write the JSON."""
    tasks = getattr(args, "task", None) or []
    base_name = getattr(args, "base", None)
    try:
        check_tasks(tasks, has_base=base_name is not None)
    except EvalError as e:
        if base_name is None and "--base" in str(e) and getattr(args, "model", None):
            trained_from = _trained_from(args.model)
            if trained_from is not None:
                raise EvalError(f"{e} (this run was trained from {trained_from}: "
                                f"--base {trained_from})") from None
        raise
    from .models import load_model

    device = getattr(args, "device", None)
    model, tokenizer = load_model(args.model, gguf_file=getattr(args, "gguf_file", None), device=device)
    base = base_tokenizer = None
    if base_name is not None:
        base, base_tokenizer = load_model(None if _is_embedded(base_name) else base_name, device=device)
    boundaries = getattr(args, "boundaries", None)
    if boundaries is None and args.model:
        boundaries = read_boundaries(args.model)
    t0 = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, base=base, base_tokenizer=base_tokenizer,
                       limit=args.limit, batch_size=args.batch_size, boundaries=boundaries,
                       progress=getattr(args, "progress", True),
                       max_new_tokens=getattr(args, "max_new_tokens", 256),
                       kl_new_tokens=getattr(args, "kl_new_tokens", 48))
    record = {"model": args.model or EMBEDDED_NAME, "base": base_name,
              "tasks": tasks, "limit": args.limit, "results": results,
              "seconds": round(time.perf_counter() - t0, 2),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(_summary_table(results))
    out = args.json
    if out is None and args.model and Path(args.model).is_dir():
        out = str(Path(args.model) / EVAL_FILE)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2))
        print(f"results written to {out}")
    return 0


def _trained_from(model_dir: str) -> str | None:
    f = Path(model_dir) / RUN_FILE
    if not f.is_file():
        return None
    try:
        options = json.loads(f.read_text()).get("options", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    return options.get("model") or "embedded"


def _summary_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for spec, metrics in results.items():
        for name, value in _headline(spec, metrics).items():
            lines.append(f"| {spec} | {name} | {_fmt(value)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI: compare

# The metrics a comparison shows for each kind (the rest stays in the JSON).
_HEADLINE = {"gsm8k": ("acc", "unparseable"), "mc": ("acc", "acc_norm"), "mmlu-redux": ("acc", "acc_macro"),
             "ppl": ("ppl", "bits_per_byte"), "task-loss": ("loss",), "retention-kl": ("kl", "nll"),
             "drift": ("mean_cka", "min_cka", "mean_cos")}
_LOWER_IS_BETTER = {"unparseable", "ppl", "bits_per_byte", "loss", "kl", "nll"}


def _headline(spec: str, metrics: dict[str, Any]) -> dict[str, float]:
    try:
        kind = parse_task(spec)[0]
    except EvalError:
        kind = None
    if kind == "lm-eval" and isinstance(metrics.get("results"), dict):
        return {f"{task}/{k}": v for task, m in metrics["results"].items() for k, v in m.items()
                if isinstance(v, (int, float)) and not k.endswith("_stderr")}
    names = _HEADLINE.get(kind) or [k for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and k != "seconds"]
    return {k: metrics[k] for k in names if isinstance(metrics.get(k), (int, float))}


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lopt compare``."""
    parser.description = ("Print the eval results of several runs side by side (markdown), with the "
                          "change from the base model where one is among them, and draw a bar chart.")
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_JSON",
                        help=f"an eval JSON written by `lopt eval`, or a run dir holding {EVAL_FILE}")
    parser.add_argument("--baseline", default=None, metavar="NAME_OR_INDEX",
                        help="the column to take deltas against (default: the run that is the others' "
                             "--base, if any)")
    parser.add_argument("--png", default="lopt_compare.png", help="bar chart file ('' for none)")


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
    if _is_embedded(a) and _is_embedded(b):
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
            for name, value in _headline(spec, metrics).items():
                rows.setdefault((spec, name), [None] * len(records))[col] = value
    header = ["task", "metric"] + [f"{lab} (base)" if i == base_col else lab for i, lab in enumerate(labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (spec, name), values in rows.items():
        cells = []
        for i, v in enumerate(values):
            if v is None:
                cells.append("–")
                continue
            cell = _fmt(v)
            ref = values[base_col] if base_col is not None else None
            if ref is not None and i != base_col:
                delta = v - ref
                cell += f" ({delta:+d})" if isinstance(delta, int) else f" ({delta:+.4f})"
            cells.append(cell)
        lines.append(f"| {spec} | {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if base_col is not None:
        print(f"\ndeltas are against {labels[base_col]}; lower is better for "
              + ", ".join(sorted(_LOWER_IS_BETTER)))
    if args.png:
        note = _bar_chart(rows, labels, args.png)
        print(note)
    return 0


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
    return None


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
        direction = "lower is better" if name in _LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{spec}\n{name} ({direction})", fontsize=8)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"chart written to {png}"
