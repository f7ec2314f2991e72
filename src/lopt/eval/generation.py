"""Generation tasks: ``gsm8k[:FILE]``, accuracy of greedy answers on GSM8K-style JSONL (``question``,
``answer`` ending in ``#### N``). The question is formatted with the chat template, decoding is
batched with left padding; the prediction is the number after ``####`` or, failing that, the last
number in the output. Default file: ``gsm8k/test.jsonl`` in the data folder (``--data-dir`` /
``$LOPT_DATA_DIR``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence
import torch

from lopt.eval.common import EvalError, chunks_of, model_device, encode_texts, eos_ids_of, max_positions_of, pad_id_of
from lopt.eval.tasks import Task, register
from lopt.eval.common import progress_bar, read_jsonl


# A number: an optional "$" and minus sign in either order ("-$5", "$-5"), then digits with optional
# thousands commas and decimals, or a bare decimal (".5"). A match may not start right after a letter,
# digit or point, so the hyphen in "5-3" or "x-1" is never read as a sign.
NUMBER_RE = re.compile(r"(?<![\w.])(?:\$\s?)?(-)?\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def extract_answer(text: str) -> float | None:
    """The numeric answer in a model output: the first number after the last ``####`` when there is
    one with a number after it, else the last number in the text; None when there is no number.
    Handles ``1,234``, ``-5``, ``3.75``, ``$12`` and trailing words or punctuation."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = NUMBER_RE.search(tail)
        if m:
            return _number_value(m)
    matches = list(NUMBER_RE.finditer(text))
    return _number_value(matches[-1]) if matches else None


def _number_value(m: re.Match) -> float:
    value = float(m.group(2).replace(",", ""))
    return -value if m.group(1) else value


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """GSM8K JSONL rows with a parsed numeric ``target`` (from the ``#### N`` line of ``answer``)."""
    path = Path(path)
    rows = []
    for lineno, row in read_jsonl(path):
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


def user_chat_prompt(tokenizer, user_text: str) -> str:
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
    device = model_device(model)
    encoded = encode_texts(tokenizer, prompts)
    room = max_positions_of(model) - max_new_tokens
    if room < 1:
        raise EvalError(f"max_new_tokens={max_new_tokens} leaves no room in the model's context")
    encoded = [ids[-room:] for ids in encoded]
    eos = eos_ids_of(model, tokenizer)
    pad = pad_id_of(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=eos or None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[tuple[list[int], list[int]]] = [([], [])] * len(encoded)
    batches = list(chunks_of(order, batch_size))
    for batch in progress_bar(batches, total=len(batches), desc=desc, enabled=progress):
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


def eval_gsm8k_file(model, tokenizer, path: Path, *, limit, batch_size, progress, max_new_tokens
                ) -> dict[str, Any]:
    rows = load_gsm8k(path, limit)
    outputs = generate_greedy(model, tokenizer, [user_chat_prompt(tokenizer, r["question"]) for r in rows],
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              progress=progress, desc="gsm8k")
    correct = unparseable = 0
    examples, items = [], []
    for i, (r, (_, new)) in enumerate(zip(rows, outputs)):
        text = tokenizer.decode(new, skip_special_tokens=True)
        pred = extract_answer(text)
        unparseable += pred is None
        ok = pred is not None and math.isclose(pred, r["target"], rel_tol=1e-9, abs_tol=1e-6)
        correct += ok
        items.append({"id": i, "acc": float(ok), "pred": pred})
        if len(examples) < 3:
            examples.append({"question": r["question"], "output": text, "pred": pred,
                             "target": r["target"], "correct": ok})
    n = len(rows)
    return {"acc": correct / n if n else 0.0, "correct": correct, "n": n, "unparseable": unparseable,
            "max_new_tokens": max_new_tokens, "examples": examples, "items": items}


register(Task("gsm8k", "gsm8k[:FILE] generation accuracy on GSM8K-style JSONL", default_data="gsm8k/test.jsonl",
              file_only=True, run=lambda r, path: eval_gsm8k_file(
                  r.model, r.tokenizer, path, limit=r.limit, batch_size=r.batch_size, progress=r.progress,
                  max_new_tokens=r.max_new_tokens)))
