"""``lopt plan --nproc N --parallel ddp|fsdp|pipeline``: the memory of one rank (process, GPU).

Built on the single-process planner (``lopt.plan.planner``): the same parameter counts, method setups
and per-layer activations (``phase_memory``) at the batch each rank holds; what changes is which
weights, gradients and optimizer state a rank keeps and what the communication adds.

Modelling assumptions, stated once:

* ``--batch-size`` is rows per process, as in ``lopt train`` under torchrun; the global batch is
  ``batch_size x N x grad_accum`` for DDP and FSDP, ``batch_size x grad_accum`` for the pipeline (every
  stage sees every row).
* **DDP** is lopt's own ``GradSync`` (``lopt.parallel.data_parallel``), not torch's DDP: every rank
  holds the whole model, its gradients and AdamW state; when a LoPT block's backward is over, its
  gradients are copied into one flat buffer (plus one fp32 flag per tensor) and the originals freed one
  by one, so at that moment the block's gradients exist twice. The averaged gradients then live in the
  buffer (``.grad`` are views) until the step. The sync point is counted at the largest block's
  gradients on top of the most gradient bytes alive (``PlanRow.grads``), with no activation held (the
  backward is over). gloo/NCCL's own staging buffers are outside (NCCL keeps them outside PyTorch's
  allocator; gloo's are on its worker threads).
* **FSDP2** as ``lopt.parallel.fsdp.shard_model`` applies it: one unit per decoder layer, one per local
  head, one for the embedding (the lowest block's parameters outside the layers) and one for the final
  norm and LM head (with the embedding when nothing is below a boundary: e2e), the wrapper as a root
  without parameters. Weights, gradients and AdamW moments are sharded 1/N (each tensor's first
  dimension padded to a multiple of N); the step counters are one per tensor on every rank. A unit is
  all-gathered for its forward (the gathered flat buffer and the unsharded parameters both exist while
  they are copied out, plus this rank's input shard) and again for its backward, where FSDP2 also
  prefetches the next unit of the backward order: two units unsharded at once. A unit's full
  gradients are copied into a reduce-scatter input of the same size and reduced to a 1/N shard, which
  is added to the sharded ``.grad``. lopt keeps nothing unsharded (the root owns no parameter); the
  loss's temporaries and the activations are a single process's at the per-rank batch (with FSDP the
  LM head's gradient is not added in the forward: the backward makes it, the same bytes). The units'
  reshard after forward is FSDP2's default.
* **Pipeline**: one LoPT block per process (N = number of blocks, method lopt only): rank r holds block
  r's layers, the embedding on rank 0, the final norm and untied LM head on the last rank, its
  reconstruction head below it, and their gradients and AdamW state; its activations are its block's
  phase. Ranks above 0 hold the received hidden states (batch x length x hidden, fp32) and ranks below
  the last one the sent copy while it is in flight.
* Activations as the single-process planner models them (every position a real token, SDPA,
  lopt's chunked loss); fp32 weights, gradients and AdamW state.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, replace
from typing import Any, Sequence

from lopt.jsonout import write_json
from lopt.methods import get_method
from lopt.plan import planner
from lopt.plan.activations import LayerShape, phase_memory
from lopt.plan.planner import (CE_CHUNK, DEFAULT_HEADROOM, DEFAULT_METHODS, MethodSetup, PlanError, PlanRow,
                               checkpointed_layers, method_setup, method_trains, model_shape, parse_method,
                               parse_size, plan, precision_bytes, row_specs)

PARALLEL_MODES = ("ddp", "fsdp", "pipeline")


def check_parallel(nproc: int, parallel: str | None, methods: Sequence[str] | None, num_blocks: int) -> None:
    """One-line PlanErrors for a launch ``lopt train`` would refuse."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise PlanError(f"--nproc must be >= 1 (processes, one per GPU), got {nproc}")
    if parallel is None:
        return
    if parallel not in PARALLEL_MODES:
        raise PlanError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    for name in methods or []:
        method, k = parse_method(name, num_blocks)
        if parallel == "fsdp" and get_method(method).switches_layers:
            raise PlanError(f"--parallel fsdp cannot plan --method {method}: lopt train --fsdp refuses it (it freezes "
                            f"and unfreezes layers while training); plan --parallel ddp")
        if parallel == "fsdp" and method == "lora":
            raise PlanError("--parallel fsdp cannot plan --method lora: lopt train --fsdp refuses it; plan --parallel ddp")
        if parallel == "pipeline" and method != "lopt":
            raise PlanError(f"--parallel pipeline trains LoPT blocks, one per process: it needs --method lopt, not {method}")
        if parallel == "pipeline" and k != nproc:
            raise PlanError(f"--parallel pipeline runs one block per process: {k} blocks but --nproc {nproc}; "
                            f"pass --num-blocks {nproc} (or --method lopt-k{nproc})")


def _default_methods(parallel: str, nproc: int) -> list[str]:
    """The rows planned when no method is named: those ``lopt train`` runs under ``parallel``."""
    if parallel == "pipeline":
        return [f"lopt-k{nproc}"]
    if parallel == "fsdp":
        return [m for m in DEFAULT_METHODS if m not in ("lora", "lisa", "badam")]
    return list(DEFAULT_METHODS)


def plan_parallel(config_or_model_source: Any = None, *, nproc: int, parallel: str, batch_size: int,
                  max_length: int, precision: str = "bf16", methods: Sequence[str] | None = None,
                  num_blocks: int = 2, gradient_checkpointing: str | None = None,
                  selective_checkpointing: str | None = None, grad_accum: int = 1,
                  gpu_memory: str | int | None = None, headroom: int = DEFAULT_HEADROOM,
                  **options: Any) -> list[PlanRow]:
    """Per-rank rows for ``nproc`` processes under ``parallel``; ``batch_size`` rows per process;
    ``options``: ``plan``'s lopt train options (task_grad_every, lower_every, optimizer). Each row's
    ``details`` has ``parallel``, ``nproc``, ``rank`` (pipeline: the stage; else "all": every rank
    alike), ``global_batch`` and ``comm`` (the communication buffers counted at the peak). Configurations
    lopt train refuses with several processes are left out (``--optimizer-in-backward``; under FSDP a
    kept-tied head)."""
    check_parallel(nproc, parallel, methods, num_blocks)
    if parallel == "pipeline":
        num_blocks = nproc
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise PlanError(f"grad_accum must be >= 1, got {grad_accum}")
    if options.get("optimizer_in_backward"):
        raise PlanError("--optimizer-in-backward runs in one process only: lopt train refuses it with --nproc > 1")
    pb = precision_bytes(precision)
    if parallel in ("fsdp", "pipeline") and pb.name == "bf16-true":
        raise PlanError(f"--precision bf16-true is not supported with --parallel {parallel} (lopt train refuses it); "
                        f"plan --precision bf16-mixed")
    capacity = parse_size(gpu_memory) if gpu_memory is not None else None
    options["optimizer_in_backward"] = False
    if parallel in ("fsdp", "pipeline"):
        if options.get("tied_head"):
            raise PlanError(f"--tied-head is not supported with --parallel {parallel} (lopt train refuses it)")
        options["tied_head"] = False
    if parallel == "pipeline":
        options["task_grad_every"] = 0
    names = list(methods) if methods else _default_methods(parallel, nproc)
    base = plan(config_or_model_source, batch_size=batch_size, max_length=max_length, precision=precision,
                methods=names, num_blocks=num_blocks, gradient_checkpointing=gradient_checkpointing,
                selective_checkpointing=selective_checkpointing, **options)
    counts, shape = model_shape(config_or_model_source, max_length)
    specs = {spec.name(counts.tied): spec for spec, _ in row_specs(names, counts.tied, num_blocks=num_blocks,
                                                                     **options)}
    amp = pb.amp
    out: list[PlanRow] = []
    for row in base:
        if parallel == "ddp":
            new = [_ddp(row, nproc)]
        else:
            setup, trains = _setup(specs[row.method], row, counts)
            if parallel == "fsdp":
                new = [_fsdp(row, setup, trains, counts, shape, nproc, batch_size, max_length, pb)]
            else:
                new = _pipeline(row, setup, trains, counts, shape, nproc, batch_size, max_length, amp)
        for r in new:
            r.details.update(parallel=parallel, nproc=nproc, global_batch=batch_size * grad_accum
                             * (1 if parallel == "pipeline" else nproc))
            if capacity is not None:
                r.fits = r.peak + headroom <= capacity
                r.free_at_peak = capacity - r.peak
            out.append(r)
    return out


def _setup(spec: Any, row: PlanRow, counts: Any) -> tuple[MethodSetup, Any]:
    n = len(counts.layers)
    trains = method_trains(spec.method, n, spec.num_blocks)
    ck = checkpointed_layers(row.details["gradient_checkpointing"], row.details["selective_checkpointing"], n,
                             list(trains.blocks or [(0, n)]))
    return method_setup(spec.method, counts, num_blocks=spec.num_blocks, checkpoint=ck, trains=trains,
                        spec=spec), trains


# --------------------------------------------------------------------------- DDP (GradSync)


def _ddp(row: PlanRow, nproc: int) -> PlanRow:
    if nproc == 1:
        return replace(row, details=dict(row.details, rank="all", comm=0))
    n_tensors = row.trainable_params and max(1, (row.optimizer - 8 * row.trainable_params) // 4)
    # The sync point: the most gradient bytes alive plus the block being copied into its flat buffer
    # (the largest block's; under the joint schedule, whatever is alive when the last block launches).
    phases = row.details.get("phases", [])
    widest = max([ph["layers"] for ph in phases] or [0])
    blocks = [ph["grads"] for ph in phases if ph["layers"] < widest]  # a joint phase holds every block
    block = min(row.grads, max(blocks or [row.grads]))
    comm = block + 4 * n_tensors
    live = row.peak - row.weights - row.optimizer
    peak = row.weights + row.optimizer + max(live, row.grads + comm)
    return replace(row, peak=peak, details=dict(row.details, rank="all", comm=comm))


# --------------------------------------------------------------------------- FSDP2


def _shard(nbytes: int, n: int) -> int:
    return 4 * math.ceil(nbytes / 4 / n)


def _fsdp(row: PlanRow, setup: MethodSetup, trains: Any, counts: Any, shape: LayerShape, n: int, batch: int,
          seq: int, pb: Any) -> PlanRow:
    weights = _shard(row.weights, n)
    sizes = setup.trainable_sizes or []
    n_tensors = len(sizes) or setup.trainable_tensors
    # Moments sharded (8-bit state too, by the same factor); the step counters on every rank.
    optimizer = _shard(row.optimizer - 4 * n_tensors, n) + 4 * n_tensors
    # A unit is gathered in its parameters' stored dtype: what trains fp32, the frozen weights in the
    # precision's (bf16 under bf16-mixed).
    def stored(trained: bool) -> int:
        return pb.trained if trained else pb.frozen
    unit_bytes = ([stored(i in set(trains.layers)) for i in range(len(counts.layers))],
                  stored(trains.embedding), stored(trains.head or trains.final_norm))
    live, grads_sh, comm = _walk_rank(setup, counts, shape, n, batch, seq, pb.amp, fsdp=True, unit_bytes=unit_bytes)
    return replace(row, weights=weights, optimizer=optimizer, grads=grads_sh, peak=weights + optimizer + live,
                   details=dict(row.details, rank="all", comm=comm))


def _walk_rank(setup: MethodSetup, counts: Any, shape: LayerShape, n: int, batch: int, seq: int, amp: bool,
               *, fsdp: bool, unit_bytes: tuple[list[int], int, int] | None = None) -> tuple[int, int, int]:
    """(peak of gradients + activations + temporaries (+ under FSDP the unsharded units and the
    reduce-scatter buffers; gradients kept as 1/n shards), most gradient bytes kept, the communication
    bytes at the peak). Without ``fsdp`` (a pipeline stage) this is the single-process walk."""
    tokens, c = batch * seq, 2 if amp else 4
    n_ce = batch * (seq - 1)
    ce_tmp = (min(CE_CHUNK, n_ce) * counts.vocab * (4 + (2 if amp else 0) + (4 if shape.final_softcap else 0))
              + n_ce * shape.hidden * 4)
    bwd_tmp = 2 * tokens * shape.hidden * 4 + 3 * tokens * shape.intermediate * c
    k = n if fsdp else 1
    layer_b, emb_b, top_b = unit_bytes or ([4] * len(counts.layers), 4, 4)
    unit = [b * x if fsdp else 0 for b, x in zip(layer_b, counts.layers)]
    below = len(setup.phases) > 1 or any(ph.spec.top == "recon" for ph in setup.phases)
    emb_w = emb_b * counts.embedding if fsdp else 0
    top_w = top_b * (counts.other + (counts.head if not counts.tied or below else 0)) if fsdp else 0
    if fsdp and counts.tied and not below:
        top_w, emb_w = top_w + emb_w, 0  # e2e with a tied head: embedding, norm and head are one unit

    def gather(w: int) -> int:  # the flat all-gather output and the unsharded copies, plus our shard
        return 2 * w + _shard(w, n) if fsdp else 0

    def reduce(g: int) -> int:  # a unit's full gradients, their reduce-scatter input and output
        return 2 * g + _shard(g, n) if fsdp else g

    live = grads = max_grads = comm_at = 0
    start, n_layers = 0, len(counts.layers)
    for ph in setup.phases:
        # Which layers the phase runs: a lower block's (recon) the next ones up; a phase with the task
        # loss (ce) the top ones (the open step every layer, a closed or idle step the last block).
        width = len(ph.spec.layers)
        first = start if ph.spec.top == "recon" else n_layers - width
        layers = list(range(first, first + width))
        start = 0 if ph.spec.top == "ce" else first + width
        mem = phase_memory(ph.spec, shape, batch, seq, counts.vocab, amp=amp)
        ce = ph.spec.top == "ce"
        biggest = max([unit[i] for i in layers] + [top_w if ce else 0, emb_w])
        live = max(live, grads + mem.held + max(gather(biggest), ce_tmp + (top_w if ce else 0) if ce else 0))
        held = mem.held - mem.top
        top_g = ph.top_grads  # a tied embedding's gradient lands in the same (sharded) .grad
        point = held + grads + reduce(top_g) + (top_w if ce else 0) + (unit[layers[-1]] if layers else 0)
        if point > live:
            live, comm_at = point, (top_g + _shard(top_g, n)) if fsdp else 0
        grads += _shard(top_g, k)
        for j in reversed(range(len(layers))):
            i, layer, g = layers[j], mem.layers[j], ph.layer_grads[j]
            # FSDP2 prefetches the unit that ran just before in the forward, whether or not its backward
            # comes (a boundary's: the lower block's top layer, or the embedding below layer 0).
            prefetch = unit[i - 1] if i > 0 else emb_w
            rebuilt = layer.rebuilt + bwd_tmp if (g or layer.held) else 0
            point = held + grads + unit[i] + prefetch + max(g + rebuilt, reduce(g))
            if point > live:
                live, comm_at = point, (g + _shard(g, n)) if fsdp else 0
            held -= layer.held
            grads += _shard(g, k)
        live = max(live, held + grads + ph.base_grads + (0 if fsdp else ph.tied_extra))
        grads += _shard(ph.base_grads, k)
        max_grads = max(max_grads, grads)
        if ph.steps_after:
            grads = 0
    return live, max_grads, comm_at


# --------------------------------------------------------------------------- pipeline


def _pipeline(row: PlanRow, setup: MethodSetup, trains: Any, counts: Any, shape: LayerShape, n: int, batch: int,
              seq: int, amp: bool) -> list[PlanRow]:
    rh, rh_t = counts.recon_head()
    hidden_msg = batch * seq * shape.hidden * 4
    out = []
    for r, ((s, e), ph) in enumerate(zip(trains.blocks, setup.phases)):
        last = r == n - 1
        params, tensors = sum(counts.layers[s:e]), sum(counts.layer_tensors[s:e])
        if r == 0:
            params, tensors = params + counts.embedding, tensors + counts.embedding_tensors
        if last:
            params, tensors = params + counts.head + counts.other, tensors + counts.head_tensors + counts.other_tensors
        else:
            params, tensors = params + rh, tensors + rh_t
        mem = phase_memory(ph.spec, shape, batch, seq, counts.vocab, amp=amp)
        stage = MethodSetup(f"{row.method} stage {r}", params, params, tensors, [ph])
        live, grads, _ = _walk_rank(stage, counts, shape, 1, batch, seq, amp, fsdp=False)
        comm = (hidden_msg if r > 0 else 0) + (hidden_msg if not last else 0)
        weights, optimizer = 4 * params, 8 * params + 4 * tensors
        out.append(replace(row, method=stage.name, trainable_params=params, weights=weights, grads=grads,
                           optimizer=optimizer, activations=mem.held, saved_visible=mem.visible,
                           peak=weights + optimizer + live + comm, details=dict(row.details, rank=r, comm=comm)))
    return out


# --------------------------------------------------------------------------- CLI


def add_parallel_arguments(p: Any) -> None:
    """``--nproc`` and ``--parallel`` of ``lopt plan``."""
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (one per GPU) under torchrun: with --parallel, memory per rank")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="ddp (lopt's gradient sync, a full replica per rank), fsdp (FSDP2, one unit per decoder "
                        "layer) or pipeline (one LoPT block per process); --batch-size is rows per process")


def add_plan_arguments(p: Any) -> None:
    """The options of ``lopt plan``: the planner's and ``--nproc``/``--parallel``."""
    planner.add_plan_arguments(p)
    add_parallel_arguments(p)


def run_plan_cli(ns: Any) -> int:
    """``lopt plan``: with ``--parallel``, the per-rank table (``--json`` as the planner's); otherwise
    the planner's own."""
    check_parallel(ns.nproc, ns.parallel, ns.method, ns.num_blocks)
    if ns.parallel is None:
        if ns.nproc != 1:
            raise PlanError(f"--nproc {ns.nproc} needs --parallel ddp, fsdp or pipeline")
        return planner.run_plan_cli(ns)
    options = {k: getattr(ns, k) for k in ("task_grad_every", "tied_head", "lower_every", "optimizer",
                                           "optimizer_in_backward", "bf16_update") if getattr(ns, k, None) is not None}
    options["method_options"] = planner.namespace_method_options(ns)  # --lora-r, --lisa-layers, ...
    rows = plan_parallel(ns.model, nproc=ns.nproc, parallel=ns.parallel, batch_size=ns.batch_size,
                         max_length=ns.max_length, precision=ns.precision, methods=ns.method,
                         num_blocks=ns.num_blocks, gradient_checkpointing=ns.gradient_checkpointing,
                         selective_checkpointing=ns.selective_checkpointing, gpu_memory=ns.gpu_memory,
                         headroom=parse_size(ns.headroom), **options)
    out = sys.stderr if ns.json == "-" else sys.stdout
    if ns.json:
        where = write_json(ns.json, {
            "model": ns.model or "smollm2-135m", "batch_size": ns.batch_size, "max_length": ns.max_length,
            "precision": ns.precision, "nproc": ns.nproc, "parallel": ns.parallel, "units": planner.PLAN_UNITS,
            "global_batch": rows[0].details["global_batch"] if rows else None,
            "gpu_memory": parse_size(ns.gpu_memory) if ns.gpu_memory else None,
            "rows": [asdict(r) | {"step_peak": r.step_peak} for r in rows]})
        if ns.json == "-":
            return 0
    print(planner.format_table(rows), file=out)
    per = {"ddp": "a full replica per rank, plus lopt's gradient-sync buffer",
           "fsdp": "FSDP2: weights, gradients and AdamW state sharded 1/N, plus two unsharded layer units and the "
                   "reduce-scatter buffers", "pipeline": "one row per stage (rank): its block only"}[ns.parallel]
    print(f"\nper rank, {ns.nproc} processes, --parallel {ns.parallel} ({per}); batch {ns.batch_size} x {ns.max_length} "
          f"tokens per process, global batch {rows[0].details['global_batch'] if rows else '-'} rows; {ns.precision}"
          + (f"; fits = peak + {ns.headroom} headroom <= {ns.gpu_memory}" if ns.gpu_memory else ""), file=out)
    if ns.json:
        print(f"rows written to {where}", file=out)
    return 0
