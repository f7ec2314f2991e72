"""What defines how a model is trained: ``LoPTConfig`` (saved with every checkpoint), its constants,
and ``LoPTError``. The method named in ``LoPTConfig.method`` is checked by ``lopt.methods.get_method``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


SCHEDULES = ("blockwise", "joint")
LOCAL_OBJECTIVES = ("recon", "anchor")
BADAM_ORDERS = ("ascending", "descending", "random")  # the order in which BAdam's blocks take turns


# Which layers recompute their activations in the backward (LoPTModel.gradient_checkpointing_enable).
CHECKPOINT_SCOPES = ("off", "all", "last-block", "lower-blocks")


class LoPTError(ValueError):
    """A bad option or an unsupported model; the message says what is wrong and what to do."""


# Default lr_lower / lr under LoPT. The paper uses 1 (the same rate); with AdamW every lower weight then
# moves about lr per step whatever the size of its small local gradient, and the lower block drifts away
# from what the upper block was trained on: at 20 steps (study v1, docs/short-budget/RESULTS.md)
# lr_lower = lr made held-out loss 1.2-1.3x end-to-end's and retention KL 1.2-2.7x, lr_lower = lr / 10
# gave 1.09x and 0.23x. Over 256 steps (study v2) lr / 10 drifts too (see RECIPE_TASK_GRAD_EVERY).
LR_LOWER_RATIO = 0.1

# Default lambda_aux: the paper's 10, or 0 under task_grad_every. With the task gradient reaching the
# lower blocks every N-th step they have a signal worth learning from; the reconstruction gradient was
# found to move them in a direction unrelated to the task (docs/RESULTS.md), and without it the steps
# in between need no lower backward at all (docs/issue15-results.md).
LAMBDA_AUX = 10.0


def default_lambda_aux(task_grad_every: int) -> float:
    """``lambda_aux`` when none is given: 10 (the paper's), 0 when ``task_grad_every`` > 0."""
    return 0.0 if task_grad_every else LAMBDA_AUX


# The training recipes' default (lopt train, grpo, dpo) under method lopt: the task gradient through the
# boundary every 4th step, the lower half at lr, a tied LM head kept tied. Study v2 (docs/RESULTS.md,
# 256 steps) found the paper's pure local learning unusable over a whole run: the reconstruction loss
# alone turns the lower half's output away from what the upper half was trained on (boundary cosine to
# the base 0.57 after 128 steps at lr / 10 in docs/results/lower-alone/, 0.47 at the end of the 256-step
# run), and the held-out loss ended above the untrained model's. This configuration was the study's
# best boundary-based run (1.03x end-to-end's held-out loss at 0.84x its retention KL, 1.19x its
# tokens/s, 0.77x its memory). The engine itself
# (lopt.wrap, LoPTConfig) keeps task_grad_every 0: opening the boundary is the training loop's job.
RECIPE_TASK_GRAD_EVERY = 4


def fill_recipe_defaults(cfg: Any) -> None:
    """Fill a recipe config's unset (None) ``task_grad_every``, ``tied_head`` and ``lambda_aux`` with the
    recipes' defaults. Under method lopt: the boundary opens every RECIPE_TASK_GRAD_EVERY steps (never
    with ``pipeline``, whose blocks live in separate processes and cannot pass the task gradient down);
    with it open and the model unsharded (no ``fsdp`` or ``pipeline``), ``tied_head`` None ("keep the LM
    head tied if the model ties it"). Other methods: 0 and False. ``lambda_aux``: see
    default_lambda_aux. Configs without ``pipeline``/``fsdp`` fields (RLConfig) count as unsharded."""
    pipeline = getattr(cfg, "pipeline", False)
    sharded = pipeline or getattr(cfg, "fsdp", False)
    if cfg.task_grad_every is None:
        cfg.task_grad_every = RECIPE_TASK_GRAD_EVERY if cfg.method == "lopt" and not pipeline else 0
    if cfg.tied_head is None:
        cfg.tied_head = None if cfg.method == "lopt" and cfg.task_grad_every and not sharded else False
    if cfg.lambda_aux is None:
        cfg.lambda_aux = default_lambda_aux(cfg.task_grad_every)


def engine_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the engine's own ``task_grad_every`` (0) and ``tied_head`` (False) where they are
    not given: for configurations that name every mechanism they use (the bench's, the studies'), so
    that the recipes' defaults add none."""
    return {"task_grad_every": 0, "tied_head": False, **options}


@dataclass
class LoPTConfig:
    """Everything that defines how a model is trained; saved with each checkpoint."""

    method: str = "lopt"
    num_blocks: int = 2
    boundaries: list[int] | None = None  # layer indices where a new block starts; overrides num_blocks
    lambda_aux: float | None = None  # None: default_lambda_aux(task_grad_every)
    schedule: str = "blockwise"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    local_objective: str = "recon"  # recon: reconstruct the block input; anchor: match the frozen pretrained block
    lower_every: int = 1  # update the lower blocks only every N-th step (set by the trainer via update_lower)
    chunked_ce: bool = True  # task loss in chunks, never the full logits (training with labels only)
    ce_chunk_size: int = 1024
    # Open the boundary every N-th optimizer step (steps 0, N, 2N, ...): the lower blocks then get the
    # true task gradient (plus their local loss when lambda_aux > 0). 0: never (the paper's LoPT).
    task_grad_every: int = 0
    # Keep a tied LM head tied to the input embedding across the boundary (by default LoPT unties it:
    # one tensor cannot sit on both sides). The shared matrix then trains with the last block, from the
    # task loss (on an open boundary also through the embedding lookup); no local loss reaches it. It
    # saves the head's copy, its gradient and its AdamW state: 4 x vocab x hidden floats. None: keep it
    # tied if the model ties it (the recipes' default under method lopt, fill_recipe_defaults).
    tied_head: bool | None = False
    # LISA (methods/lisa.py): this many decoder layers train, chosen again every lisa_interval steps.
    lisa_layers: int = 1
    lisa_interval: int = 20
    # BAdam (methods/badam.py): blocks of badam_block_size layers, one trains for badam_switch_every
    # steps, in badam_order.
    badam_switch_every: int = 50
    badam_order: str = "ascending"
    badam_block_size: int = 1
    seed: int = 0  # the methods' own random choices (LISA's layers, BAdam's random order)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> "LoPTConfig":
        """The LoPTConfig of a recipe's options (``TrainConfig``, ``RLConfig``: fields of the same
        names are taken), with ``overrides``."""
        kw = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        return cls(**{**kw, **overrides})

    def __post_init__(self) -> None:
        if self.lambda_aux is None:
            self.lambda_aux = default_lambda_aux(self.task_grad_every)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise LoPTError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.local_objective not in LOCAL_OBJECTIVES:
            raise LoPTError(f"unknown local objective {self.local_objective!r}: choose one of "
                            f"{', '.join(LOCAL_OBJECTIVES)}")
        if not isinstance(self.lower_every, int) or self.lower_every < 1:
            raise LoPTError(f"lower_every must be an integer >= 1, got {self.lower_every}")
        if self.lambda_aux < 0:
            raise LoPTError(f"lambda_aux must be >= 0, got {self.lambda_aux}")
        if not isinstance(self.task_grad_every, int) or self.task_grad_every < 0:
            raise LoPTError(f"task_grad_every must be an integer >= 0 (0: never), got {self.task_grad_every}")
        if self.method == "lopt" and self.task_grad_every and self.lambda_aux == 0:
            # No local loss is ever computed then (lopt train's default): these options would do nothing.
            if self.local_objective != "recon":
                raise LoPTError(f"--local-objective {self.local_objective} has no effect under --task-grad-every "
                                f"{self.task_grad_every} with --lambda-aux 0 (no local loss): give --lambda-aux > 0, "
                                "or --task-grad-every 0 for the paper's local learning")
            if self.lower_every > 1:
                raise LoPTError(f"--lower-every {self.lower_every} has no effect under --task-grad-every "
                                f"{self.task_grad_every} with --lambda-aux 0 (the lower blocks only learn on the open "
                                "steps): give --lambda-aux > 0, or --task-grad-every 0")
