"""``retention-kl`` (needs ``--base``): the base model answers the built-in general prompts
(:mod:`lopt.prompts`) greedily; reported are the mean per-token KL(base || tuned) over those answers
and the tuned model's NLL on them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence
import torch
import torch.nn.functional as F

from lopt.eval.common import EvalError, chunks_of, model_device, pad_id_of, right_pad
from lopt.eval.generation import user_chat_prompt, generate_greedy
from lopt.prompts import general_prompts
from lopt.eval.tasks import Task, TaskRun, register
from lopt.eval.common import progress_bar


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

    prompts = list(prompts) if prompts is not None else general_prompts(limit)
    return generate_greedy(base, tokenizer, [user_chat_prompt(tokenizer, p) for p in prompts],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                           desc="base answers")


def pair_sequences(model, base, tokenizer, sequences, prompts, **gen) -> Sequence[tuple[list[int], list[int]]]:
    """Shared set-up of retention-kl and drift: both models in eval mode, checked to be comparable,
    and the base model's answers (unless given)."""
    model.eval()
    base.eval()
    _check_pair(model, base)
    return sequences if sequences is not None else base_continuations(base, tokenizer, prompts, **gen)


@torch.inference_mode()
def answer_logprobs(model, tokenizer, sequences: Sequence[tuple[list[int], list[int]]],
                     batch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One batch of ``sequences`` (indices ``batch``), right-padded: the model's float32 log-probabilities at the positions that predict an answer token
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


def retention_kl(model, base, tokenizer, *, sequences: Sequence[tuple[list[int], list[int]]] | None = None,
                 prompts: Sequence[str] | None = None, max_new_tokens: int = 48, batch_size: int = 8,
                 limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """How far the tuned ``model`` has moved from ``base`` on the base model's own answers.

    ``sequences`` are ``(prompt_ids, continuation_ids)`` (default: :func:`base_continuations`).
    ``kl`` is the mean over continuation tokens of KL(p_base || p_tuned) of the next-token
    distributions, in nats; ``nll`` is the tuned model's mean negative log-likelihood of the
    continuation tokens (``base_nll`` the base model's own, for scale).
    """
    sequences = pair_sequences(model, base, tokenizer, sequences, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, limit=limit, progress=progress)
    kl_sum = nll_sum = base_nll_sum = 0.0
    count = 0
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    batches = list(chunks_of(order, batch_size))
    for batch in progress_bar(batches, total=len(batches), desc="retention-kl", enabled=progress):
        lp_base, targets, _ = answer_logprobs(base, tokenizer, sequences, batch)
        lp_model, _, _ = answer_logprobs(model, tokenizer, sequences, batch)
        lp_base = lp_base.to(lp_model.device)
        targets = targets.to(lp_model.device)
        kl_sum += float((lp_base.exp() * (lp_base - lp_model)).sum())
        nll_sum -= float(lp_model.gather(1, targets[:, None]).sum())
        base_nll_sum -= float(lp_base.gather(1, targets[:, None]).sum())
        count += int(targets.numel())
    if count == 0:
        raise EvalError("retention-kl: the base model produced no continuation tokens")
    return {"kl": kl_sum / count, "nll": nll_sum / count, "ppl": math.exp(min(nll_sum / count, 50.0)),
            "base_nll": base_nll_sum / count, "tokens": count, "prompts": len(sequences),
            "max_new_tokens": max_new_tokens}


def base_answers(r: TaskRun) -> list[tuple[list[int], list[int]]]:
    """The base model's answers for this evaluate() call, computed once and shared (retention-kl, drift)."""
    if "base_answers" not in r.shared:
        r.shared["base_answers"] = base_continuations(r.base, r.base_tokenizer, max_new_tokens=r.kl_new_tokens,
                                                      batch_size=r.batch_size, limit=r.limit, progress=r.progress)
    return r.shared["base_answers"]


def _run_kl(r: TaskRun, arg: None) -> dict[str, Any]:
    res = retention_kl(r.model, r.base, r.base_tokenizer, sequences=base_answers(r), batch_size=r.batch_size,
                       progress=r.progress)
    return {**res, "max_new_tokens": r.kl_new_tokens}


register(Task("retention-kl", "retention-kl KL(base||tuned) on base answers to general prompts (needs --base)",
              arg="none", needs_base=True, run=_run_kl))
