"""Evaluation: task skill, retention of what the model knew, and representation drift.

``lopt eval --model M [--base B] --task KIND[:ARG] ...``. One module per task family, each
registering its kinds in ``lopt.eval.tasks``; ``runner`` runs any list of them, ``compare`` puts
several runs side by side. The log-likelihood engine shared by the families is ``scoring``; model
plumbing (batching, KV-cache reuse) is ``common``.
"""
from lopt.eval.common import EvalError
from lopt.eval.compare import add_compare_arguments, load_eval_record, run_compare_cli
from lopt.eval.drift import drift, linear_cka, read_boundaries
from lopt.eval.generation import extract_answer, generate_greedy, load_gsm8k
from lopt.eval.kl import base_continuations, retention_kl
from lopt.eval.multiple_choice import load_mc_jsonl, load_mmlu_redux, mmlu_prompt
from lopt.eval.perplexity import perplexity, task_loss
from lopt.eval.runner import add_eval_arguments, evaluate, run_eval_cli
from lopt.eval.scoring import mc_accuracy, mc_loglikelihoods
from lopt.eval.tasks import TASKS, check_tasks, parse_task

__all__ = [
    "EvalError", "TASKS", "parse_task", "check_tasks", "evaluate", "extract_answer",
    "mc_loglikelihoods", "mc_accuracy", "load_mc_jsonl", "load_mmlu_redux", "mmlu_prompt",
    "load_gsm8k", "generate_greedy", "perplexity", "task_loss", "base_continuations",
    "retention_kl", "drift", "linear_cka", "read_boundaries", "add_eval_arguments", "run_eval_cli",
    "add_compare_arguments", "run_compare_cli", "load_eval_record",
]
