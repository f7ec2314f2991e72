"""Data for supervised post-training: load rows, normalise them to chat messages, tokenize with
assistant-only labels, and batch them with dynamic padding.

    examples, stats = build_sft_dataset("gsm8k", tokenizer, max_length=512)
    batches = Batches(examples, batch_size=8, pad_token_id=tokenizer.pad_token_id, seed=0)
    batch = next(batches)   # {'input_ids', 'attention_mask', 'labels'}, padded to the longest row

A source is a local .jsonl/.json/.parquet/.csv file, a preset name (see ``PRESETS``), any Hugging
Face Hub dataset id, or ``'arithmetic'``: a small built-in set of word problems that needs no
download, so demos and tests run offline.

Local data. A preset comes from the hub unless a data folder is given: ``--data-dir DIR`` (the
``data_dir`` option), else the environment variable ``LOPT_DATA_DIR``. With one, the presets that have
a local layout (``LOCAL_PRESETS``: ``gsm8k`` is ``DIR/gsm8k/SPLIT.jsonl``) and the eval tasks' default
files are read from it, and a file missing there is an error, never a fall-back to the hub or to a
guessed folder. ``data_dir`` is the one place that decides.

Bad rows. A problem that means the file itself is wrong stops the run with one line naming the
file and the line (or record/row) and what to do; a problem confined to one row skips that row,
counted in ``stats["skipped"]`` (reason -> rows, the first place in ``stats["skipped_first"]``), which
the trainer prints once and writes to ``lopt_run.json``. A dataset left with no usable row is an error.

* error -- text that is not UTF-8 (a stray byte in one line or a whole file in another encoding:
  re-encode it) or holds an unpaired UTF-16 surrogate escape; a line that is not JSON or not an
  object; first-row columns that match no format; a value of the wrong kind (a JSON object or a
  true/false where text belongs, ``messages`` that are not a list of role/content messages, a
  message without a role).
* converted -- a number where text belongs is used as its decimal text (an answer of ``42`` is "42").
* kept -- an empty prompt (a completion-only row is legitimate); a very long line (a 1 MB row is read
  like any other, then truncated or skipped below); a response longer than ``max_length`` is
  right-truncated and counted in ``stats["truncated"]``.
* skipped -- ``missing_field``: the prompt or response column is absent or null; ``empty_response``:
  the response is blank; ``no_assistant_turn``: a chat with no non-empty assistant message;
  ``prompt_too_long``: the prompt alone fills ``max_length``, so no response token would be trained
  (also counted as ``dropped_no_response_tokens``).

``validate_dataset`` runs every check that needs no tokenizer in about the time it takes to read the
file, so a bad local file fails before a model is loaded.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens and padding)


class DataError(ValueError):
    """A bad dataset or row. The message is one line naming the source and what to do about it."""


class SkipRow(DataError):
    """One row that training skips (``build_sft_dataset`` counts it under ``reason``); raised by
    ``to_messages`` for a row without a usable prompt or response."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


SKIP_REASONS = ("missing_field", "empty_response", "no_assistant_turn", "prompt_too_long")


PRESETS: dict[str, tuple[str, str | None, str]] = {
    # name -> (hub id, config name, default split)
    "gsm8k": ("openai/gsm8k", "main", "train"),
    "metamathqa": ("meta-math/MetaMathQA", None, "train"),
    "alpaca": ("tatsu-lab/alpaca", None, "train"),
    "tulu3": ("allenai/tulu-3-sft-mixture", None, "train"),
}
# Presets with a local layout inside the data folder (--data-dir / $LOPT_DATA_DIR): name -> file.
LOCAL_PRESETS: dict[str, str] = {"gsm8k": "gsm8k/{split}.jsonl"}
DATA_DIR_ENV = "LOPT_DATA_DIR"
EMBEDDED = "arithmetic"
EMBEDDED_SIZES = {"train": 2000, "test": 200}

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
# Suffixes that clearly mean "a file" even though we can't read them, so a missing data.txt is
# reported as a missing file rather than as an unknown hub dataset.
_OTHER_FILE_TYPES = (".txt", ".tsv", ".xlsx", ".xls", ".gz", ".zip", ".arrow", ".yaml", ".yml", ".md")

# Format name -> (prompt column(s), response column). Checked in this order; the first whose
# required columns are all present wins.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),  # 'input' optional
    "query_response": ("query", "response"),
    "question_answer": ("question", "answer"),
    "problem_solution": ("problem", "solution"),
    "prompt_completion": ("prompt", "completion"),
}
_PAIR_COLUMNS = {f: cols for f, cols in FORMATS.items() if f not in ("messages", "alpaca")}

# Plain format for tokenizers without a chat template (base models). Matches what
# lopt.recipes.sft.sample_answer feeds at inference time.
FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
FALLBACK_SEP = "\n\n"


# --------------------------------------------------------------------------- the data folder


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data folder: ``explicit`` (``--data-dir``), else ``$LOPT_DATA_DIR``, else None (the
    presets then come from the hub; lopt never guesses a folder). DataError when the folder named
    does not exist."""
    value, origin = (explicit, "--data-dir") if explicit not in (None, "") else \
        (os.environ.get(DATA_DIR_ENV) or None, DATA_DIR_ENV)
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"{origin} {value}: no such folder; give --data-dir DIR or set {DATA_DIR_ENV} "
                        f"to the folder holding the data")
    return path


def data_file(rel: str, explicit: str | Path | None = None, *, what: str,
              error: type[Exception] = DataError, alternative: str = "") -> Path:
    """``DIR/rel`` in the data folder (:func:`data_dir`); ``error`` (one line naming ``--data-dir``
    and ``LOPT_DATA_DIR``) when no folder is given or it does not hold ``rel``. ``what`` starts the
    message; ``alternative`` ends it (e.g. "; or give the path as gsm8k:PATH")."""
    try:
        root = data_dir(explicit)
    except DataError as e:
        raise error(f"{what}: {e}") from None
    if root is None:
        raise error(f"{what} reads {rel} from a data folder: give --data-dir DIR or set {DATA_DIR_ENV}"
                    f"{alternative}")
    path = root / rel
    if not path.exists():
        raise error(f"{what}: {path} not found in the data folder (from "
                    f"{'--data-dir' if explicit else DATA_DIR_ENV}); give --data-dir DIR or set "
                    f"{DATA_DIR_ENV} to a folder holding {rel}{alternative}")
    return path


def local_preset(name: str, split: str, explicit: str | Path | None = None) -> Path | None:
    """The local file of preset ``name`` (``LOCAL_PRESETS``) in the data folder; None when the preset
    has no local layout or no data folder is given (the hub then). DataError when a folder is given
    but lacks the file: no silent fall-back."""
    if name not in LOCAL_PRESETS or data_dir(explicit) is None:
        return None
    return data_file(LOCAL_PRESETS[name].format(split=split), explicit, what=f"preset {name!r} ({split})")


# --------------------------------------------------------------------------- loading


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _decode(path: Path, data: bytes, lineno: int | None = None, offset: int = 0) -> str:
    """``data`` (the bytes of ``path`` from byte ``offset``, starting on line ``lineno``) as text;
    a DataError naming the line and byte where it is not UTF-8."""
    if offset == 0 and data.startswith(_BOM):
        data, offset = data[len(_BOM):], len(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = (lineno or 1) + data.count(b"\n", 0, e.start)
        where = f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte {offset + e.start})"
        if offset == 0 and data.startswith(_UTF16_BOMS):
            raise DataError(f"{where}: the file is UTF-16; re-encode it as UTF-8 "
                            f"(iconv -f UTF-16 -t UTF-8 {path.name} > utf8-{path.name})") from None
        raise DataError(f"{where}; re-encode the file as UTF-8 (iconv -f ITS-ENCODING -t UTF-8 "
                        f"{path.name} > utf8-{path.name}) or fix that line") from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    records, where = [], []
    offset = 0
    # Bytes, decoded line by line: an encoding error then names its line, like a JSON error does.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(path, raw, lineno, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got "
                                f"{type(obj).__name__}; each line must be one {{column: value}} object")
            records.append(obj)
            where.append(f"line {lineno}")
    return records, where


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: a JSON-lines file named .json
            return _read_jsonl(path)
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                        f"fix the file") from None
    if isinstance(data, dict):
        # {"data": [...]} style wrappers: take the single list of objects inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of {{column: value}} objects; "
                        f"convert it to that or to JSON lines (.jsonl)")
    return data, [f"record {i}" for i in range(1, len(data) + 1)]


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    text = _decode(path, path.read_bytes())
    # Some files are ';' or tab separated: pick the delimiter the header line uses most.
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    # The csv module refuses fields over 128 KiB by default; a long document is a legitimate row.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))
    try:
        records = [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({e}); fix that line") from None
    finally:
        csv.field_size_limit(limit)
    return records, [f"row {i}" for i in range(1, len(records) + 1)]


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow "
                        f"(or convert the file to .jsonl)") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # corrupt file, not parquet at all, ...
        raise DataError(f"{path}: could not read parquet ({_one_line(e)}); check the file") from None
    return records, [f"row {i}" for i in range(1, len(records) + 1)]


_READERS: dict[str, Callable[[Path], tuple[list[dict], list[str]]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv,
}


def _load_hub(name: str, config: str | None, split: str, limit: int | None,
              ) -> tuple[list[dict], list[str]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading '{name}' needs the 'datasets' package: pip install 'lopt[data]' "
                        f"(or pass a local .jsonl/.json/.parquet/.csv file)") from None
    try:
        if limit is not None:
            # Streaming reads only the first rows instead of downloading the whole dataset.
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
            records = [dict(r) for _, r in zip(range(limit), ds)]
        else:
            ds = datasets.load_dataset(name, config, split=split)
            records = [dict(r) for r in ds]
    except Exception as e:
        raise DataError(f"could not load dataset '{name}'" + (f" (config '{config}')" if config else "")
                        + f" split '{split}' ({_one_line(e)}); check the name, the split and your "
                        f"network, or pass a local .jsonl/.json/.parquet/.csv file") from None
    return records, [f"row {i}" for i in range(1, len(records) + 1)]


def _looks_like_file(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    return (suffix in FILE_TYPES or suffix in _OTHER_FILE_TYPES
            or source.startswith(("/", "./", "../", "~", ".")))


def _load(source: str, split: str | None = "train", limit: int | None = None,
          data_dir: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """load_records plus, per record, where it came from ('line 7', 'row 3') for error messages."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if source == EMBEDDED:
        split = split or "train"
        if split not in EMBEDDED_SIZES:
            raise DataError(f"the embedded '{EMBEDDED}' dataset has splits {sorted(EMBEDDED_SIZES)}, "
                            f"not '{split}'")
        n = EMBEDDED_SIZES[split] if limit is None else min(limit, EMBEDDED_SIZES[split])
        records = make_arithmetic_dataset(n, seed=0, split=split)
        where = [f"row {i}" for i in range(1, len(records) + 1)]
    elif path.is_dir():
        # A local folder of data files: datasets.load_dataset knows how to pick the split's files.
        records, where = _load_hub(str(path), None, split or "train", limit)
    elif path.is_file():
        if suffix not in _READERS:
            raise DataError(f"{source}: unsupported file type '{path.suffix or '(none)'}'; "
                            f"use one of {', '.join(FILE_TYPES)}")
        try:
            records, where = _READERS[suffix](path)
        except OSError as e:  # unreadable: permissions, a device error, ...
            raise DataError(f"{source}: cannot read the file ({e.strerror or _one_line(e)}); check its "
                            f"permissions") from None
    elif _looks_like_file(source):
        raise DataError(f"{source}: file not found; check the path (relative paths are taken from "
                        f"{Path.cwd()})")
    elif source in PRESETS:
        hub_id, config, default_split = PRESETS[source]
        local = local_preset(source, split or default_split, data_dir)
        if local is not None:  # the data folder's copy (--data-dir / $LOPT_DATA_DIR)
            records, where = _READERS[local.suffix.lower()](local)
        else:
            records, where = _load_hub(hub_id, config, split or default_split, limit)
    else:
        records, where = _load_hub(source, None, split or "train", limit)
    if limit is not None:
        records, where = records[:limit], where[:limit]
    if not records:
        raise DataError(f"{source}: no records found; the dataset is empty")
    return records, where


def load_records(source: str, split: str = "train", limit: int | None = None,
                 data_dir: str | Path | None = None) -> list[dict]:
    """Load raw rows (dicts) from ``source``.

    ``source`` is a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file (``split`` is ignored:
    a file is one split), a local folder of data files, the embedded ``'arithmetic'`` dataset
    (2000 train / 200 test rows), a preset name from ``PRESETS``, or any Hugging Face Hub dataset
    id (needs the ``datasets`` package and network). ``limit`` keeps the first N rows. ``data_dir``:
    the local data folder for the presets (:func:`data_dir`; default ``$LOPT_DATA_DIR``, else the hub).
    Raises ``DataError`` for missing or unreadable files and empty datasets.
    """
    return _load(source, split, limit, data_dir)[0]


# --------------------------------------------------------------------------- formats


def detect_format(columns: Iterable[str]) -> str:
    """Name the row format from its column names: 'messages', 'alpaca' (instruction/input/output),
    'query_response', 'question_answer', 'problem_solution' or 'prompt_completion'."""
    cols = set(columns)
    if "conversations" in cols:  # ShareGPT-style rows are chat messages too
        cols.add("messages")
    for fmt, required in FORMATS.items():
        if all(c in cols for c in required):
            return fmt
    accepted = "; ".join("/".join(req) + (" (+ optional input)" if f == "alpaca" else "")
                         for f, req in FORMATS.items())
    raise DataError(f"unrecognised columns {sorted(set(columns))}; expected one of: {accepted}")


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                 "chatgpt": "assistant"}


_SURROGATE = re.compile("[\ud800-\udfff]")  # from a JSON escape like "\\ud800" with no partner


def _missing(record: dict, column: str) -> bool:
    value = record.get(column)
    return value is None or (isinstance(value, float) and math.isnan(value))  # NaN: a null in pandas' terms


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)  # a numeric answer is its decimal text
    elif isinstance(value, list):  # OpenAI-style content parts: [{'type': 'text', 'text': ...}]
        text = "".join(_text(p.get("text"), what) if isinstance(p, dict) else _text(p, what) for p in value)
    else:
        raise DataError(f"'{what}' must be text, got {type(value).__name__} {str(value)[:40]!r}; "
                        f"store it as a string")
    if _SURROGATE.search(text):
        raise DataError(f"'{what}' holds an unpaired UTF-16 surrogate (an escape like \\ud800 without its "
                        f"partner), which is not text; fix that escape")
    return text


def _chat(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"'{what}' must be a list of {{'role', 'content'}} messages, got "
                        f"{type(value).__name__}")
    out = []
    for m in value:
        role = m.get("role", m.get("from"))
        if role is None:
            raise DataError(f"a message in '{what}' has no 'role'; give every message a role and content")
        role = _ROLE_ALIASES.get(str(role).lower(), str(role).lower())
        out.append({"role": role, "content": _text(m.get("content", m.get("value")), f"{what} content")})
    return out


def _check_reply(msgs: list[dict], what: str) -> None:
    if not msgs or msgs[-1]["role"] != "assistant":
        raise SkipRow(f"no response (no assistant message in '{what}'); end each conversation with the "
                      f"assistant's reply", "no_assistant_turn")
    if not msgs[-1]["content"].strip():
        raise SkipRow(f"no response (the last assistant message in '{what}' is empty); fill it in or drop "
                      f"the row", "empty_response")


def _require(record: dict, column: str, part: str) -> None:
    if _missing(record, column):
        raise SkipRow(f"no {part} (the '{column}' column is missing or null); fill it in or drop the row",
                      "missing_field")


def to_messages(record: dict, fmt: str) -> list[dict]:
    """Turn one row of format ``fmt`` into chat messages ``[{'role', 'content'}, ...]`` whose last
    message is the assistant's response. An optional 'system' column becomes a system message.

    Raises ``SkipRow`` (a ``DataError`` with a ``reason``) for a row without a usable prompt or
    response, and ``DataError`` for a value of the wrong kind; neither names the file or row (the
    caller adds that)."""
    if fmt == "messages":
        key = "messages" if "messages" in record else "conversations"
        _require(record, key, "conversation")
        msgs = _chat(record.get(key), key)
        while msgs and msgs[-1]["role"] != "assistant":  # trailing user turns can't be trained
            msgs.pop()
        _check_reply(msgs, key)
        return msgs
    system = _text(record.get("system"), "system").strip()
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "alpaca":
        _require(record, "instruction", "prompt")
        _require(record, "output", "response")
        prompt, extra = _text(record["instruction"], "instruction"), _text(record.get("input"), "input").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        response, column = _text(record["output"], "output"), "output"
    elif fmt in _PAIR_COLUMNS:
        p_col, column = _PAIR_COLUMNS[fmt]
        _require(record, p_col, "prompt")
        _require(record, column, "response")
        prompt, response = record[p_col], record[column]
        if fmt == "prompt_completion" and isinstance(prompt, list):
            # TRL's conversational prompt/completion: both sides already messages
            msgs = _chat(prompt, p_col) + (_chat(response, column) if isinstance(response, list) else
                                           [{"role": "assistant", "content": _text(response, column)}])
            _check_reply(msgs, column)
            return head + msgs
        prompt, response = _text(prompt, p_col), _text(response, column)
    else:
        raise DataError(f"unknown format '{fmt}'; expected one of {list(FORMATS)}")
    if not response.strip():
        raise SkipRow(f"no response (the '{column}' column is empty); fill it in or drop the row",
                      "empty_response")
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# --------------------------------------------------------------------------- tokenizing


def _fallback_render(messages: list[dict], add_generation_prompt: bool, eos: str) -> str:
    blocks = [FALLBACK_HEADERS.get(m["role"], f"### {m['role'].title()}:\n") + m["content"]
              + (eos if m["role"] == "assistant" else "") for m in messages]
    if add_generation_prompt:
        blocks.append(FALLBACK_HEADERS["assistant"])
    return FALLBACK_SEP.join(blocks)


def _renderer(tokenizer) -> Callable[[list[dict], bool], str]:
    if getattr(tokenizer, "chat_template", None):
        def render(msgs: list[dict], gen: bool) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    else:
        eos = tokenizer.eos_token or ""

        def render(msgs: list[dict], gen: bool) -> str:
            return _fallback_render(msgs, gen, eos)
    return render


def chat_prompt(tokenizer, user_text: str) -> str:
    """``user_text`` as one user turn, formatted exactly as training formats prompts (chat template,
    or the plain '### User:' fallback), ready for the assistant's reply. Use it for generation."""
    return _renderer(tokenizer)([{"role": "user", "content": user_text}], True)


def _assistant_spans(messages: list[dict], render, full: str, tokenizer) -> list[tuple[int, int]]:
    """Character spans of ``full`` (the whole rendered chat) that the model should learn to write:
    each assistant turn's content plus the end-of-turn marker the template puts after it."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t), key=len, reverse=True)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = render(messages[:i], True) if i else None
            upto = render(messages[: i + 1], False)
        except Exception:
            before = upto = None
        if before is not None and upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            # The template renders this turn differently once later turns follow (e.g. it drops
            # earlier reasoning): find the content itself and the special token right after it.
            content = m["content"]
            start = full.find(content, cursor)
            if start < 0:
                raise DataError("the chat template does not render the assistant's text verbatim, so "
                                "its tokens can't be located; use a tokenizer with a standard template")
            end = start + len(content)
            end += next((len(t) for t in specials if full.startswith(t, end)), 0)
        # Whitespace the template adds after the end-of-turn token is not part of the answer.
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
        cursor = end
    return spans


def _tokenize_full(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Untruncated input_ids and labels (IGNORE_INDEX outside the assistant spans)."""
    render = _renderer(tokenizer)
    try:
        full = render(messages, False)
    except Exception as e:
        raise DataError(f"the tokenizer's chat template failed on this row ({_one_line(e)})") from None
    spans = _assistant_spans(messages, render, full, tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            # A token belongs where its last character is: a token that starts in the template
            # but ends in the answer (e.g. ' Hello' after a header) is part of the answer.
            pos = b - 1 if b > a else a
            if any(s <= pos < e for s, e in spans):
                labels[j] = ids[j]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries one by one.
    ids, labels, prev = [], [], 0
    for s, e in spans + [(len(full), len(full))]:
        for text, trained in ((full[prev:s], False), (full[s:e], True)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
        prev = e
    return ids, labels


def tokenize_messages(messages: list[dict], tokenizer, max_length: int) -> dict:
    """Tokenize a chat for SFT: ``{'input_ids', 'labels', 'truncated'}``.

    Every assistant turn is trained (its content and the end-of-turn token after it, so the model
    learns to stop); all other tokens get label -100. Uses the tokenizer's chat template, or a
    plain '### User:' / '### Assistant:' format with the EOS token when it has none. Right-truncates
    to ``max_length`` tokens.
    """
    ids, labels = _tokenize_full(messages, tokenizer)
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


_SKIP_TEXT = {"missing_field": "a missing prompt or response field", "empty_response": "an empty response",
              "no_assistant_turn": "no assistant turn", "prompt_too_long": "a prompt longer than max_length"}


def _detect(source: str, records: list[dict]) -> str:
    try:
        return detect_format(records[0].keys())
    except DataError as e:
        raise DataError(f"{source}: {e}") from None


def _skip(stats: dict, reason: str, loc: str) -> None:
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
    stats["skipped_first"].setdefault(reason, loc)


def _chats(source: str, records: list[dict], where: list[str], fmt: str, stats: dict
           ) -> Iterator[tuple[list[dict], str]]:
    """Each usable row's chat messages and location; skipped rows are counted in ``stats``."""
    for record, loc in zip(records, where):
        try:
            msgs = to_messages(record, fmt)
        except SkipRow as e:
            _skip(stats, e.reason, loc)
            continue
        except DataError as e:
            raise DataError(f"{source} {loc}: {e}") from None
        yield msgs, loc


def _skip_parts(stats: dict) -> str:
    return "; ".join(f"{n} with {_SKIP_TEXT.get(r, r)}, first at {stats['skipped_first'][r]}"
                     for r, n in stats["skipped"].items())


def describe_skips(stats: dict) -> str | None:
    """One line about the rows ``build_sft_dataset`` skipped (``None`` when it skipped none), e.g.
    "skipped 2 of 40 rows of d.jsonl (2 with an empty response, first at line 4)"."""
    skipped = sum(stats.get("skipped", {}).values())
    if not skipped:
        return None
    total = stats["rows"] + stats.get("val_rows", 0) + skipped  # val_rows: held out by --val-size
    return (f"skipped {skipped} of {total} rows of {stats['source']} ({_skip_parts(stats)}); "
            f"the rules are in help(lopt.data)")


def _new_stats(source: str, fmt: str) -> dict:
    return {"source": source, "format": fmt, "rows": 0, "skipped": {}, "skipped_first": {}}


def _no_usable_rows(source: str, stats: dict) -> DataError:
    return DataError(f"{source}: no usable row, every one was skipped ({_skip_parts(stats)}); fix the data")


def validate_dataset(source: str, split: str = "train", limit: int | None = None,
                     max_length: int | None = None, data_dir: str | Path | None = None) -> dict:
    """Check a dataset before any model is loaded: the file exists and is readable UTF-8, every line
    parses, the columns match a format, and at least one row has a usable prompt and response.

    Runs every check of ``build_sft_dataset`` that needs no tokenizer (only ``prompt_too_long`` is
    left), in about the time it takes to read the file. Local files and the embedded set are
    checked; a hub dataset or a local folder (read through ``datasets``) is checked when it is loaded.

    Returns ``{'source', 'format', 'rows', 'skipped', 'skipped_first', 'checked'}`` (``rows``: rows that
    will be tokenized; ``checked`` False for a source left to load time). Raises ``DataError``.
    """
    if max_length is not None and max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
    path = Path(source).expanduser()
    local = local_preset(source, split, data_dir) if source in PRESETS and not path.exists() else None
    if (source != EMBEDDED and local is None and not path.is_file()
            and (path.is_dir() or not _looks_like_file(source))):
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive number of rows, got {limit}")
        return {"source": source, "checked": False}
    records, where = _load(source, split, limit, data_dir)
    stats = _new_stats(source, _detect(source, records))
    stats["rows"] = sum(1 for _ in _chats(source, records, where, stats["format"], stats))
    if not stats["rows"]:
        raise _no_usable_rows(source, stats)
    stats["checked"] = True
    return stats


def build_sft_dataset(source: str, tokenizer, max_length: int = 512, split: str = "train",
                      limit: int | None = None, data_dir: str | Path | None = None
                      ) -> tuple[list[dict], dict]:
    """Load ``source``, detect its format, and tokenize every row for SFT.

    Returns ``(examples, stats)``: examples are ``{'input_ids', 'labels'}`` lists; stats has
    'format', 'rows' (examples returned), 'truncated', 'skipped' (reason -> rows skipped, see the
    module docstring) with 'skipped_first' (reason -> where the first one was),
    'dropped_no_response_tokens' (rows whose whole response fell past ``max_length``, also
    ``skipped['prompt_too_long']``) and 'tokens' (sum of example lengths).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
    records, where = _load(source, split, limit, data_dir)
    stats = _new_stats(source, _detect(source, records))
    examples: list[dict] = []
    truncated = tokens = label_tokens = 0
    shortest_prompt: int | None = None
    for msgs, loc in _chats(source, records, where, stats["format"], stats):
        try:
            ids, labels = _tokenize_full(msgs, tokenizer)
        except DataError as e:
            raise DataError(f"{source} {loc}: {e}") from None
        # Position 0 is never predicted (causal LMs shift labels by one), so it doesn't count.
        first = next((j for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX), None)
        if first is not None:
            shortest_prompt = first if shortest_prompt is None else min(shortest_prompt, first)
        if first is None or first >= max_length:
            _skip(stats, "prompt_too_long", loc)
            continue
        truncated += len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        examples.append({"input_ids": ids, "labels": labels})
        tokens += len(ids)
        label_tokens += sum(l != IGNORE_INDEX for l in labels[1:])
    if not examples:
        if shortest_prompt is None and "prompt_too_long" in stats["skipped"]:
            raise DataError(f"{source}: no row has any response tokens after tokenizing; check the "
                            f"tokenizer's chat template")
        if shortest_prompt is None:
            raise _no_usable_rows(source, stats)
        raise DataError(f"max_length {max_length} is shorter than the prompts of {source} "
                        f"(shortest prompt: {shortest_prompt} tokens); raise --max-length")
    stats.update(rows=len(examples), truncated=truncated,
                 dropped_no_response_tokens=stats["skipped"].get("prompt_too_long", 0), tokens=tokens,
                 label_tokens=label_tokens)
    return examples, stats


# --------------------------------------------------------------------------- held-out rows

# Presets whose source has a 'test' split of its own (the hub's, or DIR/gsm8k/test.jsonl).
PRESETS_WITH_TEST = ("gsm8k",)


def val_size_arg(text: Any) -> int | float:
    """``--val-size``'s value as given: a whole number of rows (``8``) or a fraction of them (``0.1``)."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ValueError(f"val_size must be a number of rows (8) or a fraction (0.1), got {text!r}")
    if isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except ValueError:
        return float(text)  # ValueError: argparse reports the bad value


def held_out_count(val_size: int | float, rows: int) -> int:
    """How many of ``rows`` rows ``--val-size`` holds out: N, or round(FRACTION x rows) (at least 1).
    DataError (one line) when that leaves nothing to train on or the value is not a size."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or not val_size > 0:
        raise DataError(f"--val-size must be a number of rows (8) or a fraction of them (0.1), > 0; got {val_size!r}")
    if val_size < 1:
        count = max(1, round(val_size * rows))
    elif float(val_size).is_integer():
        count = int(val_size)
    else:
        raise DataError(f"--val-size {val_size}: give a whole number of rows (8) or a fraction below 1 (0.1)")
    if count >= rows:
        raise DataError(f"--val-size {val_size} holds out {count} of the {rows} training rows, leaving none to "
                        f"train on; give a smaller --val-size")
    return count


def hold_out(items: list, val_size: int | float, seed: int = 0) -> tuple[list, list]:
    """``(train, val)``: ``held_out_count(val_size, len(items))`` items chosen with ``seed`` go to
    ``val``, the rest to ``train``; both keep the original order. The same seed picks the same rows."""
    count = held_out_count(val_size, len(items))
    chosen = set(random.Random(f"lopt-val-{seed}").sample(range(len(items)), count))
    return ([x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen])


def has_test_split(source: str, data_dir: str | Path | None = None) -> bool | None:
    """Whether ``source`` has a 'test' split apart from the rows it trains on: True for the embedded
    set and presets with one (``PRESETS_WITH_TEST``), a folder with a *test* file; False for a single
    file (it is one split) and the other presets; None for a hub dataset id (known only once loaded)."""
    path = Path(source).expanduser()
    if source == EMBEDDED:
        return True
    if path.is_file() or (not path.exists() and _looks_like_file(source)):
        return False
    if path.is_dir():
        return any("test" in p.name for p in path.iterdir())
    if source in PRESETS:
        return source in PRESETS_WITH_TEST
    return None


# --------------------------------------------------------------------------- batching


def collate(examples: list[dict], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one: ``input_ids``, ``attention_mask`` (1 real,
    0 pad) and ``labels`` (-100 on padding)."""
    if not examples:
        raise DataError("collate got an empty batch")
    # Padded positions are masked out and unlabelled, so any id works when there is no pad token.
    pad = 0 if pad_token_id is None else int(pad_token_id)
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Batches:
    """Endless, deterministic, resumable iterator of collated batches.

    Each epoch visits every example once in an order drawn from ``seed + epoch`` (or in file order
    with ``shuffle=False``); the last batch of an epoch may be smaller. ``state_dict()`` records the
    position, so ``load_state_dict()`` on a fresh ``Batches`` continues with the same batches.
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_token_id: int | None, seed: int = 0,
                 shuffle: bool = True):
        if not examples:
            raise DataError("no examples to batch")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.examples, self.batch_size, self.pad_token_id = examples, batch_size, pad_token_id
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = math.ceil(len(examples) / batch_size)
        self.epoch, self.index = 0, 0  # index: batches already yielded in this epoch
        self._order: list[int] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> "Batches":
        return self

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            n = len(self.examples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
        return self._order

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        lo = self.index * self.batch_size
        idx = self._epoch_order()[lo: lo + self.batch_size]
        self.index += 1
        return collate([self.examples[i] for i in idx], self.pad_token_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise DataError(f"data position epoch {epoch} batch {index} does not fit this dataset "
                            f"({self.batches_per_epoch} batches per epoch); resume with the same "
                            f"dataset and batch size")
        self.epoch, self.index, self._order = epoch, index, None


# --------------------------------------------------------------------------- embedded arithmetic

_NAMES = ["Tom", "Ava", "Liam", "Mia", "Noah", "Emma", "Omar", "Sara", "Ken", "Lucy", "Ravi", "Zoe",
          "Ben", "Nina", "Leo", "Ivy", "Sam", "Maya", "Jack", "Lena"]
_PRONOUN = {n: ("she" if n in {"Ava", "Mia", "Emma", "Sara", "Lucy", "Zoe", "Nina", "Ivy", "Maya", "Lena"}
                else "he") for n in _NAMES}
_ITEMS = ["pencils", "notebooks", "apples", "stickers", "candles", "mugs", "socks", "books"]
_THINGS = ["marbles", "cookies", "cards", "stamps", "shells", "coins", "beads", "grapes"]


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_NAMES, 2)
    return a, b


# Each template draws numbers, and returns (question, worked lines, final answer). Numbers are
# chosen so every step is a whole number.
def _t_shopping(rng):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    k, price = rng.randint(2, 9), rng.randint(2, 12)
    cost = k * price
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    return (f"{name} buys {k} {item} that cost ${price} each and pays with a ${bill} bill. "
            f"How much change does {_PRONOUN[name]} get?",
            [f"The {item} cost {k} * {price} = {cost} dollars.",
             f"The change is {bill} - {cost} = {bill - cost} dollars."], bill - cost)


def _t_sharing(rng):
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    friends, each, keep = rng.randint(2, 8), rng.randint(2, 15), rng.randint(1, 12)
    total = friends * each + keep
    return (f"{name} has {total} {thing}. {_PRONOUN[name].capitalize()} keeps {keep} and shares the "
            f"rest equally among {friends} friends. How many {thing} does each friend get?",
            [f"{name} shares {total} - {keep} = {total - keep} {thing}.",
             f"Each friend gets {total - keep} / {friends} = {each} {thing}."], each)


def _t_speed(rng):
    v1, t1, v2, t2 = rng.randint(20, 90), rng.randint(2, 6), rng.randint(20, 90), rng.randint(1, 5)
    d1, d2 = v1 * t1, v2 * t2
    return (f"A train travels at {v1} km per hour for {t1} hours, then at {v2} km per hour for "
            f"{t2} more hours. How many kilometers does it travel in total?",
            [f"First it travels {v1} * {t1} = {d1} km.",
             f"Then it travels {v2} * {t2} = {d2} km.",
             f"In total it travels {d1} + {d2} = {d1 + d2} km."], d1 + d2)


def _t_time(rng):
    name = rng.choice(_NAMES)
    v, t = rng.randint(3, 15), rng.randint(2, 9)
    d = v * t
    return (f"{name} rides a bike {d} km at {v} km per hour. How many hours does the ride take?",
            [f"The ride takes {d} / {v} = {t} hours."], t)


def _t_ages(rng):
    a, b = _two_names(rng)
    age, diff, years = rng.randint(5, 40), rng.randint(2, 30), rng.randint(2, 20)
    return (f"{a} is {age} years old. {b} is {diff} years older than {a}. "
            f"How old will {b} be in {years} years?",
            [f"{b} is {age} + {diff} = {age + diff} years old now.",
             f"In {years} years {b} will be {age + diff} + {years} = {age + diff + years} years old."],
            age + diff + years)


def _t_savings(rng):
    name = rng.choice(_NAMES)
    weekly, weeks = rng.randint(3, 25), rng.randint(3, 12)
    saved = weekly * weeks
    spent = rng.randint(1, saved - 1)
    gift = rng.choice(["a game", "a gift", "a jacket", "a kite", "a book"])
    return (f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on {gift}. "
            f"How many dollars does {_PRONOUN[name]} have left?",
            [f"{name} saves {weekly} * {weeks} = {saved} dollars.",
             f"After buying {gift}, {_PRONOUN[name]} has {saved} - {spent} = {saved - spent} dollars left."],
            saved - spent)


def _t_baking(rng):
    name = rng.choice(_NAMES)
    trays, per_tray, per_bag = rng.randint(2, 6), rng.randint(6, 16), rng.randint(2, 6)
    total = trays * per_tray
    eaten = total % per_bag or per_bag  # leaves a multiple of the bag size
    rest = total - eaten
    return (f"{name} bakes {trays} trays of {per_tray} cookies and eats {eaten} of them. "
            f"The rest go into bags of {per_bag}. How many bags does {_PRONOUN[name]} fill?",
            [f"{name} bakes {trays} * {per_tray} = {total} cookies.",
             f"After eating some, {total} - {eaten} = {rest} cookies are left.",
             f"That fills {rest} / {per_bag} = {rest // per_bag} bags."], rest // per_bag)


def _t_reading(rng):
    name = rng.choice(_NAMES)
    per_day, days = rng.randint(5, 30), rng.randint(2, 9)
    read = per_day * days
    pages = read + rng.randint(1, 150)
    return (f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. "
            f"How many pages are left to read?",
            [f"{name} reads {per_day} * {days} = {read} pages.",
             f"There are {pages} - {read} = {pages - read} pages left."], pages - read)


def _t_wages(rng):
    name = rng.choice(_NAMES)
    rate, h1, h2 = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 8)
    return (f"{name} earns ${rate} an hour. {_PRONOUN[name].capitalize()} works {h1} hours on "
            f"Monday and {h2} hours on Tuesday. How many dollars does {_PRONOUN[name]} earn?",
            [f"{name} works {h1} + {h2} = {h1 + h2} hours.",
             f"{_PRONOUN[name].capitalize()} earns {h1 + h2} * {rate} = {(h1 + h2) * rate} dollars."],
            (h1 + h2) * rate)


def _t_half(rng):
    a, b = _two_names(rng)
    thing = rng.choice(_THINGS)
    half, found = rng.randint(3, 40), rng.randint(1, 25)
    return (f"{a} has {2 * half} {thing} and gives half of them to {b}. Then {a} finds {found} more. "
            f"How many {thing} does {a} have now?",
            [f"{a} gives away {2 * half} / 2 = {half} {thing} and keeps {half}.",
             f"Now {a} has {half} + {found} = {half + found} {thing}."], half + found)


def _t_garden(rng):
    name = rng.choice(_NAMES)
    rows, per_row, dead = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 9)
    total = rows * per_row
    return (f"{name} plants {rows} rows of {per_row} tomato plants. {dead} plants do not grow. "
            f"How many plants grow?",
            [f"{name} plants {rows} * {per_row} = {total} plants.",
             f"{total} - {dead} = {total - dead} plants grow."], total - dead)


_TEMPLATES = [_t_shopping, _t_sharing, _t_speed, _t_time, _t_ages, _t_savings, _t_baking, _t_reading,
              _t_wages, _t_half, _t_garden]
_TEST_BUCKETS = 8  # 1 in 8 questions (by hash) belongs to the test split, the rest to train


def _is_test_question(question: str) -> bool:
    # A stable hash partitions the space of questions, so the splits can never share one.
    return hashlib.sha256(question.encode()).digest()[0] % _TEST_BUCKETS == 0


def make_arithmetic_dataset(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` distinct arithmetic word problems in GSM8K style: ``{'question', 'answer'}`` where the
    answer is a few worked lines like '3 * 4 = 12' and ends with '#### 12'.

    Deterministic for a given ``seed``; the 'train' and 'test' splits never share a question.
    """
    if split not in ("train", "test"):
        raise DataError(f"the arithmetic dataset has splits 'train' and 'test', not '{split}'")
    want_test = split == "test"
    rng = random.Random(f"lopt-arithmetic-{seed}-{split}")
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise DataError(f"could not draw {n} distinct arithmetic problems; ask for fewer")
        question, lines, result = rng.choice(_TEMPLATES)(rng)
        if question in seen or _is_test_question(question) != want_test:
            continue
        seen.add(question)
        out.append({"question": question, "answer": "\n".join(lines) + f"\n#### {result}"})
    return out
