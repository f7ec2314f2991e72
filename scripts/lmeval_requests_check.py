"""Check, on every row of the five files, that lopt's requests are lm-evaluation-harness's.

    PYTHONPATH=src /work/lmeval-venv/bin/python scripts/lmeval_requests_check.py TASK_DIR

TASK_DIR is the output of ``scripts/lmeval_tasks.py``. For each task, lm-eval builds its zero-shot
requests (``fewshot_context`` + ``construct_requests``) from the file and the builtin task
definition, and lopt's loader reads the same file; the (context, continuation) strings and the
gold index must be identical for every row. With ``--tokens CKPT`` the token ids are compared too:
lm-eval's HFLM ``_encode_pair`` against the sequences lopt's scorer runs (context + unscored tokens,
scored tokens). No forward pass is run.
"""
from __future__ import annotations

import sys

from lm_eval.tasks import TaskManager

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


def lopt_requests(kind: str) -> list[tuple[list[tuple[str, str]], int | None]]:
    docs = suite.TASKS[kind].loader(suite.resolve_path(kind))
    out = []
    for d in docs:
        if len(d.contexts) > 1:
            args = [(c, d.continuations[0]) for c in d.contexts]
        else:
            args = [(d.contexts[0], cont) for cont in d.continuations]
        out.append((args, d.gold))
    return out


def token_mismatches(lm, kind: str) -> int:
    """Requests whose (context ids, continuation ids) differ between lm-eval and lopt."""
    docs = suite.TASKS[kind].loader(suite.resolve_path(kind))
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


def main(task_dir: str, ckpt: str | None = None) -> int:
    tm = TaskManager(include_path=task_dir)
    tasks = tm.load_task_or_group(list(LMEVAL_TASK.values()))
    bad = 0
    for kind, name in LMEVAL_TASK.items():
        theirs = lmeval_requests(tasks[name])
        ours = lopt_requests(kind)
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
            n = token_mismatches(lm, kind)
            print(f"{kind}: token ids {'identical' if n == 0 else f'differ in {n} requests'}")
            bad += bool(n)
    return 1 if bad else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    ckpt = None
    if "--tokens" in args:
        k = args.index("--tokens")
        ckpt = args[k + 1]
        del args[k: k + 2]
    sys.exit(main(args[0] if args else "/tmp/lmeval-tasks", ckpt))
