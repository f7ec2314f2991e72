"""Model plumbing shared by the eval task families: tokenizing, batched forwards with left or right
padding, KV-cache reuse, progress bars, reading the data files, and ``EvalError``.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence
import torch



class EvalError(ValueError):
    """A bad task spec, a missing or malformed file, or a missing option; the message is one line."""


RUN_FILE = "lopt_run.json"  # written by the trainer into each checkpoint dir


EVAL_FILE = "eval.json"  # where `lopt eval` writes by default when --model is a checkpoint dir


def default_data(kind: str, rel: str, data_dir: str | Path | None = None) -> Path:
    """A task's default file or folder ``rel`` in the data folder (``--data-dir``, else
    ``$LOPT_DATA_DIR``: :func:`lopt.data.data_dir`); EvalError naming both when it is not there."""
    from lopt.data import data_file

    return data_file(rel, data_dir, what=f"task {kind!r}", error=EvalError,
                     alternative=f"; or give the path as {kind}:PATH")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def max_positions_of(model, cap: int | None = None) -> int:
    """The model's context length (from its config), optionally capped."""
    cfg = model.config
    n = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            break
    n = n if isinstance(n, int) and n > 0 else 2048
    return min(n, cap) if cap else n


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def eos_ids_of(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
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


def run_rows(model, rows: Sequence[Sequence[int]], *, past=None, past_mask: torch.Tensor | None = None,
              start: torch.Tensor | None = None, keep: str = "last", use_cache: bool = False):
    """One forward over right-padded ``rows``, optionally continuing from a KV cache.

    ``past_mask`` (B, P) marks the real tokens in the cache (a cache built from right-padded rows has
    holes); ``start`` (B,) is each row's count of real earlier tokens, i.e. the position of its
    first new token. ``keep="last"`` returns the logits at each row's last real token (B, V), computing
    the LM head only there; ``keep="all"`` returns (B, S, V).
    Returns ``(logits, cache or None, attention mask covering cache + rows)``.
    """
    device = model_device(model)
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
    positions = (start[:, None] + torch.arange(width)[None, :]).clamp(max=max_positions_of(model) - 1)
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


def cache_repeat(cache, repeats: int):
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return cache
    return tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in cache)


def cache_take(cache, index: torch.Tensor):
    """A cache holding rows ``index`` of ``cache``, which stays as it was (so it can be taken from
    again): the copy shares nothing that the selection changes, as layers re-bind their tensors."""
    if hasattr(cache, "layers") and hasattr(cache, "batch_select_indices"):
        taken = copy.copy(cache)
        taken.layers = [copy.copy(layer) for layer in cache.layers]
        taken.batch_select_indices(index)
        return taken
    return tuple(tuple(t[index] for t in layer) for layer in cache)


def progress_bar(iterable: Iterable, *, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but progress bars are never worth a crash
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def chunks_of(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), max(1, size)):
        yield seq[i: i + size]


def read_jsonl(path: Path, what: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; EvalError names the file and
    line of a bad one (``what``: the kind of file expected, added to the message as a hint)."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = f"; is this the {what} JSONL file?" if what else ""
                raise EvalError(f"{path} line {lineno}: not valid JSON ({e.msg}){hint}") from None
            if not isinstance(row, dict):
                hint = f" ({what} JSONL)" if what else ""
                raise EvalError(f"{path} line {lineno}: expected a JSON object{hint}")
            yield lineno, row


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # One MMLU-Redux file (moral_scenarios) is Windows-1252; latin-1 never fails as a last resort.
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
