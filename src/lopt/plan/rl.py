"""``lopt plan grpo`` and ``lopt plan dpo``: the memory of one ``lopt grpo`` / ``lopt dpo`` step (TRL's
GRPOTrainer and DPOTrainer on a lopt-wrapped model), per method, from the model's config.

Built on the single-process planner (``lopt.plan.planner``): the same parameter counts, method setups
(``method_setup``: what each method trains) and per-layer activations (``cached_phase_memory``); what
changes is what TRL's step holds around them. Written against TRL 1.16.0 (``TRL_VERSION``); the
defaults relied on, as installed there and as ``lopt grpo`` / ``lopt dpo`` pass them:

* **Log-probabilities**: TRL 1.16 patches a fused LM head onto the policy and the reference
  (``trl.trainer.utils.add_fused_lm_head``): the per-token log-probabilities of the labelled positions
  in tiles of ``LOGPROB_TOKEN_CHUNK`` (4096) tokens x ``LOGPROB_VOCAB_CHUNK`` (32768) vocabulary
  entries, never the whole logits. Its one tile buffer is allocated 32768 wide whatever the
  vocabulary (``min(N, 4096) x 32768`` in the compute dtype), in the forward and again in the
  backward, which also makes the hidden states' and the head's fp32 gradients. It saves the scored
  hidden states, the targets, log Z and the entropy. On CUDA (Triton) only the labelled positions are
  scored (GRPO: the completions; DPO: chosen and rejected completions); elsewhere every position,
  each tile also going through a few fp32 temporaries of its size. ``logprobs="full"`` plans the
  unchunked alternative instead (the whole logits, their fp32 log-softmax kept for the backward:
  what TRL did before the fused head, and what lopt's chunked loss avoids in ``lopt train``).
  lopt's own chunked loss is off in these recipes (``RLConfig.chunked_ce``).
* **Reference model**: a frozen fp32 copy of the base model taken before wrapping (its head tied as
  the base's), unless ``beta`` is 0 (GRPO; TRL's default beta is 0.0, lopt grpo's 0.04). Under LoRA
  TRL copies the adapters into a frozen ``ref`` adapter instead (the model it is given already has one). lopt dpo refuses beta <= 0 (TRL's default 0.1).
* **GRPO**: ``steps_per_generation`` = gradient accumulation (TRL's default; 1 in lopt), so one
  generation round of ``batch_size`` completions (``batch_size / num_generations`` prompts, each
  sampled ``num_generations`` times) per optimizer step, ``num_iterations`` 1 (so no old-policy
  log-probabilities are computed: TRL skips them when generation and optimisation are aligned).
  Generation runs ``model.generate`` with transformers' dynamic KV cache, outside autocast, so the
  cache has the weights' dtype (fp32): 2 x layers x rows x (prompt + completion) x kv heads x head dim
  x 4 bytes at its largest, plus one layer's copy while it grows. The reference's log-probabilities
  are computed under no_grad before the policy's forward. lopt grpo's defaults: ``num_generations``
  4 (TRL: 8), ``max_completion_length`` 256 (TRL: 512), ``max_prompt_length`` 512, ``beta`` 0.04.
* **DPO**: chosen and rejected are concatenated into one batch of ``2 x batch_size`` rows padded to
  ``max_length`` (TRL 1.16's default and lopt dpo's: 1024) and run through the policy in one forward;
  the reference's forward (no_grad, ``precompute_ref_log_probs`` False) runs after it, while the
  policy's activations are held, then the backward.
* **The optimizer**: lopt's AdamW over ``wrapped.param_groups``, not fused in these recipes (TRL
  steps it once per optimizer step; lopt's per-block step does not apply, so lower blocks' gradients
  stay until the step). On CUDA PyTorch's multi-tensor (foreach) AdamW makes one fp32 temporary the
  size of the trained parameters.
* Every position is a real token (no padding: the prompts of a batch the same length, completions
  generated to ``max_completion_length``); SDPA attention; fp32 weights, gradients and AdamW state.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from lopt.jsonout import write_json
from lopt.methods import get_method
from lopt.plan import distributed
from lopt.plan.activations import LayerShape
from lopt.plan.planner import (DEFAULT_HEADROOM, PLAN_UNITS, PRECISIONS, SCOPES, MethodSetup, ParamCounts, Phase,
                               PlanError, PlanRow, cached_phase_memory, checkpointed_layers, format_size,
                               method_setup, method_trains, model_shape, optimizer_bytes, parse_size,
                               precision_bytes, row_specs)

TRL_VERSION = "1.16.0"  # the TRL whose trainers and defaults this module models
RECIPES = ("sft", "grpo", "dpo")
LOGPROB_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
LOGPROB_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
LOGPROB_MODES = ("chunked", "full")
# The fp32 temporaries of one tile in TRL's torch fallback (no Triton: CPU): the forward's transformed
# logits, exp and products; the backward's log-probs, probabilities, the gradient and its factors.
TILE_TEMPS_FORWARD, TILE_TEMPS_BACKWARD = 4, 7
# lopt grpo's and lopt dpo's defaults (tests/test_plan_rl.py checks them against GRPORunConfig/DPORunConfig)
GRPO_DEFAULTS = {"num_generations": 4, "max_completion_length": 256, "max_prompt_length": 512, "beta": 0.04}
DPO_DEFAULTS = {"beta": 0.1, "max_length": 1024}
RL_METHODS = ("lopt", "lopt-k2", "e2e", "freeze-lower", "lora", "lisa", "badam")


@dataclass
class RLShape:
    """The token counts of one step: ``rows`` sequences of ``seq`` tokens in the policy's forward, of
    which ``scored`` positions are labelled; generation (GRPO) of ``gen_rows`` x ``gen_seq``."""

    rows: int
    seq: int
    completion: int
    gen_rows: int = 0
    gen_seq: int = 0
    prompt: int = 0


def check_rl(recipe: str, *, batch_size: Any, num_generations: Any = None, beta: Any = None,
             prompt_length: Any = None, completion_length: Any = None, max_length: Any = None,
             logprobs: str = "chunked") -> None:
    """One-line PlanErrors for a step ``lopt grpo`` / ``lopt dpo`` would refuse."""
    def whole(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if recipe not in ("grpo", "dpo"):
        raise PlanError(f"recipe must be grpo or dpo, got {recipe!r}")
    if not whole(batch_size) or batch_size < 1:
        raise PlanError(f"batch size must be >= 1, got {batch_size}")
    if logprobs not in LOGPROB_MODES:
        raise PlanError(f"--logprobs must be one of {', '.join(LOGPROB_MODES)}, got {logprobs!r}")
    if recipe == "grpo":
        if not whole(num_generations) or num_generations < 2:
            raise PlanError(f"--num-generations must be >= 2 (GRPO compares completions of one prompt), "
                            f"got {num_generations}")
        if batch_size % num_generations:
            raise PlanError(f"--batch-size {batch_size} is not a multiple of --num-generations {num_generations}: "
                            f"a GRPO batch holds whole groups of completions (e.g. --batch-size {num_generations})")
        if beta is None or beta < 0:
            raise PlanError(f"--beta must be >= 0 (0: no reference model), got {beta}")
        for name, v in (("--prompt-length", prompt_length), ("--max-completion-length", completion_length)):
            if not whole(v) or v < 1:
                raise PlanError(f"{name} must be >= 1 token, got {v}")
    else:
        if beta is None or beta <= 0:
            raise PlanError(f"--beta must be > 0 for DPO (lopt dpo refuses it otherwise), got {beta}")
        if not whole(max_length) or max_length < 2:
            raise PlanError(f"--max-length must be >= 2 tokens (prompt + completion), got {max_length}")
        if not whole(prompt_length) or not 1 <= prompt_length < max_length:
            raise PlanError(f"--prompt-length must be >= 1 and below --max-length {max_length}, got {prompt_length}")


def plan_rl(recipe: str, config_or_model_source: Any = None, *, batch_size: int | None = None,
            num_generations: int | None = None, beta: float | None = None, prompt_length: int | None = None,
            completion_length: int | None = None, max_length: int | None = None, precision: str = "bf16",
            methods: Sequence[str] | None = None, num_blocks: int = 2, gradient_checkpointing: str | None = None,
            selective_checkpointing: str | None = None, task_grad_every: int | None = None,
            tied_head: bool | None = None, logprobs: str = "chunked", device: str = "cuda",
            gpu_memory: str | int | None = None, headroom: int = DEFAULT_HEADROOM,
            generation_rows: int | None = None) -> list[PlanRow]:
    """Rows for one ``lopt grpo`` or ``lopt dpo`` step per method (see the module's docstring).

    GRPO: ``batch_size`` completions per step (default ``num_generations``: one prompt's group), each
    ``prompt_length`` + ``completion_length`` tokens (defaults: lopt grpo's ``max_prompt_length`` 512 and
    ``max_completion_length`` 256, the longest it runs). DPO: ``batch_size`` pairs of ``max_length``
    tokens (default 1024), ``prompt_length`` of them the prompt (default half). ``beta``: lopt's
    default (GRPO 0.04, DPO 0.1). ``device``: "cuda" (TRL's Triton kernel scores only the labelled
    positions) or "cpu" (every position, through fp32 temporaries). Each row's ``details`` holds the
    step's parts (``reference``, ``kv_cache``, ``generation``, ``reference_pass``, ``logprobs``,
    ``optimizer_step``, ``where``: the part of the step where the peak falls). ``generation_rows``
    (GRPO): completions generated at once, ``batch_size`` x TRL's ``steps_per_generation`` (default
    ``batch_size``: one micro-batch per generation round)."""
    if recipe == "grpo":
        num_generations = GRPO_DEFAULTS["num_generations"] if num_generations is None else num_generations
        beta = GRPO_DEFAULTS["beta"] if beta is None else beta
        batch_size = num_generations if batch_size is None else batch_size
        prompt_length = GRPO_DEFAULTS["max_prompt_length"] if prompt_length is None else prompt_length
        completion_length = (GRPO_DEFAULTS["max_completion_length"] if completion_length is None
                             else completion_length)
    elif recipe == "dpo":
        beta = DPO_DEFAULTS["beta"] if beta is None else beta
        batch_size = 4 if batch_size is None else batch_size
        max_length = DPO_DEFAULTS["max_length"] if max_length is None else max_length
        prompt_length = max_length // 2 if prompt_length is None and isinstance(max_length, int) else prompt_length
    check_rl(recipe, batch_size=batch_size, num_generations=num_generations, beta=beta,
             prompt_length=prompt_length, completion_length=completion_length, max_length=max_length,
             logprobs=logprobs)
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision_bytes(precision, device).name == "bf16-true":
        raise PlanError("lopt plan grpo|dpo plans fp32 weights (--precision fp32 or bf16-mixed), not bf16-true")
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be cuda or cpu, got {device!r}")
    for name, scope in (("gradient checkpointing", gradient_checkpointing),
                        ("selective checkpointing", selective_checkpointing)):
        if scope is not None and scope not in SCOPES:
            raise PlanError(f"{name} scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if recipe == "grpo":
        gen_rows = batch_size if generation_rows is None else generation_rows
        if not isinstance(gen_rows, int) or gen_rows < batch_size or gen_rows % batch_size:
            raise PlanError(f"generation rows must be a multiple of the batch size {batch_size}, got {gen_rows}")
        steps = RLShape(rows=batch_size, seq=prompt_length + completion_length, completion=completion_length,
                        gen_rows=gen_rows, gen_seq=prompt_length + completion_length, prompt=prompt_length)
    else:
        steps = RLShape(rows=2 * batch_size, seq=max_length, completion=max_length - prompt_length,
                        prompt=prompt_length)
    counts, shape = model_shape(config_or_model_source, steps.seq)
    amp = precision_bytes(precision, device).amp
    capacity = parse_size(gpu_memory) if gpu_memory is not None else None
    specs = row_specs(list(methods or RL_METHODS), counts.tied, num_blocks=num_blocks,
                      task_grad_every=task_grad_every, tied_head=tied_head)
    full, sel = gradient_checkpointing or "off", selective_checkpointing or "off"
    rows = []
    for spec, _ in specs:
        if (full, sel) != ("off", "off") and not get_method(spec.method).boundary and not {full, sel} <= {"off", "all"}:
            raise PlanError(f"checkpointing scopes other than 'all' need a method with a boundary, not {spec.method}")
        n = len(counts.layers)
        trains = method_trains(spec.method, n, spec.num_blocks)
        ck = checkpointed_layers(full, sel, n, list(trains.blocks or [(0, n)]))
        setup = method_setup(spec.method, counts, num_blocks=spec.num_blocks, checkpoint=ck, trains=trains,
                             spec=spec)
        # LoRA: TRL copies the trained adapters into a frozen "ref" adapter (the model it gets is a PEFT
        # model with an adapter already) and runs the reference pass with it.
        reference = (4 * sum(counts.lora) if spec.method == "lora" else 4 * counts.total) if beta > 0 else 0
        weights = 4 * setup.resident
        optimizer = optimizer_bytes(setup, "adamw")
        parts = _step(recipe, setup, counts, shape, steps, amp, device, logprobs, beta > 0)
        live = max(v for k, v in parts.items() if k in _POINTS)
        where = max((k for k in _POINTS if k in parts), key=lambda k: parts[k])
        peak = weights + optimizer + reference + live
        label = "-" if full == sel == "off" else " + ".join(
            f"{kind} {scope}" for kind, scope in (("full", full), ("selective", sel)) if scope != "off")
        row = PlanRow(method=spec.name(counts.tied), checkpointing=label, trainable_params=setup.trainable,
                      weights=weights, grads=parts.pop("grads"), optimizer=optimizer,
                      activations=parts.pop("activations"), saved_visible=parts.pop("visible"), peak=peak,
                      details={"recipe": recipe, "trl": TRL_VERSION, "reference": reference, "where": where,
                               "live": live, "device": device, "logprobs_mode": logprobs, **parts,
                               "rows": steps.rows, "seq": steps.seq, "beta": beta,
                               **({"num_generations": num_generations} if recipe == "grpo" else {})},
                      command=_command(recipe, spec.command(counts.tied, full, sel), batch_size, num_generations,
                                       beta, prompt_length, completion_length, max_length))
        if capacity is not None:
            row.fits = peak + headroom <= capacity
            row.free_at_peak = capacity - peak
        rows.append(row)
    return rows


_POINTS = ("generation", "reference_pass", "forward", "backward", "optimizer_step")


def resolve_batch_size(cfg: Any, recipe: str, device: Any = None, model_config: Any = None) -> None:
    """``lopt grpo|dpo --batch-size auto``: set ``cfg.batch_size`` and ``cfg.grad_accum`` to the largest
    step ``plan_rl`` predicts to fit the device's free memory (GPU free memory; on CPU the available RAM,
    ``planner.device_memory``), or with ``cfg.global_batch_size`` G to the batch x accumulation = G with
    the fewest accumulation steps that fits; say so on stderr. Does nothing for a numeric batch.

    GRPO: the batch counts completions and stays a multiple of ``num_generations`` (whole groups, as
    TRL requires); the generation round makes batch x (``steps_per_generation``, default the
    accumulation) completions at once, which the plan counts. Called by the recipes before
    ``cfg.validate()``; every other option is validated first (one-line LoPTError)."""
    import dataclasses
    import os

    import torch

    from lopt.engine.config import LoPTError
    from lopt.plan.planner import device_memory, load_config

    if cfg.batch_size != "auto":
        return
    if cfg.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LoPTError(f"--batch-size auto plans one process's device for a new run: give lopt {recipe} a number "
                        "under torchrun, and none with --resume (the run recorded its batch)")
    unit = cfg.num_generations if recipe == "grpo" else 1
    global_batch = cfg.global_batch_size
    if global_batch is not None and (not isinstance(global_batch, int) or global_batch < 1):
        raise LoPTError(f"--global-batch-size must be >= 1, got {global_batch}")
    if global_batch is None and cfg.grad_accum != 1:
        raise LoPTError("--batch-size auto chooses the gradient accumulation too: give --global-batch-size G "
                        f"(examples per step) instead of --grad-accum {cfg.grad_accum}")
    # Every other option as a numeric batch would have it (bad ones fail here, before any planning).
    dataclasses.replace(cfg, batch_size=unit if isinstance(unit, int) and unit > 0 else 1, global_batch_size=None,
                        grad_accum=1).validate()
    if global_batch is not None and global_batch % unit:
        raise LoPTError(f"--global-batch-size {global_batch} is not a multiple of --num-generations {unit}: a GRPO "
                        f"step holds whole groups of completions")
    if recipe == "grpo" and cfg.max_prompt_length is None:
        raise LoPTError("--batch-size auto plans prompts of --max-prompt-length tokens at most: give one")
    if recipe == "dpo" and cfg.max_length is None:
        raise LoPTError("--batch-size auto plans pairs of --max-length tokens at most: give one")
    if device is None:
        from lopt.runtime.loop import resolve_device

        device = resolve_device(cfg.device)
    device = torch.device(device)
    try:
        if model_config is None:
            model_config = load_config(cfg.model)
        free, headroom, where = device_memory(device)
    except PlanError as e:
        raise LoPTError(str(e)) from e
    # auto as lopt resolves it on this device; fp16 costs what bf16-mixed does (planner.precision_bytes)
    kind = "cuda" if device.type == "cuda" else "cpu"
    try:
        precision = precision_bytes("bf16-mixed" if cfg.precision == "fp16" else cfg.precision, kind).name
    except PlanError as e:
        raise LoPTError(f"--batch-size auto: {e}") from e
    options = dict(methods=[cfg.method], num_blocks=cfg.num_blocks, beta=cfg.beta, precision=precision,
                   gradient_checkpointing=cfg.gradient_checkpointing,
                   selective_checkpointing=cfg.selective_checkpointing,
                   task_grad_every=cfg.task_grad_every if cfg.method == "lopt" else None, tied_head=cfg.tied_head,
                   device=kind)
    if recipe == "grpo":
        options.update(num_generations=cfg.num_generations, prompt_length=cfg.max_prompt_length,
                       completion_length=cfg.max_completion_length)
    else:
        options.update(max_length=cfg.max_length)

    def peak(batch: int, accum: int) -> PlanRow:
        gen = batch * (getattr(cfg, "steps_per_generation", None) or accum) if recipe == "grpo" else None
        try:
            return plan_rl(recipe, model_config, batch_size=batch, generation_rows=gen, **options)[0]
        except PlanError as e:
            raise LoPTError(f"--batch-size auto: {e}") from e

    def fits(batch: int, accum: int = 1) -> bool:
        return peak(batch, accum).peak + headroom <= free

    # The largest fitting batch (in whole groups): doubling, then halving the gap (the peak grows with it).
    k = 0
    if fits(unit):
        k, hi = 1, 2
        while fits(unit * hi) and hi < 1 << 20:
            k, hi = hi, hi * 2
        while hi - k > 1:
            mid = (k + hi) // 2
            k, hi = (mid, hi) if fits(unit * mid) else (k, mid)
    largest = unit * k
    one = peak(unit, 1)
    what = f"{one.method}" + ("" if one.checkpointing == "-" else f", checkpointing {one.checkpointing}")
    step = (f"{cfg.max_prompt_length} + {cfg.max_completion_length} tokens per completion" if recipe == "grpo"
            else f"pairs of {cfg.max_length} tokens")
    if not largest:
        raise LoPTError(f"--batch-size auto: a {recipe} step of {what} does not fit even {unit} "
                        f"{'completions' if recipe == 'grpo' else 'pair'} of {step} in {where} (peak "
                        f"{format_size(one.peak)} + {format_size(headroom)} kept free)")
    if global_batch is None:
        batch, accum = largest, 1
    else:  # the fewest accumulation steps whose batch (whole groups) fits
        choice = next(((global_batch // a, a) for a in range(1, global_batch + 1)
                       if global_batch % a == 0 and (global_batch // a) % unit == 0 and global_batch // a <= largest
                       and fits(global_batch // a, a)), None)
        if choice is None:
            raise LoPTError(f"--batch-size auto: no batch x accumulation = --global-batch-size {global_batch} fits a "
                            f"{recipe} step of {what} in {where}")
        batch, accum = choice
    cfg.batch_size, cfg.grad_accum, cfg.global_batch_size = batch, accum, None
    print(f"lopt {recipe}: --batch-size auto: {batch}" + (f" x --grad-accum {accum}" if accum > 1 else "")
          + f" ({what}, {step}, {precision}: lopt plan's largest {recipe} batch is {largest} in {where}, "
          f"{format_size(headroom)} kept free)", file=sys.stderr)


def _command(recipe: str, train: str, batch: int, gens: int | None, beta: float, prompt: int | None,
             completion: int | None, max_length: int | None) -> str:
    flags = train.replace("lopt train", f"lopt {recipe}", 1) + f" --batch-size {batch} --beta {beta:g}"
    if recipe == "grpo":
        return flags + f" --num-generations {gens} --max-prompt-length {prompt} --max-completion-length {completion}"
    return flags + f" --max-length {max_length}"


def kv_cache_bytes(shape: LayerShape, layers: int, rows: int, tokens: int, itemsize: int = 4) -> int:
    """transformers' dynamic cache after ``tokens`` positions of ``rows`` sequences: keys and values
    of every layer (fp32 under lopt: generation runs outside autocast on fp32 weights)."""
    return 2 * layers * rows * tokens * shape.kv_heads * shape.head_dim * itemsize


def _nograd_forward(shape: LayerShape, tokens: int, c: int) -> int:
    """The most a forward without a graph holds at once inside one layer: the residual stream and
    the normed input (fp32), q, k, v and the attention output, and the MLP's gate, up and product."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return tokens * (2 * shape.hidden * 4 + max((2 * q + 2 * kv) * c, 3 * shape.intermediate * c))


def _logprob_forward(n: int, vocab: int, hidden: int, c: int, device: str, mode: str, n_outputs: int) -> int:
    """The transient bytes of the log-probability head's forward over ``n`` scored positions (the
    outputs included; the saved tensors are counted with the activations)."""
    if mode == "full":
        return n * vocab * (c + 4 + 4)  # the logits, their fp32 copy and the log-softmax being written
    rows = min(n, LOGPROB_TOKEN_CHUNK)
    tile = rows * LOGPROB_VOCAB_CHUNK * c
    temps = TILE_TEMPS_FORWARD * rows * min(vocab, LOGPROB_VOCAB_CHUNK) * 4 if device == "cpu" else 0
    # seven fp32 running statistics per position, the log-probs and optional outputs, the scored
    # hidden states' copy in the compute dtype for the current token chunk
    return n * 4 * (7 + n_outputs) + tile + temps + rows * hidden * c


def _logprob_backward(n: int, vocab: int, hidden: int, c: int, device: str, mode: str) -> int:
    """The log-probability head's backward transients beyond the head's own gradient (which becomes
    ``.grad``): the hidden states' fp32 gradient, the tile buffer and (CPU) its fp32 temporaries."""
    if mode == "full":
        return n * vocab * 4 * 2 + n * hidden * 4
    rows = min(n, LOGPROB_TOKEN_CHUNK)
    temps = TILE_TEMPS_BACKWARD * rows * min(vocab, LOGPROB_VOCAB_CHUNK) * 4 if device == "cpu" else 0
    return n * hidden * 4 + rows * LOGPROB_VOCAB_CHUNK * c + temps


def _steps_of(setup: MethodSetup) -> list[list[Phase]]:
    """The phases grouped into optimizer steps: a cycle's open, closed and idle steps are each a step
    of their own; the blocks of one step run one after the other, their gradients kept until TRL's
    optimizer step."""
    out: list[list[Phase]] = []
    group: list[Phase] = []
    for ph in setup.phases:
        if ph.label in ("open step", "closed step", "idle step"):
            out.append([ph])
        else:
            group.append(ph)
    return ([group] if group else []) + out


def _step(recipe: str, setup: MethodSetup, counts: ParamCounts, shape: LayerShape, s: RLShape, amp: bool,
          device: str, mode: str, with_reference: bool) -> dict[str, int]:
    """The live bytes (above weights, optimizer state and the reference) at each point of the step."""
    c = 2 if amp else 4
    h, v, L = counts.hidden, counts.vocab, len(counts.layers)
    tokens = s.rows * s.seq
    # Scored positions: on CUDA only the labelled ones (completions), elsewhere every position.
    n_all = s.rows * (s.seq - 1)
    n = s.rows * s.completion if device == "cuda" and mode == "chunked" else n_all
    n_out = 2 if recipe == "grpo" else 4  # log-probs, entropy (+ DPO: mean logits, is-top-1)
    out: dict[str, int] = {}
    ref_pass = 0
    if with_reference:
        # The reference's (LoRA: the adapters-off policy's) log-probs, no graph: one layer at a time,
        # then its final norm's output and the head (GRPO: in chunks of batch_size rows = the batch).
        ref_pass = (_nograd_forward(shape, tokens, c) if L else 0) + tokens * h * 4 \
            + _logprob_forward(n, v, h, c, device, mode, 1)
    if recipe == "grpo":
        kv = kv_cache_bytes(shape, L, s.gen_rows, s.gen_seq)
        layer_kv = kv // max(1, L)
        prefill = _nograd_forward(shape, s.gen_rows * s.prompt, 4)
        # the cache, one layer's copy while it grows, the prefill's layer, the last position's logits
        out["generation"] = kv + layer_kv + max(prefill, 4 * s.gen_rows * v * 4)
        out["kv_cache"] = kv
        out["reference_pass"] = ref_pass
    out["reference_pass_bytes"] = ref_pass
    bwd_tmp = 2 * tokens * h * 4 + 3 * tokens * shape.intermediate * c
    fwd_peak = bwd_peak = max_grads = max_held = max_vis = 0
    lp_saved = 0
    for phases in _steps_of(setup):
        grads = 0
        for ph in phases:
            mem = cached_phase_memory(ph.spec, shape, s.rows, s.seq, v, amp)
            ce = ph.spec.top == "ce"
            top_saved = mem.top
            if ce:
                # lopt's chunked loss keeps the head's gradient and the hidden states' gradient (with an
                # index) from its forward; TRL's head keeps the scored hidden states, the targets, log Z
                # and the entropy (full: the fp32 log-softmax) and makes the head's gradient in the backward.
                lopt_top = ((ph.spec.trained_bytes * v * h + (4 * v if counts.head_bias else 0)) * ph.spec.head_trained
                            + n_all * (4 * h + 8))
                fused = n * (4 * h + 8 + 8) + (n * v * 4 if mode == "full" else 0)
                top_saved = max(0, mem.top - lopt_top) + fused
                lp_saved = max(lp_saved, fused)
            held = mem.held - mem.top + top_saved
            max_held, max_vis = max(max_held, held), max(max_vis, mem.visible - mem.top + top_saved)
            fwd = grads + held + (_logprob_forward(n, v, h, c, device, mode, n_out) if ce else 0)
            fwd_peak = max(fwd_peak, fwd)
            if ce and recipe == "dpo":
                out["reference_pass"] = max(out.get("reference_pass", 0), grads + held + ref_pass)
            rest = held - top_saved
            top_g = ph.top_grads
            point = rest + grads + top_g + (_logprob_backward(n, v, h, c, device, mode) if ce else top_saved)
            bwd_peak = max(bwd_peak, point)
            grads += top_g
            for layer, g in zip(reversed(mem.layers), reversed(ph.layer_grads)):
                rebuilt = layer.rebuilt + bwd_tmp if (g or layer.held) else 0
                bwd_peak = max(bwd_peak, rest + grads + g + rebuilt)
                rest -= layer.held
                grads += g
            bwd_peak = max(bwd_peak, rest + grads + ph.base_grads + ph.tied_extra)
            grads += ph.base_grads
            max_grads = max(max_grads, grads)
    out["forward"], out["backward"] = fwd_peak, bwd_peak
    # TRL's optimizer step: every gradient of the step alive; CUDA's multi-tensor AdamW adds one fp32
    # temporary the size of the trained parameters, the CPU's per-tensor AdamW two of the largest tensor.
    sizes = setup.trainable_sizes or [setup.trainable]
    out["optimizer_step"] = max_grads + (4 * sum(sizes) if device == "cuda" else 8 * max(sizes, default=0))
    out["logprobs"] = lp_saved
    out.update(grads=max_grads, activations=max_held, visible=max_vis)
    return out


# --------------------------------------------------------------------------- output and CLI


def format_rl_table(rows: list[PlanRow]) -> str:
    """Markdown table of ``plan_rl``'s rows."""
    fit = any(r.fits is not None for r in rows)
    gen = any("kv_cache" in r.details for r in rows)
    head = ["method", "checkpointing", "trainable", "policy", "reference", "grads", "optimizer", "activations"]
    head += ["KV cache"] if gen else []
    head += ["log-probs", "peak", "peak at"] + (["fits"] if fit else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r.details
        cells = [r.method, r.checkpointing, f"{r.trainable_params / 1e6:,.1f}M", format_size(r.weights),
                 format_size(d["reference"]), format_size(r.grads), format_size(r.optimizer),
                 format_size(r.activations)]
        cells += [format_size(d["kv_cache"])] if gen else []
        cells += [format_size(d["logprobs"]), format_size(r.peak), d["where"].replace("_", " ")]
        cells += (["yes" if r.fits else "no"] if fit else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    """``lopt plan``'s recipe word and the options of ``lopt plan grpo`` / ``lopt plan dpo``."""
    p.add_argument("recipe", nargs="?", choices=RECIPES, default="sft",
                   help=f"sft (lopt train, the default), grpo (lopt grpo) or dpo (lopt dpo): TRL {TRL_VERSION}'s "
                        "step with its defaults as lopt passes them (policy, reference, generation's KV cache, "
                        "TRL's chunked log-prob head)")
    g = p.add_argument_group("grpo and dpo")
    g.add_argument("--num-generations", type=int, default=None,
                   help=f"grpo: completions per prompt (default {GRPO_DEFAULTS['num_generations']}, lopt grpo's; "
                        "TRL's is 8); --batch-size (default: this) must be a multiple of it")
    g.add_argument("--max-completion-length", type=int, default=None,
                   help=f"grpo: generated tokens per completion (default {GRPO_DEFAULTS['max_completion_length']}, "
                        "lopt grpo's; TRL's 512)")
    g.add_argument("--prompt-length", type=int, default=None,
                   help=f"grpo: prompt tokens (default {GRPO_DEFAULTS['max_prompt_length']}, lopt grpo's "
                        "--max-prompt-length); dpo: the prompt's share of --max-length (default half)")
    g.add_argument("--beta", type=float, default=None,
                   help=f"KL / DPO beta (default: grpo {GRPO_DEFAULTS['beta']}, dpo {DPO_DEFAULTS['beta']}, lopt's); "
                        "grpo --beta 0: no reference model")
    g.add_argument("--logprobs", choices=LOGPROB_MODES, default="chunked",
                   help=f"chunked: TRL {TRL_VERSION}'s fused log-prob head (tiles of {LOGPROB_TOKEN_CHUNK} tokens x "
                        f"{LOGPROB_VOCAB_CHUNK} vocabulary); full: the whole logits and their log-softmax, as "
                        "without it")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lopt plan``: the planner's, ``--nproc``/``--parallel`` and the RL recipes'.
    ``--max-length`` defaults to 512 for sft and 1024 (lopt dpo's) for dpo, ``--batch-size`` to 4 for sft
    and dpo and to ``--num-generations`` for grpo."""
    distributed.add_plan_arguments(p)
    add_rl_arguments(p)
    p.set_defaults(max_length=None, batch_size=None)


def run_plan_cli(ns: argparse.Namespace) -> int:
    """``lopt plan [sft|grpo|dpo]``: the TRL recipes' table, or the SFT planner's (with --parallel)."""
    recipe = getattr(ns, "recipe", "sft") or "sft"
    if recipe == "sft":
        ns.max_length = 512 if ns.max_length is None else ns.max_length
        ns.batch_size = 4 if ns.batch_size is None else ns.batch_size
        for flag, value in (("--num-generations", ns.num_generations), ("--max-completion-length",
                            ns.max_completion_length), ("--prompt-length", ns.prompt_length), ("--beta", ns.beta)):
            if value is not None:
                raise PlanError(f"{flag} plans lopt grpo/dpo: write lopt plan grpo (or dpo) {flag} ...")
        return distributed.run_plan_cli(ns)
    if ns.parallel is not None or ns.nproc != 1:
        raise PlanError(f"lopt plan {recipe} plans one process: --nproc/--parallel are for lopt train's recipe")
    if getattr(ns, "max_batch", False) or getattr(ns, "global_batch_size", None) is not None:
        raise PlanError(f"--max-batch is not modelled for lopt plan {recipe}: give --batch-size and --gpu-memory")
    if recipe == "grpo" and ns.max_length is not None:
        raise PlanError("lopt plan grpo: the sequence is --prompt-length + --max-completion-length, not --max-length")
    for flag, value in (("--optimizer", ns.optimizer), ("--optimizer-in-backward", ns.optimizer_in_backward),
                        ("--lower-every", ns.lower_every)):
        if value:
            raise PlanError(f"{flag} is not an option of lopt {recipe}")
    rows = plan_rl(recipe, ns.model, batch_size=ns.batch_size, num_generations=ns.num_generations, beta=ns.beta,
                   prompt_length=ns.prompt_length, completion_length=ns.max_completion_length,
                   max_length=ns.max_length, precision=ns.precision, methods=ns.method, num_blocks=ns.num_blocks,
                   gradient_checkpointing=ns.gradient_checkpointing,
                   selective_checkpointing=ns.selective_checkpointing, task_grad_every=ns.task_grad_every,
                   tied_head=ns.tied_head, logprobs=ns.logprobs, gpu_memory=ns.gpu_memory,
                   headroom=parse_size(ns.headroom))
    out = sys.stderr if ns.json == "-" else sys.stdout
    if ns.json:
        where = write_json(ns.json, {"model": ns.model or "smollm2-135m", "recipe": recipe, "trl": TRL_VERSION,
                                     "precision": ns.precision, "units": PLAN_UNITS,
                                     "gpu_memory": parse_size(ns.gpu_memory) if ns.gpu_memory else None,
                                     "rows": [asdict(r) for r in rows]})
        if ns.json == "-":
            return 0
    print(format_rl_table(rows), file=out)
    d = rows[0].details if rows else {}
    what = (f"{d.get('rows')} completions ({d.get('num_generations')} per prompt) of {d.get('seq')} tokens"
            if recipe == "grpo" else f"{d.get('rows', 0) // 2} chosen/rejected pairs (one forward of {d.get('rows')} "
            f"rows) of {d.get('seq')} tokens")
    print(f"\nlopt {recipe} on {ns.model or 'smollm2-135m'}: {what}, {ns.precision}, beta {d.get('beta')}; TRL "
          f"{TRL_VERSION}'s step as lopt runs it (fp32 policy, reference and AdamW state; log-probs {ns.logprobs}); "
          "peak = policy + reference + optimizer + the most alive at once (peak at: generation, reference pass, "
          "forward, backward or optimizer step)"
          + (f"; fits = peak + {ns.headroom} headroom <= {ns.gpu_memory}" if ns.gpu_memory else ""), file=out)
    if ns.json:
        print(f"rows written to {where}", file=out)
    return 0


__all__ = ["DPO_DEFAULTS", "GRPO_DEFAULTS", "LOGPROB_MODES", "RECIPES", "RL_METHODS", "TRL_VERSION", "RLShape",
           "add_plan_arguments", "add_rl_arguments", "check_rl", "format_rl_table", "kv_cache_bytes", "plan_rl",
           "run_plan_cli"]
