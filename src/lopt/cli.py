"""Command line: ``lopt train | demo | eval | compare``, a thin layer over the Python API."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from .boundary import METHODS, SCHEDULES, LoPTError

# Help for every training option; the flag is the field name with dashes (max_steps -> --max-steps).
TRAIN_HELP: dict[str, str] = {
    "model": "hub id, local checkpoint dir, .gguf file, or alias (qwen3-4b, qwen2.5-7b, qwen2.5-32b, "
             "llama3.1-8b); default: the embedded SmolLM2-135M-Instruct",
    "gguf_file": "GGUF file name inside --model (a directory or hub repo)",
    "dataset": "local .jsonl/.json/.parquet/.csv, a preset (gsm8k, metamathqa, alpaca, tulu3), a hub "
               "dataset id, or 'arithmetic' (embedded, offline)",
    "split": "dataset split",
    "limit": "use only the first N rows",
    "max_length": "truncate examples to this many tokens",
    "output_dir": "where checkpoints, metrics.jsonl and the final model go",
    "method": f"training method: {', '.join(METHODS)}",
    "num_blocks": "LoPT: number of blocks (2 = boundary at the midpoint)",
    "boundaries": "LoPT: explicit block starts as layer indices, e.g. 10 20 (overrides --num-blocks)",
    "lambda_aux": "LoPT: weight of the mean local reconstruction loss",
    "schedule": f"LoPT backward schedule: {', '.join(SCHEDULES)} (blockwise frees lower activations early)",
    "chunked_ce": "compute the task loss in chunks of tokens, never the full logits tensor (exact)",
    "local_objective": "what the lower blocks learn: recon (reconstruct the block input, the paper's) or "
                       "anchor (keep the block output close to the frozen pretrained block's)",
    "lower_every": "update the lower blocks only every N-th step (their backward is skipped otherwise)",
    "lora_r": "LoRA rank (method lora)",
    "lora_alpha": "LoRA alpha (method lora)",
    "lr": "learning rate of the last block, final norm and LM head",
    "lr_lower": "learning rate of the lower blocks, embeddings and local heads (default: --lr)",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps (overrides --epochs)",
    "epochs": "passes over the data when --max-steps is not given",
    "warmup_ratio": "fraction of steps with linear warm-up before the cosine decay",
    "max_grad_norm": "clip the global gradient norm (0 or none: no clipping)",
    "per_block_step": "auto, on, off: step each lower block's optimizer right after its local backward, "
                      "freeing its gradients early (auto: on for blockwise LoPT without grad accumulation; "
                      "clipping is then per block)",
    "gradient_checkpointing": "recompute activations in the backward: off, all, last-block",
    "precision": "auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16, fp16 (with a grad scaler)",
    "device": "cpu, cuda, cuda:1, ... (default: cuda when available)",
    "seed": "random seed (data order, heads, dropout)",
    "log_every": "append to metrics.jsonl every N steps",
    "save_every": "write OUT/checkpoint-N every N steps",
    "resume": "continue from the latest checkpoint in --output-dir (or from the given checkpoint dir)",
    "tensorboard": "also log to OUT/tensorboard",
    "progress": "show a progress bar",
    "eval_every": "run --eval-tasks every N steps and at the end; results go to metrics.jsonl",
    "eval_tasks": "lopt eval task specs for --eval-every (default: task-loss on the training dataset's test split)",
    "eval_limit": "questions/examples per eval task during training",
    "sample_prompt": "a prompt the trained model answers in the summary",
    "trust_remote_code": "allow model repos to run their own code (off by default)",
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": f"{TRAIN_HELP.get(f.name, '')} (default: {default})"}
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "boundaries":
            p.add_argument(flag, type=int, nargs="+", metavar="LAYER", **kw)
        elif f.name == "eval_tasks":
            p.add_argument(flag, nargs="+", metavar="TASK", **kw)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", metavar="CHECKPOINT", **kw)
        elif f.name == "max_grad_norm":
            p.add_argument(flag, type=_optional_float, **kw)
        else:
            typ = {"lr_lower": float, "max_steps": int, "limit": int, "save_every": int, "eval_every": int,
                   "eval_limit": int}.get(
                f.name, type(default) if default is not None else str)
            kw["type"] = typ
            if f.name == "method":
                kw["choices"] = METHODS
            elif f.name == "schedule":
                kw["choices"] = SCHEDULES
            elif f.name == "gradient_checkpointing":
                kw["choices"] = ("off", "all", "last-block")
            elif f.name == "local_objective":
                kw["choices"] = ("recon", "anchor")
            elif f.name == "per_block_step":
                kw["choices"] = ("auto", "on", "off")
            elif f.name == "precision":
                kw["choices"] = ("auto", "fp32", "bf16", "fp16")
            p.add_argument(flag, **kw)
    p.add_argument("--config", dest="config_file", default=argparse.SUPPRESS,
                   help="YAML file with any of these options (keys as in the flags, dashes or underscores); "
                        "flags given on the command line override it")


def _optional_float(s: str) -> float | None:
    return None if s.lower() in ("0", "none", "off") else float(s)


def train_config_from_args(ns: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """Merge: dataclass defaults < ``defaults`` < YAML file < command-line flags."""
    from .train import TrainConfig

    values: dict[str, Any] = dict(defaults or {})
    cfg_file = getattr(ns, "config_file", None)
    if cfg_file:
        values.update(load_yaml_options(cfg_file, TrainConfig.field_names()))
    values.update({k: v for k, v in vars(ns).items() if k in TrainConfig.field_names()})
    return TrainConfig(**values)


def load_yaml_options(path: str, allowed: Sequence[str]) -> dict[str, Any]:
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
            raise LoPTError(f"{path}: unknown option {k!r}; see `lopt train --help` for the options")
        out[key] = v
    return out


# --------------------------------------------------------------------------- commands


def cmd_train(ns: argparse.Namespace, defaults: dict[str, Any] | None = None) -> int:
    from .train import sample_answer, train

    cfg = train_config_from_args(ns, defaults)
    t0 = time.perf_counter()
    result = train(cfg)
    s = result.summary
    answer = None
    prompt = cfg.sample_prompt
    if prompt is None and cfg.dataset == "arithmetic":
        from .data import load_records

        prompt = load_records("arithmetic", split="test", limit=1)[0]["question"]
    if prompt and not s["interrupted"]:
        answer = sample_answer(result.model, result.tokenizer, prompt, max_new_tokens=96)
    print_summary(s, time.perf_counter() - t0, prompt, answer)
    return 130 if s["interrupted"] else 0


def print_summary(s: dict[str, Any], seconds: float, prompt: str | None, answer: str | None) -> None:
    def f(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    rows = [
        ("method", f"{s['method']} (blocks {s['block_ranges']})"),
        ("steps", f"{s['steps']}/{s['total_steps']}" + (" (interrupted)" if s["interrupted"] else "")),
        ("task loss first -> last", f"{f(s['loss_first'])} -> {f(s['loss_last'])}"),
        ("aux loss first -> last", f"{f(s['aux_first'])} -> {f(s['aux_last'])}"),
        ("tokens/s (median)", f(s["tokens_per_s"], "{:.0f}")),
        ("peak memory", f(s["peak_mem_mb"], "{:.0f} MiB")),
        ("wall time", f"{seconds:.0f} s"),
        ("checkpoint", s["output_dir"]),
    ]
    w = max(len(r[0]) for r in rows)
    print("\n| " + "what".ljust(w) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")
    if prompt and answer is not None:
        print(f"\nheld-out prompt: {prompt}\nmodel answer:    {answer}")


DEMO_DEFAULTS = {"dataset": "arithmetic", "method": "lopt", "max_steps": 24, "batch_size": 8,
                 "lr": 1e-4, "lr_lower": 1e-5, "max_length": 256, "output_dir": "runs/demo",
                 "warmup_ratio": 0.1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopt", description="Local-Learning Post-Training (LoPT) of Hugging Face causal LMs: the "
        "upper block learns the task, the lower block only a local reconstruction loss.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="supervised post-training (SFT) with LoPT or a baseline",
                       description="Supervised post-training. Every option can also be set in a YAML "
                       "file given with --config; flags override it.")
    _add_train_options(p)
    p = sub.add_parser("demo", help="a short offline LoPT run of the embedded SmolLM2-135M-Instruct on "
                       "the embedded arithmetic set (CPU, a few minutes)",
                       description="The train command with demo defaults: "
                       + ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items()) + ". Any train option overrides them.")
    _add_train_options(p)
    from .bench import add_bench_arguments

    add_bench_arguments(sub.add_parser(
        "bench", help="memory and speed of training configurations side by side, each in a fresh process",
        description="Each configuration runs warm-up and timed training steps (AdamW included) in its own "
        "process; configurations are interleaved over repeats. Ratios are against the first configuration."))
    try:
        from .evaluate import add_compare_arguments, add_eval_arguments

        add_eval_arguments(sub.add_parser("eval", help="task skill, retention and drift of a model"))
        add_compare_arguments(sub.add_parser("compare", help="eval results of several runs side by side"))
    except ImportError:  # evaluation module not available
        pass
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        if ns.command == "train":
            return cmd_train(ns)
        if ns.command == "demo":
            return cmd_train(ns, DEMO_DEFAULTS)
        if ns.command == "bench":
            from .bench import run_bench_cli

            return run_bench_cli(ns)
        if ns.command == "eval":
            from .evaluate import run_eval_cli

            return run_eval_cli(ns)
        if ns.command == "compare":
            from .evaluate import run_compare_cli

            return run_compare_cli(ns)
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
