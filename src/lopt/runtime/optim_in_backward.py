"""The optimizer step inside the backward (``--optimizer-in-backward``).

Every parameter of the block above the last boundary gets its own optimizer, stepped by a
``register_post_accumulate_grad_hook`` as soon as the backward has finished that parameter's
gradient; the gradient is freed right after. The block's gradients therefore never coexist: at most
one parameter's gradient is alive beyond what autograd is computing. With LoPT's per-block step for
the lower blocks, no gradient of the model outlives its block's backward.

What stays the same as the ordinary step:

* the learning rate: the per-parameter optimizers read it, at each step, from the parameter's group
  in the trainer's main optimizer, which the LR scheduler drives as usual;
* the checkpoint: ``state_dict`` returns the main optimizer's state dict with every per-parameter
  state filled in at the parameter's index, the very format of the ordinary step, so a run can be
  resumed with or without the option.

What changes: clipping. A global gradient norm is only known once every gradient exists, which is
exactly what this mode avoids, so ``max_grad_norm`` bounds *each parameter's* gradient norm (the
same formula as ``torch.nn.utils.clip_grad_norm_``, applied per tensor). The reported gradient norm
is still the true norm of the whole gradient (the per-parameter norms before clipping, summed in
squares). Gradient accumulation and fp16's grad scaler need every gradient before any step, and are
refused by ``TrainConfig.validate``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn


class OptimizerInBackward:
    """Step each of ``params`` inside the backward, with an optimizer of its own made by
    ``make_optimizer(param_groups)`` from the hyperparameters of its group in ``main``.

    The hooks act only while ``active`` is true (the trainer's step sets it), so a backward run by
    anyone else leaves the gradients in ``.grad`` as usual. ``main`` keeps every parameter in its
    groups (for the schedule and the state dict) but never holds state for ``params``: their
    gradients are gone by the time ``main.step()`` runs, and optimizers skip parameters without one.
    """

    def __init__(self, params: Iterable[nn.Parameter], main: torch.optim.Optimizer,
                 make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 max_grad_norm: float | None = None):
        self.main = main
        self.max_grad_norm = max_grad_norm
        self.active = False
        self._norm_sq: torch.Tensor | None = None
        # The index of every parameter in main's state dict (torch numbers them in group order).
        order = [p for g in main.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(order)}
        # Group *indices*: main.load_state_dict replaces the group dicts with new ones.
        self._group_of = {id(p): gi for gi, g in enumerate(main.param_groups) for p in g["params"]}
        self.params = [p for p in params if p.requires_grad]
        missing = [i for i, p in enumerate(self.params) if id(p) not in self._group_of]
        if missing:
            raise ValueError(f"optimizer in backward: {len(missing)} parameter(s) are not in the main optimizer")
        self.optimizers: dict[int, torch.optim.Optimizer] = {
            id(p): make_optimizer([{**_hyper(self._group(p)), "params": [p]}]) for p in self.params}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _group(self, p: torch.Tensor) -> dict[str, Any]:
        return self.main.param_groups[self._group_of[id(p)]]

    def _hook(self, p: torch.Tensor) -> None:
        if not self.active or p.grad is None:
            return
        g = p.grad
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        # A tensor sum, read once at the end of the step: no device synchronisation per parameter.
        self._norm_sq = norm.square() if self._norm_sq is None else self._norm_sq + norm.square()
        if self.max_grad_norm is not None:
            g.mul_((self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(g.dtype))
        opt = self.optimizers[id(p)]
        opt.param_groups[0]["lr"] = self._group(p)["lr"]  # the schedule lives in main
        opt.step()
        p.grad = None

    def pop_norm_sq(self) -> float | None:
        """The sum of squared gradient norms (before clipping) of the parameters stepped since the
        last call; None when none was."""
        n, self._norm_sq = self._norm_sq, None
        return None if n is None else float(n)

    def state_dict(self) -> dict[str, Any]:
        """``main``'s state dict with the per-parameter states at their parameters' indices: the same
        format as an ordinary optimizer over all parameters."""
        sd = self.main.state_dict()
        state = dict(sd["state"])
        for p in self.params:
            own = self.optimizers[id(p)].state_dict()["state"]
            if 0 in own:
                state[self._index[id(p)]] = own[0]
        return {**sd, "state": state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a state dict written by ``state_dict`` (or by an ordinary optimizer over the same
        parameters): the per-parameter states go to their optimizers, the rest to ``main``."""
        state = dict(sd["state"])
        mine = {id(p): state.pop(self._index[id(p)], None) for p in self.params}
        self.main.load_state_dict({**sd, "state": state})  # also restores lr, initial_lr, ...
        for p in self.params:
            group = {**_hyper(self._group(p)), "params": [0]}
            st = mine[id(p)]
            self.optimizers[id(p)].load_state_dict({"state": {0: st} if st is not None else {},
                                                    "param_groups": [group]})

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}
