"""``lopt plan``: will a training step fit, and with which method? Predicted before loading anything.

The model is built from its config on the ``meta`` device (shapes, no weights), so parameter counts
are exact for any size. For every method the plan says which parameters train, and from that the
bytes of weights (fp32, as lopt trains), gradients and fused-AdamW state. Activations come from
``lopt.plan.activations``, which replays each layer's forward op by op and counts what autograd
saves. The step is then walked through in the order lopt runs it (forward, backward layer by layer,
the optimizer step; under LoPT's blockwise schedule one block after the other, each lower block
stepped and its gradients freed before the next block runs), and the peak is the largest sum of
live bytes along the way.

    >>> rows = plan("qwen2.5-7b", batch_size=4, max_length=1024, precision="bf16", gpu_memory="80GB")

Assumptions, stated once: every position is a real, labelled token (no padding, so attention runs
without a mask and the loss covers B x (T-1) tokens); lopt's defaults otherwise (chunked loss in
chunks of 1024 tokens, SDPA attention, LoRA r=16 on all linear layers, LoPT's reconstruction heads
and per-block optimizer step). Rows are named as lopt train spells them: ``lopt`` is its default
recipe (``--task-grad-every 4``, a tied head kept tied, no local loss): a cycle of one open step (the
lower layers keep only their inputs and are recomputed in the backward, the task gradient reaches every
layer, all gradients wait for the step) and N-1 closed steps (the lower half without a graph), the
row's peak the cycle's; ``lopt-kN`` is the paper's pure local learning (``--task-grad-every 0``).
``--optimizer adamw-8bit`` is bitsandbytes' blockwise AdamW8bit (``paged-adamw-8bit`` the same in CUDA
unified memory, outside the peak), ``--optimizer-in-backward`` frees the last block's gradients one tensor
at a time inside the backward. Bytes per element follow ``--precision`` as lopt train stores it
(``PRECISION_BYTES``: fp32; bf16-mixed, fp32 masters of what trains and bf16 frozen weights under
autocast; bf16-true, bf16 everything plus ``--bf16-update``'s state), a qlora base in NF4 (``nf4_bytes``).
The basis is live tensor bytes (what ``torch.cuda.max_memory_allocated`` counts): CUDA's context and the
caching allocator's reserve are not in the peak; the fit column keeps ``headroom`` free for them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from lopt.engine.anatomy import find_layers
from lopt.engine.config import RECIPE_TASK_GRAD_EVERY, LoPTError
from lopt.config import OPTIMIZERS
from lopt.config import BF16_UPDATES, RecipeConfig
from lopt.config import PRECISIONS as TRAIN_PRECISIONS
from lopt.jsonout import json_help, write_json
from lopt.methods import LoPTConfig, Trains, get_method, method_names
from lopt.plan.activations import (CLOSEST_MODEL_TYPE, SUPPORTED_MODEL_TYPES, LayerMemory, LayerMode, LayerShape,
                                   PhaseMemory, PhaseSpec, phase_memory)

# lopt train --method lopt (its default recipe), the paper's lopt-kN, every other method
DEFAULT_METHODS = ("lopt", "lopt-k2", "lopt-k4", "e2e", "freeze-lower", "lora", "lisa", "badam")
EXTRA_METHODS = ("qlora",)  # also in the full single-process table, where its method is registered


@dataclass(frozen=True)
class PrecisionBytes:
    """What a precision stores, in bytes per element: trained parameters (the optimizer's master
    copy), frozen ones, gradients; ``amp``: the forward runs under bf16 autocast; ``compute``: the
    matmuls' dtype."""

    name: str
    amp: bool
    trained: int
    frozen: int
    grad: int
    compute: int


# lopt train's precisions, as the plan costs them. bf16-mixed: fp32 master weights, gradients and AdamW
# state for what trains, frozen weights (LoRA's base, freeze-lower's lower half, LISA's and BAdam's
# inactive layers) in bf16, the forward under autocast; bf16-true: weights, gradients and optimizer state
# in bf16 (the optimizer state as the update keeps it: ``BF16_UPDATE_STATE``).
PRECISION_BYTES = {
    "fp32": PrecisionBytes("fp32", False, 4, 4, 4, 4),
    "bf16-mixed": PrecisionBytes("bf16-mixed", True, 4, 2, 4, 2),
    "bf16-true": PrecisionBytes("bf16-true", False, 2, 2, 2, 2),
}
PRECISION_ALIASES = {"bf16": "bf16-mixed"}  # lopt train's alias
# The precisions lopt plan takes: lopt train's (lopt.config.PRECISIONS) that it models; auto is
# bf16-mixed on CUDA and fp32 on CPU, as lopt train picks it.
PRECISIONS = tuple(p for p in TRAIN_PRECISIONS
                   if p in PRECISION_BYTES or p in PRECISION_ALIASES or p == "auto")


def precision_bytes(precision: str, device: str = "cuda") -> PrecisionBytes:
    """The storage of ``precision`` (an alias resolved; auto as lopt train resolves it on ``device``);
    PlanError (one line) for one the plan does not model."""
    name = ("bf16-mixed" if device == "cuda" else "fp32") if precision == "auto" else precision
    name = PRECISION_ALIASES.get(name, name)
    if name not in PRECISION_BYTES:
        known = ", ".join(p for p in PRECISIONS) or ", ".join(PRECISION_BYTES)
        raise PlanError(f"precision must be one of {known}, got {precision!r}"
                        + (" (fp16 is not planned: plan bf16-mixed, whose bytes are the same)" if precision == "fp16"
                           else ""))
    return PRECISION_BYTES[name]


# bf16-true's AdamW state (lopt.runtime.loop.make_optimizer, --bf16-update), as (bytes per element, bytes
# per tensor) for a bf16 and for an fp32 parameter (the local reconstruction heads stay fp32):
# stochastic-round (the default) is torchao's AdamW (two moments in the weight's dtype and an fp32 step
# tensor: measured with torchao 0.18.0), kahan torch-optimi's AdamW (two moments and a Kahan compensation
# buffer in the weight's dtype, the step count in the group: measured with torch-optimi 0.3.3), plain
# PyTorch's fused AdamW (two moments and an fp32 step tensor).
BF16_UPDATE_STATE = {"kahan": ((6, 0), (8, 0)), "stochastic-round": ((4, 4), (8, 4)), "plain": ((4, 4), (8, 4))}
BF16_TRUE_STATE_BYTES = 2  # kahan's compensation buffer per bf16 weight, beyond the two moments
DEFAULT_BF16_UPDATE = next(f.default for f in dataclasses.fields(RecipeConfig) if f.name == "bf16_update")
# 4-bit NF4 bases (bitsandbytes' Params4bit, as lopt.methods.qlora quantizes every decoder-layer linear
# map): two weights a byte, an absmax per block of 64 (fp32, or under double quantization 8-bit plus an
# fp32 absmax per 256 blocks, a 256-entry fp32 code and an offset) and a 16-entry fp32 NF4 code per tensor.
NF4_BLOCK = 64
SCOPES = ("off", "all", "last-block", "lower-blocks")
CE_CHUNK = 1024  # LoPTConfig.ce_chunk_size
LORA_R = 16  # LoRAOptions.lora_r: the methods are planned at their default options
DEFAULT_HEADROOM = 1 << 30  # CUDA context + allocator slack kept free by the fit column
PLAN_UNITS = {"memory": "bytes", "parameters": "count"}  # the units of `lopt plan --json`


class PlanError(ValueError):
    """Bad input to ``lopt plan``: one line saying what is wrong and what to do."""


# --------------------------------------------------------------------------- the model's config


def aliases() -> list[str]:
    """Model names ``lopt plan`` knows without a download (configs shipped in ``lopt/configs``)."""
    return sorted(p.name[:-5] for p in resources.files("lopt").joinpath("configs").iterdir()
                  if p.name.endswith(".json"))


def _alias_key(name: str) -> str:
    # "Qwen/Qwen2.5-7B", "llama3.1-8b", "SmolLM2-135M-Instruct" -> the shipped names
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = re.sub(r"-(instruct|hf|chat-hf)$", "", key)
    key = re.sub(r"^(meta-)?llama-?(\d)", r"llama-\2", key)
    return key


def load_config(source: Any) -> Any:
    """A transformers config from an alias, a checkpoint directory, a ``config.json`` path, a dict or
    a config object. Raises PlanError (one line) when there is none."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        return _config_from_dict(dict(source), "the given dict")
    if source is None:
        source = "smollm2-135m"  # lopt's embedded default model
    name = str(source)
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{name} has no config.json: pass a checkpoint directory, a config.json file "
                            f"or an alias ({', '.join(aliases())})")
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PlanError(f"cannot read {path} as JSON ({e}); pass a transformers config.json") from e
        return _config_from_dict(data, str(path))
    key = _alias_key(name)
    shipped = resources.files("lopt").joinpath("configs", f"{key}.json")
    if shipped.is_file():
        return _config_from_dict(json.loads(shipped.read_text()), key)
    looks_like_path = name.endswith(".json") or name.startswith((".", "/", "~"))
    what = f"no such file or directory: {name}" if looks_like_path else f"unknown model {name!r}"
    raise PlanError(f"{what}; pass a checkpoint directory, a config.json file or one of the aliases "
                    f"{', '.join(aliases())} (lopt plan does not download)")


def _config_from_dict(data: dict[str, Any], label: str) -> Any:
    from transformers import AutoConfig

    model_type = data.pop("model_type", None)
    if model_type is None:
        raise PlanError(f"{label} has no model_type: it is not a transformers model config")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as e:
        raise PlanError(f"{label}: transformers cannot build a {model_type!r} config "
                        f"({str(e).splitlines()[0]})") from e


# --------------------------------------------------------------------------- parameters


@dataclass
class ParamCounts:
    """Exact parameter counts of a causal LM, from its meta-device skeleton."""

    layers: list[int]  # elements per decoder layer
    layer_tensors: list[int]
    embedding: int  # input (and position) embeddings
    embedding_tensors: int
    head: int  # LM head elements (the embedding's when tied)
    head_tensors: int
    tied: bool
    other: int  # the final norm and anything else outside layers, embeddings and head
    other_tensors: int
    lora: list[int]  # LoRA adapter elements per layer (r=LORA_R on every linear map; see ``with_lora``)
    lora_tensors: list[int]
    vocab: int
    hidden: int
    head_bias: bool
    # Element counts of every parameter tensor, by part (for the per-tensor optimizer state of 8-bit
    # AdamW and the one gradient at a time of --optimizer-in-backward).
    layer_sizes: list[tuple[int, ...]] = field(default_factory=list)
    embedding_sizes: tuple[int, ...] = ()
    head_sizes: tuple[int, ...] = ()
    other_sizes: tuple[int, ...] = ()
    lora_sizes: list[tuple[int, ...]] = field(default_factory=list)
    # Every decoder layer's linear maps, in module order: (module name in the model, in, out).
    layer_linears: list[tuple[tuple[str, int, int], ...]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return sum(self.layers) + self.embedding + (0 if self.tied else self.head) + self.other

    def recon_head(self) -> tuple[int, int]:
        """(elements, tensors) of one ``lopt.heads.ReconstructionHead``: LayerNorm, two Linears."""
        h, b = self.hidden, max(1, self.hidden // 4)
        return 2 * h + h * b + b + b * h + h, 6


def _two_layer_config(config: Any) -> Any | None:
    """A copy of ``config`` with two decoder layers (per-layer lists cut to match), or None when it has
    fewer than three."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 3:
        return None
    small = copy.deepcopy(config)
    small.num_hidden_layers = 2
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:2]
    return small


def count_parameters(config: Any, lora_r: int = LORA_R) -> ParamCounts:
    """Build the model on the meta device and count its parameters by part. The decoder layers of the
    architectures lopt plan models all have the same parameters, so a deep model is built with two layers
    (in well under a second instead of seconds for 80) and its layers counted from them, when the two are
    alike (otherwise the whole model is built)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    def build(cfg: Any) -> Any:
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise PlanError(f"transformers cannot build a causal LM from this config "
                            f"({str(e).splitlines()[0]})") from e

    n_layers, small = config.num_hidden_layers, _two_layer_config(config)
    model = build(small) if small is not None else build(config)
    _, built = find_layers(model)
    if small is not None:
        shapes = [[(name, tuple(p.shape)) for name, p in layer.named_parameters()] for layer in built]
        if shapes[0] != shapes[1]:
            model = build(config)
            _, built = find_layers(model)
    layers = list(built) if len(built) == n_layers else [built[0]] * n_layers
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    seen = {id(p) for layer in built for p in layer.parameters()}

    def part(module: nn.Module | None) -> tuple[int, ...]:
        ps = [p for p in (module.parameters() if module is not None else []) if id(p) not in seen]
        seen.update(id(p) for p in ps)
        return tuple(p.numel() for p in ps)

    emb_s = part(emb)
    head_s = (head.weight.numel(),) + ((head.bias.numel(),) if getattr(head, "bias", None) is not None else ())
    if not tied:
        part(head)
    rest = tuple(p.numel() for p in model.parameters() if id(p) not in seen)
    layer_s = [tuple(p.numel() for p in layer.parameters()) for layer in layers]
    lora_s = [tuple(n for m in layer.modules() if isinstance(m, nn.Linear)
                    for n in (lora_r * m.in_features, lora_r * m.out_features)) for layer in layers]
    names = {id(m): name for name, m in model.named_modules()}
    linears = [tuple((names[id(m)], m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear))
               for layer in layers]
    return ParamCounts(
        layers=[sum(x) for x in layer_s], layer_tensors=[len(x) for x in layer_s],
        embedding=sum(emb_s), embedding_tensors=len(emb_s), head=sum(head_s), head_tensors=len(head_s), tied=tied,
        other=sum(rest), other_tensors=len(rest), lora=[sum(x) for x in lora_s], lora_tensors=[len(x) for x in lora_s],
        vocab=emb.weight.shape[0], hidden=emb.weight.shape[1], head_bias=getattr(head, "bias", None) is not None,
        layer_sizes=layer_s, embedding_sizes=emb_s, head_sizes=head_s, other_sizes=rest, lora_sizes=lora_s,
        layer_linears=linears)


# LayerShape.linears' names for the linear maps of the architectures whose modules are named otherwise.
_SHAPE_NAMES = {"query_key_value": "qkv_proj", "dense": "o_proj", "dense_h_to_4h": "up_proj",
                "dense_4h_to_h": "down_proj"}


def lora_targets(counts: ParamCounts, targets: Any) -> list[tuple[str, int, int]]:
    """The linear maps of decoder layer 0 that PEFT's ``target_modules`` selects: ``all-linear`` (every
    linear map but the LM head), a list of names (a module matches a name equal to its own or ending
    in ``.name``), or a string matched as a regular expression against the whole module name. PlanError
    (one line) when it selects none of a layer's linear maps."""
    layer = counts.layer_linears[0] if counts.layer_linears else ()
    if isinstance(targets, (list, tuple)) and list(targets) == ["all-linear"]:
        targets = "all-linear"
    if targets == "all-linear":
        picked = list(layer)
    elif isinstance(targets, str):
        picked = [m for m in layer if re.fullmatch(targets, m[0])]
    else:
        picked = [m for m in layer if any(m[0] == t or m[0].endswith("." + t) for t in targets)]
    if not picked:
        have = ", ".join(sorted({m[0].rsplit(".", 1)[-1] for m in layer}))
        raise PlanError(f"--lora-target-modules {' '.join(targets) if isinstance(targets, (list, tuple)) else targets} "
                        f"matches no linear map of this model's decoder layers (they are {have}); pass some of "
                        f"those names or all-linear")
    return picked


def with_lora(counts: ParamCounts, r: int, targets: Any) -> tuple[ParamCounts, tuple[str, ...]]:
    """``counts`` with its LoRA adapters at rank ``r`` on ``targets`` (see ``lora_targets``), and the
    adapted maps as ``LayerShape.linears`` names."""
    picked = lora_targets(counts, targets)
    short = {m[0].rsplit(".", 1)[-1] for m in picked}
    sizes = [tuple(n for name, i, o in layer if name.rsplit(".", 1)[-1] in short for n in (r * i, r * o))
             for layer in counts.layer_linears]
    shape_names = tuple(sorted({_SHAPE_NAMES.get(s, s) for s in short}))
    return dataclasses.replace(counts, lora=[sum(x) for x in sizes], lora_tensors=[len(x) for x in sizes],
                               lora_sizes=sizes), shape_names


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class RowSpec:
    """One training configuration as ``lopt train`` runs it: the method and the options that change a
    step's memory. ``task_grad_every`` N > 0 (method lopt only): lopt train's default recipe, the boundary
    open every N-th step, no local loss (``--lambda-aux 0``, its default there). ``tied_head``: keep a
    tied LM head tied across the boundary (None: when the model ties it, as lopt train's default under
    ``--task-grad-every``). ``lower_every``: the lower blocks update every N-th step (the paper's
    mechanism). ``optimizer``: adamw (fused), adamw-8bit or paged-adamw-8bit (bitsandbytes).
    ``optimizer_in_backward``: the last block's parameters stepped one by one inside the backward.
    ``options``: the method's own options that change its memory, as (field, value) pairs of its options
    dataclass (lora_r, lora_target_modules, lisa_layers, badam_block_size); absent: the method's
    defaults. ``precision``: one of ``PRECISION_BYTES``."""

    method: str
    num_blocks: int = 2
    task_grad_every: int = 0
    tied_head: bool | None = False
    lower_every: int = 1
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    precision: str = "fp32"
    bf16_update: str = DEFAULT_BF16_UPDATE

    def keeps_tied(self, model_tied: bool) -> bool:
        """Whether the LM head stays tied to the embedding (a boundary unties it unless told not to)."""
        if not get_method(self.method).boundary:
            return model_tied
        return model_tied and self.tied_head is not False

    def name(self, model_tied: bool) -> str:
        """The row's name, as lopt train's flags spell it after ``--method`` (lopt-kN: the paper's
        ``--method lopt --task-grad-every 0 --num-blocks N``)."""
        if self.method == "lopt" and self.task_grad_every:
            out = "lopt" + (f" --task-grad-every {self.task_grad_every}" if self.task_grad_every != RECIPE_TASK_GRAD_EVERY
                            else "") + (f" --num-blocks {self.num_blocks}" if self.num_blocks != 2 else "")
            default_tied = model_tied
        else:
            out = f"lopt-k{self.num_blocks}" if self.method == "lopt" else self.method
            default_tied = False
        if get_method(self.method).boundary and self.keeps_tied(model_tied) != default_tied:
            out += " --tied-head" if self.keeps_tied(model_tied) else " --no-tied-head"
        return out + self._extra()

    def _extra(self) -> str:
        flags = "".join(f" --{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                        for k, v in self.options)
        return (flags + (f" --lower-every {self.lower_every}" if self.lower_every != 1 else "")
                + (f" --optimizer {self.optimizer}" if self.optimizer != "adamw" else "")
                + (" --optimizer-in-backward" if self.optimizer_in_backward else ""))

    def command(self, model_tied: bool, full: str = "off", sel: str = "off") -> str:
        """The ``lopt train`` flags of this configuration, in full."""
        out = f"lopt train --method {self.method}"
        boundary = get_method(self.method).boundary
        if self.method == "lopt":
            out += f" --task-grad-every {self.task_grad_every}"
        if boundary:
            out += f" --num-blocks {self.num_blocks}"
            default_tied = model_tied and self.method == "lopt" and bool(self.task_grad_every)
            if self.keeps_tied(model_tied) != default_tied:
                out += " --tied-head" if self.keeps_tied(model_tied) else " --no-tied-head"
        out += self._extra()
        out += f" --gradient-checkpointing {full}" if full != "off" else ""
        out += f" --selective-checkpointing {sel}" if sel != "off" else ""
        return out

    def check(self, model_tied: bool) -> None:
        """PlanError (one line) where lopt train would refuse this configuration."""
        if self.tied_head and not model_tied:
            raise PlanError("--tied-head: this model's LM head is not tied to its input embedding "
                            "(tie_word_embeddings is off), so there is nothing to keep tied; drop --tied-head")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        try:
            config = LoPTConfig(method=self.method, num_blocks=self.num_blocks, task_grad_every=self.task_grad_every,
                                tied_head=bool(self.tied_head),
                                lower_every=self.lower_every, **dict(self.options))
            config.validate()
            cls = get_method(self.method)
            # A 4-bit method's own check imports bitsandbytes, which planning does not need: its options
            # are checked as the method it derives from checks them.
            (cls.__mro__[1] if getattr(cls, "bf16_only", False) else cls).check(config)
        except (LoPTError, TypeError) as e:
            raise PlanError(str(e).splitlines()[0]) from e


@dataclass
class Phase:
    """One forward+backward stretch of a step (see ``PhaseSpec``) with the gradients it makes, in
    bytes: per layer, on top (final norm and head, or a local head) and below (the embedding)."""

    spec: PhaseSpec
    layer_grads: list[int]
    top_grads: int = 0
    base_grads: int = 0
    tied_extra: int = 0  # a tied embedding's dense gradient, made at the end and added into the head's
    steps_after: bool = True  # the optimizer steps and frees these gradients right after the phase
    # --optimizer-in-backward: which layers' gradients are stepped and freed one tensor at a time
    # inside the backward (with the largest of a layer's gradients), and whether the top's and the
    # embedding's are.
    in_backward: tuple[bool, ...] = ()
    layer_max_grads: tuple[int, ...] = ()
    top_in_backward: bool = False
    base_in_backward: bool = False
    label: str = ""  # which step of a cycle (open, closed, idle) or block this phase is


@dataclass
class MethodSetup:
    """Which parameters a method keeps, trains and steps, and the phases of its step."""

    name: str
    resident: int  # parameter elements in memory
    trainable: int
    trainable_tensors: int
    phases: list[Phase]
    trainable_sizes: list[int] = field(default_factory=list)  # elements of every trained tensor
    last_block_sizes: list[int] = field(default_factory=list)  # those the last block's loss trains
    precision: str = "fp32"
    weight_bytes: int = 0  # the parameters' bytes as stored (0: fp32, 4 x resident)
    quantized: int = 0  # of them, the 4-bit base's (data and quantization state)
    hidden_bytes: int = 4  # bytes per element of the hidden states (the residual stream)
    final_bytes: int = 4  # of the final norm's output (what the loss reads)
    dequant_tmp: int = 0  # a 4-bit base: the largest weight dequantized to bf16 in the backward
    bf16_update: str = DEFAULT_BF16_UPDATE
    fp32_sizes: list[int] = field(default_factory=list)  # trained tensors kept fp32 under bf16-true (local heads)

    @property
    def weights(self) -> int:
        """The parameters' bytes as stored."""
        return self.weight_bytes or 4 * self.resident


def parse_method(name: str, num_blocks: int) -> tuple[str, int]:
    """``lopt-k4`` -> ("lopt", 4); ``lopt`` -> ("lopt", num_blocks); any registered method's name."""
    m = re.fullmatch(r"lopt-k(\d+)", name)
    if m:
        return "lopt", int(m.group(1))
    if name not in method_names():
        raise PlanError(f"unknown method {name!r}: choose from {', '.join(method_names())} (lopt-kN for N blocks)")
    return name, num_blocks


def nf4_bytes(n: int, double_quant: bool = False) -> int:
    """Bytes of an ``n``-element weight quantized to 4-bit NF4 by bitsandbytes (see ``NF4_BLOCK``)."""
    blocks = -(-n // NF4_BLOCK)
    state = blocks + 4 * -(-blocks // 256) + 256 * 4 + 4 if double_quant else 4 * blocks
    return -(-n // 2) + state + 16 * 4


def method_config(method: str, num_blocks: int = 2, options: dict[str, Any] | None = None) -> Any:
    """The ``LoPTConfig`` lopt train builds for ``method`` with these method options (the rest at their
    defaults, which live in each method's options dataclass)."""
    try:
        return LoPTConfig(method=method, num_blocks=num_blocks, **(options or {}))
    except (LoPTError, TypeError) as e:
        raise PlanError(str(e).splitlines()[0]) from e


def method_trains(method: str, num_layers: int, num_blocks: int = 2, **options: Any) -> Trains:
    """What ``method`` trains on a ``num_layers``-layer model, as the method itself says
    (``Method.trains``) under its default options, ``num_blocks`` and ``options``."""
    try:
        config = LoPTConfig(method=method, num_blocks=num_blocks, **options)
        return get_method(method).trains(num_layers, config)
    except LoPTError as e:
        raise PlanError(str(e)) from e


def method_setup(method: str, counts: ParamCounts, *, num_blocks: int = 2, checkpoint: dict[int, str]
                 | None = None, trains: Trains | None = None, spec: RowSpec | None = None) -> MethodSetup:
    """The setup of ``method`` on a model, from what the method trains (``trains``, by default
    ``method_trains``); ``checkpoint``: layer index -> "full" / "selective" for the checkpointed
    layers; ``spec``: the training options (default: the method's mechanism alone, adamw)."""
    ck = checkpoint or {}
    n = len(counts.layers)
    spec = spec or RowSpec(method, num_blocks)
    t = trains or method_trains(method, n, num_blocks, **dict(spec.options))
    pb = precision_bytes(spec.precision)
    targets: tuple[str, ...] | None = None
    config = method_config(method, spec.num_blocks, dict(spec.options))
    if t.lora_r:
        counts, targets = with_lora(counts, t.lora_r, getattr(config, "lora_target_modules", "all-linear"))
    oib = spec.optimizer_in_backward
    gb = pb.grad
    g = [gb * x for x in counts.layers]
    head_g, norm_g, emb_g = gb * counts.head, gb * counts.other, gb * counts.embedding
    trained = set(t.layers)
    layer_sizes = counts.layer_sizes or [(x,) for x in counts.layers]  # a hand-made ParamCounts has no sizes
    lora_sizes = counts.lora_sizes or [(x,) for x in counts.lora]

    def sizes(i: int) -> tuple[int, ...]:
        return lora_sizes[i] if t.lora_r else (layer_sizes[i] if i in trained else ())

    def modes(idx: range, forced: dict[int, str] | None = None) -> tuple[LayerMode, ...]:
        c = {**ck, **(forced or {})}
        return tuple(LayerMode(trained=i in trained, lora_r=t.lora_r, checkpoint=c.get(i, "off"), lora_targets=targets,
                               lora_dropout=bool(t.lora_r and getattr(config, "lora_dropout", 0.0)))
                     for i in idx)

    def layer_grads(idx: range) -> list[int]:
        return [gb * counts.lora[i] if t.lora_r else (g[i] if i in trained else 0) for i in idx]

    def grad_flags(idx: range, last_start: int) -> dict[str, Any]:
        return {"in_backward": tuple(oib and i >= last_start for i in idx),
                "layer_max_grads": tuple(gb * max(sizes(i), default=0) for i in idx)}

    # Trained parameters outside the layers: embedding, final norm, LM head. A tied head is the
    # embedding (trained as the head under a boundary that keeps it tied), unless a boundary unties it.
    boundary = t.blocks is not None
    keep_tied = spec.keeps_tied(counts.tied)
    emb_s = tuple(counts.embedding_sizes) or (counts.embedding,)
    head_s = tuple(counts.head_sizes) or (counts.head,)
    norm_s = tuple(counts.other_sizes) or ((counts.other,) if counts.other else ())
    if keep_tied:
        shared = t.head if boundary else t.embedding
        outside_s = list(emb_s) * shared
        emb_trained = False if boundary else t.embedding  # a boundary's shared matrix trains as the head
    else:
        outside_s = list(emb_s) * t.embedding + list(head_s) * t.head
        emb_trained = t.embedding
    outside_s += list(norm_s) * t.final_norm
    layers_s = [x for i in range(n) for x in sizes(i)]
    resident = counts.total + (sum(counts.lora) if t.lora_r else 0)
    top = head_g * t.head + norm_g * t.final_norm
    # The residual stream has the embedding's dtype (a trained embedding, or a tied matrix trained as
    # the head, keeps an fp32 master under bf16-mixed); the final norm's output is fp32 under autocast
    # when its weight is (trained), else the stream's.
    emb_stored_trained = t.embedding or (counts.tied and keep_tied and t.head)
    stream = pb.trained if emb_stored_trained else pb.frozen
    final_b = 4 if pb.amp and t.final_norm else stream
    quant = getattr(t, "base_bits", 16) == 4  # qlora: every decoder-layer linear map in NF4
    double_quant = True  # lopt's qlora quantizes the quantization constants again (lopt.methods.qlora)
    qlin = [m for layer in counts.layer_linears for m in layer] if quant else []

    def ce(idx: range, emb: bool, forced: dict[int, str] | None = None) -> PhaseSpec:
        return PhaseSpec(modes(idx, forced), embedding_trained=emb, final_norm_trained=t.final_norm,
                         head_trained=t.head, head_bias=counts.head_bias, trained_bytes=pb.trained,
                         frozen_bytes=pb.frozen, stream_bytes=stream)

    def setup(phases: list[Phase], extra_s: list[int], last_s: list[int]) -> MethodSetup:
        all_s = layers_s + outside_s + extra_s
        name = spec.name(counts.tied) if spec != RowSpec(method, num_blocks) else (t.label or method)
        frozen = resident - sum(all_s)
        q = sum(nf4_bytes(i * o, double_quant) for _, i, o in qlin)
        frozen -= sum(i * o for _, i, o in qlin)
        weight_bytes = pb.trained * sum(all_s) + pb.frozen * frozen + q + (4 - pb.trained) * sum(extra_s)
        return MethodSetup(name, resident, sum(all_s), len(all_s), phases, all_s, last_s, precision=pb.name,
                           weight_bytes=weight_bytes, quantized=q, hidden_bytes=stream, final_bytes=final_b,
                           dequant_tmp=2 * max((i * o for _, i, o in qlin), default=0), bf16_update=spec.bf16_update,
                           fp32_sizes=list(extra_s) if pb.name == "bf16-true" else [])

    if not boundary:
        emb_grads = emb_g if t.embedding else 0
        tied = counts.tied
        phase = Phase(ce(range(n), t.embedding), layer_grads(range(n)), top_grads=top,
                      base_grads=0 if tied else emb_grads, tied_extra=emb_grads if tied else 0,
                      top_in_backward=oib and not tied, base_in_backward=oib, **grad_flags(range(n), 0))
        return setup([phase], [], layers_s + outside_s)
    # A boundary: the last block learns the task; each lower block learns from a reconstruction head of
    # its own, one after the other, or is frozen; under task_grad_every the boundary opens every N-th step.
    resident += counts.head if counts.tied and not keep_tied else 0
    (last_start, _), lower = t.blocks[-1], t.blocks[:-1]
    upper_idx = range(last_start, n)
    last_s = [x for i in upper_idx for x in sizes(i)] + outside_s[len(emb_s) if emb_trained else 0:]
    upper = Phase(ce(upper_idx, False), layer_grads(upper_idx), top_grads=top, top_in_backward=oib,
                  label="upper", **grad_flags(upper_idx, last_start))
    if spec.task_grad_every:
        if not t.local_heads:
            raise PlanError(f"--task-grad-every needs --method lopt, not {method}")
        # The open step: the lower layers keep only their inputs (full checkpointing on this step only)
        # and the task gradient runs through every layer; all gradients wait for the step. The closed
        # steps run the lower half without a graph (no local loss under --lambda-aux 0).
        forced = {i: "full" for i in range(last_start)}
        opened = Phase(ce(range(n), True, forced), layer_grads(range(n)), top_grads=top,
                       base_grads=0 if keep_tied else emb_g, tied_extra=emb_g if keep_tied else 0,
                       top_in_backward=oib and not keep_tied, label="open step", **grad_flags(range(n), last_start))
        closed = dataclasses.replace(upper, label="closed step")
        return setup([opened, closed], [], last_s)
    phases: list[Phase] = []
    extra_s: list[int] = []
    if t.local_heads:
        rh, _ = counts.recon_head()
        h, b = counts.hidden, max(1, counts.hidden // 4)
        rh_s = [h, h, h * b, b, b * h, h]  # LayerNorm, two Linears (lopt.engine.heads.ReconstructionHead)
        resident += len(lower) * rh
        extra_s = rh_s * len(lower)
        for i, (s, e) in enumerate(lower):
            emb = i == 0 and emb_trained
            phases.append(Phase(PhaseSpec(modes(range(s, e)), embedding_trained=emb, top="recon",
                                          trained_bytes=pb.trained, frozen_bytes=pb.frozen, stream_bytes=stream),
                                layer_grads(range(s, e)), top_grads=4 * rh, base_grads=emb_g if emb else 0,
                                label=f"block {i}", **grad_flags(range(s, e), n)))
    phases.append(upper)
    if t.local_heads and spec.lower_every > 1:  # the steps in between run the lower blocks without a graph
        phases.append(dataclasses.replace(upper, label="idle step"))
    return setup(phases, extra_s, last_s)


def checkpointed_layers(full: str, selective: str, n_layers: int, block_ranges: list[tuple[int, int]]
                        ) -> dict[int, str]:
    """Layer index -> "full"/"selective", as ``LoPTModel.gradient_checkpointing_enable`` picks them
    (a layer in both scopes is checkpointed in full)."""
    def layers(scope: str) -> set[int]:
        if scope == "off":
            return set()
        last = block_ranges[-1][0]
        return set(range(n_layers) if scope == "all" else range(last, n_layers) if scope == "last-block"
                   else range(last))
    out = {i: "selective" for i in layers(selective)}
    out.update({i: "full" for i in layers(full)})
    return out


# --------------------------------------------------------------------------- the step, walked through


@dataclass
class PlanRow:
    """One method x checkpointing configuration; sizes in bytes."""

    method: str
    checkpointing: str
    trainable_params: int
    weights: int
    grads: int  # most gradient bytes alive at once
    optimizer: int  # fused AdamW: exp_avg, exp_avg_sq (fp32) and a step counter per tensor
    activations: int  # most activation bytes held at once (saved tensors and checkpoint caches)
    saved_visible: int  # the part of ``activations`` lopt's SavedTensorTracker sees
    peak: int  # weights + optimizer + the largest live sum of gradients, activations and temporaries
    fits: bool | None = None
    free_at_peak: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    command: str = ""  # the lopt train flags of this configuration
    max_batch: int | None = None  # --max-batch: the largest per-device batch that fits (0: none)
    accumulation: tuple[int, int] | None = None  # --global-batch-size: (batch, gradient accumulation)
    fits_with: str | None = None  # --max-batch: the cheapest checkpointing with which --batch-size fits

    @property
    def step_peak(self) -> int:
        """The peak above the loaded model: what ``lopt bench`` measures (peak minus baseline)."""
        return self.peak - self.weights


def _walk(setup: MethodSetup, counts: ParamCounts, shape: LayerShape, batch: int, seq: int, amp: bool,
          accumulate: bool = False, step_tmp: int = 0) -> tuple[int, int, int, int, list[dict[str, Any]]]:
    """(peak of grads + activations + temporaries above weights and optimizer state, most gradient
    bytes, most held activation bytes, most tracker-visible bytes, per-phase details).
    ``accumulate``: a second or later micro-batch under gradient accumulation: every gradient of the
    step is alive from the start (lopt's per-block step is off then), and each new one is a temporary
    added into it. ``step_tmp``: the optimizer step's temporaries (``step_temporaries``), alive with the
    gradients it steps."""
    tokens, c = batch * seq, 2 if amp or setup.precision == "bf16-true" else 4
    n_ce = batch * (seq - 1)
    # Temporaries. Loss: the labelled rows' hidden states and one chunk's buffers (``ce_chunk_bytes``).
    # A layer's backward: the gradient of its output and of its input (the hidden states' dtype), about
    # three intermediate-width gradients of the MLP at once, and for a 4-bit base the weight it dequantizes.
    chunk, ce_rows = min(CE_CHUNK, n_ce), n_ce * shape.hidden * setup.final_bytes
    bwd_tmp = (2 * tokens * shape.hidden * setup.hidden_bytes + 3 * tokens * shape.intermediate * c
               + setup.dequant_tmp)
    grads, live = 0, 0
    max_grads = max_held = max_vis = 0
    details = []
    if accumulate:  # the step's gradients (the open step's under --task-grad-every)
        grads = sum(sum(ph.layer_grads) + ph.top_grads + ph.base_grads for ph in setup.phases
                    if ph.label not in ("closed step", "idle step"))
        setup = dataclasses.replace(setup, phases=[dataclasses.replace(
            ph, steps_after=False, in_backward=(), top_in_backward=True, base_in_backward=True,
            layer_max_grads=tuple(ph.layer_grads)) for ph in setup.phases])
    # Autocast caches the bf16 cast of every trained (fp32) weight it meets until the forward's
    # autocast region ends: a lower block's casts outlive its local backward (which runs inside the
    # forward) while the blocks above run, and the LM head's cast lives through the loss's forward.
    cache, prev_recon = 0, False
    for ph in setup.phases:
        mem = cached_phase_memory(ph.spec, shape, batch, seq, counts.vocab, amp)
        max_held, max_vis = max(max_held, mem.held), max(max_vis, mem.visible)
        cache = cache if prev_recon else 0
        inside = cache if ph.spec.top == "recon" else 0  # a lower block's backward and step run in the forward
        head_cast = 2 * counts.head if amp and ph.spec.head_trained and ph.spec.trained_bytes == 4 else 0
        head16 = (ph.spec.trained_bytes if ph.spec.head_trained else ph.spec.frozen_bytes) == 2
        ce_tmp = ce_rows + ce_chunk_bytes(chunk, counts.vocab, shape.hidden, c == 2, bool(shape.final_softcap),
                                          head16 or amp)
        fwd = grads + mem.held + (ce_tmp + head_cast if ph.spec.top == "ce" else 0) + cache
        live = max(live, fwd)
        held = mem.held - mem.top  # the loss's saved head gradient (in the head's dtype) becomes its .grad
        # --optimizer-in-backward: a gradient stepped inside the backward is freed at once; within a
        # layer's backward at most its largest gradient is alive beyond what autograd computes.
        grads += 0 if ph.top_in_backward else ph.top_grads
        oib = ph.in_backward or (accumulate,) * len(ph.layer_grads)
        gmax = ph.layer_max_grads or tuple(ph.layer_grads)
        for layer, g, own, big in zip(reversed(mem.layers), reversed(ph.layer_grads), reversed(oib), reversed(gmax)):
            rebuilt = layer.rebuilt + bwd_tmp if (g or layer.held) else 0
            # The layer's backward frees its saved tensors op by op as its gradients appear: at most the
            # larger of the two is alive beside the rest, plus the backward's temporaries.
            new = min(g, big) + (step_tmp if g else 0) if own else g
            live = max(live, held - layer.held + grads + max(layer.held, new) + rebuilt + inside)
            max_grads = max(max_grads, grads + (min(g, big) if own else 0))
            held -= layer.held
            grads += 0 if own else g
        # A tied matrix: its dense embedding gradient is summed with the head's into a new tensor while
        # both are alive (autograd's input buffer does not add in place into the loss's saved gradient).
        live = max(live, held + grads + ph.base_grads + 2 * ph.tied_extra + inside)
        grads += 0 if ph.base_in_backward else ph.base_grads
        max_grads = max(max_grads, grads)
        details.append({"layers": len(ph.spec.layers), "top": ph.spec.top, "activations": mem.held,
                        "saved_visible": mem.visible, "grads": grads, "label": ph.label})
        if ph.steps_after:
            live = max(live, held + grads + step_tmp + inside)
            grads = 0
        if amp and ph.spec.trained_bytes == 4:
            cache += sum(ph.layer_grads) // 2  # the phase's trained weights (fp32 gradients) as bf16 casts
        prev_recon = ph.spec.top == "recon"
    return live, max_grads, max_held, max_vis, details


def ce_chunk_bytes(rows: int, vocab: int, hidden: int, logits16: bool, softcap: bool, grad16: bool) -> int:
    """The most bytes of one chunk's buffers in ``lopt.engine.loss.chunked_cross_entropy`` (``rows``
    labelled positions), the largest of three moments: the matmul's logits (16-bit when it runs in bf16,
    ``logits16``) beside their fp32 copy; a softcap's derivative formed from the square of the capped
    logits; the fp32 logit gradient (and the derivative) beside its 16-bit cast (``grad16``: a 16-bit
    head's dtype, or autocast's) and the hidden-state gradient the product makes from it."""
    made = 4 + (2 if logits16 else 0)
    cap = 12 if softcap else 0
    grad = 4 + (4 if softcap else 0) + (2 if grad16 else 0)
    return max(rows * vocab * max(made, cap), rows * vocab * grad + rows * hidden * (2 if grad16 else 4))


def step_temporaries(setup: MethodSetup, optimizer: str, device: str) -> int:
    """Bytes the optimizer step allocates for one tensor at a time. Fused AdamW (CUDA and CPU) and
    bitsandbytes' CUDA kernels update in place: none. bitsandbytes' CPU backend dequantizes each 8-bit
    tensor's two states to fp32 and computes in fp32: five fp32 copies of the tensor at once (states,
    gradient, the denominator and its square root), three for its 32-bit path (smaller tensors)."""
    if optimizer != "adamw-8bit" or device != "cpu" or not setup.trainable_sizes:
        return 0
    big = [n for n in setup.trainable_sizes if n >= BNB_MIN_8BIT_SIZE]
    small = [n for n in setup.trainable_sizes if n < BNB_MIN_8BIT_SIZE]
    return max(20 * max(big, default=0), 12 * max(small, default=0))


@functools.lru_cache(maxsize=4096)
def _replayed(spec: PhaseSpec, shape: LayerShape, batch: int, seq: int, vocab: int, amp: bool) -> PhaseMemory:
    return phase_memory(spec, shape, batch, seq, vocab, amp=amp)


def cached_phase_memory(spec: PhaseSpec, shape: LayerShape, batch: int, seq: int, vocab: int, amp: bool
                        ) -> PhaseMemory:
    """``phase_memory`` from two cached replays: every saved tensor is either per token (its size
    proportional to the batch at a fixed length) or per position or per model (the rotary tables, the
    head's gradient), so each byte count is affine in the batch and batch B is batch 1 plus (B - 1)
    times the step from batch 1 to 2, exactly. Rows, and --max-batch's search, replay each phase
    twice instead of once per batch tried."""
    if batch <= 2:
        return _replayed(spec, shape, batch, seq, vocab, amp)
    one, two = _replayed(spec, shape, 1, seq, vocab, amp), _replayed(spec, shape, 2, seq, vocab, amp)

    def at(a: int, b: int) -> int:
        return a + (batch - 1) * (b - a)

    layers = [LayerMemory(held=at(x.held, y.held), visible=at(x.visible, y.visible), rebuilt=at(x.rebuilt, y.rebuilt))
              for x, y in zip(one.layers, two.layers)]
    return PhaseMemory(layers=layers, base=at(one.base, two.base), top=at(one.top, two.top),
                       held=at(one.held, two.held), visible=at(one.visible, two.visible))


def plan(config_or_model_source: Any = None, *, batch_size: int, max_length: int, precision: str = "bf16",
         methods: Sequence[str] | None = None, num_blocks: int = 2, gradient_checkpointing: str | None = None,
         selective_checkpointing: str | None = None, gpu_memory: str | int | None = None,
         headroom: int = DEFAULT_HEADROOM, task_grad_every: int | None = None, tied_head: bool | None = None,
         lower_every: int | None = None, optimizer: str | None = None, optimizer_in_backward: bool | None = None,
         max_batch: bool = False, global_batch_size: int | None = None, device: str = "cuda",
         method_options: dict[str, Any] | None = None, bf16_update: str = DEFAULT_BF16_UPDATE) -> list[PlanRow]:
    """Predict the memory of one training step for each training configuration x checkpointing scope.

    ``config_or_model_source``: an alias (``qwen2.5-7b``; see ``aliases()``), a checkpoint directory,
    a ``config.json``, a dict or a transformers config; None is lopt's default SmolLM2-135M.
    ``methods``: method names as lopt train spells them (``lopt`` is its default recipe,
    ``--task-grad-every 4`` with a tied head kept tied; ``lopt-kN`` the paper's ``--task-grad-every 0``
    with N blocks); by default ``DEFAULT_METHODS`` plus one row for each option that changes the memory
    (``--optimizer adamw-8bit`` and ``--optimizer-in-backward`` for every method, ``--no-tied-head`` and
    ``--lower-every 2`` for lopt). ``task_grad_every``, ``tied_head``, ``lower_every``, ``optimizer``,
    ``optimizer_in_backward``: lopt train's options, applied to every row they apply to (given: no
    variant rows for it). ``method_options``: the methods' own options (``lora_r``,
    ``lora_target_modules``, ``lisa_layers``, ``badam_block_size``, ...), each applied to the methods that
    declare it. ``precision``: fp32, bf16-mixed (alias bf16), bf16-true or auto (see ``PRECISION_BYTES``);
    ``bf16_update``: bf16-true's AdamW update (kahan, stochastic-round, plain; ``BF16_UPDATE_STATE``).
    ``gradient_checkpointing`` / ``selective_checkpointing``: a scope (off, all, last-block,
    lower-blocks) to plan only that; by default each method is shown without checkpointing and with
    full and selective checkpointing of all layers (LoPT: of its last block too).
    ``gpu_memory``: bytes or a string like ``80GB`` / ``24GiB`` (both 2**30); rows then say whether
    the peak plus ``headroom`` fits. ``max_batch`` (needs ``gpu_memory``): each row's largest per-device
    batch that fits (``PlanRow.max_batch``), with ``global_batch_size`` G the batch x gradient
    accumulation that keeps G (``PlanRow.accumulation``), and for each configuration the cheapest
    checkpointing scope with which ``batch_size`` fits (``PlanRow.fits_with``). ``device``: cuda (what
    the plan is for) or cpu (the same step; bitsandbytes' CPU optimizer step adds fp32 temporaries)."""
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be cuda or cpu, got {device!r}")
    _check_batch(batch_size, max_length)
    if (max_batch or global_batch_size is not None) and gpu_memory is None:
        raise PlanError("--max-batch needs --gpu-memory (the memory to fit in), e.g. --gpu-memory 80GB")
    if global_batch_size is not None and (not isinstance(global_batch_size, int) or global_batch_size < 1):
        raise PlanError(f"global batch size must be >= 1, got {global_batch_size}")
    max_batch = max_batch or global_batch_size is not None
    pb = precision_bytes(precision, device)
    if optimizer is not None and optimizer.startswith("paged-") and device != "cuda":
        raise PlanError(f"--optimizer {optimizer} pages its state through CUDA unified memory: it runs on CUDA only; "
                        f"plan adamw-8bit for --device {device}")
    for name, scope in (("gradient checkpointing", gradient_checkpointing),
                        ("selective checkpointing", selective_checkpointing)):
        if scope is not None and scope not in SCOPES:
            raise PlanError(f"{name} scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    capacity = parse_size(gpu_memory) if gpu_memory is not None else None
    counts, shape = model_shape(config_or_model_source, max_length)
    amp = pb.amp
    specs = row_specs(methods, counts.tied, num_blocks=num_blocks, task_grad_every=task_grad_every,
                      tied_head=tied_head, lower_every=lower_every, optimizer=optimizer,
                      optimizer_in_backward=optimizer_in_backward, precision=pb.name, method_options=method_options,
                      bf16_update=bf16_update)
    rows = []
    for spec, variant in specs:
        scopes = _scopes(spec.method, gradient_checkpointing, selective_checkpointing)
        first = len(rows)
        for full, sel in scopes[:1] if variant else scopes:
            row = _row(spec, full, sel, counts, shape, batch_size, max_length, amp, capacity, headroom, device)
            if max_batch:
                search = _BatchSearch(spec, full, sel, counts, shape, max_length, amp, capacity - headroom, device)
                row.max_batch = search.largest()
                if global_batch_size is not None:
                    row.accumulation = search.accumulation(global_batch_size)
            rows.append(row)
        if max_batch:
            rows[first].fits_with = _cheapest_scope(spec, counts, shape, batch_size, max_length, amp,
                                                    capacity - headroom, device)
    return rows


# Checkpointing scopes from the cheapest in recomputation to the dearest: selective checkpointing redoes
# only element-wise work, full checkpointing the whole forward of its layers; the last block is fewer
# layers than all of them.
SCOPE_COST = (("off", "off"), ("off", "last-block"), ("off", "all"), ("last-block", "off"), ("all", "off"))


def _cheapest_scope(spec: RowSpec, counts: ParamCounts, shape: LayerShape, batch: int, seq: int, amp: bool,
                    budget: int, device: str = "cuda") -> str:
    """The cheapest checkpointing with which ``spec`` fits at ``batch`` (as lopt train's flags), or
    "none"."""
    boundary = get_method(spec.method).boundary
    for full, sel in SCOPE_COST:
        if not boundary and "last-block" in (full, sel):
            continue
        if _BatchSearch(spec, full, sel, counts, shape, seq, amp, budget, device).peak(batch) <= budget:
            if full == sel == "off":
                return "-"
            return (f"--gradient-checkpointing {full}" if full != "off" else f"--selective-checkpointing {sel}")
    return "none"


class _BatchSearch:
    """Peaks of one configuration at any batch (each phase replayed twice, then extrapolated)."""

    def __init__(self, spec: RowSpec, full: str, sel: str, counts: ParamCounts, shape: LayerShape, seq: int,
                 amp: bool, budget: int, device: str = "cuda"):
        n = len(counts.layers)
        trains = method_trains(spec.method, n, spec.num_blocks, **dict(spec.options))
        ck = checkpointed_layers(full, sel, n, list(trains.blocks or [(0, n)]))
        self.setup = method_setup(spec.method, counts, num_blocks=spec.num_blocks, checkpoint=ck, trains=trains,
                                  spec=spec)
        self.fixed = self.setup.weights + device_optimizer(
            spec.optimizer, optimizer_bytes(self.setup, spec.optimizer, spec.optimizer_in_backward))
        self.spec, self.counts, self.shape, self.seq, self.amp, self.budget = spec, counts, shape, seq, amp, budget
        self.step_tmp = step_temporaries(self.setup, spec.optimizer, device)

    def peak(self, batch: int, accumulate: bool = False) -> int:
        live = _walk(self.setup, self.counts, self.shape, batch, self.seq, self.amp, accumulate, self.step_tmp)[0]
        return self.fixed + live

    def largest(self, accumulate: bool = False) -> int:
        """The largest batch whose peak fits the budget (0: not even 1)."""
        if self.peak(1, accumulate) > self.budget:
            return 0
        lo, hi = 1, 2
        while self.peak(hi, accumulate) <= self.budget:
            lo, hi = hi, hi * 2
            if hi > 1 << 24:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid, accumulate) <= self.budget else (lo, mid)
        return lo

    def accumulation(self, global_batch: int) -> tuple[int, int] | None:
        """(per-device batch, gradient accumulation) with batch x accumulation = ``global_batch``, the
        fewest accumulation steps that fit; None when none does (or the configuration cannot accumulate:
        --optimizer-in-backward)."""
        for accum in range(1, global_batch + 1):
            if global_batch % accum:
                continue
            if accum > 1 and self.spec.optimizer_in_backward:
                return None
            batch = global_batch // accum
            if self.peak(batch) <= self.budget and (accum == 1 or self.peak(batch, True) <= self.budget):
                return batch, accum
        return None


def _check_batch(batch_size: Any, max_length: Any) -> None:
    if (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
            or not isinstance(max_length, int) or max_length < 2):
        raise PlanError(f"batch size must be >= 1 and max length >= 2, got {batch_size} and {max_length}")


def model_shape(config_or_model_source: Any, max_length: int | None = None) -> tuple[ParamCounts, LayerShape]:
    """The parameter counts and the decoder layer's shape of a model (see ``plan``), after checking
    that lopt plan models its architecture (PlanError otherwise). Cached per config."""
    config = load_config(config_or_model_source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_architecture(text, max_length)
    key = text.to_json_string(use_diff=False)
    if key not in _COUNTS:
        _COUNTS[key] = count_parameters(text)
    return _COUNTS[key], LayerShape.from_config(text)


_COUNTS: dict[str, ParamCounts] = {}


def check_architecture(text: Any, max_length: int | None = None) -> None:
    """PlanError (one line) for a config whose decoder layer lopt plan does not model."""
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        closest = CLOSEST_MODEL_TYPE.get(text.model_type)
        raise PlanError(f"lopt plan does not model {text.model_type!r} decoder layers"
                        + (f" (the closest it models is {closest!r})" if closest else "")
                        + f"; it models {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", "silu")
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise PlanError(f"lopt plan models SiLU and GELU MLPs; this config's activation is {act!r}")
    if not getattr(text, "num_hidden_layers", None):
        raise PlanError(f"this {text.model_type!r} config has no decoder layers (num_hidden_layers is "
                        f"{getattr(text, 'num_hidden_layers', None)!r}): nothing to plan")
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if isinstance(window, int) and max_length is not None and max_length > window:
        raise PlanError(f"this model uses sliding-window attention ({window} tokens) and --max-length {max_length} "
                        f"is longer: lopt plan models full causal attention only; plan at most {window} tokens")


def row_specs(methods: Sequence[str] | None, model_tied: bool, *, num_blocks: int = 2,
              task_grad_every: int | None = None, tied_head: bool | None = None, lower_every: int | None = None,
              optimizer: str | None = None, optimizer_in_backward: bool | None = None, precision: str = "fp32",
              method_options: dict[str, Any] | None = None, bf16_update: str = DEFAULT_BF16_UPDATE
              ) -> list[tuple[RowSpec, bool]]:
    """The training configurations to plan, as (spec, variant): a variant row (an option's effect on a
    method shown once) is planned without checkpointing only. See ``plan``."""
    names = list(methods or DEFAULT_METHODS + tuple(m for m in EXTRA_METHODS if m in method_names()))
    given = {k: v for k, v in (method_options or {}).items() if v is not None}
    declared = {f for m in method_names() for f in _option_fields(m)}
    unknown = sorted(set(given) - declared)
    if unknown:
        raise PlanError(f"unknown method option {unknown[0]!r}: the methods declare {', '.join(sorted(declared))}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise PlanError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if bf16_update not in BF16_UPDATES:
        raise PlanError(f"bf16_update must be one of {', '.join(BF16_UPDATES)}, got {bf16_update!r}")
    # lopt train refuses an 8-bit optimizer under bf16-true with a compensated update (it has none)
    no_8bit = precision == "bf16-true" and bf16_update != "plain"
    if optimizer not in (None, "adamw") and no_8bit:
        raise PlanError(f"--optimizer {optimizer} under --precision bf16-true has no compensated update: lopt train "
                        f"takes it with --bf16-update plain only (or use --optimizer adamw)")
    out: list[tuple[RowSpec, bool]] = []
    for name in names:
        method, k = parse_method(name, num_blocks)
        if getattr(get_method(method), "bf16_only", False) and not precision.startswith("bf16"):
            if methods is None:
                continue  # the full table at fp32: lopt train refuses qlora there
            raise PlanError(f"--method {method} computes in bf16 (its 4-bit base): plan --precision bf16-true (bf16 "
                            f"adapters) or bf16-mixed (fp32 adapter masters), not {precision}")
        fields_ = _option_fields(method)
        options = tuple((f, tuple(v) if isinstance(v, list) else v) for f, v in given.items() if f in fields_)
        boundary = get_method(method).boundary
        if method == "lopt" and name == "lopt":
            tg = RECIPE_TASK_GRAD_EVERY if task_grad_every is None else task_grad_every
        else:
            tg = 0
        # --tied-head: every boundary row; a method without a boundary asked for by name refuses it
        tied = tied_head if (boundary or methods) and tied_head is not None else (None if tg else False)
        # --lower-every: the paper's rows in the full table; any lopt row asked for by name (lopt train
        # refuses it under --task-grad-every without a local loss, and so does the plan)
        le = lower_every if lower_every is not None and method == "lopt" and (methods or not tg) else 1
        spec = RowSpec(method, k, tg, tied, le, optimizer or "adamw", bool(optimizer_in_backward), options, precision,
                       bf16_update)
        spec.check(model_tied)
        out.append((spec, False))
    if methods is not None:
        return out
    variants: list[tuple[RowSpec, bool]] = []
    first_k = next((s for s, _ in out if s.method == "lopt" and not s.task_grad_every), None)
    for spec, _ in out:
        if spec.method == "lopt" and spec.task_grad_every and tied_head is None and model_tied:
            variants.append((dataclasses.replace(spec, tied_head=False), True))
        if spec is first_k and lower_every is None:
            variants.append((dataclasses.replace(spec, lower_every=2), True))
    for spec, _ in out:
        if optimizer is None and not no_8bit:
            variants.append((dataclasses.replace(spec, optimizer="adamw-8bit"), True))
        if optimizer_in_backward is None:
            variants.append((dataclasses.replace(spec, optimizer_in_backward=True), True))
    return out + variants


def _option_fields(method: str) -> tuple[str, ...]:
    """The fields of ``method``'s own options dataclass (lora_r, lisa_layers, ...; a method without one of
    its own, qlora, takes the class it derives from's)."""
    cls = next((k.options for k in get_method(method).__mro__ if getattr(k, "options", None) is not None), None)
    return tuple(f.name for f in dataclasses.fields(cls)) if cls is not None else ()


def _scopes(method: str, full: str | None, sel: str | None) -> list[tuple[str, str]]:
    """(full, selective) scope pairs to plan for ``method``."""
    boundary = get_method(method).boundary
    if full is not None or sel is not None:
        full, sel = full or "off", sel or "off"
        if not boundary and not {full, sel} <= {"off", "all"}:
            with_boundary = ", ".join(m for m in method_names() if get_method(m).boundary)
            raise PlanError(f"checkpointing scopes other than 'all' need a method with a boundary "
                            f"({with_boundary}), not {method}")
        return [(full, sel)]
    out = [("off", "off"), ("all", "off"), ("off", "all")]
    if get_method(method).local_loss:
        out += [("last-block", "off"), ("off", "last-block")]
    return out


def optimizer_bytes(setup: MethodSetup, optimizer: str = "adamw", in_backward: bool = False) -> int:
    """The optimizer state of ``setup``'s trained tensors. adamw (fused): two fp32 moments and an fp32
    step per tensor. adamw-8bit (bitsandbytes' AdamW8bit, blockwise): tensors of at least 4096 elements
    keep two uint8 states and an fp32 absmax per block of 256 for each; smaller ones two fp32 states;
    each optimizer holding 8-bit state has two 256-entry fp32 quantization maps (under
    ``in_backward`` every last-block tensor has an optimizer of its own)."""
    sizes = setup.trainable_sizes or [setup.trainable // max(1, setup.trainable_tensors)] * setup.trainable_tensors
    if optimizer == "adamw":
        if setup.precision != "bf16-true":
            return sum(8 * n + 4 for n in sizes)
        (per16, each16), (per32, each32) = BF16_UPDATE_STATE[setup.bf16_update]
        fp32 = Counter(setup.fp32_sizes)
        bf16 = Counter(sizes) - fp32
        return (sum((per16 * n + each16) * c for n, c in bf16.items())
                + sum((per32 * n + each32) * c for n, c in fp32.items()))
    big = BNB_MIN_8BIT_SIZE
    total = sum(2 * n + 8 * -(-n // BNB_BLOCK) if n >= big else 8 * n for n in sizes)
    own = Counter(setup.last_block_sizes) if in_backward else Counter()
    main = Counter(sizes) - own
    maps = (1 if any(n >= big for n in main.elements()) else 0) + sum(c for n, c in own.items() if n >= big)
    return total + maps * 2 * 256 * 4


def device_optimizer(optimizer: str, nbytes: int) -> int:
    """The part of the optimizer state in the device's own memory: paged-adamw-8bit keeps its state
    in CUDA unified memory, which the driver pages out to host RAM when the device is full, so it is
    shown in the optimizer column but not counted in the peak."""
    return 0 if optimizer.startswith("paged-") else nbytes


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 states
BNB_BLOCK = 256  # its blockwise quantization's block


def _row(spec: RowSpec, full: str, sel: str, counts: ParamCounts, shape: LayerShape, batch: int,
         seq: int, amp: bool, capacity: int | None, headroom: int, device: str = "cuda") -> PlanRow:
    n = len(counts.layers)
    trains = method_trains(spec.method, n, spec.num_blocks, **dict(spec.options))
    ck = checkpointed_layers(full, sel, n, list(trains.blocks or [(0, n)]))
    setup = method_setup(spec.method, counts, num_blocks=spec.num_blocks, checkpoint=ck, trains=trains, spec=spec)
    weights = setup.weights
    optimizer = optimizer_bytes(setup, spec.optimizer, spec.optimizer_in_backward)
    live, grads, acts, visible, details = _walk(setup, counts, shape, batch, seq, amp,
                                                step_tmp=step_temporaries(setup, spec.optimizer, device))
    peak = weights + device_optimizer(spec.optimizer, optimizer) + live
    label = "-" if full == sel == "off" else " + ".join(
        f"{kind} {scope}" for kind, scope in (("full", full), ("selective", sel)) if scope != "off")
    row = PlanRow(method=spec.name(counts.tied), checkpointing=label, trainable_params=setup.trainable,
                  weights=weights, grads=grads, optimizer=optimizer, activations=acts, saved_visible=visible,
                  peak=peak, details={"phases": details, "gradient_checkpointing": full, "selective_checkpointing": sel,
                                      "precision": setup.precision, "quantized_weights": setup.quantized,
                                      "paged_optimizer": optimizer - device_optimizer(spec.optimizer, optimizer)},
                  command=spec.command(counts.tied, full, sel))
    if capacity is not None:
        row.fits = peak + headroom <= capacity
        row.free_at_peak = capacity - peak
    return row


# --------------------------------------------------------------------------- lopt train --batch-size auto


def device_memory(device: Any) -> tuple[int, int, str]:
    """(free bytes, headroom to keep, what they are) of a torch device: a GPU's free memory (1 GiB
    kept), or on CPU the RAM the kernel reports available (1 GiB and 10% kept: the allocator's and the
    process's share, docs/plan-validation.md section 3)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, DEFAULT_HEADROOM, f"{free / 2**30:.1f} GiB free on {device}"
    if device.type == "cpu":
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError) as e:
            raise PlanError(f"--batch-size auto: cannot read the available RAM from /proc/meminfo ({e}); "
                            "give a number") from e
        return free, DEFAULT_HEADROOM + free // 10, f"{free / 2**30:.1f} GiB of RAM available"
    raise PlanError(f"--batch-size auto knows CUDA and CPU memory, not {device.type}: give a number")


def auto_batch_size(cfg: Any, device: Any, model_config: Any = None) -> tuple[int, int, str]:
    """``lopt train --batch-size auto``: (batch, gradient accumulation, a line saying why) for ``cfg``
    (a TrainConfig) on ``device``: the largest batch lopt plan predicts to fit the device's free memory,
    or with ``cfg.global_batch_size`` G the batch x accumulation = G with the fewest accumulation steps
    that fits. ``model_config``: the model's transformers config (default: from ``cfg.model``)."""
    if model_config is None:
        try:
            model_config = load_config(cfg.model)
        except PlanError:
            if cfg.model is None or cfg.gguf_file:
                raise
            from transformers import AutoConfig  # a hub id: its config.json, as load_model reads it

            model_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    free, headroom, where = device_memory(device)
    precision = precision_bytes(cfg.precision if cfg.precision != "fp16" else "bf16-mixed", device.type).name
    options = {f: getattr(cfg, f) for f in _option_fields(cfg.method) if f in PLAN_METHOD_OPTIONS and hasattr(cfg, f)}
    rows = plan(model_config, batch_size=1, max_length=cfg.max_length, precision=precision, methods=[cfg.method],
                num_blocks=cfg.num_blocks, gradient_checkpointing=cfg.gradient_checkpointing,
                selective_checkpointing=cfg.selective_checkpointing, gpu_memory=free, headroom=headroom,
                task_grad_every=cfg.task_grad_every if cfg.method == "lopt" else None, tied_head=cfg.tied_head,
                lower_every=cfg.lower_every if cfg.method == "lopt" else None, optimizer=cfg.optimizer,
                optimizer_in_backward=cfg.optimizer_in_backward, max_batch=True,
                global_batch_size=cfg.global_batch_size, device=device.type, method_options=options,
                bf16_update=getattr(cfg, "bf16_update", DEFAULT_BF16_UPDATE))
    row = rows[0]
    what = f"{row.method}" + ("" if row.checkpointing == "-" else f", checkpointing {row.checkpointing}")
    if not row.max_batch:
        hint = f" (with {row.fits_with} it would)" if row.fits_with not in (None, "none", "-") else ""
        raise PlanError(f"--batch-size auto: {what} does not fit even one row of {cfg.max_length} tokens in {where} "
                        f"(peak {format_size(row.peak)} + {format_size(headroom)} kept free){hint}")
    if cfg.global_batch_size is None:
        batch, accum = row.max_batch, 1
    elif row.accumulation is None:
        raise PlanError(f"--batch-size auto: no batch x accumulation = --global-batch-size {cfg.global_batch_size} "
                        f"fits {what} in {where}" + (" (--optimizer-in-backward cannot accumulate)"
                                                     if cfg.optimizer_in_backward else ""))
    else:
        batch, accum = row.accumulation
    note = (f"lopt: --batch-size auto: {batch}" + (f" x --grad-accum {accum}" if accum > 1 else "")
            + f" ({what}, {cfg.max_length} tokens, {precision}: lopt plan's largest batch is {row.max_batch} in {where}, "
            f"{format_size(headroom)} kept free)")
    return batch, accum, note


# --------------------------------------------------------------------------- sizes and output


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(value: str | int) -> int:
    """``80GB``, ``80 GiB``, ``81920MiB``, ``24g`` or a byte count -> bytes (GB and GiB are both 2**30,
    as GPU memory is sold)."""
    if isinstance(value, int) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise PlanError(f"cannot read GPU memory {value!r}: write it like 80GB, 24GiB or 81920MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Bytes as MiB, the unit of every printed table (JSON keeps bytes)."""
    return f"{n / (1 << 20):,.0f} MiB"


def format_table(rows: list[PlanRow]) -> str:
    """Markdown table of the rows."""
    fit = any(r.fits is not None for r in rows)
    search = any(r.max_batch is not None for r in rows)
    accum = any(r.accumulation is not None for r in rows)
    head = ["method", "checkpointing", "trainable", "weights", "grads", "optimizer", "activations", "peak"]
    head += ["fits"] if fit else []
    head += ["max batch"] if search else []
    head += ["batch x accum"] if accum else []
    head += ["fits with"] if search else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, r.checkpointing, f"{r.trainable_params / 1e6:,.1f}M", format_size(r.weights),
                 format_size(r.grads), format_size(r.optimizer), format_size(r.activations), format_size(r.peak)]
        if fit:
            cells.append("yes" if r.fits else "no")
        if search:
            cells.append(str(r.max_batch) if r.max_batch else "none")
        if accum:
            cells.append(f"{r.accumulation[0]} x {r.accumulation[1]}" if r.accumulation else "none")
        if search:
            cells.append(r.fits_with or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The methods' own options that change their memory, planned as lopt train's flags (declared once, in
# each method's options dataclass: LoRAOptions, LISAOptions, BAdamOptions).
PLAN_METHOD_OPTIONS = ("lora_r", "lora_target_modules", "lora_dropout", "lisa_layers", "badam_block_size")


def _add_option_flag(p: argparse.ArgumentParser, name: str) -> None:
    """``--name`` from the method option's dataclass field: its help, default, choices, nargs (absent:
    the method's default)."""
    for method in method_names():
        cls = get_method(method).options
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls is not None else None
        if f is None:
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = " ".join(default) if isinstance(default, list) else default
        kw: dict[str, Any] = {k: meta[k] for k in ("choices", "nargs", "metavar") if k in meta}
        kw["type"] = meta.get("type", type(default) if default is not None and not isinstance(default, list) else str)
        users = "/".join(m for m in method_names() if name in _option_fields(m))
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       help=f"--method {users}: {meta.get('help', '')} (default: {shown})", **kw)
        return
    raise PlanError(f"no method declares the option {name!r}")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lopt plan``."""
    p.add_argument("--model", default=None,
                   help="checkpoint directory, config.json or alias (default: the embedded SmolLM2-135M); "
                        "aliases: " + ", ".join(aliases()))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512, help="tokens per row")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="as lopt train: bf16-mixed (alias bf16; autocast, fp32 master weights, gradients and AdamW "
                        "state for what trains, frozen weights in bf16), bf16-true (weights, gradients and optimizer "
                        "state in bf16, plus the compensated update's buffer), fp32, auto (bf16-mixed on CUDA, "
                        "fp32 on CPU) (default: bf16)")
    p.add_argument("--method", action="append", default=None, metavar="NAME",
                   help=f"plan only this method (repeatable): {', '.join(method_names())} or lopt-kN "
                        f"(default: {' '.join(DEFAULT_METHODS + tuple(m for m in EXTRA_METHODS if m in method_names()))}; "
                        "qlora at bf16 precisions only)")
    p.add_argument("--num-blocks", type=int, default=2, help="blocks for --method lopt")
    p.add_argument("--task-grad-every", type=int, default=None, metavar="N",
                   help=f"--method lopt: open the boundary every N-th step (default {RECIPE_TASK_GRAD_EVERY}, as lopt "
                        "train; 0: the paper's lopt-kN)")
    p.add_argument("--tied-head", action=argparse.BooleanOptionalAction, default=None,
                   help="lopt, freeze-lower: keep a tied LM head tied across the boundary (default: as lopt train, "
                        "and a --no-tied-head row for lopt)")
    p.add_argument("--lower-every", type=int, default=None, metavar="N",
                   help="lopt-kN: update the lower blocks every N-th step (default 1, and a --lower-every 2 row)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="plan only this optimizer (default: adamw, and an adamw-8bit row per method; paged-adamw-8bit "
                        "keeps its state in CUDA unified memory, outside the peak)")
    p.add_argument("--optimizer-in-backward", action=argparse.BooleanOptionalAction, default=None,
                   help="plan with (or without) the last block stepped inside the backward (default: without, and "
                        "one row per method with)")
    f = next(f for f in dataclasses.fields(RecipeConfig) if f.name == "bf16_update")
    p.add_argument("--bf16-update", choices=BF16_UPDATES, default=f.default,
                   help=f"{f.metadata.get('help', '')} (default: {f.default})")
    for name in PLAN_METHOD_OPTIONS:
        _add_option_flag(p, name)
    p.add_argument("--gradient-checkpointing", choices=SCOPES, default=None,
                   help="plan only this full-checkpointing scope (default: off, all and, for lopt, last-block)")
    p.add_argument("--selective-checkpointing", choices=SCOPES, default=None,
                   help="plan only this selective-checkpointing scope")
    p.add_argument("--gpu-memory", default=None, help="e.g. 80GB: add a fits column")
    p.add_argument("--max-batch", action="store_true",
                   help="with --gpu-memory: each row's largest per-device batch that fits, and for each "
                        "configuration the cheapest checkpointing with which --batch-size fits")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="what the step runs on (default cuda; cpu: bitsandbytes' CPU optimizer step keeps fp32 "
                        "temporaries)")
    p.add_argument("--global-batch-size", type=int, default=None, metavar="G",
                   help="with --max-batch: the per-device batch x gradient accumulation that keeps G and fits")
    p.add_argument("--headroom", default="1GiB", help="kept free for the CUDA context and allocator (default 1GiB)")
    p.add_argument("--json", default=None, metavar="PATH", help=json_help("the rows"))


def run_plan_cli(ns: argparse.Namespace) -> int:
    """``lopt plan``: print the table for the parsed options; ``--json PATH`` also writes the rows
    (sizes in bytes) to PATH, ``-`` to standard output instead of the table."""
    rows = plan(ns.model, batch_size=ns.batch_size, max_length=ns.max_length, precision=ns.precision,
                methods=ns.method, num_blocks=ns.num_blocks, gradient_checkpointing=ns.gradient_checkpointing,
                selective_checkpointing=ns.selective_checkpointing, gpu_memory=ns.gpu_memory,
                headroom=parse_size(ns.headroom), task_grad_every=ns.task_grad_every, tied_head=ns.tied_head,
                lower_every=ns.lower_every, optimizer=ns.optimizer, optimizer_in_backward=ns.optimizer_in_backward,
                max_batch=getattr(ns, "max_batch", False), global_batch_size=getattr(ns, "global_batch_size", None),
                device=getattr(ns, "device", "cuda"), method_options=namespace_method_options(ns),
                bf16_update=getattr(ns, "bf16_update", DEFAULT_BF16_UPDATE))
    out = sys.stderr if ns.json == "-" else sys.stdout  # `--json -`: stdout holds the JSON only
    if ns.json:
        where = write_json(ns.json, {
            "model": ns.model or "smollm2-135m", "batch_size": ns.batch_size, "max_length": ns.max_length,
            "precision": ns.precision, "units": PLAN_UNITS,
            "gpu_memory": parse_size(ns.gpu_memory) if ns.gpu_memory else None,
            "rows": [asdict(r) | {"step_peak": r.step_peak} for r in rows]})
        if ns.json == "-":
            return 0
    print(format_table(rows), file=out)
    pb = precision_bytes(ns.precision, getattr(ns, "device", "cuda"))
    print(f"\n{ns.model or 'smollm2-135m'}, batch {ns.batch_size} x {ns.max_length} tokens, {precision_note(pb)}; "
          "peak = weights + optimizer + the most gradients, activations and temporaries alive at once", file=out)
    print(allowance_note(ns.headroom, ns.gpu_memory), file=out)
    print("rows are lopt train's --method and flags (each row's full command is in --json); lopt = its default "
          f"recipe (--task-grad-every {RECIPE_TASK_GRAD_EVERY}, a tied head kept tied); lopt-kN = the paper's "
          "--method lopt --task-grad-every 0 --num-blocks N", file=out)
    if ns.json:
        print(f"rows written to {where}", file=out)
    return 0


def namespace_method_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line (``PLAN_METHOD_OPTIONS``)."""
    return {k: getattr(ns, k) for k in PLAN_METHOD_OPTIONS if getattr(ns, k, None) is not None}


def precision_note(pb: PrecisionBytes) -> str:
    """What the rows' bytes assume about ``pb``, in a phrase."""
    if pb.name == "fp32":
        return "fp32: weights, gradients and AdamW state in fp32"
    if pb.name == "bf16-mixed":
        return ("bf16-mixed: autocast; fp32 master weights, gradients and AdamW state for what trains, frozen "
                "weights in bf16 (a qlora base in 4-bit NF4)")
    return ("bf16-true: weights, gradients and optimizer state in bf16 (AdamW's state as --bf16-update keeps it: "
            "stochastic-round and plain two bf16 moments, kahan also a bf16 compensation buffer per weight; the local "
            "heads stay fp32; a qlora base in 4-bit NF4)")


def allowance_note(headroom: str | int, gpu_memory: str | None) -> str:
    """The line saying what the peak counts and what it leaves out (shown, never folded into rows)."""
    return ("basis: live tensor bytes, what torch.cuda.max_memory_allocated reports; not in any row: the CUDA "
            "context (about 0.3-0.6 GiB) and the caching allocator's reserve above live bytes "
            "(max_memory_reserved - max_memory_allocated; fragmentation), for which "
            + (f"the fits column keeps --headroom {headroom} free (fits = peak + {headroom} <= {gpu_memory})"
               if gpu_memory else f"allow --headroom {headroom} (with --gpu-memory, the fits column keeps it free)")
            + "; paged-adamw-8bit's state lives in unified memory, outside the peak")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lopt plan", description="Predict a training step's memory per method.")
    add_plan_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return run_plan_cli(ns)
    except PlanError as e:
        print(f"lopt plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
