"""Sharded LoPT (``--fsdp``): PyTorch's ``fully_shard`` (FSDP2) with one unit per decoder layer, one for
the embeddings, one for the final norm and LM head, one per local head, and the wrapper as root. Works
with both schedules; ``shard_model`` says what LoPT needs from FSDP2 and why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable
import torch
from torch import nn

from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError
from lopt.parallel.context import DistContext


def leaf_modules_outside_layers(model: nn.Module, layers_name: str) -> list[tuple[str, nn.Module]]:
    prefix = layers_name + "."
    return [(n, m) for n, m in model.named_modules()
            if n != layers_name and not n.startswith(prefix) and any(True for _ in m.parameters(recurse=False))]


def _run_lopt_hooks_last(wrapped: LoPTModel) -> None:
    """Move LoPT's forward hooks behind the ones registered after them (FSDP's).

    FSDP2's post-forward hook registers the pre-backward hook (which re-gathers a unit's parameters
    for its backward) on the layer's *output*. LoPT's boundary hook returns that output detached, so
    it must run after FSDP's, or the lower block's last layer would be backpropagated with its
    parameters still sharded.
    """
    for h in wrapped._hooks:
        d = h.hooks_dict_ref()
        if d is not None and h.id in d:
            d.move_to_end(h.id)


def shard_model(wrapped: LoPTModel, ctx: DistContext) -> LoPTModel:
    """Apply FSDP2 (``fully_shard``) to a wrapped model: one unit per decoder layer, one per local
    head, one for the embeddings (the lowest block's non-layer parameters), one for everything else
    outside the layers (final norm, LM head), and the wrapper as the root, which keeps no parameter
    of its own.

    Why the root must own nothing: at the end of *every* backward FSDP2 runs its root "post-backward
    final callback", which finishes and reshards every unit that has not done so. Under the
    blockwise schedule the first backward (the local one) ends in the middle of the forward; a unit
    that is still to be used in that forward (the final norm, when it sits in the root) would be
    resharded under the running forward. With every parameter in its own unit, units that have not
    run yet are untouched by that callback, and units that ran (the lower block's layers and the
    embeddings) are exactly the ones whose gradients are complete. The second requirement is the
    hook order (``_run_lopt_hooks_last``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if wrapped.anchors or wrapped.exit_head is not None:
        raise LoPTError(f"--fsdp does not support --local-objective {wrapped.lopt_config.local_objective} (its frozen "
                        "reference modules would sit in the FSDP root unit); use recon, or data parallel without --fsdp")
    if wrapped.method == "lora":
        raise LoPTError("--fsdp does not support --method lora (merging adapters into sharded weights "
                        "is not implemented); LoRA's optimizer state is small: use data parallel without --fsdp")
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    model = wrapped.model
    layers = model.get_submodule(wrapped.layers_name)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    for head in wrapped.heads:
        fully_shard(head, mesh=mesh)
    lower_ids = {id(p) for p in wrapped.lower_parameters()}
    outside = leaf_modules_outside_layers(model, wrapped.layers_name)
    emb = [m for _, m in outside if any(id(p) in lower_ids for p in m.parameters(recurse=False))]
    top = [m for _, m in outside if not any(id(p) in lower_ids for p in m.parameters(recurse=False))]
    for group in (emb, top):
        if group:
            fully_shard(group if len(group) > 1 else group[0], mesh=mesh)
    fully_shard(wrapped, mesh=mesh)
    _run_lopt_hooks_last(wrapped)
    wrapped._block_params = None  # fully_shard replaced the parameters by sharded ones
    return wrapped


def full_state_dict(module: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of an FSDP module, on CPU, on rank 0 (None elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    # Tied parameters (e2e with tied embeddings) come back as separate tensors under each name; keep
    # the first name only, as save_pretrained does for a model whose tensors are shared.
    names: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for group in names.values():
        for dup in group[1:]:
            sd.pop(dup, None)
    return sd


class GatheredModel:
    """What ``lopt.models.save_checkpoint`` needs (``save_pretrained``, ``modules``) for a model whose
    weights live elsewhere (sharded, or on other pipeline ranks): saves ``plain`` with the gathered
    full ``state_dict``, which gives the same plain transformers checkpoint as a single process."""

    def __init__(self, plain: nn.Module, state_dict: dict[str, torch.Tensor]):
        self.plain, self.state_dict = plain, state_dict

    def modules(self) -> Iterable[nn.Module]:
        return self.plain.modules()

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        self.plain.save_pretrained(save_directory, state_dict=self.state_dict, **kwargs)
