"""Data parallel LoPT (the default when WORLD_SIZE > 1).

Every rank holds the whole model; each global batch of ``batch_size x WORLD_SIZE`` rows is cut into
contiguous slices, one per rank, so the data order is that of one process with the global batch.
Plain ``DistributedDataParallel`` cannot be used: its reducer expects one backward per forward, and
LoPT's blockwise schedule runs the lower block's local backward *inside* the forward, then the task
backward. ``GradSync`` does the reducer's job per LoPT block instead: as soon as a block's backward is
over its gradients are flattened into one buffer and summed across ranks with an asynchronous
``all_reduce``, so the lower block's communication overlaps the upper block's compute.

Exact token normalisation: the task loss is a mean over labelled tokens and the local loss a mean
over attention-mask tokens; ranks hold different counts. Before the forward the counts are summed
across ranks and each rank scales its losses by ``W * n_rank / n_global``, so the averaged gradient
equals the single-process gradient of the global batch.
"""
from __future__ import annotations

from typing import Any, Callable
import torch
import torch.distributed as dist
from torch import nn

from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError
from lopt.parallel.context import DistContext
from lopt.parallel.fsdp import GatheredModel, full_state_dict, shard_model


IGNORE_INDEX = -100


def shard_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's contiguous slice of a global batch (``torch.tensor_split``: sizes differ by at most
    one row), with the columns that are padding in every row of the slice cut off (right padding, so
    this changes nothing a causal model computes for the real tokens).

    Returns ``(slice, real)``. When the global batch has fewer rows than ranks, a rank without a row
    gets a copy of the first row and ``real=False``: it runs the step (the collectives need every
    rank) with zero loss factors, so it contributes nothing.
    """
    rows = batch["input_ids"].shape[0]
    idx = torch.tensor_split(torch.arange(rows), world)[rank]
    real = len(idx) > 0
    if not real:
        idx = torch.arange(1)
    out = {k: v[idx] for k, v in batch.items()}
    mask = out.get("attention_mask")
    if mask is not None and mask.ndim == 2 and real:
        width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        if width < mask.shape[1]:
            out = {k: v[:, :width] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v for k, v in out.items()}
    return out, real


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(labelled tokens the task loss averages over, attention-mask tokens the local loss averages over)."""
    labels = batch["labels"]
    n_lab = int((labels[:, 1:] != IGNORE_INDEX).sum())
    mask = batch.get("attention_mask")
    n_mask = int(mask.sum()) if mask is not None else labels.numel()
    return n_lab, n_mask


class GradSync:
    """Average gradients across ranks, one coalesced all_reduce per LoPT block.

    ``launch(block)`` copies the block's gradients into one flat buffer (a missing gradient counts
    as zeros), frees the originals, and starts an asynchronous all_reduce of the buffer; ``wait()``
    waits for all launched blocks and makes each ``.grad`` a view of the averaged buffer. The buffer
    also carries one flag per parameter (1 where this rank had a gradient): a parameter that had no
    gradient on any rank keeps ``.grad = None``, so the optimizer skips it exactly as a single
    process would.
    """

    def __init__(self, blocks: list[list[nn.Parameter]], world_size: int):
        self.blocks = blocks
        self.world = world_size
        self.pending: dict[int, tuple[Any, list[tuple[torch.Tensor, list[nn.Parameter]]]]] = {}
        self.launched: set[int] = set()
        seen: set[int] = set()
        for params in blocks:
            for p in params:
                if id(p) in seen:
                    raise LoPTError("a parameter belongs to two LoPT blocks; gradient sync needs disjoint blocks")
                seen.add(id(p))

    def launch(self, block: int, async_op: bool = True) -> None:
        if block in self.launched:
            return
        self.launched.add(block)
        # Frozen parameters are left out (LISA and BAdam freeze most layers, and every rank freezes
        # the same ones: the buffer layout still agrees).
        params = [p for p in self.blocks[block] if p.requires_grad]
        if not params:
            return
        buffers = []
        works = []
        # One buffer per (dtype, device): gradients are summed in their own precision.
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), ps in groups.items():
            n = sum(p.numel() for p in ps)
            flat = torch.empty(n + len(ps), dtype=dtype, device=device)
            off = 0
            for i, p in enumerate(ps):
                k = p.numel()
                if p.grad is None:
                    flat[off:off + k].zero_()
                    flat[n + i] = 0
                else:
                    flat[off:off + k].copy_(p.grad.reshape(-1))
                    flat[n + i] = 1
                    p.grad = None  # the buffer holds it now: no second copy of the block's gradients
                off += k
            works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=async_op))
            buffers.append((flat, ps))
        self.pending[block] = (works, buffers)

    def wait(self, block: int | None = None) -> None:
        """Wait for one launched block (or all) and put the averaged gradients in place."""
        for b in ([block] if block is not None else list(self.pending)):
            if b not in self.pending:
                continue
            works, buffers = self.pending.pop(b)
            for w in works:
                if w is not None:
                    w.wait()
            for flat, ps in buffers:
                n = flat.numel() - len(ps)
                flags = flat[n:].tolist()
                flat = flat[:n]
                flat.div_(self.world)
                off = 0
                for i, p in enumerate(ps):
                    k = p.numel()
                    if flags[i] > 0:
                        g = flat[off:off + k]
                        p.grad = g.view(p.shape) if p.is_contiguous() else g.view(p.shape).clone()
                    off += k

    def reset(self) -> None:
        self.wait()
        self.launched.clear()


class DataParallel:
    """What a data-parallel step (DDP-style or FSDP) adds to ``lopt.runtime.loop.Stepper``.

    The Stepper calls ``local_batches`` (slice + exact loss factors), ``begin_micro`` before each
    micro-batch's forward, ``local_hook`` (installed as the wrapper's ``after_local_backward``),
    ``end_micro`` after each micro-batch's backward, ``finish`` before clipping, and
    ``reduce_stats`` for the logged numbers.
    """

    def __init__(self, ctx: DistContext, fsdp: bool = False):
        self.ctx, self.fsdp = ctx, fsdp
        self.wrapped: LoPTModel | None = None
        self.sync: GradSync | None = None
        self._scales: list[tuple[float, float, float, float]] = []
        self._last = True

    # ---- model
    def prepare_model(self, wrapped: LoPTModel) -> LoPTModel:
        """DDP: make every rank start from rank 0's weights (local heads and LoRA adapters are drawn
        at random). FSDP: shard. Call after loading any resumed extra state, before the optimizer."""
        self.wrapped = wrapped
        if self.fsdp:
            return shard_model(wrapped, self.ctx)
        with torch.no_grad():
            for t in list(wrapped.parameters()) + list(wrapped.buffers()):
                dist.broadcast(t.data, src=0)
        self.sync = GradSync([wrapped.block_parameters(i) for i in range(len(wrapped.block_ranges))],
                             self.ctx.world_size)
        return wrapped

    # ---- batches and loss factors
    def local_batches(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """This rank's slices of the global micro-batches, and the loss factors that make the averaged
        gradient that of the global batch (one all_reduce of the token counts)."""
        W, out, counts = self.ctx.world_size, [], []
        for b in micro_batches:
            loc, real = shard_rows(b, self.ctx.rank, W)
            n_lab, n_mask = token_counts(loc) if real else (0, 0)
            out.append(loc)
            counts += [n_lab, n_mask]
        total = self.ctx.all_reduce(counts)
        self._scales = []
        for i in range(len(micro_batches)):
            n_lab, n_mask, N_lab, N_mask = counts[2 * i], counts[2 * i + 1], total[2 * i], total[2 * i + 1]
            # With no labelled token in the whole global micro-batch the single-process loss is NaN;
            # factor 1 keeps that behaviour rather than hiding it.
            task = W * n_lab / N_lab if N_lab > 0 else 1.0
            local = W * n_mask / N_mask if N_mask > 0 else 1.0
            self._scales.append((task, local, n_lab / N_lab if N_lab > 0 else 0.0,
                                 n_mask / N_mask if N_mask > 0 else 0.0))
        return out

    def begin_micro(self, i: int, n: int) -> None:
        w = self.wrapped
        w.task_loss_scale, w.local_loss_scale = self._scales[i][0], self._scales[i][1]
        self._last = i == n - 1
        if self.fsdp:
            w.set_requires_gradient_sync(self._last)  # FSDP2: reduce-scatter only on the last micro-batch

    def stat_weights(self, i: int) -> tuple[float, float]:
        """This rank's share of the global mean task loss / local loss for micro-batch ``i``."""
        return self._scales[i][2], self._scales[i][3]

    # ---- gradient sync
    def local_hook(self, step_block: Callable[[int, list[nn.Parameter]], None] | None
                   ) -> Callable[[int, list[nn.Parameter]], None] | None:
        """The wrapper's ``after_local_backward``: start the lower block's all_reduce (async), or with
        the per-block step, synchronise it and step it. FSDP reduces inside the backward itself."""
        if self.fsdp:
            return step_block

        def hook(block: int, params: list[nn.Parameter]) -> None:
            if not self._last:
                return  # accumulating: gradients stay local until the last micro-batch
            if step_block is not None:
                self.sync.launch(block, async_op=False)
                self.sync.wait(block)
                step_block(block, params)
            else:
                self.sync.launch(block)
        return hook

    def end_micro(self, i: int, n: int) -> None:
        """After a micro-batch's backward: on the last one, launch every block not launched yet (the
        last block; all of them under the joint schedule, on a step whose boundary is open
        (``--task-grad-every``) or under a method without boundary). Lower blocks that learn nothing
        this step (``--lower-every``) have no gradient on any rank and are left out."""
        if self.fsdp or i != n - 1:
            return
        w = self.wrapped
        last = len(w.block_ranges) - 1
        for b in range(len(w.block_ranges)):
            if b < last and not w.lower_trains():
                continue
            self.sync.launch(b)

    def finish(self) -> None:
        """Before clipping and the optimizer step: every gradient averaged and in place."""
        if self.sync is not None:
            self.sync.reset()

    def reduce_stats(self, loss_sum: float, aux_sum: float, tokens: int) -> tuple[float, float, int]:
        loss, aux, tok = self.ctx.all_reduce([loss_sum, aux_sum, float(tokens)])
        return loss, aux, int(tok)

    # ---- checkpoints
    def saveable(self, wrapped: LoPTModel) -> Any:
        """What rank 0 passes to ``save_checkpoint``; None on other ranks. Collective under FSDP."""
        if not self.fsdp:
            return wrapped if self.ctx.is_main else None
        sd = full_state_dict(wrapped.model, self.ctx)
        return GatheredModel(wrapped.plain_model(), sd) if self.ctx.is_main else None

    def optimizer_state(self, wrapped: LoPTModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state to save (full, keyed by parameter names under FSDP). Collective under FSDP."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, wrapped: LoPTModel, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
