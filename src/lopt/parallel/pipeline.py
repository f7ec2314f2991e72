"""Block-parallel LoPT (``--pipeline``, WORLD_SIZE = number of blocks): the mechanism.

Rank r holds block r only and trains it from what it sees; block r sends its detached boundary hidden
states to rank r+1 and never waits for a gradient, so all ranks compute at once. ``build_stage`` builds
a rank's ``PipelineStage`` (its block, the sends and receives), ``PipelineStepper`` is one optimizer
step of that block, and ``StatsRelay`` brings the other ranks' numbers to rank 0 without making the
pipeline wait. The training loop around them (data, logging, checkpoints, ``--resume``, Ctrl-C) is
``lopt.recipes.pipeline``.
"""
from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any, Callable
import torch
import torch.distributed as dist
from torch import nn

from lopt.engine.anatomy import (is_embedding_name, untie_output_embeddings, find_layers, hidden_size_of,
                                 split_blocks)
from lopt.engine.boundary import LoPTModel
from lopt.engine.config import LoPTError
from lopt.engine.heads import ReconstructionHead
from lopt.methods import wrap
from lopt.models import load_model, packaged_checkpoint, packaged_model, prepare_tokenizer, resolve_alias
from lopt.parallel.context import DistContext
from lopt.parallel.fsdp import leaf_modules_outside_layers
from lopt.runtime.loop import autocast_dtype, build_optimizer, cosine_with_warmup, finish_step


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


_TAG_HIDDEN, _TAG_STATS = 0, 1


class PipelineStage:
    """Rank r's share of the model for the block-parallel pipeline: block r's layers (plus the
    embeddings on rank 0, the final norm and LM head on the last rank, and block r's local head).

    The model's own forward runs unchanged on every rank. The model is built on the meta device (no
    memory), only this rank's modules are materialised and loaded, and the rest are made inert:

    * the other blocks' layers keep their (meta, memory-free) parameters but their ``forward`` is
      replaced by a pass-through that returns the hidden state it was given;
    * on ranks > 0 the embeddings return a zero tensor of the right shape (an expanded scalar, no
      memory), and a forward pre-hook on the first own layer substitutes the hidden states received
      from rank r-1;
    * on ranks below the last the final norm and LM head pass their input through, and a forward hook
      on the last own layer sends the block's (detached) output to rank r+1 before LoPT's boundary
      hook runs the local backward, so rank r+1 starts as early as possible.

    Only rank 0 reads and tokenizes the data: each micro-batch's token ids, attention mask and labels
    travel with the hidden states (a few KB), so the other ranks load neither a tokenizer nor the
    dataset (a tokenizer alone costs about 100 MiB of RAM).

    Staleness: block r+1's step t uses the boundary states that block r computed in its step t, with
    block r's parameters *before* its step-t update: exactly what one process does under LoPT's
    blockwise schedule. Sends run ahead (rank r starts step t+1 while rank r+1 works on step t), but
    a rank waits for its previous send to be received before it sends again, so it is at most one
    step ahead and never uses anything stale.
    """

    def __init__(self, wrapped: LoPTModel, ctx: DistContext, owned_state_keys: list[str], hidden: int):
        self.wrapped, self.ctx = wrapped, ctx
        self.rank, self.world = ctx.rank, ctx.world_size
        self.last = self.rank == self.world - 1
        self.owned_state_keys = owned_state_keys
        self.hidden = hidden
        self.active = False
        self._received: torch.Tensor | None = None
        self.batch: dict[str, torch.Tensor] | None = None  # the micro-batch being run (sent on with h)
        self._sends: list[Any] = []
        self._keep: list[torch.Tensor] = []  # tensors being sent must stay alive until the send is done
        layers = wrapped.model.get_submodule(wrapped.layers_name)
        start, end = wrapped.block_ranges[self.rank]
        if self.rank > 0:
            layers[start].register_forward_pre_hook(self._substitute, with_kwargs=True, prepend=True)
        if not self.last:
            layers[end - 1].register_forward_hook(self._send, prepend=True)

    # ---- hooks
    def _substitute(self, module, args, kwargs):
        if not self.active or self._received is None:
            return None
        h, self._received = self._received, None
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def _send(self, module, args, output) -> None:
        if self.active:
            h = output[0] if isinstance(output, tuple) else output
            self.send_hidden(h.detach())

    # ---- point to point
    def wait_sends(self) -> None:
        for w in self._sends:
            w.wait()
        self._sends, self._keep = [], []

    def send_hidden(self, h: torch.Tensor) -> None:
        """Send block r's output for the current micro-batch, and the micro-batch, to rank r+1."""
        self.wait_sends()  # at most one step in flight: bounded memory, and rank r never runs far ahead
        comm = self.ctx.comm_device  # the host under gloo (its send/recv take CPU tensors only)
        h = h.to(comm).contiguous()
        b = self.batch
        ids = torch.stack([b["input_ids"], b["attention_mask"].to(b["input_ids"].dtype),
                           b["labels"].to(b["input_ids"].dtype)]).to(device=comm, dtype=torch.int64)
        header = torch.tensor([0, *h.shape, _DTYPES.index(h.dtype)], dtype=torch.int64, device=comm)
        self._keep = [header, h, ids]
        self._sends = [dist.isend(t, dst=self.rank + 1, tag=_TAG_HIDDEN) for t in self._keep]

    def send_stop(self) -> None:
        """Tell the next rank (which passes it on) that the run stops before the next step."""
        if self.last:
            return
        self.wait_sends()
        header = torch.tensor([1, 0, 0, 0, 0], dtype=torch.int64, device=self.ctx.comm_device)
        dist.send(header, dst=self.rank + 1, tag=_TAG_HIDDEN)

    def receive(self) -> dict[str, torch.Tensor] | None:
        """Receive the next hidden states and their micro-batch from rank r-1 (the batch is returned,
        the hidden states wait for the first own layer); None when it sent the stop signal."""
        comm = self.ctx.comm_device
        header = torch.empty(5, dtype=torch.int64, device=comm)
        dist.recv(header, src=self.rank - 1, tag=_TAG_HIDDEN)
        if int(header[0]) == 1:
            self.send_stop()
            return None
        shape, dtype = [int(x) for x in header[1:4]], _DTYPES[int(header[4])]
        h = torch.empty(shape, dtype=dtype, device=comm)
        dist.recv(h, src=self.rank - 1, tag=_TAG_HIDDEN)
        ids = torch.empty((3, *shape[:2]), dtype=torch.int64, device=comm)
        dist.recv(ids, src=self.rank - 1, tag=_TAG_HIDDEN)
        self._received = h.to(self.ctx.device)
        return {"input_ids": ids[0], "attention_mask": ids[1], "labels": ids[2]}

    # ---- checkpoint
    def own_state(self) -> dict[str, torch.Tensor]:
        """This rank's entries of the plain model's state dict, on CPU."""
        sd = self.wrapped.plain_model().state_dict()
        return {k: sd[k].detach().cpu() for k in self.owned_state_keys}

    def gather_state(self) -> dict[str, torch.Tensor] | None:
        """The whole trained model's plain state dict on rank 0 (None elsewhere). Collective."""
        parts: list[Any] = [None] * self.world if self.ctx.is_main else None
        dist.gather_object(self.own_state(), parts, dst=0)
        if not self.ctx.is_main:
            return None
        full: dict[str, torch.Tensor] = {}
        for p in parts:
            full.update(p)
        return full


def _checkpoint_tensors(source: Path) -> tuple[dict[str, Path], Callable[[str, Path], torch.Tensor]]:
    """{tensor name: safetensors file} of a local checkpoint, and a loader for one tensor."""
    from safetensors import safe_open

    files = sorted(source.glob("*.safetensors"))
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                names[k] = f

    def load(name: str, f: Path) -> torch.Tensor:
        with safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor(name)
    return names, load


def _local_source(cfg: Any, resume_dir: Path | None) -> Path | None:
    """The local safetensors checkpoint the pipeline loads its block from, or None (then the whole
    model is loaded once and the other blocks dropped)."""
    if resume_dir is not None:
        return resume_dir
    if cfg.gguf_file:
        return None
    target = resolve_alias(cfg.model)
    packaged = packaged_model(target)
    if packaged is not None:  # the embedded default or another packaged GGUF: its converted cache
        return packaged_checkpoint(packaged.name)
    p = Path(target).expanduser()
    return p if p.is_dir() and any(p.glob("*.safetensors")) else None


def build_stage(cfg: Any, ctx: DistContext, resume_dir: Path | None = None) -> tuple[PipelineStage, Any]:
    """Build this rank's ``PipelineStage``, and the tokenizer on rank 0 (None elsewhere: only rank 0
    reads the data). See ``PipelineStage`` for how."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    device = ctx.device
    source = _local_source(cfg, resume_dir)
    full_model = None
    if source is None:  # hub id or GGUF: load once in full (CPU), keep this rank's part
        full_model, tokenizer = load_model(cfg.model, gguf_file=cfg.gguf_file, device="cpu",
                                           trust_remote_code=cfg.trust_remote_code)
        config = full_model.config
        if ctx.rank > 0:
            tokenizer = None
    else:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        tokenizer = (AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
                     if ctx.rank == 0 else None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code)
    in_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    untied = untie_output_embeddings(model)  # before loading: the head gets its own (meta) tensor
    layers_name, layers = find_layers(model)
    ranges = split_blocks(len(layers), cfg.num_blocks, cfg.boundaries)
    if len(ranges) != ctx.world_size:
        raise LoPTError(f"--pipeline runs one block per process: {len(ranges)} blocks but WORLD_SIZE "
                        f"{ctx.world_size}; launch --nproc_per_node {len(ranges)} or set --num-blocks")
    r, last = ctx.rank, ctx.rank == ctx.world_size - 1
    start, end = ranges[r]

    # Which modules this rank owns: its layers; outside the layers, the embeddings (rank 0) and the
    # rest - final norm, LM head - (last rank).
    owned: list[nn.Module] = [layers[j] for j in range(start, end)]
    inert_embeddings, inert_top = [], []
    for name, mod in leaf_modules_outside_layers(model, layers_name):
        is_emb = any(is_embedding_name(f"{name}.{pn}") for pn, _ in mod.named_parameters(recurse=False))
        mine = (r == 0) if is_emb else last
        (owned if mine else (inert_embeddings if is_emb else inert_top)).append(mod)
    owned_ids = {id(m) for m in owned}
    owned_names = [n for n, m in model.named_modules() if id(m) in owned_ids]

    # Materialise and load what this rank owns.
    for m in owned:
        m.to_empty(device=device)
    state_keys = [k for k in model.state_dict() if any(k.startswith(n + ".") for n in owned_names)]
    out_emb = model.get_output_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is out_emb), None) if out_emb is not None else None
    if full_model is not None:
        src_sd = full_model.state_dict()
        get = src_sd.__getitem__
        available = set(src_sd)
    else:
        names, load = _checkpoint_tensors(source)
        available = set(names)

        def get(k: str) -> torch.Tensor:
            return load(k, names[k])
    missing = []
    with torch.no_grad():
        for k in state_keys:
            key = k
            if key not in available and out_name is not None and key == f"{out_name}.weight":
                key = f"{in_name}.weight"  # the checkpoint ties the head to the input embedding
            if key not in available:
                missing.append(k)
                continue
            target = _get_tensor(model, k)
            target.copy_(get(key).to(target.dtype))
    if missing:
        raise LoPTError(f"--pipeline: the checkpoint {source} lacks {missing[:3]}... for this rank's block; "
                        f"its tensor names must match the model (a lopt or transformers checkpoint)")
    del full_model
    gc.collect()
    # Modules without parameters that hold buffers (rotary embeddings) run on every rank; they are
    # computed from the config, not stored, so transformers' own init fills them in.
    for n, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)) or not any(
                b.is_meta for b in m.buffers(recurse=False)):
            continue
        inside_layer = n.startswith(layers_name + ".")
        if inside_layer and not any(n.startswith(f"{layers_name}.{j}.") for j in range(start, end)):
            continue
        m.to_empty(device=device)
        model._init_weights(m)
    for n, b in model.named_buffers():
        runs_here = not n.startswith(layers_name + ".") or any(
            n.startswith(f"{layers_name}.{j}.") for j in range(start, end))
        if b.is_meta and runs_here and not any(n.startswith(o + ".") for o in owned_names):
            raise LoPTError(f"--pipeline cannot initialise the buffer {n} of {type(model).__name__}")

    # Make the rest inert (see PipelineStage).
    for p in model.parameters():
        if p.is_meta:
            p.requires_grad_(False)
    for j, layer in enumerate(layers):
        if not start <= j < end:
            layer.forward = _pass_through
    dtype = next(layers[start].parameters()).dtype
    emb = model.get_input_embeddings()
    if r == 0 and isinstance(emb, nn.Embedding):
        # A dense embedding gradient is vocabulary x hidden (113 MB for SmolLM2) per micro-batch, and
        # a second one while it is added to .grad; the sparse one holds only the batch's rows and is
        # made dense once, at the step (PipelineStepper), when the activations are gone.
        emb.sparse = True
    for m in inert_embeddings:
        dim = m.weight.shape[-1]
        m.forward = _zeros_like_embedding(dim, dtype, device)
    for m in inert_top:
        m.forward = _pass_through

    wrapped = wrap(model, config=cfg.lopt_config())
    wrapped.untied = untied
    # LoPT's hooks on the other blocks' layers would compute their local losses: remove them.
    for h in list(wrapped._hooks):
        d = h.hooks_dict_ref()
        for j, layer in enumerate(layers):
            if not start <= j < end and d is not None and (d is layer._forward_hooks or d is layer._forward_pre_hooks):
                h.remove()
    # Local heads: this rank's (lower ranks) is trained; built fresh on the device.
    for i in range(len(wrapped.heads)):
        if i == r:
            wrapped.heads[i] = ReconstructionHead(_hidden_size(model)).to(device=device, dtype=torch.float32)
        else:
            wrapped.heads[i].requires_grad_(False)
    wrapped._block_params = None
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, model, cfg.model or "smollm2-135m-instruct")
    return PipelineStage(wrapped, ctx, state_keys, _hidden_size(model)), tokenizer


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return getattr(mod, leaf)


def _hidden_size(model: nn.Module) -> int:
    return hidden_size_of(model)


def _pass_through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for a module that lives on another rank: hands its input on unchanged (decoder
    layers in transformers >= 5 return the hidden-state tensor itself)."""
    return hidden_states


def _zeros_like_embedding(dim: int, dtype: torch.dtype, device: torch.device) -> Callable[..., torch.Tensor]:
    def forward(ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The embeddings live on rank 0; here their output is overwritten at the first own layer, so
        # it only has to have the right shape, dtype and device: an expanded scalar costs no memory.
        return torch.zeros((), dtype=dtype, device=device).expand(*ids.shape, dim)
    return forward


class PipelineStepper:
    """One optimizer step of this rank's block (the pipeline's ``Stepper``): receive, forward
    (the local backward runs inside it on lower ranks), task backward on the last rank, clip this
    block's gradients, AdamW step, LR schedule."""

    def __init__(self, stage: PipelineStage, cfg: Any, total_steps: int):
        self.stage, self.cfg = stage, cfg
        w = stage.wrapped
        self.device = stage.ctx.device
        self.optimizer = build_optimizer(w, cfg.lr, cfg.lr_lower, cfg.weight_decay, kind=cfg.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total_steps, int(cfg.warmup_ratio * total_steps)))
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        # Each rank scales (and unscales) only its own block's losses: a per-rank scaler is exact.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        w.after_local_backward = None  # the block's step is the end-of-step step below
        w.head_grad_in_forward = True  # the task loss goes through w.backward only

    def step(self, micro_batches: list[dict[str, torch.Tensor]] | None) -> dict[str, Any] | None:
        """Rank 0 gets the step's micro-batches (the others receive them from the rank before; pass
        None). Returns this rank's numbers (loss on the last rank, aux_loss on the others, grad_norm,
        lr, tokens), or None when rank 0 stopped the run before this step."""
        st, w, dev = self.stage, self.stage.wrapped, self.device
        w.update_lower = self.scheduler.last_epoch % self.cfg.lower_every == 0
        train_block = st.last or w.update_lower
        loss_sum, aux_sum, n_aux, tokens = 0.0, 0.0, 0, 0
        n = self.cfg.grad_accum
        if st.rank == 0 and (micro_batches is None or len(micro_batches) != n):
            raise LoPTError(f"the pipeline's first rank needs grad_accum={n} micro-batches per step")
        st.active = True
        try:
            for i in range(n):
                b = st.receive() if st.rank > 0 else micro_batches[i]
                if b is None:
                    return None
                b = {k: v.to(dev) for k, v in b.items()}
                st.batch = b
                scale = self.scaler.scale(torch.ones((), device=dev)).item() if self.scaler else 1.0
                w.loss_scale = scale / n
                with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None), torch.set_grad_enabled(train_block):
                    out = w(b["input_ids"], attention_mask=b["attention_mask"],
                            labels=b["labels"] if st.last else None)
                if st.last:
                    w.backward(out)
                    loss_sum += out.loss.item()
                elif out.aux_loss is not None:
                    aux_sum += out.aux_loss.item()
                    n_aux += 1
                tokens += int(b["attention_mask"].sum())
        finally:
            st.active = False
            st.batch = None
        params = [p for p in w.parameters() if p.requires_grad]
        for p in params:
            if p.grad is not None and p.grad.is_sparse:  # the embedding's (see build_stage)
                p.grad = p.grad.to_dense()
        grad_norm, lr = finish_step(self, params)
        return {"loss": loss_sum / n if st.last else None,
                "aux_loss": aux_sum / n_aux if n_aux else None, "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens}


class StatsRelay:
    """Rank 0 logs numbers that other ranks computed (the loss lives on the last rank) without
    making the pipeline wait. On each logging step ranks > 0 ``isend`` their numbers (a rank waits
    only for its previous logging step's send, which rank 0 has long posted the receive for, since
    rank 0 heads the pipeline); rank 0 posts the matching ``irecv``s and a helper thread waits on
    them in order (gloo's point-to-point requests report completion only through ``wait``), handing
    merged records to the main thread, which logs whatever has arrived."""

    FIELDS = ("loss", "aux_loss", "grad_norm", "peak_mem_mb")

    def __init__(self, ctx: DistContext):
        import queue
        import threading

        self.ctx = ctx
        self._sent: tuple[Any, torch.Tensor] | None = None
        self._posted = 0
        self._delivered = 0
        self._todo: queue.Queue[Any] = queue.Queue()
        self._done: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = None
        if ctx.is_main and ctx.world_size > 1:
            self._thread = threading.Thread(target=self._run, name="lopt-stats", daemon=True)
            self._thread.start()

    def send(self, rec: dict[str, Any]) -> None:
        """Ranks > 0: this logging window's numbers to rank 0."""
        if self._sent is not None:
            self._sent[0].wait()
        vals = [rec.get(k) for k in self.FIELDS]
        t = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64,
                         device=self.ctx.comm_device)
        self._sent = (dist.isend(t, dst=0, tag=_TAG_STATS), t)

    def post(self, own: dict[str, Any]) -> None:
        """Rank 0: expect the other ranks' numbers for this logging window."""
        bufs = [torch.empty(len(self.FIELDS), dtype=torch.float64, device=self.ctx.comm_device)
                for _ in range(1, self.ctx.world_size)]
        works = [dist.irecv(b, src=i + 1, tag=_TAG_STATS) for i, b in enumerate(bufs)]
        self._posted += 1
        self._todo.put((own, works, bufs))

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            own, works, bufs = item
            for w in works:
                w.wait()
            self._done.put(_merge_stats(own, [b.tolist() for b in bufs]))

    def ready(self, block: bool = False) -> list[dict[str, Any]]:
        """The merged records that have arrived, in order (all posted ones when ``block``)."""
        out = []
        while self._delivered < self._posted:
            if not block and self._done.empty():
                break
            out.append(self._done.get())
            self._delivered += 1
        return out

    def close(self) -> None:
        if self._sent is not None:
            self._sent[0].wait()
            self._sent = None
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None


def _merge_stats(own: dict[str, Any], others: list[list[float]]) -> dict[str, Any]:
    """One log record from rank 0's numbers and the other ranks' (loss from the last rank, aux the
    mean over the lower blocks, grad_norm over all blocks, peak memory the largest)."""
    rows = [[own["loss"], own["aux_loss"], own["grad_norm"], own["peak_mem_mb"]]]
    rows += [[None if math.isnan(x) else x for x in vals] for vals in others]
    losses = [r[0] for r in rows if r[0] is not None]
    auxes = [r[1] for r in rows if r[1] is not None]
    norms = [r[2] for r in rows if r[2] is not None]
    rec = dict(own)
    rec["loss"] = losses[-1] if losses else None
    rec["aux_loss"] = sum(auxes) / len(auxes) if auxes else None
    rec["grad_norm"] = math.sqrt(sum(n * n for n in norms)) if norms else None
    rec["peak_mem_mb"] = max(r[3] for r in rows if r[3] is not None)
    return rec
