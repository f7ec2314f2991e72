"""The log-likelihood engine of every scored task: the summed log-probability of continuations given a
context, tokenized as lm-evaluation-harness does.

A question's context is run once: its key/value cache is expanded to one row per choice and the
choices are scored as a batch continuing from it; the longest token prefix shared by a whole batch of
contexts (the MMLU preamble) is likewise run once.
"""
from __future__ import annotations

from typing import Sequence
import torch
import torch.nn.functional as F

from lopt.eval.common import (EvalError, cache_repeat, cache_take, chunks_of, model_device, encode_texts,
                              max_positions_of, run_rows)
from lopt.eval.common import progress_bar


def encode_pairs(tokenizer, requests: Sequence[tuple[str, Sequence[str]]]
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
    ctx_ids = encode_texts(tokenizer, ctx_texts)
    whole_ids = encode_texts(tokenizer, whole_texts)
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
    pairs = encode_pairs(tokenizer, requests)
    limit = max_positions_of(model)
    for i, (ctx, conts) in enumerate(pairs):
        room = limit - max((len(c) for c in conts), default=0)
        if len(ctx) > room:
            pairs[i] = (ctx[-max(1, room):], conts)
    results: list[list[float]] = [[0.0] * len(conts) for _, conts in pairs]
    greedy = [[True] * len(conts) for _, conts in pairs] if return_greedy else None
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]), reverse=True)
    batches = list(chunks_of(order, batch_size))
    for batch in progress_bar(batches, total=len(batches), desc=desc, enabled=progress):
        score_batch(model, [pairs[i] for i in batch], [results[i] for i in batch], share_prefix,
                     greedy=None if greedy is None else [greedy[i] for i in batch])
    if greedy is not None:
        return [list(zip(lls, gs)) for lls, gs in zip(results, greedy)]
    return results


# Continuation tokens scored per forward in the second (multi-token) pass: bounds the logits memory.
_CONT_TOKENS_PER_PASS = 2048


def score_batch(model, items: list[tuple[list[int], list[list[int]]]], out: list[list[float]],
                 share_prefix: bool, *, greedy: list[list[bool]] | None = None,
                 skips: list[list[int]] | None = None) -> None:
    """Fill ``out`` (one list per item) with the continuations' summed log-probabilities.

    ``greedy`` (shaped like ``out``), when given, is filled with whether every scored token is the
    argmax. ``skips`` (shaped like ``out``) gives, per continuation, a number of leading tokens that
    are run but not scored: they extend the context (WinoGrande's options, whose contexts differ
    after a shared prefix while the scored continuation is the same)."""
    device = model_device(model)
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
        _, past, past_mask = run_rows(model, [ctxs[0][:shared]], use_cache=True)
        past = cache_repeat(past, bsz)
        past_mask = past_mask.expand(bsz, -1)
        start = torch.full((bsz,), shared, dtype=torch.long)
    else:
        shared = 0

    # 2. The rest of each context, batched; its last logits score every first continuation token.
    last_logits, past, mask = run_rows(model, [c[shared:] for c in ctxs], past=past,
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
    for part in chunks_of(rows, per_pass):
        index = torch.tensor([r for r, _ in part])
        logits, _, _ = run_rows(model, [items[r][1][j][:-1] for r, j in part],
                                 past=cache_take(past, index.to(device)), past_mask=mask[index],
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


def join_choice(choice: str) -> str:
    # lm-evaluation-harness joins context and choice with one space (its target delimiter).
    return choice if choice[:1].isspace() else " " + choice
