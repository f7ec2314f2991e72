"""Command line: ``lopt train | demo | grpo | dpo | eval | compare | bench``, a thin layer over the
Python API."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from lopt.bench.plan import add_plan_arguments, run_plan_cli
from lopt.bench.runner import add_bench_arguments, run_bench_cli
from lopt.data import load_records
from lopt.engine.config import BADAM_ORDERS, CHECKPOINT_SCOPES, LoPTError, SCHEDULES
from lopt.eval.compare import add_compare_arguments, run_compare_cli
from lopt.eval.runner import add_eval_arguments, run_eval_cli
from lopt.methods import METHODS
from lopt.recipes import dpo, grpo
from lopt.recipes.dpo import DPORunConfig
from lopt.recipes.grpo import GRPORunConfig
from lopt.recipes.sft import TrainConfig, sample_answer, train
from lopt.runtime.loop import OPTIMIZERS
from lopt.runtime.preflight import check_output_dir


# Help for every training option; the flag is the field name with dashes (max_steps -> --max-steps).
TRAIN_HELP: dict[str, str] = {
    "model": "hub id, local checkpoint dir, .gguf file, or alias (qwen3-4b, qwen2.5-7b, qwen2.5-32b, "
             "llama3.1-8b); default: the embedded SmolLM2-135M-Instruct",
    "gguf_file": "GGUF file name inside --model (a directory or hub repo)",
    "dataset": "local .jsonl/.json/.parquet/.csv, a preset (gsm8k, metamathqa, alpaca, tulu3), a hub "
               "dataset id, or 'arithmetic' (embedded, offline)",
    "split": "dataset split",
    "data_dir": "local data folder for the gsm8k preset (DIR/gsm8k/SPLIT.jsonl) and the eval tasks' default "
                "files (default: $LOPT_DATA_DIR; with neither, presets come from the hub)",
    "limit": "use only the first N rows",
    "max_length": "truncate examples to this many tokens",
    "output_dir": "where checkpoints, metrics.jsonl and the final model go",
    "method": f"training method: {', '.join(METHODS)}",
    "num_blocks": "LoPT: number of blocks (2 = boundary at the midpoint)",
    "boundaries": "LoPT: explicit block starts as layer indices, e.g. 10 20 (overrides --num-blocks)",
    "lambda_aux": "LoPT: weight of the mean local reconstruction loss (default: 0 under --task-grad-every, as by "
                  "default; 10, the paper's, with --task-grad-every 0)",
    "schedule": f"LoPT backward schedule: {', '.join(SCHEDULES)} (blockwise frees lower activations early)",
    "chunked_ce": "compute the task loss in chunks of tokens, never the full logits tensor (exact)",
    "local_objective": "what the lower blocks learn: recon (reconstruct the block input, the paper's) or "
                       "anchor (keep the block output close to the frozen pretrained block's)",
    "lower_every": "update the lower blocks only every N-th step (their backward is skipped otherwise)",
    "task_grad_every": "LoPT: open the boundary every N-th step (steps 0, N, 2N, ...): the lower blocks then get the "
                       "task gradient (plus their local loss if --lambda-aux > 0), recomputed in the backward from "
                       "each layer's input; 0: never, the paper's pure local learning (default: 4 for --method "
                       "lopt, 0 with --pipeline; study v2 in docs/RESULTS.md says why). --lr-lower under it: --lr",
    "tied_head": "lopt / freeze-lower: keep a tied LM head tied to the input embedding (otherwise the boundary "
                 "unties it): the shared matrix trains with the last block, from the task loss only; saves the "
                 "head's copy, gradient and AdamW state (4 x vocab x hidden floats) (default: on for --method "
                 "lopt with --task-grad-every when the model ties its head, without --fsdp / --pipeline; "
                 "--no-tied-head turns it off)",
    "lisa_layers": "method lisa: decoder layers trained at a time (embeddings, final norm and LM head always train; "
                   "LMFlow's default 1)",
    "lisa_interval": "method lisa: steps before the trained layers are drawn again (LMFlow's default 20)",
    "badam_switch_every": "method badam: steps before the next block trains (LLaMA-Factory's example: 50)",
    "badam_order": "method badam: order of the blocks: ascending, descending, random",
    "badam_block_size": "method badam: decoder layers per block (LLaMA-Factory's layer mode: 1)",
    "lora_r": "LoRA rank (method lora)",
    "lora_alpha": "LoRA alpha (method lora)",
    "lr": "learning rate of the last block, final norm and LM head",
    "lr_lower": "learning rate of the lower blocks, embeddings and local heads (default: --lr / 10 under lopt, the study's finding; N x --lr under --task-grad-every N; = --lr for the other methods)",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps (overrides --epochs)",
    "epochs": "passes over the data when --max-steps is not given",
    "warmup_ratio": "fraction of steps with linear warm-up before the cosine decay",
    "max_grad_norm": "clip the global gradient norm (0 or none: no clipping; per block for LoPT's lower blocks "
                     "under the per-block step)",
    "per_block_step": "auto, on, off: step each lower block's optimizer right after its local backward, "
                      "freeing its gradients early (auto: on for blockwise LoPT without grad accumulation; "
                      "clipping is then per block)",
    "optimizer_in_backward": "step the last block's parameters inside the backward, each as soon as its gradient "
                             "is ready, and free that gradient: no gradient of the last block outlives its "
                             "backward. max_grad_norm then clips each parameter's gradient separately; needs "
                             "grad_accum 1, no fp16, one process",
    "optimizer": "adamw (PyTorch's, fused where possible) or adamw-8bit (bitsandbytes' blockwise 8-bit states: "
                 "a quarter of the optimizer memory)",
    "gradient_checkpointing": "layers that recompute their activations in the backward: off, all, last-block, "
                              "lower-blocks (all but the last block: the --pipeline's lower ranks have time to spare)",
    "selective_checkpointing": "layers (same choices) that keep their matrix-multiply and attention outputs and "
                               "recompute only the element-wise work: about half the activation memory for a few "
                               "percent of the time",
    "precision": "auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16, fp16 (with a grad scaler)",
    "device": "cpu, cuda, cuda:1, ... (default: cuda when available)",
    "seed": "random seed (data order, heads, dropout)",
    "log_every": "append to metrics.jsonl every N steps",
    "save_every": "write OUT/checkpoint-N every N steps",
    "save_total_limit": "keep only the newest N checkpoint-N dirs, deleting older ones once each new "
                        "checkpoint is complete (unset: keep all)",
    "save_only_model": "checkpoints hold the weights only, no optimizer or trainer state: smaller, but "
                       "they cannot be resumed (--resume skips them)",
    "resume": "continue from the newest complete checkpoint in --output-dir, skipping damaged ones (or "
              "from the given checkpoint dir); see docs/checkpoints.md",
    "tensorboard": "also log to OUT/tensorboard",
    "progress": "show a progress bar",
    "eval_every": "run --eval-tasks every N steps and at the end; results go to metrics.jsonl",
    "eval_tasks": "lopt eval task specs for --eval-every (default: task-loss on the training dataset's test split)",
    "eval_limit": "questions/examples per eval task during training",
    "sample_prompt": "a prompt the trained model answers in the summary",
    "trust_remote_code": "allow model repos to run their own code (off by default)",
    "fsdp": "multi-process (torchrun/accelerate launch): shard weights, gradients and optimizer state with "
            "FSDP2 (one unit per decoder layer) instead of replicating them",
    "pipeline": "multi-process: one LoPT block per process (WORLD_SIZE = number of blocks), all blocks "
                "computing at once; each process holds only its block",
}


RL_HELP: dict[str, str] = {
    **{k: v for k, v in TRAIN_HELP.items()},
    "output_dir": "where checkpoints, metrics.jsonl and the final model go",
    "lr": "learning rate of the last block, final norm and LM head",
    "batch_size": "sequences per micro-batch (grpo: completions; dpo: preference pairs)",
    "warmup_ratio": "fraction of steps with linear warm-up before the cosine decay",
    "max_grad_norm": "clip gradient norms (per block under LoPT, so the lower blocks' step never depends on "
                     "the task gradient; 0 or none: no clipping)",
    # grpo
    "task": "gsm8k (DIR/gsm8k/SPLIT.jsonl with --data-dir or $LOPT_DATA_DIR, else the hub), numinamath (hub: "
            "AI-MO/NuminaMath-TIR), or a file / hub dataset with a question column (question, problem, prompt, "
            "query) and a reference column (answer, solution, ...)",
    "answer_format": "how answers are checked: gsm8k (number after ####, else the last number), boxed (last "
                     "\\boxed{}), auto (from the task / the first reference)",
    "instruction": "text appended to every question (default: asks for '#### N' or \\boxed{} depending on "
                   "the answer format; '' for none)",
    "reward": "reward function, repeatable: accuracy, format (built-ins for the answer format) or "
              "module:function / file.py:function (TRL signature: fn(completions, answer, **kw) -> list[float])",
    "reward_weights": "one weight per --reward (default: 1 each)",
    "num_generations": "completions sampled per prompt (the GRPO group)",
    "max_prompt_length": "drop prompts longer than this many tokens (they are never cut)",
    "max_completion_length": "tokens generated per completion at most",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling threshold",
    "beta": "grpo: KL coefficient to the frozen base (0: no reference model); dpo: the DPO beta",
    "loss_type": "grpo: grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo; dpo: sigmoid, ipo, hinge, ...",
    "scale_rewards": "advantage scaling: group (std within a prompt's group), batch, none",
    "epsilon": "PPO-style clipping range of the importance ratio",
    "num_iterations": "optimisation passes over each generated batch (mu in the GRPO paper)",
    "steps_per_generation": "optimizer micro-steps served by one generation round (default: --grad-accum)",
    "use_vllm": "generate with vLLM (needs the vllm package and a GPU)",
    "log_completions": "also write the sampled completions to OUT/completions/*.parquet",
    # dpo
    "dataset": "preference data: a file or hub dataset with prompt/chosen/rejected (strings or chat messages), "
               "or synthetic-gsm8k[:PATH] (chosen = GSM8K reference solution, rejected = same solution with a "
               "wrong final answer; default file gsm8k/train.jsonl in --data-dir or $LOPT_DATA_DIR)",
    "max_length": "prompt + completion tokens at most (longer pairs are cut at the end)",
    "eval_dataset": "held-out preference pairs (same forms as --dataset), scored after the last step and every "
                    "--eval-every steps: eval loss, reward margin and accuracy go to metrics.jsonl",
    "eval_limit": "use the first N held-out pairs",
    "eval_every": "also evaluate every N steps (needs --eval-dataset)",
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    _add_options(p, TrainConfig, TRAIN_HELP)


# Flag types for the options whose default is None (the others take their default's type).
_OPTION_TYPES: dict[str, Any] = {"lr_lower": float, "lambda_aux": float, "max_steps": int, "limit": int,
                                 "save_every": int, "save_total_limit": int, "task_grad_every": int,
                                 "eval_every": int, "eval_limit": int, "max_prompt_length": int,
                                 "steps_per_generation": int, "max_length": int, "eval_dataset": str}
_OPTION_CHOICES: dict[str, Sequence[str]] = {
    "method": METHODS, "schedule": SCHEDULES,
    "gradient_checkpointing": CHECKPOINT_SCOPES, "selective_checkpointing": CHECKPOINT_SCOPES,
    "local_objective": ("recon", "anchor"), "per_block_step": ("auto", "on", "off"), "optimizer": OPTIMIZERS,
    "precision": ("auto", "fp32", "bf16", "fp16"), "answer_format": ("auto", "gsm8k", "boxed"),
    "scale_rewards": ("group", "batch", "none"), "badam_order": BADAM_ORDERS,
}


def _add_options(p: argparse.ArgumentParser, config_cls: type, helps: dict[str, str]) -> None:
    """One flag per field of the options dataclass ``config_cls`` (max_steps -> --max-steps), plus
    --config for a YAML file of the same options."""
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        text = helps.get(f.name, "")
        # A help that explains its default itself (lr_lower, lambda_aux: None = "depends") keeps it.
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": text if "(default:" in text else f"{text} (default: {default})"}
        if isinstance(default, bool) or f.name == "tied_head":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "boundaries":
            p.add_argument(flag, type=int, nargs="+", metavar="LAYER", **kw)
        elif f.name == "eval_tasks":
            p.add_argument(flag, nargs="+", metavar="TASK", **kw)
        elif f.name == "reward":
            p.add_argument(flag, action="append", metavar="REWARD", **kw)
        elif f.name == "reward_weights":
            p.add_argument(flag, type=float, nargs="+", metavar="WEIGHT", **kw)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", metavar="CHECKPOINT", **kw)
        elif f.name == "max_grad_norm":
            p.add_argument(flag, type=_optional_float, **kw)
        else:
            kw["type"] = _OPTION_TYPES.get(f.name, type(default) if default is not None else str)
            if f.name in _OPTION_CHOICES:
                kw["choices"] = _OPTION_CHOICES[f.name]
            p.add_argument(flag, **kw)
    p.add_argument("--config", dest="config_file", default=argparse.SUPPRESS,
                   help="YAML file with any of these options (keys as in the flags, dashes or underscores); "
                        "flags given on the command line override it")


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
    command-line flags."""
    names = [f.name for f in fields(config_cls)]
    values: dict[str, Any] = dict(defaults or {})
    cfg_file = getattr(ns, "config_file", None)
    if cfg_file:
        values.update(load_yaml_options(cfg_file, names, command))
    values.update({k: v for k, v in vars(ns).items() if k in names})
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
        # only when a local (auxiliary) loss was computed: the default recipe has none
        ("aux loss first -> last", first_last(s.get("aux_first"), s.get("aux_last"))),
        ("tokens/s (median)", opt(s.get("tokens_per_s"), "{:.0f}")),
        ("peak memory", opt(s.get("peak_mem_mb"), "{:.0f} MiB")),
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
                 "lr": 1e-4, "max_length": 256, "output_dir": "runs/demo", "warmup_ratio": 0.1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopt", description="Local-Learning Post-Training (LoPT) of Hugging Face causal LMs: a gradient "
        "boundary at the midpoint; the upper block learns the task, the lower block gets the task gradient "
        "every 4th step (--task-grad-every 0: only the paper's local reconstruction loss).")
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

    _add_options(sub.add_parser(
        "grpo", help="on-policy GRPO (TRL) with verifiable rewards, LoPT or a baseline",
        description="GRPO through TRL's GRPOTrainer: completions sampled from the current policy, scored by "
        "verifiable rewards; under LoPT the policy loss trains the last block and the lower blocks learn "
        "from their local loss. Every option can also be set in a YAML file given with --config."),
        GRPORunConfig, RL_HELP)
    _add_options(sub.add_parser(
        "dpo", help="DPO (TRL) against the frozen base model, LoPT or a baseline",
        description="DPO through TRL's DPOTrainer; the reference is the frozen base model. Under LoPT the "
        "DPO loss trains the last block and the lower blocks learn from their local loss. Every option "
        "can also be set in a YAML file given with --config."),
        DPORunConfig, RL_HELP)

    add_bench_arguments(sub.add_parser(
        "bench", help="memory and speed of training configurations side by side, each in a fresh process",
        description="Each configuration runs warm-up and timed training steps (AdamW included) in its own "
        "process; configurations are interleaved over repeats. Ratios are against the first configuration."))
    add_plan_arguments(sub.add_parser(
        "plan", help="predict the memory of each method before loading any weights",
        description="Weights, gradients, optimizer state, activations and the peak of every method x "
        "checkpointing scope, from the model's config on the meta device (no weights are loaded)."))
    add_eval_arguments(sub.add_parser("eval", help="task skill, retention and drift of a model"))
    add_compare_arguments(sub.add_parser("compare", help="eval results of several runs side by side"))
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
