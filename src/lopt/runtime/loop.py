"""The optimizer step shared by every trainer: micro-batches, autocast, accumulation, clipping, the per-block step, the LR schedule.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable
import torch

from lopt.engine.boundary import LoPTModel
from lopt.config import OPTIMIZERS
from lopt.engine.config import LoPTError
from lopt.runtime.optim_in_backward import OptimizerInBackward
from lopt.models import import_torchao_quietly
from lopt.runtime.precision import autocast_dtype, check_device_options, resolve_precision  # noqa: F401  (autocast_dtype: lopt.runtime.loop's name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stochastic_round_adamw() -> type[torch.optim.Optimizer]:
    """torchao's AdamW class (its ``bf16_stochastic_round`` option is bf16-true's default update), imported
    only when that optimizer is built, with torchao's import-time warnings held back
    (:func:`lopt.models.import_torchao_quietly`)."""
    try:
        optim = import_torchao_quietly("torchao.optim")
    except ImportError:
        optim = None
    if optim is None:
        raise LoPTError("--precision bf16-true --bf16-update stochastic-round needs torchao: pip install torchao "
                        "(or lopt[bf16]), or choose --bf16-update kahan")
    return optim._AdamW  # torchao's AdamW with the bf16 option


def build_optimizer(wrapped: LoPTModel, lr: float, lr_lower: float | None = None,
                    weight_decay: float = 0.0, fused: bool = True, kind: str = "adamw",
                    bf16_update: str | None = None) -> torch.optim.Optimizer:
    """AdamW over ``wrapped.param_groups`` (upper block at ``lr``, lower blocks, embeddings and local
    heads at ``lr_lower``), with PyTorch's fused kernel where the parameters allow it (CPU and CUDA
    floating point): besides being faster, the default multi-tensor kernel allocates a temporary the
    size of all parameters (the square root of the second moment), which made the optimizer step the
    peak of a whole training step. ``kind="adamw-8bit"``: bitsandbytes' blockwise 8-bit AdamW.
    ``bf16_update``: under bf16-true, how the update lands on bf16 weights (``make_optimizer``)."""
    return make_optimizer(wrapped.param_groups(lr, lr_lower, weight_decay), kind, fused, bf16_update)


def make_optimizer(groups: list[dict[str, Any]], kind: str = "adamw", fused: bool = True,
                   bf16_update: str | None = None) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (one of ``OPTIMIZERS``) over parameter ``groups`` (each with its lr and
    weight_decay), betas (0.9, 0.999), eps 1e-8.

    ``bf16_update`` (bf16-true's ``--bf16-update``; None otherwise) picks AdamW's update of bf16 weights:
    ``stochastic-round`` (the default): torchao's AdamW, which computes the step in fp32 and rounds the new
    weight up or down at random, unbiased (torch.compile'd: the first step of each tensor shape compiles);
    ``kahan``: torch-optimi's AdamW with Kahan summation (a buffer per weight carries what rounding dropped
    into the next step; the buffer is bf16 too, so updates small against it are still lost);
    ``plain`` (or None): PyTorch's AdamW, round to nearest. fp32 parameters in the same groups (the local
    heads) get the ordinary update from either library."""
    params = [p for g in groups for p in g["params"]]
    lr = groups[0]["lr"] if groups else 1e-3
    if kind in ("adamw-8bit", "paged-adamw-8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise LoPTError(f"--optimizer {kind} needs bitsandbytes: pip install bitsandbytes") from e
        cls = bnb.optim.AdamW8bit if kind == "adamw-8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if kind != "adamw":
        raise LoPTError(f"unknown optimizer {kind!r}: choose one of {', '.join(OPTIMIZERS)}")
    if bf16_update == "kahan":
        try:
            import optimi
        except ImportError as e:
            raise LoPTError("--precision bf16-true --bf16-update kahan needs torch-optimi: pip install torch-optimi "
                            "(or lopt[bf16]), or choose --bf16-update stochastic-round") from e
        # optimi's defaults differ from AdamW's (betas (0.9, 0.99), eps 1e-6): lopt's are given explicitly.
        return optimi.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, kahan_sum=True)
    if bf16_update == "stochastic-round":
        StochasticAdamW = stochastic_round_adamw()
        return StochasticAdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                               bf16_stochastic_round=True)
    if bf16_update not in (None, "plain"):
        raise LoPTError(f"unknown bf16_update {bf16_update!r}: choose stochastic-round, kahan or plain")
    fused = fused and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"] if groups else 1e-3, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


class Stepper:
    """One optimizer step of a wrapped model: micro-batches, autocast, gradient accumulation, clipping,
    the per-block step, the LR schedule. Shared by ``train`` and ``bench`` so both measure one thing."""

    def __init__(self, wrapped: LoPTModel, cfg: Any, device: torch.device, total_steps: int,
                 dist: Any = None):
        # dist: a lopt.parallel.data_parallel.DataParallel for multi-process runs (slices the batches, scales the
        # losses, synchronises gradients); None in a single process.
        self.wrapped, self.cfg, self.device, self.dist = wrapped, cfg, device, dist
        kind = getattr(cfg, "optimizer", "adamw")
        check_device_options(cfg, device)
        bf16_update = cfg.bf16_update if resolve_precision(cfg.precision, device) == "bf16-true" else None
        self.optimizer = build_optimizer(wrapped, cfg.lr, cfg.lr_lower, cfg.weight_decay, kind=kind,
                                         bf16_update=bf16_update)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total_steps, int(cfg.warmup_ratio * total_steps)))
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.per_block = cfg.per_block_step == "on" or (
            cfg.per_block_step == "auto" and wrapped.local and cfg.schedule == "blockwise"
            and cfg.grad_accum == 1 and self.scaler is None and not cfg.fsdp)
        self._block_norms: list[float] = []
        wrapped.head_grad_in_forward = not cfg.fsdp  # every task loss goes through wrapped.backward below
        wrapped.after_local_backward = self._step_block if self.per_block else None
        if dist is not None:
            wrapped.after_local_backward = dist.local_hook(wrapped.after_local_backward)
        # --optimizer-in-backward: the last block's parameters step inside the task backward.
        self.in_backward: OptimizerInBackward | None = None
        if getattr(cfg, "optimizer_in_backward", False):
            self.in_backward = OptimizerInBackward(
                wrapped.block_parameters(len(wrapped.block_ranges) - 1), self.optimizer,
                lambda groups: make_optimizer(groups, kind, bf16_update=bf16_update), cfg.max_grad_norm)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The optimizer state to checkpoint (the same format with or without the optimizer in backward)."""
        return self.in_backward.state_dict() if self.in_backward else self.optimizer.state_dict()

    def load_optimizer_state_dict(self, sd: dict[str, Any]) -> None:
        if self.in_backward:
            self.in_backward.load_state_dict(sd)
        else:
            self.optimizer.load_state_dict(sd)

    def _step_block(self, block: int, params: list[torch.nn.Parameter]) -> None:
        # Each lower block is clipped and stepped as soon as its local backward is done, and its
        # gradients freed, so they never coexist with the upper block's activations. Clipping is
        # therefore per block (max_grad_norm bounds each block's gradient norm separately).
        self._block_norms.append(clip_gradients(params, self.cfg.max_grad_norm) or 0.0)
        self.optimizer.step()  # only this block holds gradients now
        for p in params:
            p.grad = None

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Forward/backward every micro-batch, then step. Returns loss, aux_loss, lr, grad_norm, tokens."""
        w = self.wrapped
        step = self.scheduler.last_epoch  # restored on resume: the schedules below follow it
        w.begin_step(step, self.optimizer)  # layer switching, --lower-every, --task-grad-every
        try:
            return self._step(micro_batches)
        finally:
            w.open_boundary = False

    def _step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        w = self.wrapped
        n = len(micro_batches)
        if self.dist is not None:
            micro_batches = self.dist.local_batches(micro_batches)
        if self.in_backward is not None:
            self.in_backward.active = True
        try:
            loss_sum, aux_sum, n_aux, tokens = self._forward_backward(micro_batches, n)
        finally:
            if self.in_backward is not None:
                self.in_backward.active = False
        if self.dist is not None:
            self.dist.finish()
            loss_sum, aux_sum, tokens = self.dist.reduce_stats(loss_sum, aux_sum, tokens)
        grad_norm, lr = finish_step(self, list(w.parameters()))
        # The whole gradient's norm: the blocks stepped early, what finish_step stepped, and the
        # parameters stepped in the backward (all before clipping).
        sq = [n * n for n in self._block_norms] + ([grad_norm * grad_norm] if grad_norm is not None else [])
        if self.in_backward is not None and (oib := self.in_backward.pop_norm_sq()) is not None:
            sq.append(oib)
        if self._block_norms or self.in_backward is not None:
            grad_norm = math.sqrt(sum(sq)) if sq else None
            self._block_norms.clear()
        return {"loss": loss_sum / len(micro_batches), "aux_loss": aux_sum / n_aux if n_aux else None,
                "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def _forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], n: int
                          ) -> tuple[float, float, int, int]:
        w, dev = self.wrapped, self.device
        loss_sum, aux_sum, n_aux, tokens = 0.0, 0.0, 0, 0
        for i, b in enumerate(micro_batches):
            b = {k: v.to(dev) for k, v in b.items()}
            scale = self.scaler.scale(torch.ones((), device=dev)).item() if self.scaler else 1.0
            w.loss_scale = scale / n
            if self.dist is not None:
                self.dist.begin_micro(i, n)
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = w(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            w.backward(out)
            # This rank's share of the global mean (1 in a single process); 0 leaves a NaN out.
            wl, wa = self.dist.stat_weights(i) if self.dist is not None else (1.0, 1.0)
            if self.dist is not None:
                self.dist.end_micro(i, n)
            if wl:
                loss_sum += out.loss.item() * wl
            if out.aux_loss is not None:
                if wa:
                    aux_sum += out.aux_loss.item() * wa
                n_aux += 1
            tokens += int(b["attention_mask"].sum())
        return loss_sum, aux_sum, n_aux, tokens


def finish_step(stepper: Any, params: list[torch.nn.Parameter]) -> tuple[float | None, float]:
    """The end of an optimizer step of ``stepper`` (``Stepper`` or the pipeline's, with .optimizer,
    .scheduler, .scaler, .cfg): unscale, clip ``params``, step, advance the schedule, free the
    gradients. Returns (gradient norm before clipping, the learning rate the step used)."""
    opt, scaler = stepper.optimizer, stepper.scaler
    if scaler is not None:
        scaler.unscale_(opt)
    grad_norm = clip_gradients(params, stepper.cfg.max_grad_norm)
    lr = opt.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    stepper.scheduler.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, lr


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
    """Clip to ``max_norm`` (None or 0: only measure); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    if not max_norm:  # 0 turns clipping off (it must not scale every gradient to zero)
        if any(hasattr(p.grad, "full_tensor") for p in params):  # FSDP: sharded gradients (DTensor)
            return _full(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    return _full(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _full(norm: torch.Tensor) -> float:
    """A norm as a float; under FSDP it is a DTensor, whose value needs the other shards."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
