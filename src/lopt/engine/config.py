"""What defines how the gradient boundary trains a model: ``EngineConfig`` (the engine's part of
``lopt.methods.LoPTConfig``, saved with every checkpoint), ``option`` (a field that is also a flag),
the recipes' defaults and ``LoPTError``. Methods and their options live in ``lopt.methods``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable


SCHEDULES = ("blockwise", "joint")
LOCAL_OBJECTIVES = ("recon", "anchor", "recon+anchor", "recon-std", "recon+cos", "early-exit")
# Which of them train a reconstruction head per lower block, and which keep frozen copies of the
# pretrained lower blocks (lopt.engine.boundary builds both from these).
HEAD_OBJECTIVES = ("recon", "recon+anchor", "recon-std", "recon+cos")
ANCHOR_OBJECTIVES = ("anchor", "recon+anchor", "recon+cos")
# Default weight of the anchor term of recon+anchor and recon+cos: both terms are dimensionless
# (0 at the base, about 1 for a state as far from the base's as it is large), and the reconstruction
# loss starts near 0.013 on SmolLM2-135M, so at weight 1 the anchor takes over once the boundary state
# has moved by a few percent, long before the cosine of 0.57 that recon alone reached (issue 29).
ANCHOR_WEIGHT = 1.0


# Which layers recompute their activations in the backward (LoPTModel.gradient_checkpointing_enable).
CHECKPOINT_SCOPES = ("off", "all", "last-block", "lower-blocks")


class LoPTError(ValueError):
    """A bad option or an unsupported model; the message says what is wrong and what to do."""


# Default lr_lower / lr under LoPT. The paper uses 1 (the same rate); with AdamW every lower weight then
# moves about lr per step whatever the size of its small local gradient, and the lower block drifts away
# from what the upper block was trained on: at 20 steps (study v1, records/study-v1/RESULTS.md)
# lr_lower = lr made held-out loss 1.2-1.3x end-to-end's and retention KL 1.2-2.7x, lr_lower = lr / 10
# gave 1.09x and 0.23x. Over 256 steps (study v2) lr / 10 drifts too (see RECIPE_TASK_GRAD_EVERY).
LR_LOWER_RATIO = 0.1

# Default lambda_aux: the paper's 10, or 0 under task_grad_every. With the task gradient reaching the
# lower blocks every N-th step they have a signal worth learning from; the reconstruction gradient was
# found to move them in a direction unrelated to the task (records/study-v2/RESULTS.md), and without it the steps
# in between need no lower backward at all (docs/performance.md).
LAMBDA_AUX = 10.0


def default_lambda_aux(task_grad_every: int) -> float:
    """``lambda_aux`` when none is given: 10 (the paper's), 0 when ``task_grad_every`` > 0."""
    return 0.0 if task_grad_every else LAMBDA_AUX


# The training recipes' default (lopt train, grpo, dpo) under method lopt: the task gradient through the
# boundary every 4th step, the lower half at lr, a tied LM head kept tied. Study v2 (records/study-v2/RESULTS.md,
# 256 steps) found the paper's pure local learning unusable over a whole run: the reconstruction loss
# alone turns the lower half's output away from what the upper half was trained on (boundary cosine to
# the base 0.57 after 128 steps at lr / 10 in records/study-v2/results/lower-alone/, 0.47 at the end of the 256-step
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


def option(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None,
           **cli: Any) -> Any:
    """A dataclass field that is also a command-line flag and a YAML key: ``help`` is its ``--help``
    text; ``cli`` holds argparse settings the field's type does not give (``choices``, ``nargs``,
    ``metavar``, ``type``, ``action``, ``const``), ``group`` (the ``--help`` section) or ``cli=False``
    (an option of the Python API only)."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUNDARY = "method: the boundary (lopt, freeze-lower)"


@dataclass
class EngineConfig:
    """The gradient boundary's own options, the part of ``LoPTConfig`` that ``lopt.engine`` reads;
    each method adds its own (``Method.options``) in ``lopt.methods.LoPTConfig``."""

    method: str = option("lopt", "training method (lopt.methods.METHODS)", group="method")
    num_blocks: int = option(2, "LoPT: number of blocks (2 = boundary at the midpoint)", group=_BOUNDARY)
    boundaries: list[int] | None = option(
        None, "LoPT: explicit block starts as layer indices, e.g. 10 20 (overrides --num-blocks)",
        nargs="+", type=int, metavar="LAYER", group=_BOUNDARY)
    lambda_aux: float | None = option(
        None, "LoPT: weight of the mean local reconstruction loss (default: 0 under --task-grad-every; 10, the "
        "paper's, with --task-grad-every 0)", type=float, group=_BOUNDARY)
    schedule: str = option("blockwise", "LoPT backward schedule: blockwise frees lower activations early",
                           choices=SCHEDULES, group=_BOUNDARY)
    local_objective: str = option(
        "recon", "what the lower blocks learn: recon (reconstruct the block input, the paper's), anchor (keep "
        "the block output close to the frozen pretrained block's), recon+anchor (recon plus --anchor-weight x "
        "the relative MSE to the base model's boundary state), recon-std (recon with input, target and "
        "prediction standardised per dimension), recon+cos (recon plus --anchor-weight x per-token 1 - cosine "
        "and squared log norm ratio to the base's state) or early-exit (next-token loss of the block output "
        "through a frozen copy of the final norm and LM head)", choices=LOCAL_OBJECTIVES, group=_BOUNDARY)
    anchor_weight: float = option(
        ANCHOR_WEIGHT, "LoPT: weight of the anchor term of --local-objective recon+anchor and recon+cos",
        type=float, group=_BOUNDARY)
    lower_every: int = option(1, "update the lower blocks only every N-th step (their backward is skipped "
                                 "otherwise)", group=_BOUNDARY)
    chunked_ce: bool = option(True, "compute the task loss in chunks of tokens, never the full logits tensor "
                                    "(exact)", group="memory")
    ce_chunk_size: int = option(1024, "tokens per chunk of the chunked task loss", cli=False)
    task_grad_every: int = option(
        0, "LoPT: open the boundary every N-th step (steps 0, N, 2N, ...): the lower blocks then get the task "
        "gradient (plus their local loss if --lambda-aux > 0), recomputed in the backward from each layer's "
        "input; 0: never, the paper's pure local learning", type=int, group=_BOUNDARY)
    # One tensor cannot sit on both sides of the boundary, so LoPT unties a tied head by default.
    tied_head: bool | None = option(
        False, "keep a tied LM head tied to the input embedding across the boundary: the shared matrix trains "
        "with the last block, from the task loss only; saves the head's copy, gradient and AdamW state "
        "(4 x vocab x hidden floats). None: keep it tied if the model ties it", group=_BOUNDARY)
    seed: int = option(0, "random seed (data order, heads, dropout, the methods' own random choices)",
                       group="optimisation")
    extra: dict[str, Any] = option(help="free-form notes saved with the run", factory=dict, cli=False)

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> Any:
        """This config class filled from a recipe's options (``TrainConfig``, ``RLConfig``: fields of
        the same names are taken), with ``overrides``."""
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
        if not self.anchor_weight >= 0:
            raise LoPTError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.anchor_weight != ANCHOR_WEIGHT and self.local_objective not in ("recon+anchor", "recon+cos"):
            raise LoPTError(f"--anchor-weight has no effect with --local-objective {self.local_objective}: it weighs "
                            "the anchor term of recon+anchor and recon+cos")
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
