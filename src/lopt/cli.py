"""Command line: ``lopt train | demo | grpo | dpo | eval | compare | bench``, a thin layer over the
Python API."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from lopt.plan import add_plan_arguments, run_plan_cli
from lopt.bench.runner import add_bench_arguments, run_bench_cli
from lopt.config import config_yaml
from lopt.data import load_records
from lopt.engine.config import LoPTError
from lopt.eval.compare import add_compare_arguments, run_compare_cli
from lopt.eval.runner import add_eval_arguments, run_eval_cli
from lopt.recipes import dpo, grpo
from lopt.recipes.dpo import DPORunConfig
from lopt.recipes.grpo import GRPORunConfig
from lopt.recipes.sft import TrainConfig, sample_answer, train
from lopt.recipes.study.command import StudyOptions, study_command
from lopt.parallel.context import exit_worker, launched_distributed
from lopt.runtime.preflight import check_output_dir
from lopt.runtime.resume_options import resume_options


# --help's sections in this order; a method's own options ("method: NAME") follow the boundary's.
_GROUP_ORDER = ("what to train", "method", "method: the boundary (lopt, freeze-lower)", "method: *", "grpo", "dpo",
                "optimisation", "memory", "several processes", "evaluation", "bookkeeping", "other")


def _group_rank(name: str) -> int:
    if name in _GROUP_ORDER:
        return _GROUP_ORDER.index(name)
    return _GROUP_ORDER.index("method: *") if name.startswith("method: ") else len(_GROUP_ORDER)


def add_config_arguments(p: argparse.ArgumentParser, config_cls: type,
                         defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of the options dataclass ``config_cls`` (max_steps -> --max-steps), its help
    and argparse settings from the field's metadata (``lopt.engine.config.option``), in ``--help``
    sections; plus --config for a YAML file of the same options. ``defaults``: the command's own
    defaults where they differ from the dataclass's (``lopt demo``), shown in ``--help``."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    declared = [f for f in fields(config_cls) if f.metadata.get("cli", True)]
    for f in sorted(declared, key=lambda f: _group_rank(f.metadata.get("group", "other"))):
        meta = f.metadata
        group_name = meta.get("group", "other")
        if group_name not in groups:
            groups[group_name] = p.add_argument_group(group_name)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
        text = meta.get("help", "")
        if defaults and f.name in defaults:  # this command's default, said instead of the dataclass's
            default = defaults[f.name]
            text = text.split(" (default:")[0].split("; default:")[0]
        # A help that explains its default itself (lr_lower, lambda_aux: None = "depends") keeps it.
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": text if "default:" in text else f"{text} (default: {default})"}
        for key in ("choices", "nargs", "metavar", "const"):
            if key in meta:
                kw[key] = meta[key]
        if "bool" in str(f.type):
            groups[group_name].add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "action" in meta:
            kw["action"] = meta["action"]
        kind = meta.get("type", type(default) if default is not None and not isinstance(default, list) else str)
        kw["type"] = {"optional_float": _optional_float, "batch_size": _batch_size}.get(kind, kind)
        groups[group_name].add_argument(flag, **kw)
    p.add_argument("--config", dest="config_file", default=argparse.SUPPRESS,
                   help="YAML file with any of these options (keys as in the flags, dashes or underscores); "
                        "flags given on the command line override it")
    p.add_argument("--print-config", action="store_true", default=False,
                   help="print the options as a YAML file for --config (defaults < --config < flags) and exit")


def _batch_size(s: str) -> int | str:
    """``--batch-size``: a number, or ``auto`` (lopt train: the largest that fits, from lopt plan)."""
    return "auto" if s.strip().lower() == "auto" else int(s)


def _optional_float(s: str) -> float | None:
    if s.lower() in ("none", "off"):
        return None
    value = float(s)
    return None if value == 0 else value


def train_config_from_args(ns: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """Merge: dataclass defaults < ``defaults`` < YAML file < command-line flags."""
    return config_from_args(ns, TrainConfig, defaults)


def config_from_args(ns: argparse.Namespace, config_cls: type, defaults: dict[str, Any] | None = None,
                     command: str = "train"):
    """An options dataclass from the parsed flags: dataclass defaults < ``defaults`` < YAML file <
    command-line flags. With ``--resume``, the options the run recorded take the place of every one
    not given in the YAML file or the flags (``lopt.runtime.resume_options``)."""
    names = [f.name for f in fields(config_cls)]
    values: dict[str, Any] = dict(defaults or {})
    given: dict[str, Any] = {}
    cfg_file = getattr(ns, "config_file", None)
    if cfg_file:
        given.update(load_yaml_options(cfg_file, names, command))
    given.update({k: v for k, v in vars(ns).items() if k in names})
    values.update(given)
    if values.get("resume"):
        values = resume_options(config_cls, values, set(given), command)
    return config_cls(**values)


def load_yaml_options(path: str, allowed: Sequence[str], command: str = "train") -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LoPTError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LoPTError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise LoPTError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in allowed:
            raise LoPTError(f"{path}: unknown option {k!r}; see `lopt {command} --help` for the options")
        out[key] = v
    return out


# --------------------------------------------------------------------------- commands


def cmd_train(ns: argparse.Namespace, defaults: dict[str, Any] | None = None) -> int:
    cfg = train_config_from_args(ns, defaults)
    t0 = time.perf_counter()
    result = train(cfg)
    s = result.summary
    if s.get("rank", 0) != 0:  # multi-process run: rank 0 reports
        return 130 if s["interrupted"] else 0
    answer = None
    prompt = cfg.sample_prompt
    if prompt is None and cfg.dataset == "arithmetic":

        prompt = load_records("arithmetic", split="test", limit=1)[0]["question"]
    # Under --fsdp / --pipeline rank 0 does not hold the whole model: the sample is left out.
    if prompt and not s["interrupted"] and not (cfg.fsdp or cfg.pipeline):
        answer = sample_answer(result.model, result.tokenizer, prompt, max_new_tokens=96)
    print_summary(s, time.perf_counter() - t0, prompt, answer)
    return 130 if s["interrupted"] else 0


def retention_row(r: dict[str, Any] | None, seconds: float) -> str | None:
    """The summary's retention row: the last retention KL, what it means, and what measuring it cost."""
    if not r or r.get("kl") is None:
        return None
    suite = "; ".join(f"{k} {v['score']:.3f} ({v['change']:+.3f})" for k, v in (r.get("suite") or {}).items())
    return (f"{r['kl']:.4g} at step {r['step']}: how far the model's answers to general prompts moved from the base "
            f"model's (0 = unchanged)" + (f"; {suite}" if suite else "")
            + f"; measuring it took {r['seconds']:.1f} s" + (f" ({100 * r['seconds'] / seconds:.1f}% of the run)"
                                                            if seconds > 0 else ""))


def print_summary(s: dict[str, Any], seconds: float, prompt: str | None, answer: str | None) -> None:
    def f(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    def first_last(a, b):
        return None if a is None and b is None else f"{f(a)} -> {f(b)}"

    def opt(x, fmt):
        return None if x is None else fmt.format(x)

    rows = [
        ("method", f"{s['method']} (blocks {s['block_ranges']})"),
        ("steps", f"{s['steps']}/{s['total_steps']}" + (" (interrupted)" if s["interrupted"] else "")),
        ("task loss first -> last", first_last(s.get("loss_first"), s.get("loss_last"))),
        ("held-out eval (last)", "; ".join(f"{k} {f(v['loss'])} ({v.get('split')}, n {v['n']})"
                                           for k, v in (s.get("eval") or {}).items()
                                           if isinstance(v, dict) and "loss" in v and "n" in v) or None),
        # only when a local (auxiliary) loss was computed: the default recipe has none
        ("aux loss first -> last", first_last(s.get("aux_first"), s.get("aux_last"))),
        ("tokens/s (median)", opt(s.get("tokens_per_s"), "{:.0f}")),
        ("peak memory", opt(s.get("peak_mem_mb"), "{:.0f} MiB")),
        ("retention KL (general prompts)", retention_row(s.get("retention"), seconds)),
        ("wall time", f"{seconds:.0f} s"),
        ("checkpoint", s.get("output_dir") or None),
    ]
    rows = [(k, v) for k, v in rows if v is not None]  # only the rows that apply
    w = max(len(r[0]) for r in rows)
    print("\n| " + "what".ljust(w) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")
    if prompt and answer is not None:
        print(f"\nheld-out prompt: {prompt}\nmodel answer:    {answer}")


def cmd_grpo(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns, GRPORunConfig, command="grpo")
    check_output_dir(cfg.output_dir)
    return grpo.cmd_grpo(cfg)


def cmd_dpo(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns, DPORunConfig, command="dpo")
    check_output_dir(cfg.output_dir)
    return dpo.cmd_dpo(cfg)


DEMO_DEFAULTS = {"dataset": "arithmetic", "method": "lopt", "max_steps": 24, "batch_size": 8,
                 "lr": 1e-4, "max_length": 256, "output_dir": "runs/demo", "warmup_ratio": 0.1,
                 # the demo shows the retention KL, on a small probe (4 prompts x 16 tokens) to stay quick
                 "retention": "kl", "retention_prompts": 4, "retention_new_tokens": 16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopt", description="Local-Learning Post-Training (LoPT) of Hugging Face causal LMs: a gradient "
        "boundary at the midpoint; the upper block learns the task, the lower block gets the task gradient "
        "every 4th step (--task-grad-every 0: only the paper's local reconstruction loss).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="supervised post-training (SFT) with LoPT or a baseline",
                       description="Supervised post-training. Every option can also be set in a YAML "
                       "file given with --config; flags override it.")
    add_config_arguments(p, TrainConfig)
    p = sub.add_parser("demo", help="a short offline LoPT run of the embedded SmolLM2-135M-Instruct on "
                       "the embedded arithmetic set (CPU, a few minutes)",
                       description="The train command with demo defaults: "
                       + ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items()) + ". Any train option overrides them.")
    add_config_arguments(p, TrainConfig, DEMO_DEFAULTS)

    add_config_arguments(sub.add_parser(
        "grpo", help="on-policy GRPO (TRL) with verifiable rewards, LoPT or a baseline",
        description="GRPO through TRL's GRPOTrainer: completions sampled from the current policy, scored by "
        "verifiable rewards; under LoPT the policy loss trains the last block and the lower blocks learn "
        "from their local loss. Every option can also be set in a YAML file given with --config."),
        GRPORunConfig)
    add_config_arguments(sub.add_parser(
        "dpo", help="DPO (TRL) against the frozen base model, LoPT or a baseline",
        description="DPO through TRL's DPOTrainer; the reference is the frozen base model. Under LoPT the "
        "DPO loss trains the last block and the lower blocks learn from their local loss. Every option "
        "can also be set in a YAML file given with --config."),
        DPORunConfig)

    add_bench_arguments(sub.add_parser(
        "bench", help="memory and speed of training configurations side by side, each in a fresh process",
        description="Each configuration runs warm-up and timed training steps (AdamW included) in its own "
        "process; configurations are interleaved over repeats. Ratios are against the first configuration."))
    add_plan_arguments(sub.add_parser(
        "plan", help="predict the memory of each method before loading any weights",
        description="Weights, gradients, optimizer state, activations and the peak of every method x "
        "checkpointing scope, from the model's config on the meta device (no weights are loaded)."))
    add_config_arguments(sub.add_parser(
        "study", help="which method, on your model and data: a learning-rate sweep per method, runs at 1-3 rates, "
        "held-out loss, retention and cost, retention at matched task skill, a report (resumable)",
        description="Compare post-training methods on a model and dataset (lopt.recipes.study.command). Every "
        "finished piece is recorded under --output-dir/results; run it again to resume. Every option can also "
        "be set in a YAML file given with --config."), StudyOptions)
    add_eval_arguments(sub.add_parser("eval", help="task skill, retention and drift of a model"))
    add_compare_arguments(sub.add_parser("compare", help="eval results of several runs side by side"))
    return parser


def print_config(ns: argparse.Namespace) -> int:
    """``--print-config``: the command's resolved options as YAML."""
    config_cls = {"train": TrainConfig, "demo": TrainConfig, "grpo": GRPORunConfig, "dpo": DPORunConfig,
                  "study": StudyOptions}[ns.command]
    defaults = DEMO_DEFAULTS if ns.command == "demo" else None
    print(config_yaml(config_from_args(ns, config_cls, defaults, command=ns.command)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lopt ...``: run one command; the exit status. Run as a program (no ``argv``) by a launcher
    (torchrun, accelerate launch), the worker process ends through ``exit_worker``."""
    code = _run(argv)
    if argv is None and launched_distributed():
        exit_worker(code)
    return code


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(ns, "print_config", False):
            return print_config(ns)
        if ns.command == "train":
            return cmd_train(ns)
        if ns.command == "demo":
            return cmd_train(ns, DEMO_DEFAULTS)
        if ns.command == "grpo":
            return cmd_grpo(ns)
        if ns.command == "dpo":
            return cmd_dpo(ns)
        if ns.command == "bench":
            return run_bench_cli(ns)
        if ns.command == "eval":
            return run_eval_cli(ns)
        if ns.command == "compare":
            return run_compare_cli(ns)
        if ns.command == "plan":
            return run_plan_cli(ns)
        if ns.command == "study":
            return study_command(config_from_args(ns, StudyOptions, command="study"))
    except (LoPTError, ValueError, FileNotFoundError) as e:
        # Our errors (LoPTError, DataError, ModelError, EvalError) are one clear line: no stack trace.
        if not _is_lopt_error(e):
            raise
        print(f"lopt {ns.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {ns.command}")
    return 2


def _is_lopt_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("lopt.") or isinstance(e, LoPTError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
