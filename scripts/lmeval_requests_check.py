"""Check, on every row of the five files, that lopt's requests are lm-evaluation-harness's.

    python scripts/lmeval_requests_check.py TASK_DIR [--tokens CKPT] [--data-dir DATA_DIR]

TASK_DIR is the output of ``scripts/lmeval_tasks.py``. For each task, lm-eval builds its zero-shot
requests (``fewshot_context`` + ``construct_requests``) from the file and the builtin task
definition, and lopt's loader reads the same file; the (context, continuation) strings and the
gold index must be identical for every row. With ``--tokens CKPT`` the token ids are compared too:
lm-eval's HFLM ``_encode_pair`` against the sequences lopt's scorer runs (context + unscored tokens,
scored tokens). No forward pass is run. It needs lm_eval (``pip install -e ".[eval]"``); lopt reads
the files from DATA_DIR (default: $LOPT_DATA_DIR), which must be the folder TASK_DIR was made from.
"""
from __future__ import annotations

import argparse
import sys

from lopt.eval import benchmarks as bm
from lopt.eval import suite

LMEVAL_TASK = {"arc-easy": "lopt_arc_easy", "arc-challenge": "lopt_arc_challenge", "piqa": "lopt_piqa",
               "winogrande": "lopt_winogrande", "lambada": "lopt_lambada_openai"}


def lmeval_requests(task) -> list[tuple[list[tuple[str, str]], int | None]]:
    out = []
    for doc in task.eval_docs:
        ctx = task.fewshot_context(doc, num_fewshot=0)
        reqs = task.construct_requests(doc, ctx)
        reqs = reqs if isinstance(reqs, list) else [reqs]
        args = [tuple(r.arguments) for r in reqs]
        if task.OUTPUT_TYPE == "multiple_choice":
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        else:
            gold = None
        out.append((args, gold))
    return out


def lopt_requests(kind: str, data_dir: str | None = None) -> list[tuple[list[tuple[str, str]], int | None]]:
    docs = suite.TASKS[kind].loader(suite.resolve_path(kind, data_dir=data_dir))
    out = []
    for d in docs:
        if len(d.contexts) > 1:
            args = [(c, d.continuations[0]) for c in d.contexts]
        else:
            args = [(d.contexts[0], cont) for cont in d.continuations]
        out.append((args, d.gold))
    return out


def token_mismatches(lm, kind: str, data_dir: str | None = None) -> int:
    """Requests whose (context ids, continuation ids) differ between lm-eval and lopt."""
    docs = suite.TASKS[kind].loader(suite.resolve_path(kind, data_dir=data_dir))
    items, slots = bm._token_items(lm.tokenizer, docs)
    bad = 0
    for doc, doc_slots in zip(docs, slots):
        pairs = ([(c, doc.continuations[0]) for c in doc.contexts] if len(doc.contexts) > 1
                 else [(doc.contexts[0], c) for c in doc.continuations])
        for (ctx, cont), (i, j) in zip(pairs, doc_slots):
            it = items[i]
            ours = (it.ctx + it.conts[j][: it.skips[j]], it.conts[j][it.skips[j]:])
            bad += ours != tuple(lm._encode_pair(ctx, cont))
    return bad


def main(task_dir: str, ckpt: str | None = None, data_dir: str | None = None) -> int:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=task_dir)
    tasks = tm.load_task_or_group(list(LMEVAL_TASK.values()))
    bad = 0
    for kind, name in LMEVAL_TASK.items():
        theirs = lmeval_requests(tasks[name])
        ours = lopt_requests(kind, data_dir)
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        status = "identical" if not differ and len(ours) == len(theirs) else f"{len(differ)} differ"
        print(f"{kind}: {len(ours)} rows (lm-eval {len(theirs)}), requests and gold {status}")
        for i in differ[:3]:
            print("  row", i, "lopt", ours[i], "lm-eval", theirs[i])
        bad += bool(differ) or len(ours) != len(theirs)
    if ckpt:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=ckpt, dtype="float32", device="cpu")
        for kind in LMEVAL_TASK:
            n = token_mismatches(lm, kind, data_dir)
            print(f"{kind}: token ids {'identical' if n == 0 else f'differ in {n} requests'}")
            bad += bool(n)
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task_dir", help="the output of scripts/lmeval_tasks.py")
    p.add_argument("--tokens", metavar="CKPT", default=None, help="also compare token ids with this checkpoint's tokenizer")
    p.add_argument("--data-dir", default=None, help="the retention files' folder (default: $LOPT_DATA_DIR)")
    ns = p.parse_args()
    sys.exit(main(ns.task_dir, ns.tokens, ns.data_dir))
