"""lopt inside your own TRL or transformers ``Trainer`` script: two added lines.

    from lopt.integrations.trl import wrap_trainer

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds)   # your script, unchanged
    trainer = wrap_trainer(trainer, method="lopt")                             # added
    trainer.train()

Why a function on the built trainer rather than a subclass per trainer: a TRL script already
builds its trainer (``SFTTrainer``, ``GRPOTrainer``, ``DPOTrainer``, ``transformers.Trainer``, or
the user's own subclass of one), and TRL's trainers do real work in ``__init__`` (tokenising the
dataset, building the reference model, patching in their fused LM head). ``wrap_trainer`` takes
that finished trainer as it is, whatever its class, and swaps its class for a subclass that adds
:class:`LoPTTrainerMixin` in front (``lopt_trainer_class``), so nothing of the script changes but one
line. Users who prefer a subclass can write ``class MyTrainer(LoPTTrainerMixin, SFTTrainer)`` and
call ``wrap_trainer`` on it the same way.

What it changes in the trainer, and why:

* **The model** is wrapped for ``method`` (``lopt.wrap``; the method's and the boundary's options
  as keyword arguments, with ``lopt train``'s defaults: under ``method="lopt"`` the task gradient
  crosses the boundary every 4th step and a tied LM head stays tied). The trainer keeps the plain
  transformers model: ``LoPTModel.route_forward`` makes its decoder stack open LoPT's per-step
  scope on every training forward, so the boundary hooks act as under ``lopt train`` (lower blocks
  detached at the boundary, each lower block's local loss backpropagated inside the forward).
  Generation, reference and evaluation passes run without gradients and go straight through.
* **The optimizer** is the one the trainer's arguments name (``optim``, ``adam_beta1``, ...,
  ``optimizer_cls_and_kwargs``) over ``LoPTModel.param_groups``: it must hold the local heads, which
  are not part of the plain model, and the lower blocks at ``lr_lower``.
* **Gradient accumulation**: the local loss of each micro-batch is scaled by ``1 / micro-batches``
  before its forward (its backward runs inside it), as the trainer averages its task loss.
* **Clipping** (``max_grad_norm``) is per block on LoPT's closed steps, as ``lopt train``'s
  per-block step: a global norm would make the lower blocks' step depend on the task gradient.
* **Checkpoints** (``save_strategy``, ``save_steps``, ``save_total_limit``, ``save_only_model``) are
  plain transformers checkpoints (local heads left out, LoRA merged) plus the trainer's resume files
  and ``lopt_state.pt`` (local heads, anchors, adapters), written whole in a temporary directory and
  renamed; ``trainer.train(resume_from_checkpoint=...)`` reads them back. ``trainer.save_model(dir)``
  writes the plain model and ``lopt_run.json``.
* bf16/fp16, the scheduler (``lr_scheduler_type``, warm-up), ``report_to`` and logging are the
  trainer's own; the mean local loss is logged as ``aux_loss``, and the retention KL (how far the
  model's answers to general prompts moved from the base's; 0 = unchanged) as ``retention/kl`` at
  every ``eval_steps`` and the last step with ``retention="kl"`` (off by default).

Options lopt cannot honour raise a one-line ``LoPTError`` naming the option (see ``check_trainer``).
``lopt grpo`` and ``lopt dpo`` run through this same code.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError, fill_recipe_defaults
from lopt.eval.common import EvalError
from lopt.eval.retention import parse_retention, retention_callback
from lopt.methods import LoPTConfig, get_method, wrap
from lopt.models import save_checkpoint
from lopt.runtime import loop
from lopt.runtime.checkpoints import (method_extra_state, rotate_checkpoints, save_plain_into, state_writer,
                                      versions)
from lopt.runtime.loop import cosine_with_warmup
from lopt.runtime.resume import load_state

if TYPE_CHECKING:  # transformers is imported when a trainer is wrapped
    from transformers import Trainer


CHECKPOINT_PREFIX = "checkpoint-"
LOPT_STATE_FILE = "lopt_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' name, read back by Trainer.train(resume_from_checkpoint)
STATE_FILES = (TRAINER_STATE_FILE, LOPT_STATE_FILE)
# transformers' own resume files: listed in lopt's manifest, checked before a resume reads them.
TRAINER_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
RUN_FILE = "lopt_run.json"


@dataclass
class StepStats:
    """What the trainer counts as it trains: tokens trained on (prompt + completion, padding
    excluded) and the mean local loss of each micro-batch since the last log."""

    tokens: int = 0
    aux_window: list[float] = field(default_factory=list)


class LoPTTrainerMixin:
    """Put in front of any ``transformers.Trainer`` class (``class T(LoPTTrainerMixin, SFTTrainer)``),
    then ``wrap_trainer(T(...))``; ``wrap_trainer`` on a trainer of any class does both."""

    lopt_model: LoPTModel
    lopt_stats: StepStats
    lopt_lr_lower: float | None = None
    # LR factor per step, from the number of steps: lopt's warm-up + cosine for lopt grpo / dpo; None:
    # the trainer's own scheduler (lr_scheduler_type, warmup_steps).
    lopt_schedule: Callable[[int], Callable[[int], float]] | None = None
    # What lopt_run.json of each checkpoint holds; and a function told of every checkpoint written.
    lopt_info: Callable[[], dict[str, Any]] | None = None
    lopt_on_checkpoint: Callable[[Path], None] | None = None

    def _send_telemetry(self) -> None:
        # lopt runs offline by default and never phones home; TRL would ping the Hub here.
        return None

    # ---- optimizer and schedule
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_trainer_optimizer(self)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.lopt_schedule is not None:
            opt = optimizer or self.optimizer
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, self.lopt_schedule(num_training_steps))
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ---- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        w = self.lopt_model
        # The trainer averages its loss over the micro-batches of a step; the blockwise local backward
        # runs inside the forward, so it must know that scale before the forward. Under fp16 it also
        # takes the grad scaler's factor, which accelerate applies to the trainer's loss and unscales
        # from all gradients before the step.
        scaler = getattr(self.accelerator, "scaler", None)
        amp_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        w.loss_scale = amp_scale / max(1, getattr(self, "current_gradient_accumulation_steps", 1) or 1)
        w.routed_aux_losses.clear()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            aux = list(w.routed_aux_losses)
            if w.lopt_config.schedule == "joint":
                live = [a for a in aux if a.requires_grad]
                if live:  # the lower graph is disjoint from the trainer's: one more backward equals the joint sum
                    (torch.stack(live).sum() * (w.lopt_config.lambda_aux * w.loss_scale)).backward()
            if aux:
                self.lopt_stats.aux_window.append(float(torch.stack([a.detach() for a in aux]).mean()))
        finally:
            w.routed_aux_losses.clear()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(inputs, dict) and model.training:
            # Tokens trained on in this micro-batch (prompt + completion, padding excluded).
            n = sum(int(inputs[k].sum()) for k in ("prompt_mask", "completion_mask", "attention_mask")
                    if isinstance(inputs.get(k), torch.Tensor))
            if not n and isinstance(inputs.get("input_ids"), torch.Tensor):  # padding-free: one packed row
                n = int(inputs["input_ids"].numel())
            self.lopt_stats.tokens += n
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        w = self.lopt_model
        live = [a for a in w.routed_aux_losses if a.requires_grad]
        if w.open_boundary and live and model.training:
            # An open step: the lower blocks' graph is shared with the trainer's loss, so their local loss
            # must join that loss's one backward (a second backward would find the graph freed). Added as
            # (x - x.detach()), it changes the gradient, not the loss reported, and gets the same scaling
            # (accumulation, AMP) as the task loss, as in lopt train's open step.
            extra = torch.stack(live).sum() * w.lopt_config.lambda_aux
            extra = extra - extra.detach()
            w.routed_aux_losses[:] = [a.detach() for a in w.routed_aux_losses]
            out = (out[0] + extra, *out[1:]) if isinstance(out, tuple) else out + extra
        return out

    def _clip_grad_norm(self, model):
        w, max_norm = self.lopt_model, self.args.max_grad_norm
        if getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.unscale_gradients()  # fp16: clip the true gradients (accelerate's order)
        if w.local and not w.open_boundary:
            # Each block on its own (like lopt train's per-block step): the lower blocks' update then
            # depends on their local loss only, never on the size of the task gradient. (On an open
            # step they have the task gradient too: one global norm, as end-to-end.)
            norms = [_clip_norm(w.block_parameters(i), max_norm) for i in range(len(w.block_ranges))]
            return torch.tensor(math.sqrt(sum(n * n for n in norms)))
        return torch.tensor(_clip_norm(list(w.parameters()), max_norm))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        window = self.lopt_stats.aux_window
        if "loss" in logs and window:  # a training log: the mean local loss since the last one
            logs["aux_loss"] = sum(window) / len(window)
            window.clear()
        super().log(logs, *args, **kwargs)

    # ---- checkpoints
    def lopt_run_info(self) -> dict[str, Any]:
        """``lopt_run.json``'s contents: the method, its options and block ranges, versions."""
        if self.lopt_info is not None:
            return self.lopt_info()
        import trl

        base = next(c for c in type(self).__mro__ if not issubclass(c, LoPTTrainerMixin))
        return {"command": f"integrations.trl ({base.__name__})", "method": self.lopt_model.method,
                **self.lopt_model.describe(), "versions": {**versions(), "trl": trl.__version__}}

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_callback import ExportableState

        out = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        self.store_flos()

        def write_trainer_files(d: Path) -> None:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(d / TRAINER_STATE_FILE))

        def write_resume_files(d: Path) -> None:
            self._save_optimizer_and_scheduler(str(d))
            self._save_scaler(str(d))
            self._save_rng_state(str(d))
            torch.save(method_extra_state(self.lopt_model), d / LOPT_STATE_FILE)

        def write_all(d: Path) -> None:
            write_trainer_files(d)
            # save_only_model: trainer_state.json (the log history) stays; nothing to resume from.
            state_writer(self.state.global_step, None if self.args.save_only_model else write_resume_files,
                         [*STATE_FILES, *TRAINER_TORCH_FILES])(d)

        save_checkpoint(self.lopt_model, self.processing_class, out, extra_json={RUN_FILE: self.lopt_run_info()},
                        write_extra=write_all)
        if self.lopt_on_checkpoint is not None:
            self.lopt_on_checkpoint(out)
        rotate_checkpoints(Path(self.args.output_dir), self.args.save_total_limit, keep=out)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # trainer.save_model(dir): the plain model (no local heads, LoRA merged, the head as the
        # model ties it), the tokenizer and lopt_run.json, each file renamed into place.
        target = Path(output_dir if output_dir is not None else self.args.output_dir)
        target.mkdir(parents=True, exist_ok=True)
        save_plain_into(self.lopt_model, self.processing_class, target, self.lopt_run_info())
        torch.save(self.args, target / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        w = self.lopt_model
        state = load_state(Path(resume_from_checkpoint) / LOPT_STATE_FILE)  # tensors and plain data only
        missing = w.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise LoPTError(f"{resume_from_checkpoint} was written by another method/config (unexpected keys "
                            f"{missing.unexpected_keys[:3]}...): resume with the same options")
        if not get_method(w.method).resume_from_base:
            # LoRA checkpoints hold merged weights; its base stays the pretrained model and the adapters
            # came back with lopt_state.pt above.
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def _clip_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    return loop.clip_gradients(params, max_norm or None) or 0.0


def build_trainer_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    """The optimizer the trainer's arguments name, over ``lopt_model.param_groups`` (the last block
    at ``learning_rate``, the lower blocks, embeddings and local heads at ``lr_lower``; no weight
    decay on biases and norms)."""
    args, w = trainer.args, trainer.lopt_model
    groups = w.param_groups(args.learning_rate, trainer.lopt_lr_lower, args.weight_decay)
    update = getattr(w, "bf16_update", None)  # --precision bf16-true (lopt.runtime.precision.apply_precision)
    if trainer.optimizer_cls_and_kwargs is None and update not in (None, "plain"):
        # AdamW whose update of bf16 weights is compensated (stochastic rounding or Kahan), at the trainer's lrs
        return loop.make_optimizer(groups, bf16_update=update)
    if trainer.optimizer_cls_and_kwargs is not None:
        cls, kwargs = trainer.optimizer_cls_and_kwargs
    else:
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    kwargs = dict(kwargs)
    from transformers.trainer_optimizer import is_optimizer_factory

    if is_optimizer_factory(cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise LoPTError(f"optim={args.optim}: that optimizer chooses its own parameters, and lopt needs its own "
                        f"groups (the local heads, the lower blocks' lr): use an AdamW-like optim (adamw_torch, "
                        f"adamw_torch_fused, adamw_8bit, ...)")
    return cls(groups, **kwargs)


def lopt_step_callback(wrapped: LoPTModel) -> Any:
    """The per-step switches of the method: ``begin_step`` before each optimizer step (layer
    switching, ``lower_every``, ``task_grad_every``'s open boundary), the local heads' gradients freed
    after it (the trainer zeroes the plain model's only), the boundary closed at the step's end."""
    from transformers import TrainerCallback

    class LoPTStepCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            optimizer = kwargs.get("optimizer")
            # Restored on resume, so the schedules follow it; accelerate wraps the optimizer, and the
            # method frees state in the torch optimizer inside it.
            wrapped.begin_step(state.global_step, getattr(optimizer, "optimizer", optimizer))

        def on_optimizer_step(self, args, state, control, **kwargs):
            wrapped.heads.zero_grad(set_to_none=True)

        def on_step_end(self, args, state, control, **kwargs):
            wrapped.open_boundary = False

    return LoPTStepCallback()


# --------------------------------------------------------------------------- options


def trainer_config(method: str = "lopt", **options: Any) -> Any:
    """The ``LoPTConfig`` for ``method`` with ``options``, and ``lopt train``'s defaults where they are
    not given (method lopt: ``task_grad_every`` 4, a tied head kept tied, ``lambda_aux`` 0; give
    ``task_grad_every=0`` for the paper's local learning). The task loss is the trainer's own, so
    lopt's chunked loss is off."""
    names = {f.name for f in fields(LoPTConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise LoPTError(f"wrap_trainer: unknown option {unknown[0]!r}; the options are lopt.LoPTConfig's fields "
                        f"(num_blocks, task_grad_every, lambda_aux, lora_r, ...)")
    if "chunked_ce" in options:
        raise LoPTError("wrap_trainer: chunked_ce does not apply: the trainer computes the task loss itself")

    class _Defaults:  # fill_recipe_defaults reads and fills these attributes
        pass

    d = _Defaults()
    d.method = method
    for name in ("task_grad_every", "tied_head", "lambda_aux"):
        setattr(d, name, options.get(name))
    fill_recipe_defaults(d)
    options = {**options, "task_grad_every": d.task_grad_every, "tied_head": d.tied_head, "lambda_aux": d.lambda_aux}
    config = LoPTConfig(method=method, chunked_ce=False, **options)
    config.validate()
    get_method(method).check(config)
    return config


def check_trainer(trainer: Trainer, config: Any, wrapped: LoPTModel | None = None) -> None:
    """One-line LoPTError for a trainer option that lopt cannot honour with ``config``'s method
    (``wrapped``: the model lopt already wrapped, which the trainer trains)."""
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise LoPTError(f"wrap_trainer expects a transformers Trainer (SFTTrainer, GRPOTrainer, DPOTrainer, ...), "
                        f"got {type(trainer).__name__}")
    if isinstance(trainer, LoPTTrainerMixin) and getattr(trainer, "lopt_model", None) is not None:
        raise LoPTError("this trainer is already wrapped by wrap_trainer: wrap it once")
    if trainer.optimizer is not None or trainer.lr_scheduler is not None:
        raise LoPTError("optimizers=(...): lopt builds the optimizer itself (it holds the local heads and the lower "
                        "blocks' lr); choose it with optim= or optimizer_cls_and_kwargs= instead")
    if trainer.state.global_step:
        raise LoPTError("wrap_trainer: the trainer has trained already; wrap it before trainer.train()")
    if wrapped is None and hasattr(trainer.model, "peft_config"):
        # lopt's methods take the plain model: LoRA is its own method (which merges the adapters into
        # a plain checkpoint), and wrapping a PEFT model would save adapters, not a plain model.
        raise LoPTError("peft_config=: the trainer's model is already a PEFT model; drop peft_config and use "
                        "method='lora' (lopt's LoRA: lora_r=, lora_alpha=, lora_target_modules=)")
    args = trainer.args
    boundary = get_method(config.method).boundary
    if get_method(config.method).local_loss and args.world_size > 1:
        # Checked with torchrun on 2 CPU processes (gloo): with --task-grad-every 0 DDP stops ("Expected to have
        # finished reduction in the prior iteration"), with the default the two ranks' weights drift apart;
        # e2e, freeze-lower and lisa kept the ranks equal.
        raise LoPTError(f"{args.world_size} processes: method {config.method}'s local losses backpropagate inside the "
                        f"forward, which the trainer's DDP/FSDP gradient sync cannot follow; train on one process, "
                        f"or use lopt train, whose data parallel handles them (docs/distributed.md)")
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None) or {}
    checkpointing = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    if boundary and checkpointing and kwargs.get("use_reentrant"):
        # Reentrant checkpointing drops the gradient of a layer whose input needs none: the block above
        # the boundary gets a detached input, so its weights would never train.
        raise LoPTError("gradient_checkpointing_kwargs={'use_reentrant': True}: the block above lopt's boundary "
                        "gets a detached input, which reentrant checkpointing trains nothing through; drop "
                        "use_reentrant (non-reentrant is the default)")


def lopt_trainer_class(base: type) -> type:
    """``base`` with :class:`LoPTTrainerMixin` in front (one class per base, made once)."""
    if issubclass(base, LoPTTrainerMixin):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"LoPT{base.__name__}", (LoPTTrainerMixin, base), {"__module__": __name__,
                   "__doc__": f"{base.__name__} training a lopt-wrapped model (lopt.integrations.trl)."})
        _CLASSES[base] = cls
    return cls


_CLASSES: dict[type, type] = {}


def wrap_trainer(trainer: Trainer, method: str = "lopt", *, lr_lower: float | None = None, retention: str | None = None,
                 retention_options: dict[str, Any] | None = None,
                 schedule: Callable[[int], Callable[[int], float]] | None = None, wrapped: LoPTModel | None = None,
                 stats: Any = None, **options: Any) -> Trainer:
    """Train ``trainer``'s model with lopt's ``method`` (``lopt``, ``e2e``, ``freeze-lower``, ``lora``,
    ``lisa``, ``badam`` or a plugin's), keeping everything else of the trainer. Returns the trainer
    (the same object, its class now ``lopt_trainer_class(type(trainer))``); the wrapped model is
    ``trainer.lopt_model``.

    ``options``: the method's and the boundary's options (``lopt.LoPTConfig`` fields:
    ``task_grad_every``, ``num_blocks``, ``lambda_aux``, ``lora_r``, ...), with ``lopt train``'s
    defaults. ``lr_lower``: the learning rate of the lower blocks, embeddings and local heads (default:
    the method's, from the trainer's ``learning_rate``). ``retention``: ``kl`` records the base model's
    answers to lopt's general prompts when training starts and logs ``retention/kl`` (KL(base || model)
    on them, ``lopt eval``'s retention-kl; 0 = unchanged) at every ``eval_steps`` and the last step, to
    the trainer's ``report_to`` trackers; ``suite[:TASKS]`` adds lm-eval-exact benchmarks; ``none`` or
    None (the default, as for lopt's commands: it cost over 5% of a short CPU run) measures nothing
    (``lopt.eval.retention.retention_callback``, whose keyword arguments ``retention_options`` passes
    on). ``schedule``: a function of the number of steps giving the LR factor per step
    (``lopt_schedule(warmup_ratio)`` is ``lopt train``'s); default: the trainer's own
    ``lr_scheduler_type``. ``wrapped``: a model already wrapped (its ``.model`` must be the trainer's
    model; the options then come from it). ``stats``: where tokens
    and local losses are counted (a :class:`StepStats` by default).

    Call it after building the trainer and before ``trainer.train()``.
    """
    try:
        parse_retention(retention)
    except EvalError as e:
        raise LoPTError(str(e).replace("--retention", "wrap_trainer(retention=...)")) from None
    if wrapped is None:
        config = trainer_config(method, **options)
        check_trainer(trainer, config)
        model = trainer.model
        wrapped = wrap_seeded(model, config, trainer.args.seed)
        if wrapped.model is not model:  # LoRA: the trainer trains the PEFT model around it
            trainer.model = trainer.model_wrapped = wrapped.model
        wrapped.train()
        wrapped.route_forward()
    else:
        if options:
            raise LoPTError(f"wrap_trainer(wrapped=...): the options come from the wrapped model; drop "
                            f"{sorted(options)[0]}=")
        check_trainer(trainer, wrapped.lopt_config, wrapped)
        if trainer.model is not wrapped.model:
            raise LoPTError("wrap_trainer(wrapped=...): the trainer must train wrapped.model")
        wrapped.route_forward()
    trainer.__class__ = lopt_trainer_class(type(trainer))
    trainer.lopt_model = wrapped
    trainer.lopt_stats = stats if stats is not None else StepStats()
    trainer.lopt_lr_lower = lr_lower
    trainer.lopt_schedule = schedule
    trainer.add_callback(lopt_step_callback(wrapped))
    trainer.lopt_retention = None
    if retention is not None and parse_retention(retention)[0] != "none":
        # Its record is taken at on_train_begin, before the first step: the weights are still the base's.
        trainer.lopt_retention = retention_callback(trainer.processing_class, retention=retention, trainer=trainer,
                                                    **(retention_options or {}))
        trainer.add_callback(trainer.lopt_retention)
    return trainer


def wrap_seeded(model, config: Any, seed: int) -> LoPTModel:
    """``lopt.wrap(model, config=config)`` with the local heads (and LoRA adapters) drawn from ``seed``,
    and the random state restored afterwards: wrapping a trainer's model then leaves the run's own
    random stream (sampling, dropout, data order) as the trainer seeded it, and ``lopt grpo`` /
    ``lopt dpo``, which wrap before building the trainer, draw the same heads."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return wrap(model, config=config)


def lopt_schedule(warmup_ratio: float) -> Callable[[int], Callable[[int], float]]:
    """lopt's warm-up + cosine LR factor for a run of N steps (``lopt train``'s), as a trainer's
    ``lopt_schedule``."""
    def make(total_steps: int) -> Callable[[int], float]:
        return cosine_with_warmup(total_steps, int(warmup_ratio * total_steps))
    return make


def checkpoint_global_step(checkpoint: Path) -> int:
    """The optimizer steps a trainer checkpoint was written after."""
    return int(json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())["global_step"])


__all__ = ["wrap_trainer", "LoPTTrainerMixin", "lopt_trainer_class", "trainer_config", "check_trainer",
           "StepStats", "lopt_schedule", "wrap_seeded", "build_trainer_optimizer", "lopt_step_callback", "checkpoint_global_step",
           "CHECKPOINT_PREFIX", "LOPT_STATE_FILE", "TRAINER_STATE_FILE", "STATE_FILES", "TRAINER_TORCH_FILES",
           "RUN_FILE"]
