"""``lm-eval:TASK[,TASK...]``: lm-evaluation-harness tasks on the in-memory model, when ``lm_eval`` is
installed (``pip install 'lopt[eval]'``).
"""
from __future__ import annotations

import math
from typing import Any

from lopt.eval.common import EvalError
from lopt.eval.tasks import Task, register


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


register(Task("lm-eval", "lm-eval:TASK[,TASK...] lm-evaluation-harness tasks (needs lopt[eval])", arg="required",
              run=lambda r, arg: _eval_lm_eval(r.model, r.tokenizer, arg, limit=r.limit, batch_size=r.batch_size)))
