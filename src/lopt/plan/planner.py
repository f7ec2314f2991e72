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
and per-block optimizer step). ``lopt-kN`` is the paper's pure local learning (``--task-grad-every 0``);
lopt train's default (``--task-grad-every 4``) runs three such steps, minus the local loss, for every
step whose boundary is open, which holds the lower blocks' layer inputs for a recomputing backward.
fp32 weights, gradients and AdamW state in both precisions; ``bf16`` is lopt's autocast. CUDA's context (about 0.5 GiB) and allocator slack are not in the peak: the fit
column keeps ``headroom`` free for them.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from lopt.engine.anatomy import find_layers
from lopt.engine.config import LoPTError
from lopt.jsonout import json_help, write_json
from lopt.methods import LoPTConfig, Trains, get_method, method_names
from lopt.plan.activations import (SUPPORTED_MODEL_TYPES, LayerMode, LayerShape, PhaseSpec,
                               phase_memory)

DEFAULT_METHODS = ("e2e", "lopt-k2", "lopt-k4", "freeze-lower", "lora", "lisa", "badam")
PRECISIONS = ("fp32", "bf16")
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
    key = re.sub(r"-instruct$", "", key)
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
    lora: list[int]  # LoRA r=LORA_R adapter elements per layer (all linear maps)
    lora_tensors: list[int]
    vocab: int
    hidden: int
    head_bias: bool

    @property
    def total(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return sum(self.layers) + self.embedding + (0 if self.tied else self.head) + self.other

    def recon_head(self) -> tuple[int, int]:
        """(elements, tensors) of one ``lopt.heads.ReconstructionHead``: LayerNorm, two Linears."""
        h, b = self.hidden, max(1, self.hidden // 4)
        return 2 * h + h * b + b + b * h + h, 6


def count_parameters(config: Any, lora_r: int = LORA_R) -> ParamCounts:
    """Build the model on the meta device and count its parameters by part."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM


    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise PlanError(f"transformers cannot build a causal LM from this config "
                        f"({str(e).splitlines()[0]})") from e
    _, layers = find_layers(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    seen = {id(p) for layer in layers for p in layer.parameters()}

    def part(module: nn.Module | None) -> tuple[int, int]:
        ps = [p for p in (module.parameters() if module is not None else []) if id(p) not in seen]
        seen.update(id(p) for p in ps)
        return sum(p.numel() for p in ps), len(ps)

    emb_n, emb_t = part(emb)
    head_n = head.weight.numel() + (head.bias.numel() if getattr(head, "bias", None) is not None else 0)
    head_t = 1 + (getattr(head, "bias", None) is not None)
    if not tied:
        part(head)
    rest = [p for p in model.parameters() if id(p) not in seen]
    lora, lora_t = [], []
    for layer in layers:
        lin = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        lora.append(sum(lora_r * (m.in_features + m.out_features) for m in lin))
        lora_t.append(2 * len(lin))
    return ParamCounts(
        layers=[sum(p.numel() for p in layer.parameters()) for layer in layers],
        layer_tensors=[len(list(layer.parameters())) for layer in layers],
        embedding=emb_n, embedding_tensors=emb_t, head=head_n, head_tensors=head_t, tied=tied,
        other=sum(p.numel() for p in rest), other_tensors=len(rest), lora=lora, lora_tensors=lora_t,
        vocab=emb.weight.shape[0], hidden=emb.weight.shape[1],
        head_bias=getattr(head, "bias", None) is not None)


# --------------------------------------------------------------------------- methods


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


@dataclass
class MethodSetup:
    """Which parameters a method keeps, trains and steps, and the phases of its step."""

    name: str
    resident: int  # parameter elements in memory (fp32)
    trainable: int
    trainable_tensors: int
    phases: list[Phase]


def parse_method(name: str, num_blocks: int) -> tuple[str, int]:
    """``lopt-k4`` -> ("lopt", 4); ``lopt`` -> ("lopt", num_blocks); any registered method's name."""
    m = re.fullmatch(r"lopt-k(\d+)", name)
    if m:
        return "lopt", int(m.group(1))
    if name not in method_names():
        raise PlanError(f"unknown method {name!r}: choose from {', '.join(method_names())} (lopt-kN for N blocks)")
    return name, num_blocks


def method_trains(method: str, num_layers: int, num_blocks: int = 2, **options: Any) -> Trains:
    """What ``method`` trains on a ``num_layers``-layer model, as the method itself says
    (``Method.trains``) under its default options, ``num_blocks`` and ``options``."""
    try:
        config = LoPTConfig(method=method, num_blocks=num_blocks, **options)
        return get_method(method).trains(num_layers, config)
    except LoPTError as e:
        raise PlanError(str(e)) from e


def method_setup(method: str, counts: ParamCounts, *, num_blocks: int = 2, checkpoint: dict[int, str]
                 | None = None, trains: Trains | None = None) -> MethodSetup:
    """The setup of ``method`` on a model, from what the method trains (``trains``, by default
    ``method_trains``); ``checkpoint``: layer index -> "full" / "selective" for the checkpointed
    layers."""
    ck = checkpoint or {}
    n = len(counts.layers)
    t = trains or method_trains(method, n, num_blocks)
    g = [4 * x for x in counts.layers]
    head_g, norm_g, emb_g = 4 * counts.head, 4 * counts.other, 4 * counts.embedding
    trained = set(t.layers)

    def modes(idx: range) -> tuple[LayerMode, ...]:
        return tuple(LayerMode(trained=i in trained, lora_r=t.lora_r, checkpoint=ck.get(i, "off")) for i in idx)

    def layer_grads(idx: range) -> list[int]:
        return [4 * counts.lora[i] if t.lora_r else (g[i] if i in trained else 0) for i in idx]

    # Trained parameters and their tensors outside the layers: embedding, final norm, LM head (a tied
    # head is the embedding, unless a boundary unties it).
    untied = t.blocks is not None or not counts.tied
    outside = (counts.embedding * t.embedding + counts.other * t.final_norm
               + (counts.head if t.head and untied else 0))
    outside_t = (counts.embedding_tensors * t.embedding + counts.other_tensors * t.final_norm
                 + (counts.head_tensors if t.head and untied else 0))
    layers_n = sum(counts.lora) if t.lora_r else sum(counts.layers[i] for i in trained)
    layers_t = sum(counts.lora_tensors) if t.lora_r else sum(counts.layer_tensors[i] for i in trained)
    resident = counts.total + (sum(counts.lora) if t.lora_r else 0)
    top = head_g * t.head + norm_g * t.final_norm

    def ce(idx: range, emb: bool) -> PhaseSpec:
        return PhaseSpec(modes(idx), embedding_trained=emb, final_norm_trained=t.final_norm, head_trained=t.head,
                         head_bias=counts.head_bias)

    if t.blocks is None:
        emb_grads = emb_g if t.embedding else 0
        phase = Phase(ce(range(n), t.embedding), layer_grads(range(n)), top_grads=top,
                      base_grads=0 if counts.tied else emb_grads, tied_extra=emb_grads if counts.tied else 0)
        return MethodSetup(t.label or method, resident, layers_n + outside, layers_t + outside_t, [phase])
    # A boundary: the head is untied (its own copy), the last block learns the task; each lower block
    # learns from a reconstruction head of its own, one after the other, or is frozen.
    resident += counts.head if counts.tied else 0
    (last_s, _), lower = t.blocks[-1], t.blocks[:-1]
    upper = Phase(ce(range(last_s, n), False), layer_grads(range(last_s, n)), top_grads=top)
    phases = []
    if t.local_heads:
        rh, rh_t = counts.recon_head()
        resident += len(lower) * rh
        outside += len(lower) * rh
        outside_t += len(lower) * rh_t
        phases = [Phase(PhaseSpec(modes(range(s, e)), embedding_trained=(i == 0 and t.embedding), top="recon"),
                        layer_grads(range(s, e)), top_grads=4 * rh,
                        base_grads=emb_g if i == 0 and t.embedding else 0) for i, (s, e) in enumerate(lower)]
    return MethodSetup(t.label or method, resident, layers_n + outside, layers_t + outside_t, phases + [upper])


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

    @property
    def step_peak(self) -> int:
        """The peak above the loaded model: what ``lopt bench`` measures (peak minus baseline)."""
        return self.peak - self.weights


def _walk(setup: MethodSetup, counts: ParamCounts, shape: LayerShape, batch: int, seq: int, amp: bool
          ) -> tuple[int, int, int, int, list[dict[str, Any]]]:
    """(peak of grads + activations + temporaries above weights and optimizer state, most gradient
    bytes, most held activation bytes, most tracker-visible bytes, per-phase details)."""
    tokens, c = batch * seq, 2 if amp else 4
    n_ce = batch * (seq - 1)
    # Temporaries. Loss: one chunk of fp32 logits (plus their bf16 original under autocast) and the
    # labelled rows' hidden states. A layer's backward: the fp32 gradient of its output and of its
    # input, and about three intermediate-width gradients of the MLP at once.
    ce_tmp = min(CE_CHUNK, n_ce) * counts.vocab * (4 + (2 if amp else 0)) + n_ce * shape.hidden * 4
    bwd_tmp = 2 * tokens * shape.hidden * 4 + 3 * tokens * shape.intermediate * c
    grads, live = 0, 0
    max_grads = max_held = max_vis = 0
    details = []
    for ph in setup.phases:
        mem = phase_memory(ph.spec, shape, batch, seq, counts.vocab, amp=amp)
        max_held, max_vis = max(max_held, mem.held), max(max_vis, mem.visible)
        fwd = grads + mem.held + (ce_tmp if ph.spec.top == "ce" else 0)
        live = max(live, fwd)
        held = mem.held - mem.top  # the loss's saved head gradient becomes the head's .grad
        grads += ph.top_grads
        for layer, g in zip(reversed(mem.layers), reversed(ph.layer_grads)):
            rebuilt = layer.rebuilt + bwd_tmp if (g or layer.held) else 0
            live = max(live, held + grads + g + rebuilt)
            held -= layer.held
            grads += g
        grads += ph.base_grads
        live = max(live, held + grads + ph.tied_extra)
        max_grads = max(max_grads, grads)
        details.append({"layers": len(ph.spec.layers), "top": ph.spec.top, "activations": mem.held,
                        "saved_visible": mem.visible, "grads": grads})
        if ph.steps_after:
            grads = 0
    return live, max_grads, max_held, max_vis, details


def plan(config_or_model_source: Any = None, *, batch_size: int, max_length: int, precision: str = "bf16",
         methods: Sequence[str] | None = None, num_blocks: int = 2, gradient_checkpointing: str | None = None,
         selective_checkpointing: str | None = None, gpu_memory: str | int | None = None,
         headroom: int = DEFAULT_HEADROOM) -> list[PlanRow]:
    """Predict the memory of one training step for each method x checkpointing scope.

    ``config_or_model_source``: an alias (``qwen2.5-7b``; see ``aliases()``), a checkpoint directory,
    a ``config.json``, a dict or a transformers config; None is lopt's default SmolLM2-135M.
    ``methods``: names from ``DEFAULT_METHODS`` (``lopt`` means ``lopt-k{num_blocks}``).
    ``gradient_checkpointing`` / ``selective_checkpointing``: a scope (off, all, last-block,
    lower-blocks) to plan only that; by default each method is shown without checkpointing and with
    full and selective checkpointing of all layers (LoPT: of its last block too).
    ``gpu_memory``: bytes or a string like ``80GB`` / ``24GiB`` (both 2**30); rows then say whether
    the peak plus ``headroom`` fits."""
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(max_length, int) or max_length < 2:
        raise PlanError(f"batch size must be >= 1 and max length >= 2, got {batch_size} and {max_length}")
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for name, scope in (("gradient checkpointing", gradient_checkpointing),
                        ("selective checkpointing", selective_checkpointing)):
        if scope is not None and scope not in SCOPES:
            raise PlanError(f"{name} scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    capacity = parse_size(gpu_memory) if gpu_memory is not None else None
    config = load_config(config_or_model_source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        raise PlanError(f"lopt plan models the activations of {', '.join(SUPPORTED_MODEL_TYPES)} decoder "
                        f"layers; this config is {text.model_type!r}")
    if getattr(text, "hidden_act", "silu") not in ("silu", "swish"):
        raise PlanError(f"lopt plan models SiLU-gated MLPs; this config's hidden_act is {text.hidden_act!r}")
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if isinstance(window, int) and max_length > window:
        raise PlanError(f"this model uses sliding-window attention ({window} tokens) and --max-length {max_length} "
                        f"is longer: lopt plan models full causal attention only; plan at most {window} tokens")
    counts = count_parameters(text)
    shape = LayerShape.from_config(text)
    amp = precision == "bf16"
    rows = []
    for name in methods or DEFAULT_METHODS:
        method, k = parse_method(name, num_blocks)
        for full, sel in _scopes(method, gradient_checkpointing, selective_checkpointing):
            rows.append(_row(method, k, full, sel, counts, shape, batch_size, max_length, amp, capacity, headroom))
    return rows


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


def _row(method: str, k: int, full: str, sel: str, counts: ParamCounts, shape: LayerShape, batch: int,
         seq: int, amp: bool, capacity: int | None, headroom: int) -> PlanRow:
    n = len(counts.layers)
    trains = method_trains(method, n, k)
    ck = checkpointed_layers(full, sel, n, list(trains.blocks or [(0, n)]))
    setup = method_setup(method, counts, num_blocks=k, checkpoint=ck, trains=trains)
    weights = 4 * setup.resident
    optimizer = 8 * setup.trainable + 4 * setup.trainable_tensors
    live, grads, acts, visible, details = _walk(setup, counts, shape, batch, seq, amp)
    peak = weights + optimizer + live
    label = "-" if full == sel == "off" else " + ".join(
        f"{kind} {scope}" for kind, scope in (("full", full), ("selective", sel)) if scope != "off")
    row = PlanRow(method=setup.name, checkpointing=label, trainable_params=setup.trainable, weights=weights,
                  grads=grads, optimizer=optimizer, activations=acts, saved_visible=visible, peak=peak,
                  details={"phases": details, "gradient_checkpointing": full, "selective_checkpointing": sel})
    if capacity is not None:
        row.fits = peak + headroom <= capacity
        row.free_at_peak = capacity - peak
    return row


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
    head = ["method", "checkpointing", "trainable", "weights", "grads", "optimizer", "activations", "peak"]
    head += ["fits"] if fit else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, r.checkpointing, f"{r.trainable_params / 1e6:,.1f}M", format_size(r.weights),
                 format_size(r.grads), format_size(r.optimizer), format_size(r.activations), format_size(r.peak)]
        if fit:
            cells.append("yes" if r.fits else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lopt plan``."""
    p.add_argument("--model", default=None,
                   help="checkpoint directory, config.json or alias (default: the embedded SmolLM2-135M); "
                        "aliases: " + ", ".join(aliases()))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512, help="tokens per row")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="bf16: lopt's autocast on CUDA (weights, gradients, AdamW state stay fp32); fp32")
    p.add_argument("--method", action="append", default=None, metavar="NAME",
                   help=f"plan only this method (repeatable): {', '.join(method_names())} or lopt-kN "
                        f"(default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--num-blocks", type=int, default=2, help="blocks for --method lopt")
    p.add_argument("--gradient-checkpointing", choices=SCOPES, default=None,
                   help="plan only this full-checkpointing scope (default: off, all and, for lopt, last-block)")
    p.add_argument("--selective-checkpointing", choices=SCOPES, default=None,
                   help="plan only this selective-checkpointing scope")
    p.add_argument("--gpu-memory", default=None, help="e.g. 80GB: add a fits column")
    p.add_argument("--headroom", default="1GiB", help="kept free for the CUDA context and allocator (default 1GiB)")
    p.add_argument("--json", default=None, metavar="PATH", help=json_help("the rows"))


def run_plan_cli(ns: argparse.Namespace) -> int:
    """``lopt plan``: print the table for the parsed options; ``--json PATH`` also writes the rows
    (sizes in bytes) to PATH, ``-`` to standard output instead of the table."""
    rows = plan(ns.model, batch_size=ns.batch_size, max_length=ns.max_length, precision=ns.precision,
                methods=ns.method, num_blocks=ns.num_blocks, gradient_checkpointing=ns.gradient_checkpointing,
                selective_checkpointing=ns.selective_checkpointing, gpu_memory=ns.gpu_memory,
                headroom=parse_size(ns.headroom))
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
    print(f"\n{ns.model or 'smollm2-135m'}, batch {ns.batch_size} x {ns.max_length} tokens, {ns.precision}; "
          "weights, gradients and AdamW state in fp32; peak = weights + optimizer + the most gradients, "
          "activations and temporaries alive at once"
          + (f"; fits = peak + {ns.headroom} headroom <= {ns.gpu_memory}" if ns.gpu_memory else ""), file=out)
    if ns.json:
        print(f"rows written to {where}", file=out)
    return 0


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
