"""The gradient boundary: LoPT around any Hugging Face causal LM, without touching its forward.

How it works, in one paragraph. The decoder layers are split into k contiguous blocks. Two forward
hooks per boundary do all the work while the model's own forward runs unchanged:

* a pre-hook on the first layer of each lower block records that block's input;
* a hook on the last layer of each lower block computes the block's local loss
  (reconstruct the block input from the block output), and returns the output *detached*, so
  nothing above the boundary can send a gradient below it.

With the ``blockwise`` schedule the local loss is backpropagated inside that hook, before the next
block runs: the lower block's activations are freed at once, and peak activation memory is that of
the largest block rather than of the whole stack. The ``joint`` schedule (the paper's code) keeps
the local losses and backpropagates everything in one pass at the end. Both give the same
gradients.

What each training method changes (which parameters train, whether there is a boundary, how the
model is saved) comes from ``lopt.methods``: the same wrapper serves every method, so every
comparison runs one code path.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lopt.engine.anatomy import (find_loss_head, hidden_of, is_embedding_name, is_tied,
                                 untie_output_embeddings, find_layers, hidden_size_of, split_blocks)
from lopt.engine.activation_checkpointing import keep_matmul_outputs
from lopt.engine.config import ANCHOR_OBJECTIVES, CHECKPOINT_SCOPES, HEAD_OBJECTIVES, EngineConfig, LoPTError
from lopt.engine.heads import (EarlyExitHead, ReconstructionHead, final_norm_of, masked_mse, relative_anchor_loss,
                               shape_loss, standardised_recon_loss)
from lopt.engine.loss import causal_lm_loss, chunked_cross_entropy


@dataclass
class LoPTOutput(CausalLMOutputWithPast):
    """The model's output plus ``aux_loss``: the mean local (reconstruction) loss, unweighted.

    Under the joint schedule ``aux_loss`` still carries its graph (``backward`` needs it); under
    the blockwise schedule it was already backpropagated and is detached.
    """

    aux_loss: torch.Tensor | None = None


class LoPTModel(nn.Module):
    """A causal LM with LoPT's gradient boundaries (or one of the baselines), called like the model.

    ``out = wrapped(input_ids, attention_mask=..., labels=...)`` returns ``out.loss`` (task),
    ``out.aux_loss`` (mean local loss) and ``out.logits``; ``wrapped.backward(out)`` completes the
    step's backward for any schedule. In eval mode or under ``torch.no_grad()`` the output equals the
    bare model's. Attributes the wrapper does not define (``config``, ``generate``, ...) are the
    model's.
    """

    def __init__(self, model: nn.Module, method: Any):
        """``method``: a ``lopt.methods.Method`` built on its ``LoPTConfig`` (``lopt.wrap`` makes both)."""
        super().__init__()
        config: EngineConfig = method.config
        config.validate()
        self.lopt_config = config
        self.method_impl = method
        # The LM head shares the input embedding's matrix and stays shared (config.tied_head): the
        # matrix belongs to the last block, and the lower blocks see it through a detached lookup.
        self.tied = bool(method.boundary and (config.tied_head or (config.tied_head is None and is_tied(model))))
        if self.tied and not is_tied(model):
            raise LoPTError(f"--tied-head: the LM head of {type(model).__name__} is not tied to its input embedding "
                            f"(config.tie_word_embeddings is off), so there is nothing to keep tied; drop --tied-head")
        self.untied = untie_output_embeddings(model) if method.boundary and not self.tied else False
        self.model = model = method.prepare(model)
        self.layers_name, layers = find_layers(model)
        self.num_layers = len(layers)
        if method.boundary:
            self.block_ranges = split_blocks(self.num_layers, config.num_blocks, config.boundaries)
        else:
            self.block_ranges = [(0, self.num_layers)]
        n_lower = len(self.block_ranges) - 1
        hidden = hidden_size_of(model)
        self.local = method.local_loss  # lower blocks learn from a local loss
        # Under task_grad_every with lambda 0 no local loss is ever computed: no heads, no anchors (heads
        # that never get a gradient would also have no optimizer state to save or restore).
        has_local = self.local and not (config.task_grad_every and config.lambda_aux == 0)
        objective = config.local_objective if has_local else None
        self.heads = nn.ModuleList([ReconstructionHead(hidden) for _ in range(n_lower)]
                                   if objective in HEAD_OBJECTIVES else [])
        p = next(model.parameters())
        self.heads.to(device=p.device, dtype=torch.float32)  # local losses are computed in fp32
        # anchor: frozen copies of the pretrained lower blocks; the local loss keeps each block's output
        # what the pretrained block would give for the same input (costs the lower blocks' weights
        # once more in memory and one extra no-grad forward of them per step).
        self.anchors = nn.ModuleList(
            [nn.ModuleList(copy.deepcopy(layers[i]) for i in range(s, e)) for s, e in self.block_ranges[:-1]]
            if objective in ANCHOR_OBJECTIVES else [])
        self.anchors.requires_grad_(False)
        self.anchors.eval()
        # recon+anchor and recon+cos compare the boundary state with the *base model's*: the anchors'
        # chain starts from what the frozen input embedding gives (a copy: the lowest block trains the
        # real one), not from the trained embedding's output.
        self.anchor_embedding = (copy.deepcopy(model.get_input_embeddings()).requires_grad_(False)
                                 if objective in ANCHOR_OBJECTIVES and objective != "anchor" else None)
        # early-exit: frozen copies of the final norm and LM head (see EarlyExitHead for the cost).
        self.exit_head = self._make_exit_head(model) if objective == "early-exit" else None
        # False on the steps that skip the lower blocks' update (lower_every): they run without a graph.
        self.update_lower: bool = True
        # True on the steps that open the boundary (task_grad_every): see the open_boundary property.
        self._open = False
        self._saved_checkpointing: dict[nn.Module, tuple[bool, Any]] = {}
        # Multiplies every loss before its backward (1/grad_accum, a grad scaler's scale...). It must be
        # known before the forward because the blockwise schedule backpropagates inside it.
        self.loss_scale: float = 1.0
        # Extra factors on the task loss and on the local losses only (both times loss_scale). Data-
        # parallel training sets them so that each rank's gradient is its share of the global batch's
        # mean: the task loss is a mean over labelled tokens, the local loss over attention-mask tokens,
        # so the two need separate factors (lopt.parallel.data_parallel). 0 skips that loss's backward.
        self.task_loss_scale: float = 1.0
        self.local_loss_scale: float = 1.0
        # True when the caller always backpropagates the task loss through ``backward()`` (lopt's
        # trainers): under gradient accumulation the chunked loss then adds the LM head's gradient to
        # its ``.grad`` in the forward instead of holding a second head-sized buffer until the backward.
        self.head_grad_in_forward: bool = False
        # Called as fn(block_index, params) right after a lower block's local backward (blockwise
        # schedule): the trainer's per-block optimizer step, which frees that block's gradients
        # before the blocks above build their activations.
        self.after_local_backward: Callable[[int, list[nn.Parameter]], None] | None = None
        self._step: dict[str, Any] | None = None
        # Local losses of the training forwards that ran through a module set up by route_forward()
        # (with their graph under the joint schedule); whoever drives those forwards consumes and clears it.
        self.routed_aux_losses: list[torch.Tensor] = []
        self._block_params: list[list[nn.Parameter]] | None = None
        self._in_local_backward = False
        self._hooks = []
        self._loss_head = find_loss_head(self.plain_model()) if config.chunked_ce else None
        method.setup(self)
        if config.task_grad_every and not self._lower_checkpoint_modules():
            raise LoPTError(f"--task-grad-every recomputes the lower blocks in the backward, and the decoder layers of "
                            f"{type(model).__name__} do not support gradient checkpointing (transformers' "
                            f"GradientCheckpointingLayer); train without --task-grad-every")
        for i, (start, end) in enumerate(self.block_ranges[:-1]):
            for j in range(start, end):
                if j == start or self.anchors:
                    self._hooks.append(layers[j].register_forward_pre_hook(
                        self._make_input_hook(i, j), with_kwargs=True))
            self._hooks.append(layers[end - 1].register_forward_hook(self._make_boundary_hook(i)))
        if self.tied:
            self._hooks.append(self.model.get_input_embeddings().register_forward_hook(self._tied_lookup_hook))
        if self.anchor_embedding is not None:  # after the tied lookup's hook: it sees the output layer 0 gets
            self._hooks.append(self.model.get_input_embeddings().register_forward_hook(self._anchor_embedding_hook))

    def _make_exit_head(self, model: nn.Module) -> EarlyExitHead:
        loss_head = find_loss_head(model)
        norm = final_norm_of(model)
        if loss_head is None or norm is None:
            raise LoPTError(f"--local-objective early-exit needs a model whose logits are LM head(final norm(hidden)); "
                            f"{type(model).__name__}'s are not (scaled logits, or no final norm found): choose "
                            "another --local-objective")
        return EarlyExitHead(norm, loss_head[1], loss_head[2], self.lopt_config.ce_chunk_size)

    def train(self, mode: bool = True) -> "LoPTModel":
        super().train(mode)
        self.anchors.eval()  # the frozen reference blocks never use dropout
        for m in (self.anchor_embedding, self.exit_head):
            if m is not None:
                m.eval()
        return self

    # ---- passthrough so the wrapper behaves like the model
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    @property
    def method(self) -> str:
        return self.lopt_config.method

    @property
    def boundaries(self) -> list[int]:
        """First layer index of every block above the lowest."""
        return [s for s, _ in self.block_ranges[1:]]

    # ---- parameter bookkeeping
    def _layer_param_ids(self, ranges: Iterable[tuple[int, int]]) -> set[int]:
        layers = self.model.get_submodule(self.layers_name)
        return {id(p) for s, e in ranges for i in range(s, e) for p in layers[i].parameters()}

    def lower_parameters(self) -> list[nn.Parameter]:
        """Everything below the last boundary: lower layers, input (and position) embeddings."""
        if len(self.block_ranges) == 1:
            return []
        lower_ids = self._layer_param_ids(self.block_ranges[:-1])
        all_layer_ids = self._layer_param_ids(self.block_ranges)
        out_emb = self.model.get_output_embeddings()
        out_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
        params = []
        for name, p in self.model.named_parameters():
            if id(p) in lower_ids:
                params.append(p)
            elif id(p) not in all_layer_ids and id(p) not in out_ids and is_embedding_name(name):
                params.append(p)
        return params

    def _lower_side_ids(self) -> set[int]:
        """Ids of everything trained by local losses: the lower parameters and the local heads."""
        return {id(p) for p in self.lower_parameters()} | {id(p) for p in self.heads.parameters()}

    def block_parameters(self, block: int) -> list[nn.Parameter]:
        """Trainable parameters that block ``block``'s loss trains: its layers, its local head, and for
        the lowest block the embeddings; for the last block, everything above the last boundary."""
        if self._block_params is None:
            self._block_params = [self._collect_block_parameters(i) for i in range(len(self.block_ranges))]
        return self._block_params[block]

    def _optimizer_ids(self) -> set[int]:
        return {id(p) for p in self.method_impl.optimizer_parameters(self)}

    def _collect_block_parameters(self, block: int) -> list[nn.Parameter]:
        # Everything the optimizer holds, trainable now or later (LISA, BAdam switch layers on and off).
        pool = self._optimizer_ids()
        if block == len(self.block_ranges) - 1:
            lower = self._lower_side_ids()
            return [p for p in self.parameters() if id(p) in pool and id(p) not in lower]
        ids = self._layer_param_ids([self.block_ranges[block]])
        if block == 0:
            layer_ids = self._layer_param_ids(self.block_ranges)
            ids |= {id(p) for p in self.lower_parameters() if id(p) not in layer_ids}
        params = [p for p in self.model.parameters() if id(p) in ids and id(p) in pool]
        head = self.heads[block].parameters() if self.heads else []
        return params + [p for p in head if id(p) in pool]

    def param_groups(self, lr: float, lr_lower: float | None = None, weight_decay: float = 0.0
                     ) -> list[dict[str, Any]]:
        """AdamW parameter groups: the last block, final norm and LM head at ``lr``; the lower blocks,
        embeddings and local heads at ``lr_lower`` (default: the method's ``Method.lr_lower(lr)``:
        ``lr / 10`` for ``method="lopt"`` without ``task_grad_every``, ``lr`` otherwise). Biases and
        norm weights (1-D) get no weight decay. Frozen parameters are left out, except those the method
        may unfreeze later (LISA, BAdam: ``Method.optimizer_parameters``)."""
        if lr_lower is None:
            lr_lower = self.method_impl.lr_lower(lr)
        lower = self._lower_side_ids()
        pool = self._optimizer_ids()
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for p in self.parameters():
            if id(p) not in pool:
                continue
            key = ("lower" if id(p) in lower else "upper", p.ndim >= 2)
            groups.setdefault(key, []).append(p)
        out = []
        for (side, decay), params in sorted(groups.items()):
            out.append({"params": params, "lr": lr_lower if side == "lower" else lr,
                        "weight_decay": weight_decay if decay else 0.0, "name": f"{side}{'' if decay else '-nodecay'}"})
        return out

    # ---- the open boundary (task_grad_every)
    @property
    def open_boundary(self) -> bool:
        """True on a step whose boundary is open (set by the trainer from the step counter under
        ``task_grad_every``): the lower blocks' output is not detached, so the task gradient reaches
        them, and their local loss (when lambda_aux > 0) joins the task loss in one backward. Their
        activations are not held through the upper block: each lower layer keeps only its input and
        is recomputed in the backward (checkpointed on this step only)."""
        return self._open

    @open_boundary.setter
    def open_boundary(self, value: bool) -> None:
        value = bool(value)
        if value and len(self.block_ranges) < 2:
            raise LoPTError("open_boundary needs a model with a boundary (method lopt)")
        if value != self._open:
            self._checkpoint_lower(value)
        self._open = value

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set the model up for optimizer step ``step`` (0-based; call it before the step's first
        forward): the method switches its trainable layers (LISA, BAdam: give the ``optimizer`` so the
        switched-off layers' state is freed), the lower blocks update only on every ``lower_every``-th
        step, and under ``task_grad_every`` N the boundary opens on steps 0, N, 2N, ..."""
        c = self.lopt_config
        self.method_impl.begin_step(self, step, optimizer)
        self.update_lower = step % max(1, c.lower_every) == 0
        self.open_boundary = bool(c.task_grad_every) and step % c.task_grad_every == 0

    def lower_trains(self) -> bool:
        """Whether the lower blocks get a gradient in this step's backward (open boundary, or a local
        loss that is not skipped)."""
        return self._open or (self.local and not self._lower_idle())

    def _lower_idle(self) -> bool:
        """A closed step on which the lower blocks learn nothing: --lower-every skips it, or
        task_grad_every runs without a local loss (lambda_aux 0). They then run without a graph."""
        c = self.lopt_config
        return not self._open and (not self.update_lower or (c.task_grad_every > 0 and c.lambda_aux == 0))

    def _lower_checkpoint_modules(self) -> list[nn.Module]:
        layers = self.model.get_submodule(self.layers_name)
        last = self.block_ranges[-1][0]
        return [m for i in range(last) for m in layers[i].modules() if hasattr(m, "gradient_checkpointing")]

    def _checkpoint_lower(self, on: bool) -> None:
        """Full checkpointing of the lower layers while the boundary is open; their own setting back
        afterwards. (transformers checkpoints the layer's forward, not its call, so the boundary hooks
        on the layers never run again in the recomputation.)"""
        if on:
            from torch.utils.checkpoint import checkpoint

            full = functools.partial(checkpoint, use_reentrant=False)
            for m in self._lower_checkpoint_modules():
                self._saved_checkpointing[m] = (m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = full
        else:
            for m, (flag, func) in self._saved_checkpointing.items():
                m.gradient_checkpointing = flag
                if func is None:
                    m.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    m._gradient_checkpointing_func = func
            self._saved_checkpointing.clear()

    # ---- hooks
    def _active(self) -> bool:
        return (self._step is not None and self.training and not self._in_local_backward
                and (torch.is_grad_enabled() or self._step["skip"]))

    def _make_input_hook(self, block: int, layer: int):
        def hook(module, args, kwargs):
            if not self._active():
                return
            step = self._step
            if layer == self.block_ranges[block][0]:
                if block == 0 and self.local and self._lower_idle():
                    # This step leaves the lower blocks alone: run them without building a graph.
                    step["skip"] = True
                    torch.set_grad_enabled(False)
                step["inputs"][block] = hidden_of(args, kwargs)
            if self.anchors:
                step["layer_args"][layer] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    def _make_boundary_hook(self, block: int):
        def hook(module, args, output):
            if not self._active():
                return None
            h = output[0] if isinstance(output, tuple) else output
            if self._step["skip"]:
                if block == len(self.block_ranges) - 2:
                    torch.set_grad_enabled(True)
                    self._step["skip"] = False
            elif self._open:
                # The task gradient flows on through the boundary; the local loss (if any) joins the
                # task loss in one backward, so each lower layer is recomputed once, not twice.
                if self.local and self.lopt_config.lambda_aux > 0:
                    self._step["aux"].append(self._local_loss(block, h))
                return None
            elif self.local:
                aux = self._local_loss(block, h)
                if self.lopt_config.schedule == "blockwise":
                    self._backward_local(aux)
                    aux = aux.detach()
                    if self.after_local_backward is not None:
                        self.after_local_backward(block, self.block_parameters(block))
                self._step["aux"].append(aux)
            h = h.detach()
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    def _anchor_embedding_hook(self, module, args, output):
        # The base model's embedding output for the same tokens, for the anchors' chain (_reference).
        if self._active():
            with torch.no_grad():
                self._step["base_embedding"] = (self.anchor_embedding(*args), output)
        return None

    def _tied_lookup_hook(self, module, args, output):
        # Under tied_head the embedding matrix is the LM head, trained by the last block. Its lookup is
        # cut from the graph except on an open boundary (where the task gradient goes through it, as
        # in e2e), so no local loss reaches the head, and a frozen lower half (freeze-lower) builds
        # no graph just because the matrix under it trains.
        if self._active() and not self._open:
            return output.detach()
        return None

    def _local_loss(self, block: int, h: torch.Tensor) -> torch.Tensor:
        x = self._step["inputs"].pop(block)
        mask = self._step["mask"]
        objective = self.lopt_config.local_objective
        if objective == "anchor":
            return masked_mse(h, self._reference(block, x), mask)  # fp32 inside
        # The frozen blocks run as the model's do (under the step's autocast, if any); the losses in fp32.
        ref = self._reference(block, x) if objective in ANCHOR_OBJECTIVES else None
        with torch.autocast(device_type=h.device.type, enabled=False):
            if objective == "early-exit":
                labels = self._step["labels"]
                if labels is None:
                    raise LoPTError("--local-objective early-exit scores the lower block on the forward's labels, and "
                                    "this forward has none (GRPO/DPO trainers call the model without labels): "
                                    "choose another --local-objective")
                return self.exit_head(h, labels)
            if objective == "recon-std":
                return standardised_recon_loss(self.heads[block], h, x, mask)
            loss = masked_mse(self.heads[block](h.float()), x.detach(), mask)  # the paper's recon
            if objective == "recon+anchor":
                loss = loss + self.lopt_config.anchor_weight * relative_anchor_loss(h, ref, mask)
            elif objective == "recon+cos":
                loss = loss + self.lopt_config.anchor_weight * shape_loss(h, ref, mask)
            return loss

    @torch.no_grad()
    def _reference(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """What the frozen pretrained block ``block`` gives. Under ``anchor``, for the block's current
        input ``x``; under recon+anchor and recon+cos, the base model's own state at the block's output
        boundary: the chain of frozen blocks from the frozen embedding's output."""
        ref = x.detach()
        if self.anchor_embedding is not None:
            if block == 0:
                base, trained = self._step.pop("base_embedding")
                if trained is not x:
                    raise LoPTError(f"--local-objective {self.lopt_config.local_objective} needs a model whose first "
                                    f"layer reads the input embedding's output as it is ({type(self.model).__name__} "
                                    "changes it first: scaled or position embeddings): use anchor or recon")
                ref = base
            else:
                ref = self._step.pop("reference")
        start = self.block_ranges[block][0]
        for j, layer in enumerate(self.anchors[block]):
            rest, kwargs = self._step["layer_args"].pop(start + j)
            out = layer(ref, *rest, **kwargs)
            ref = out[0] if isinstance(out, tuple) else out
        self._step["reference"] = ref
        return ref

    def _aux_weight(self) -> float:
        return self.lopt_config.lambda_aux / max(1, len(self.block_ranges) - 1)

    def _backward_local(self, aux: torch.Tensor) -> None:
        w = self._aux_weight() * self.loss_scale * self.local_loss_scale
        if w == 0 or not aux.requires_grad:
            return
        self._in_local_backward = True  # a checkpointed layer recomputed now must not re-enter the hooks
        try:
            (aux * w).backward()
        finally:
            self._in_local_backward = False

    # ---- forward / backward
    @contextlib.contextmanager
    def step_scope(self, attention_mask: torch.Tensor | None = None) -> Iterator[dict[str, Any]]:
        """The per-step state the boundary hooks act on, for one forward of the model.

        The hooks do nothing outside this scope, so a forward that does not come through the wrapper
        (or through a module set up by ``route_forward``) is the bare model's. Yields the state; its
        ``"aux"`` list collects the local losses of the lower blocks. On exit the state is dropped and
        the grad mode restored (a step that skips the lower update switches it off for a while).
        """
        if self._step is not None:
            raise LoPTError("a LoPT forward is already running: step scopes cannot nest")
        self._step = {"inputs": {}, "aux": [], "mask": attention_mask, "layer_args": {}, "skip": False,
                      "labels": None}
        grad_mode = torch.is_grad_enabled()
        try:
            yield self._step
        finally:
            self._step = None
            torch.set_grad_enabled(grad_mode)

    def decoder_stack(self) -> nn.Module:
        """The module that holds the decoder layers (``model.model`` for Llama, ``transformer`` for
        GPT-2): every forward of the causal LM passes through it."""
        parent = self.layers_name.rsplit(".", 1)[0] if "." in self.layers_name else ""
        return self.model.get_submodule(parent)

    def route_forward(self, module: nn.Module | None = None) -> nn.Module:
        """Make calls of the plain ``module`` (default: ``decoder_stack()``) train the LoPT way.

        For trainers that call the plain transformers model rather than this wrapper (TRL's GRPO and
        DPO trainers do, through their own fused LM head that runs only the decoder stack): the
        instance's ``forward`` is replaced by one that opens ``step_scope`` when the module is in
        training mode and gradients are enabled, so the boundary hooks act exactly as in
        ``LoPTModel.forward`` (blockwise: the local backward runs inside the forward, scaled by
        ``loss_scale``). Generation (under ``no_grad``) and eval passes go straight to the original
        forward and compute what the bare model computes; a call made from inside the wrapper's own
        forward is passed through too. The local losses of each routed training forward are appended
        to ``routed_aux_losses`` (joint schedule: with their graph; the caller backpropagates them and
        clears the list). Returns ``module``; routing twice is a no-op.
        """
        module = self.decoder_stack() if module is None else module
        if getattr(module, "_lopt_routed_by", None) == id(self):
            return module
        original = module.forward
        wrapper = self

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if wrapper._step is not None or not (module.training and torch.is_grad_enabled()):
                return original(*args, **kwargs)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            # A KV cache would keep every layer's keys/values (and so the lower block's graph) alive.
            kwargs.setdefault("use_cache", False)
            with wrapper.step_scope(mask) as step:
                out = original(*args, **kwargs)
            if step["aux"]:
                wrapper.routed_aux_losses.append(torch.stack(step["aux"]).mean())
            return out

        module.forward = forward
        module._lopt_routed_by = id(self)  # an id, not the wrapper: a Module attribute would become a submodule
        return module

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> LoPTOutput:
        if self.training:
            # A KV cache would keep every layer's keys/values (and so the lower block's graph) alive.
            kwargs.setdefault("use_cache", False)
        chunked = (self._loss_head is not None and labels is not None and self.training
                   and torch.is_grad_enabled())
        with self.step_scope(attention_mask) as step:
            step["labels"] = labels  # early-exit's local loss scores the lower blocks on them
            if chunked:  # run the decoder stack only; the loss head never forms the full logits
                decoder, head, softcap = self._loss_head
                out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                scale = self.loss_scale * self.task_loss_scale if self.head_grad_in_forward else 0.0
                loss = chunked_cross_entropy(out.last_hidden_state, head.weight, labels, head.bias,
                                             self.lopt_config.ce_chunk_size, softcap, grad_scale=scale or None)
                logits = None
            else:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                logits = out.logits
                loss = causal_lm_loss(logits, labels) if labels is not None else None
        aux = torch.stack(step["aux"]).mean() if step["aux"] else None
        extra = {k: v for k, v in out.items() if k not in ("loss", "logits", "last_hidden_state")}
        return LoPTOutput(loss=loss, aux_loss=aux, logits=logits, **extra)

    def backward(self, output: LoPTOutput) -> None:
        """Finish the step's backward: afterwards every trainable parameter's ``.grad`` holds its
        gradient (task gradient above the last boundary, local gradient below), whatever the
        schedule. Multiplies by ``self.loss_scale`` (and the task / local parts by
        ``task_loss_scale`` / ``local_loss_scale``)."""
        if output.loss is None:
            raise LoPTError("the output has no loss: call the model with labels=... before backward")
        terms = []
        # A zero factor leaves the term out rather than multiplying it: a rank whose share of the batch
        # has no labelled token has a NaN mean loss, and NaN * 0 would still poison the gradients.
        if self.task_loss_scale != 0:
            terms.append(output.loss * self.task_loss_scale)
        if output.aux_loss is not None and output.aux_loss.requires_grad and self.local_loss_scale != 0:
            terms.append(output.aux_loss * (self.lopt_config.lambda_aux * self.local_loss_scale))  # joint
        if terms:
            (sum(terms) * self.loss_scale).backward()

    # ---- gradient checkpointing
    def gradient_checkpointing_enable(self, scope: str | None = "all", selective: str | None = None) -> None:
        """Recompute layer activations in the backward.

        ``scope``: the layers that keep only their input and recompute everything in the backward:
        ``'all'``; ``'last-block'``, the block above the last boundary (under blockwise LoPT the lower
        blocks' activations are freed early anyway); ``'lower-blocks'``, all but the last block (in
        the ``--pipeline`` the lower ranks have time to spare: the last one also runs the LM head);
        or None. ``selective``: the same choices, for layers that keep the outputs of their matrix
        multiplications and attention and recompute only the cheap element-wise work (norms, rotary
        embedding, activation function): about half of a layer's activations for a few percent of
        its time. A layer in both is checkpointed in full."""
        layers = self.model.get_submodule(self.layers_name)
        full, sel = self._checkpoint_layers(scope, len(layers)), self._checkpoint_layers(selective, len(layers))
        if not full and not sel:
            return
        base = self.model
        # Non-reentrant: the upper block's input is detached, and reentrant checkpointing would then
        # drop its parameters' gradients.
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        from torch.utils.checkpoint import checkpoint

        keep_matmuls = functools.partial(checkpoint, use_reentrant=False, context_fn=keep_matmul_outputs)
        for i, layer in enumerate(layers):
            for m in layer.modules():
                if not hasattr(m, "gradient_checkpointing"):
                    continue
                m.gradient_checkpointing = i in full or i in sel
                if i in sel and i not in full:
                    m._gradient_checkpointing_func = keep_matmuls

    def _checkpoint_layers(self, scope: str | None, n_layers: int) -> set[int]:
        if scope in (None, "off"):
            return set()
        if scope not in CHECKPOINT_SCOPES:
            raise LoPTError(f"gradient checkpointing scope must be one of {', '.join(CHECKPOINT_SCOPES)}, got {scope!r}")
        if scope != "all" and len(self.block_ranges) < 2:
            raise LoPTError(f"gradient checkpointing scope {scope!r} needs a model with a boundary (lopt, freeze-lower)")
        last = self.block_ranges[-1][0]
        return set(range(n_layers) if scope == "all" else range(last, n_layers) if scope == "last-block" else range(last))

    # ---- saving
    def plain_model(self) -> nn.Module:
        """The underlying transformers model (PEFT's base model for LoRA, adapters unmerged)."""
        return self.method_impl.plain_model(self.model)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write a plain transformers checkpoint: no local heads, LoRA merged into the weights."""
        self.method_impl.save_pretrained(self.model, Path(save_directory), **kwargs)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: options, block ranges, parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"lopt_config": asdict(self.lopt_config), "block_ranges": self.block_ranges,
                "num_layers": self.num_layers, "layers": self.layers_name, "untied_lm_head": self.untied,
                "tied_lm_head": self.tied,
                "trainable_params": trainable, "head_params": sum(p.numel() for p in self.heads.parameters()),
                **self.method_impl.describe()}


def load_run_info(path: str | Path) -> dict[str, Any]:
    """Read ``lopt_run.json`` from a checkpoint directory (empty dict when absent)."""
    f = Path(path) / "lopt_run.json"
    return json.loads(f.read_text()) if f.is_file() else {}
