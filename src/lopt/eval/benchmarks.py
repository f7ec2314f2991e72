"""Zero-shot retention benchmarks, scored as lm-evaluation-harness 0.4.x scores them.

Readers for the official release files of ARC (Easy and Challenge), PIQA, WinoGrande 1.1 and
LAMBADA (OpenAI's test set), the requests lm-evaluation-harness's builtin tasks ``arc_easy``,
``arc_challenge``, ``piqa``, ``winogrande`` and ``lambada_openai`` build from them, and their metrics:

* ARC: context ``"Question: {stem}\\nAnswer:"``, choices ``" " + text``; ``acc`` and ``acc_norm``.
* PIQA: context ``"Question: {goal}\\nAnswer:"``, choices ``" " + sol1``, ``" " + sol2``; the same.
* WinoGrande (partial scoring): one context per option, the sentence up to ``_`` with the option
  filled in; the continuation, shared by both, is ``" " +`` the rest of the sentence (stripped).
  ``acc``: the option under which that continuation is likelier.
* LAMBADA: context = the text before its last ``" "``, continuation = ``" " +`` the last word.
  ``acc``: every continuation token is the model's argmax; ``perplexity`` = exp(-mean loglik).

``acc`` picks the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood divided by
the choice's length in characters (the choice without the joining space); ties go to the first
choice. Standard errors are lm-evaluation-harness's: the sample standard deviation (n - 1) of the
per-item scores over sqrt(n); perplexity's uses the delta method, ppl * stderr(mean loglik)
(lm-evaluation-harness bootstraps it; the two agree to the bootstrap's noise).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lopt.eval.common import EvalError, chunks_of, max_positions_of, progress_bar, read_jsonl
from lopt.eval.scoring import encode_pairs, score_batch

__all__ = [
    "Doc", "arc_prompt", "piqa_prompt", "winogrande_requests", "lambada_split", "load_arc",
    "load_piqa", "load_winogrande", "load_lambada", "piqa_labels_path", "score_docs", "item_scores",
    "aggregate", "mean_stderr",
]


@dataclass(frozen=True)
class Doc:
    """One benchmark item as lm-evaluation-harness's requests see it.

    ``contexts`` has one entry (ARC, PIQA, LAMBADA) or one per choice (WinoGrande);
    ``continuations`` one per choice (ARC, PIQA) or one shared by every context (WinoGrande,
    LAMBADA). ``choices`` are the strings whose length ``acc_norm`` divides by; ``gold`` is the index
    of the right choice (None for LAMBADA).
    """
    id: str
    contexts: list[str]
    continuations: list[str]
    choices: list[str] = field(default_factory=list)
    gold: int | None = None


# --------------------------------------------------------------------------- prompts


def arc_prompt(stem: str) -> str:
    """lm-evaluation-harness's ARC context (``arc_easy.yaml``'s doc_to_text)."""
    return f"Question: {stem}\nAnswer:"


def piqa_prompt(goal: str) -> str:
    """lm-evaluation-harness's PIQA context (``piqa.yaml``'s doc_to_text)."""
    return f"Question: {goal}\nAnswer:"


def winogrande_requests(sentence: str, option1: str, option2: str) -> tuple[list[str], str]:
    """``([context1, context2], continuation)`` of WinoGrande's partial scoring: each context is the
    sentence up to the first ``_`` with an option in its place, the continuation ``" " +`` the rest
    of the sentence, stripped (lm-evaluation-harness's ``preprocess_winogrande``)."""
    idx = sentence.index("_")
    return [sentence[:idx] + option1, sentence[:idx] + option2], " " + sentence[idx + 1:].strip()


def lambada_split(text: str) -> tuple[str, str]:
    """``(context, continuation)`` of ``lambada_openai``: the text split on single spaces, all but
    the last piece joined back as the context, ``" " +`` the last piece as the continuation."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


# --------------------------------------------------------------------------- file readers


def _first_rows(path: Path, what: str, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for the first ``limit`` non-blank lines of a JSONL file."""
    if not path.is_file():
        raise EvalError(f"{what} file not found: {path}; give the path as KIND:PATH")
    return itertools.islice(read_jsonl(path, what), limit)


def _need_str(row: dict[str, Any], key: str, path: Path, lineno: int, what: str, columns: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise EvalError(f"{path} line {lineno}: no string {key!r} ({what} rows have {columns}); "
                        f"is this the {what} file?")
    return value


def load_arc(path: str | Path, limit: int | None = None) -> list[Doc]:
    """ARC rows (``question.stem``, ``question.choices[].text/label``, ``answerKey``): the answer key
    is looked up among the choices' own labels, so letters (A-E) and digits (1-5) both work."""
    path = Path(path)
    docs = []
    for lineno, row in _first_rows(path, "ARC", limit):
        question = row.get("question")
        choices = question.get("choices") if isinstance(question, dict) else None
        if (not isinstance(question, dict) or not isinstance(question.get("stem"), str)
                or not isinstance(choices, list) or not choices
                or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                           and isinstance(c.get("label"), str) for c in choices)):
            raise EvalError(f"{path} line {lineno}: ARC rows need question.stem and question.choices "
                            f"(a list of {{text, label}}); is this an ARC JSONL file?")
        labels = [c["label"].strip() for c in choices]
        key = row.get("answerKey")
        if not isinstance(key, str) or key.strip() not in labels:
            raise EvalError(f"{path} line {lineno}: answerKey {key!r} is not one of the choice labels "
                            f"{labels}")
        texts = [c["text"] for c in choices]
        docs.append(Doc(id=str(row.get("id", lineno)), contexts=[arc_prompt(question["stem"])],
                        continuations=[" " + t for t in texts], choices=texts,
                        gold=labels.index(key.strip())))
    return docs


def piqa_labels_path(path: str | Path) -> Path:
    """The labels file beside a PIQA data file: ``valid.jsonl`` -> ``valid-labels.lst``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-labels.lst")


def load_piqa(path: str | Path, limit: int | None = None, labels: str | Path | None = None) -> list[Doc]:
    """PIQA rows (``goal``, ``sol1``, ``sol2``) with their labels (0 or 1) from line N of the labels
    file (default: ``<stem>-labels.lst`` beside the data)."""
    path = Path(path)
    labels_path = Path(labels) if labels is not None else piqa_labels_path(path)
    if not labels_path.is_file():
        raise EvalError(f"PIQA labels file not found: {labels_path} (the labels are read from "
                        f"{piqa_labels_path(path).name} beside the data file)")
    label_lines = labels_path.read_text(encoding="utf-8").splitlines()
    docs = []
    for n, (lineno, row) in enumerate(_first_rows(path, "PIQA", limit)):
        cols = "goal, sol1, sol2"
        goal, sol1, sol2 = (_need_str(row, k, path, lineno, "PIQA", cols) for k in ("goal", "sol1", "sol2"))
        if n >= len(label_lines):
            raise EvalError(f"{labels_path} has {len(label_lines)} labels but {path} has more rows "
                            f"(row {n + 1} at line {lineno}); use the labels file of the same split")
        label = label_lines[n].strip()
        if label not in ("0", "1"):
            raise EvalError(f"{labels_path} line {n + 1}: label {label!r} is not 0 or 1")
        docs.append(Doc(id=str(lineno), contexts=[piqa_prompt(goal)],
                        continuations=[" " + sol1, " " + sol2], choices=[sol1, sol2], gold=int(label)))
    if limit is None and len(label_lines) > len(docs) and any(x.strip() for x in label_lines[len(docs):]):
        raise EvalError(f"{labels_path} has {len(label_lines)} labels but {path} has {len(docs)} rows; "
                        f"use the labels file of the same split")
    return docs


def load_winogrande(path: str | Path, limit: int | None = None) -> list[Doc]:
    """WinoGrande rows (``sentence`` with one ``_``, ``option1``, ``option2``, ``answer`` "1"/"2")
    as partial-scoring requests (:func:`winogrande_requests`)."""
    path = Path(path)
    docs = []
    cols = "sentence, option1, option2, answer"
    for lineno, row in _first_rows(path, "WinoGrande", limit):
        sentence, opt1, opt2 = (_need_str(row, k, path, lineno, "WinoGrande", cols)
                                for k in ("sentence", "option1", "option2"))
        if "_" not in sentence:
            raise EvalError(f"{path} line {lineno}: the sentence has no '_' blank to fill")
        answer = str(row.get("answer", "")).strip()
        if answer not in ("1", "2"):
            raise EvalError(f"{path} line {lineno}: answer {row.get('answer')!r} is not \"1\" or \"2\"")
        contexts, continuation = winogrande_requests(sentence, opt1, opt2)
        docs.append(Doc(id=str(row.get("qID", lineno)), contexts=contexts, continuations=[continuation],
                        choices=contexts, gold=int(answer) - 1))
    return docs


def load_lambada(path: str | Path, limit: int | None = None) -> list[Doc]:
    """LAMBADA rows (``text``): context and last word as :func:`lambada_split` cuts them."""
    path = Path(path)
    docs = []
    for lineno, row in _first_rows(path, "LAMBADA", limit):
        text = _need_str(row, "text", path, lineno, "LAMBADA", "text")
        if " " not in text.strip():
            raise EvalError(f"{path} line {lineno}: the text needs at least two words")
        context, continuation = lambada_split(text)
        docs.append(Doc(id=str(lineno), contexts=[context], continuations=[continuation]))
    return docs


# --------------------------------------------------------------------------- scoring


@dataclass
class _Item:
    """One scorer request in tokens: a context, its continuations, and per continuation how many
    leading tokens only extend the context (run, not scored)."""
    ctx: list[int]
    conts: list[list[int]]
    skips: list[int]


def _token_items(tokenizer, docs: Sequence[Doc]) -> tuple[list[_Item], list[list[tuple[int, int]]]]:
    """Tokenize every doc as lm-evaluation-harness does; returns the scorer items and, per doc and
    choice, the ``(item, continuation)`` slot holding its score.

    A doc with one context is one item. A doc with a context per choice (WinoGrande) becomes one
    item whose context is the token prefix its contexts share: each choice continues with the rest
    of its own context (not scored) and then the continuation, so the shared part runs once. The
    token sequences are exactly ``tokens(context_i) + continuation tokens``, as if run separately.
    """
    flat = [(ctx, [doc.continuations[0]]) if len(doc.contexts) > 1 else (ctx, doc.continuations)
            for doc in docs for ctx in doc.contexts]
    encoded = iter(encode_pairs(tokenizer, flat))
    items: list[_Item] = []
    slots: list[list[tuple[int, int]]] = []
    for doc in docs:
        if len(doc.contexts) == 1:
            ctx, conts = next(encoded)
            slots.append([(len(items), j) for j in range(len(conts))])
            items.append(_Item(ctx, conts, [0] * len(conts)))
            continue
        pairs = [next(encoded) for _ in doc.contexts]
        ctxs = [ctx for ctx, _ in pairs]
        shared = 0
        while all(shared < len(c) and c[shared] == ctxs[0][shared] for c in ctxs):
            shared += 1
        if shared == 0:  # nothing in common (a blank at the very start): score them apart
            slots.append([(len(items) + k, 0) for k in range(len(pairs))])
            items.extend(_Item(ctx, conts, [0]) for ctx, conts in pairs)
            continue
        slots.append([(len(items), j) for j in range(len(pairs))])
        items.append(_Item(ctxs[0][:shared], [ctx[shared:] + conts[0] for ctx, conts in pairs],
                           [len(ctx) - shared for ctx in ctxs]))
    return items, slots


def _fit_window(item: _Item, limit: int) -> _Item:
    """Drop context tokens from the left so context + the longest continuation fits the window
    (lm-evaluation-harness keeps the last max_length tokens of the sequence likewise)."""
    room = limit - max((len(c) for c in item.conts), default=0)
    if len(item.ctx) <= room:
        return item
    return _Item(item.ctx[-max(1, room):], item.conts, item.skips)


@torch.inference_mode()
def score_docs(model, tokenizer, docs: Sequence[Doc], *, batch_size: int = 32, progress: bool = False,
               desc: str = "scoring") -> list[list[tuple[float, bool]]]:
    """``(loglik, is_greedy)`` of every doc's choices (one per context for WinoGrande, the single
    continuation for LAMBADA): the continuation's summed log-probability, and whether every one of
    its tokens is the argmax.

    Items are sorted by context length and scored ``batch_size`` at a time by the shared scorer
    (each context run once, its KV cache expanded to the choices; a token prefix shared by a whole
    batch run once).
    """
    model.eval()
    items, slots = _token_items(tokenizer, docs)
    window = max_positions_of(model)
    items = [_fit_window(it, window) for it in items]
    lls = [[0.0] * len(it.conts) for it in items]
    greedy = [[True] * len(it.conts) for it in items]
    order = sorted(range(len(items)), key=lambda i: len(items[i].ctx), reverse=True)
    batches = list(chunks_of(order, batch_size))
    for batch in progress_bar(batches, total=len(batches), desc=desc, enabled=progress):
        any_skip = any(s for i in batch for s in items[i].skips)
        score_batch(model, [(items[i].ctx, items[i].conts) for i in batch], [lls[i] for i in batch],
                     True, greedy=[greedy[i] for i in batch],
                     skips=[items[i].skips for i in batch] if any_skip else None)
    return [[(lls[i][j], greedy[i][j]) for i, j in doc_slots] for doc_slots in slots]


def _argmax(values: Sequence[float]) -> int:
    # numpy's argmax: the first of equal maxima
    return max(range(len(values)), key=lambda k: (values[k], -k))


def item_scores(doc: Doc, scores: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """The per-item record: for multiple choice ``gold``, ``pred``, ``acc`` (and ``pred_norm``,
    ``acc_norm`` when the choices have lengths to divide by) and the choices' ``loglik``; for
    LAMBADA ``acc`` (greedy match) and ``loglik``."""
    lls = [ll for ll, _ in scores]
    if doc.gold is None:
        return {"id": doc.id, "acc": int(scores[0][1]), "loglik": lls[0]}
    pred = _argmax(lls)
    rec: dict[str, Any] = {"id": doc.id, "gold": doc.gold, "pred": pred, "acc": int(pred == doc.gold)}
    if len(doc.contexts) == 1:  # acc_norm: lm-eval divides by len(choice) in characters
        pred_norm = _argmax([ll / max(1, len(c)) for ll, c in zip(lls, doc.choices)])
        rec.update(pred_norm=pred_norm, acc_norm=int(pred_norm == doc.gold))
    rec["loglik"] = lls
    return rec


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); None below 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def aggregate(items: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """``{metric, metric_stderr, ..., n}`` over per-item records; ``perplexity`` is
    exp(-mean loglik) with the delta-method standard error."""
    out: dict[str, Any] = {"n": len(items)}
    for name in metrics:
        if name == "perplexity":
            lls = [float(it["loglik"]) for it in items]
            value = math.exp(-sum(lls) / len(lls)) if lls else float("nan")
            se = mean_stderr(lls)
            out["perplexity"], out["perplexity_stderr"] = value, None if se is None else value * se
        else:
            vals = [float(it[name]) for it in items]
            out[name] = sum(vals) / len(vals) if vals else float("nan")
            out[f"{name}_stderr"] = mean_stderr(vals)
    return out
