"""``lopt grpo``: on-policy GRPO with TRL's ``GRPOTrainer`` and verifiable rewards, any lopt method.

    from lopt.grpo import GRPORunConfig, grpo
    result = grpo(GRPORunConfig(task="gsm8k", method="lopt", max_steps=10, num_generations=4))

Completions are sampled from the current policy every step; the rewards (``lopt.rewards``) score
them; TRL's GRPO loss trains the last block (LoPT: through the gradient boundary only), while the
lower blocks learn from their local loss alone (see ``lopt.integrations.trl`` for how LoPT runs inside TRL).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopt.config import check_held_out
from lopt.data import DataError, chat_prompt, has_test_split, hold_out, load_records, local_preset, val_size_arg
from lopt.engine.config import LoPTError, option
from lopt.recipes.trl_bridge import (RLConfig, RLResult, RunState, load_and_wrap, make_trainer, prepare_trainer,
                                     resolve_resume, run_command, train_and_finish, trl_common_args)
from lopt.rewards import (ANSWER_FORMATS, RewardError, boxed_reference, extract_boxed, gsm8k_answer,
                          math_value, normalize_math_answer, resolve_rewards)
from lopt.runtime.loop import resolve_device, set_seed


NUMINAMATH = "AI-MO/NuminaMath-TIR"  # problem / solution (with \boxed{}) / messages
TASKS = {"gsm8k": "gsm8k", "numinamath": "boxed"}  # preset -> answer format
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
PROMPT_COLUMNS = ("question", "problem", "prompt", "query", "instruction")
REFERENCE_COLUMNS = ("answer", "solution", "response", "output", "completion")
INSTRUCTIONS = {
    "gsm8k": "Solve the problem step by step. Then write the final answer as a number on its own "
             "last line, after '#### '.",
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
}
HEADLINE = {"reward": "reward", "kl": "kl"}
_GRPO, _RUN = "grpo", "bookkeeping"


@dataclass
class GRPORunConfig(RLConfig):
    """Every option of ``lopt grpo`` (the shared ones are ``RLConfig``'s)."""

    output_dir: str = option("runs/grpo", "where checkpoints, metrics.jsonl and the final model go", group=_RUN)
    task: str = option(
        "gsm8k", "gsm8k (DIR/gsm8k/SPLIT.jsonl with --data-dir or $LOPT_DATA_DIR, else the hub), numinamath (hub: "
        "AI-MO/NuminaMath-TIR), or a file / hub dataset with a question column (question, problem, prompt, query) "
        "and a reference column (answer, solution, ...)", group=_GRPO)
    answer_format: str = option(
        "auto", "how answers are checked: gsm8k (number after ####, else the last number), boxed (last "
        "\\boxed{}), auto (from the task / the first reference)", choices=("auto", *ANSWER_FORMATS), group=_GRPO)
    instruction: str | None = option(
        None, "text appended to every question (default: asks for '#### N' or \\boxed{} depending on the answer "
        "format; '' for none)", group=_GRPO)
    reward: list[str] = option(
        help="reward function, repeatable: accuracy, format (built-ins for the answer format) or module:function / "
        "file.py:function (TRL signature: fn(completions, answer, **kw) -> list[float])",
        factory=lambda: ["accuracy", "format"], action="append", metavar="REWARD", group=_GRPO)
    reward_weights: list[float] | None = option(None, "one weight per --reward (default: 1 each)", type=float,
                                                nargs="+", metavar="WEIGHT", group=_GRPO)
    num_generations: int = option(4, "completions sampled per prompt (the GRPO group)", group=_GRPO)
    batch_size: int | None = option(
        None, "completions per micro-batch (default: --num-generations, one prompt's group; batch_size x "
        "steps_per_generation must be a multiple of it); auto: the largest that fits the device's free memory",
        type="batch_size", group="optimisation")
    max_prompt_length: int | None = option(512, "drop prompts longer than this many tokens (they are never cut)",
                                           type=int, group=_GRPO)
    max_completion_length: int = option(256, "tokens generated per completion at most", group=_GRPO)
    temperature: float = option(1.0, "sampling temperature", group=_GRPO)
    top_p: float = option(1.0, "nucleus sampling threshold", group=_GRPO)
    beta: float = option(0.04, "KL coefficient to the frozen base (0: no reference model)", group=_GRPO)
    loss_type: str = option("dapo", f"GRPO loss: {', '.join(LOSS_TYPES)}", group=_GRPO)
    scale_rewards: str = option("group", "advantage scaling: group (std within a prompt's group), batch, none",
                                choices=("group", "batch", "none"), group=_GRPO)
    epsilon: float = option(0.2, "PPO-style clipping range of the importance ratio", group=_GRPO)
    num_iterations: int = option(1, "optimisation passes over each generated batch (mu in the GRPO paper)",
                                 group=_GRPO)
    steps_per_generation: int | None = option(
        None, "optimizer micro-steps served by one generation round (default: --grad-accum)", type=int, group=_GRPO)
    use_vllm: bool = option(False, "generate with vLLM (needs the vllm package and a GPU)", group=_GRPO)
    log_completions: bool = option(False, "also write the sampled completions to OUT/completions/*.parquet",
                                   group=_GRPO)
    # held-out evaluation: completions sampled for held-out questions, scored by the rewards (TRL's eval)
    eval_every: int | None = option(
        None, "evaluate every N steps and after the last (the --val-size rows or --eval-dataset; with neither, "
        "the task's own test split, e.g. gsm8k's): rewards of held-out prompts go to metrics.jsonl", type=int,
        group="evaluation")
    eval_dataset: str | None = option(
        None, "held-out questions (same forms as --task; a preset's test split), scored after the last step and "
        "every --eval-every steps", group="evaluation")
    val_size: int | float | None = option(
        None, "take N questions (8) or a fraction of them (0.1) out of --task, chosen with --seed, and score them "
        "after the last step and every --eval-every steps", type=val_size_arg, metavar="N|FRACTION",
        group="evaluation")
    eval_limit: int | None = option(32, "use the first N held-out questions of --eval-dataset or the test split "
                                        "(the --val-size rows are all scored)", type=int, group="evaluation")

    def __post_init__(self) -> None:
        # No --batch-size: one group per micro-batch, which every --num-generations divides (said in one
        # line when the run starts).
        self.batch_size_from_generations = self.batch_size is None
        if self.batch_size is None:
            self.batch_size = self.num_generations
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check_held_out(self)
        if self.answer_format not in ("auto", *ANSWER_FORMATS):
            raise LoPTError(f"answer_format must be auto, gsm8k or boxed, got {self.answer_format!r}")
        if self.num_generations < 2:
            raise LoPTError(f"num_generations must be >= 2 (GRPO compares completions of one prompt), "
                            f"got {self.num_generations}")
        per_generation = self.batch_size * (self.steps_per_generation or self.grad_accum)
        if per_generation % self.num_generations:
            raise LoPTError(f"batch_size x steps_per_generation ({per_generation} completions per generation "
                            f"round) must be a multiple of num_generations ({self.num_generations})")
        if self.loss_type not in LOSS_TYPES:
            raise LoPTError(f"unknown loss_type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise LoPTError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise LoPTError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        if self.beta < 0:
            raise LoPTError(f"beta must be >= 0, got {self.beta}")
        if self.max_completion_length < 1 or (self.max_prompt_length is not None and self.max_prompt_length < 1):
            raise LoPTError("max_completion_length and max_prompt_length must be >= 1")
        if self.num_iterations < 1:
            raise LoPTError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise LoPTError(f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards "
                            f"({', '.join(self.reward)}): give one weight per --reward")
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            raise LoPTError("use_vllm needs the vllm package (pip install vllm, CUDA only); drop --use-vllm "
                            "to generate with transformers")


# --------------------------------------------------------------------------- data


def load_task(task: str, split: str = "train", limit: int | None = None, answer_format: str = "auto",
              data_dir: str | Path | None = None) -> tuple[list[dict[str, str]], str, dict[str, Any]]:
    """Questions and reference answers of a GRPO task.

    ``task`` is ``gsm8k`` (``DIR/gsm8k/{split}.jsonl`` when a data folder is given, ``data_dir`` or
    ``$LOPT_DATA_DIR``, else the hub's openai/gsm8k; see :func:`lopt.data.data_dir`), ``numinamath``
    (hub: AI-MO/NuminaMath-TIR) or a file / hub dataset id with a question column (question, problem,
    prompt, query, instruction) and a reference column (answer, solution, response, output,
    completion). Returns ``(rows, answer_format, stats)`` where a row is
    ``{'question', 'answer'}``, ``answer`` being the reference *final* answer (a number for gsm8k,
    the boxed expression for boxed). Rows whose reference has no final answer are dropped (counted).
    """
    source = NUMINAMATH if task == "numinamath" else task
    if task == "gsm8k":  # the data folder's file when one is given (named in the stats), else the hub
        local = local_preset("gsm8k", split, data_dir)
        source = str(local) if local is not None else source
    records = load_records(source, split=split, limit=limit, data_dir=data_dir)
    cols = set(records[0])
    q_col = next((c for c in PROMPT_COLUMNS if c in cols), None)
    a_col = next((c for c in REFERENCE_COLUMNS if c in cols), None)
    if q_col is None or a_col is None:
        raise DataError(f"{source}: GRPO needs a question column ({', '.join(PROMPT_COLUMNS)}) and a reference "
                        f"column ({', '.join(REFERENCE_COLUMNS)}); found {sorted(cols)}")
    fmt = answer_format
    if fmt == "auto":
        fmt = TASKS.get(task) or _guess_format(str(records[0][a_col]))
    rows, dropped = [], 0
    for r in records:
        question, ref = r.get(q_col), r.get(a_col)
        if not isinstance(question, str) or not question.strip() or ref is None:
            dropped += 1
            continue
        final = _final_answer(str(ref), fmt)
        if final is None:
            dropped += 1
            continue
        rows.append({"question": question.strip(), "answer": final})
    if not rows:
        raise DataError(f"{source}: no row has a usable question and final answer ({fmt} format; "
                        f"reference column '{a_col}'); check --answer-format")
    return rows, fmt, {"source": source, "rows": len(rows), "dropped_no_answer": dropped,
                       "question_column": q_col, "answer_column": a_col, "answer_format": fmt}


def _guess_format(reference: str) -> str:
    if "####" in reference:
        return "gsm8k"
    if "\\boxed" in reference or "\\fbox" in reference:
        return "boxed"
    return "gsm8k" if math_value(normalize_math_answer(reference)) is not None else "boxed"


def _final_answer(reference: str, fmt: str) -> str | None:
    if fmt == "gsm8k":
        value = gsm8k_answer(reference)
        if value is None:
            return None
        return str(int(value)) if float(value).is_integer() else repr(value)
    if "\\boxed" in reference or "\\fbox" in reference:  # a solution: its last complete box, if any
        boxed = extract_boxed(reference)
        return (boxed.strip() or None) if boxed is not None else None
    return boxed_reference(reference).strip() or None  # the column holds just the answer


def build_prompts(rows: list[dict[str, str]], tokenizer, instruction: str | None,
                  max_prompt_length: int | None) -> tuple[list[dict[str, Any]], int]:
    """TRL rows ``{'prompt', 'answer'}``: the question (plus the instruction) as one user turn
    (chat messages when the tokenizer has a chat template, else lopt's plain prompt format). Rows
    whose prompt is longer than ``max_prompt_length`` tokens are dropped (a cut question would be a
    different question); returns (rows, number dropped)."""
    out, dropped = [], 0
    chat = bool(getattr(tokenizer, "chat_template", None))
    for r in rows:
        text = r["question"] + (f"\n\n{instruction}" if instruction else "")
        if chat:
            prompt: Any = [{"role": "user", "content": text}]
            rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            prompt = rendered = chat_prompt(tokenizer, text)
        if max_prompt_length is not None:
            if len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) > max_prompt_length:
                dropped += 1
                continue
        out.append({"prompt": prompt, "answer": r["answer"]})
    return out, dropped


# --------------------------------------------------------------------------- the trainer


@functools.cache
def _trainer_class():
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model


    class RefGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer with a given frozen reference model."""

        def __init__(self, *, ref_model=None, **kwargs):
            args = kwargs["args"]
            beta = args.beta
            if ref_model is not None:
                # GRPOTrainer would load its reference from the model config's path (impossible for a
                # GGUF-loaded or in-memory model); it gets the frozen base taken before wrapping instead.
                args.beta = 0.0
            try:
                super().__init__(**kwargs)
            finally:
                args.beta = beta
            if ref_model is not None and beta != 0.0:
                self.beta = beta
                if args.disable_dropout:
                    disable_dropout_in_model(ref_model)
                add_fused_lm_head(ref_model, temperature=self.temperature,
                                  cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    return RefGRPOTrainer


def grpo(cfg: GRPORunConfig, callbacks: list | None = None) -> RLResult:
    """Run GRPO; returns the summary (also in ``lopt_run.json``), the trained wrapped model and the
    tokenizer. ``callbacks`` are extra ``transformers.TrainerCallback`` objects."""
    from trl import GRPOConfig

    from lopt.plan.rl import resolve_batch_size

    resolve_batch_size(cfg, "grpo")  # --batch-size auto: lopt plan's largest GRPO step for this device
    cfg.validate()
    if getattr(cfg, "batch_size_from_generations", False):
        print(f"lopt grpo: --batch-size {cfg.batch_size} (one group of --num-generations {cfg.num_generations} "
              f"completions per micro-batch; give --batch-size to change it)", file=sys.stderr)
    resume_dir = resolve_resume(cfg)
    rows, fmt, data_stats = load_task(cfg.task, cfg.split, cfg.limit, cfg.answer_format, cfg.data_dir)
    rows, eval_rows, eval_info = held_out_rows(cfg, rows, fmt)  # before the model too
    if cfg.val_size:
        data_stats.update(rows=len(rows), val_rows=len(eval_rows))
    reward_funcs = resolve_rewards(cfg.reward, fmt)  # fails before the model is loaded
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    wrapped, tokenizer, reference = load_and_wrap(cfg, device, with_reference=cfg.beta != 0.0)
    instruction = INSTRUCTIONS[fmt] if cfg.instruction is None else cfg.instruction
    prompts, too_long = build_prompts(rows, tokenizer, instruction, cfg.max_prompt_length)
    if not prompts:
        raise DataError(f"every prompt of {data_stats['source']} is longer than max_prompt_length="
                        f"{cfg.max_prompt_length} tokens; raise --max-prompt-length")
    data_stats.update(prompts=len(prompts), dropped_too_long=too_long, instruction=instruction)
    eval_prompts, evaluation = None, {}
    if eval_rows is not None:
        eval_prompts, _ = build_prompts(eval_rows, tokenizer, instruction, cfg.max_prompt_length)
        if not eval_prompts:
            raise DataError(f"every held-out prompt ({eval_info['source']}) is longer than max_prompt_length="
                            f"{cfg.max_prompt_length} tokens; raise --max-prompt-length")
        eval_info["n"] = len(eval_prompts)
        data_stats["eval"] = dict(eval_info)
        # The Trainer also evaluates after the last step when it is not a multiple of eval_steps; an eval
        # batch holds whole groups of --num-generations completions.
        evaluation = dict(eval_strategy="steps", eval_steps=cfg.eval_every or 10 ** 9,
                          per_device_eval_batch_size=cfg.num_generations * max(1, cfg.batch_size // cfg.num_generations))

    import datasets

    dataset = datasets.Dataset.from_list(prompts)
    args = GRPOConfig(
        **trl_common_args(cfg, device), num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        beta=cfg.beta, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations, steps_per_generation=cfg.steps_per_generation,
        use_vllm=cfg.use_vllm, reward_weights=cfg.reward_weights, log_completions=cfg.log_completions,
        # Dropout would make the sampling policy and the trained one differ for the same weights.
        disable_dropout=True, remove_unused_columns=False, shuffle_dataset=True, **evaluation,
    )
    run = RunState(cfg=cfg, command="grpo", device=device,
                   extra_info={"data": data_stats, "rewards": list(cfg.reward)}, eval_info=eval_info or {})
    trainer = make_trainer(
        _trainer_class(), cfg, wrapped, run, ref_model=reference, reward_funcs=reward_funcs, args=args,
        train_dataset=dataset, processing_class=tokenizer,
        eval_dataset=datasets.Dataset.from_list(eval_prompts) if eval_prompts is not None else None)
    prepare_trainer(trainer, run, wrapped, ("reward", "kl", "loss"), callbacks)
    print(f"lopt grpo: {cfg.method} on {type(wrapped.plain_model()).__name__} ({wrapped.num_layers} layers, "
          f"blocks {wrapped.block_ranges}), {len(prompts)} prompts from {data_stats['source']} "
          + (f"({data_stats['val_rows']} more held out by --val-size) " if cfg.val_size else "")
          + f"({fmt} answers; {too_long} too long, {data_stats['dropped_no_answer']} without answer dropped), "
          f"{cfg.num_generations} completions each, rewards {', '.join(cfg.reward)}, on {device}"
          + (f", resuming {resume_dir}" if resume_dir else ""), file=sys.stderr)
    return train_and_finish(trainer, run, resume_dir, wrapped, tokenizer, HEADLINE)


def held_out_rows(cfg: GRPORunConfig, rows: list[dict[str, str]], fmt: str
                  ) -> tuple[list[dict[str, str]], list[dict[str, str]] | None, dict[str, Any] | None]:
    """``(training rows, held-out rows, what they are)``: the ``--val-size`` rows taken out of ``rows``,
    else ``--eval-dataset``'s, else (``--eval-every`` alone) the task's own test split; ``(rows, None,
    None)`` without evaluation. A one-line error for held-out rows that cannot be had."""
    if cfg.val_size and cfg.eval_dataset:
        raise LoPTError("--val-size and --eval-dataset: GRPO scores one held-out set, give one of them")
    if cfg.val_size:
        rows, val = hold_out(rows, cfg.val_size, cfg.seed)
        return rows, val, {"split": "val", "source": "--val-size"}
    if cfg.eval_dataset:
        try:
            held, _, stats = load_task(cfg.eval_dataset, "test", cfg.eval_limit, fmt, cfg.data_dir)
        except DataError as e:
            raise DataError(f"--eval-dataset: {e}") from None
        return rows, held, {"split": "eval-dataset", "source": stats["source"]}
    if not cfg.eval_every:
        return rows, None, None
    if has_test_split(cfg.task, cfg.data_dir) is False or cfg.split == "test":
        raise LoPTError(f"--eval-every: {cfg.task} has no test split apart from the rows it trains on; hold rows out "
                        f"with --val-size N|FRACTION, or give held-out questions with --eval-dataset PATH")
    held, _, stats = load_task(cfg.task, "test", cfg.eval_limit, fmt, cfg.data_dir)
    return rows, held, {"split": "test", "source": stats["source"]}


def cmd_grpo(cfg: GRPORunConfig, callbacks: list | None = None) -> int:
    """The CLI command: run, print the summary table; 130 when interrupted."""
    return run_command(grpo, cfg, callbacks, HEADLINE)


__all__ = ["GRPORunConfig", "grpo", "cmd_grpo", "load_task", "build_prompts", "RewardError"]
