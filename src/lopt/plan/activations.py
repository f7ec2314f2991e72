"""What autograd keeps for the backward, derived op by op for Llama-family decoder models.

``lopt plan`` predicts activation memory without running the model. Rather than fitting curves to
measured totals, this module replays the forward of a decoder layer symbolically: every op creates
symbolic tensors (element count, bytes per element, requires-grad) and saves for the backward exactly
what PyTorch's autograd formulas save for that op, given which inputs require gradients:

* ``linear``: the input when the weight is trained, the weight when the input needs a gradient;
  under bf16 autocast both are the bf16 casts (a trained weight's cast is made once per forward);
* ``mul``: each operand when the *other* one needs a gradient; ``pow``: its input; ``rsqrt``, its output;
* ``silu``: its input; scaled-dot-product attention (flash kernels): q, k, v, the output and the
  fp32 log-sum-exp, with grouped-query attention done by the kernel (no repeated k/v copies);
* additions, views, casts and ``mean`` save nothing.

A tensor saved by several ops is counted once (as ``lopt.memory.SavedTensorTracker`` does), and
parameters are not activations. ``tests/test_plan.py`` checks the result against the tracker on tiny
models of every supported architecture, method and precision.

Gradient checkpointing (``torch.utils.checkpoint``, non-reentrant, as lopt uses it):

* full: the layer keeps only its input (``_NoopSaveInputs``, which the tracker sees); the backward
  rebuilds the layer's saved tensors one layer at a time;
* selective (lopt's policy): the layer keeps its input plus the outputs of its matrix multiplications
  and attention, in the checkpoint's own cache (the tracker does not see the cache).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

# Architectures whose decoder layer is replayed below: pre-norm RMSNorm, rotary attention through SDPA,
# gated SiLU MLP (llama, mistral, qwen2); qwen3 adds a per-head RMSNorm on q and k; phi3 fuses q/k/v
# and gate/up into one linear each; gemma2/gemma3 use (1 + w) RMSNorms around attention and MLP, a
# gated GELU-tanh MLP and a scaled embedding (gemma2: eager attention with logit soft-capping; gemma3:
# SDPA and q/k norms); gpt_neox: LayerNorm, a parallel residual, fused q/k/v, partial rotary, GELU MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt_neox")
# Not modelled, with the closest that is (for the one-line error).
CLOSEST_MODEL_TYPE = {"gemma": "gemma2", "gemma3": "gemma3_text", "phi": "phi3", "qwen3_moe": "qwen3",
                      "qwen2_moe": "qwen2", "mixtral": "mistral", "olmo": "llama", "olmo2": "llama",
                      "granite": "llama", "cohere": "llama", "starcoder2": "gpt_neox", "gpt2": "gpt_neox",
                      "gptj": "gpt_neox", "falcon": "gpt_neox", "stablelm": "gpt_neox", "smollm3": "llama",
                      "deepseek_v3": "qwen3", "gemma3n_text": "gemma3_text", "phimoe": "phi3"}
CHECKPOINT_KINDS = ("off", "full", "selective")


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one decoder layer that decide its activation memory."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool = False
    norm: str = "rms"  # rms (llama's w * x), gemma ((1 + w) * x, in fp32), layer (LayerNorm)
    fused: bool = False  # one qkv_proj and one gate_up_proj (phi3); gpt_neox: query_key_value
    act_gated: bool = True  # act(gate) * up; False: act(dense_h_to_4h(x))
    sandwich: bool = False  # gemma: norms after attention and MLP too
    parallel: bool = False  # gpt_neox: attention and MLP both read the layer input
    rotary_dim: int = 0  # rotated dims per head (0: all)
    attn_softcap: float | None = None  # gemma2: eager attention with soft-capped logits
    embed_scale: bool = False  # gemma: the embedding output times sqrt(hidden)
    final_softcap: float | None = None  # the LM head's logit soft-capping (a second buffer per loss chunk)

    @classmethod
    def from_config(cls, cfg: Any) -> "LayerShape":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        t = cfg.model_type
        rope = getattr(cfg, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", None) or getattr(cfg, "partial_rotary_factor", None) or 1.0
        if t == "gpt_neox":
            partial = getattr(cfg, "rotary_pct", None) or partial
        gemma = t in ("gemma2", "gemma3_text")
        return cls(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   qk_norm=t in ("qwen3", "gemma3_text"), norm="gemma" if gemma else "layer" if t == "gpt_neox" else "rms",
                   fused=t in ("phi3", "gpt_neox"), act_gated=t != "gpt_neox", sandwich=gemma,
                   parallel=t == "gpt_neox" and getattr(cfg, "use_parallel_residual", True),
                   rotary_dim=int(head_dim * partial) if partial != 1.0 else 0,
                   attn_softcap=getattr(cfg, "attn_logit_softcapping", None) if t == "gemma2" else None,
                   embed_scale=gemma, final_softcap=getattr(cfg, "final_logit_softcapping", None))

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the layer's linear maps, in forward order."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused:
            mlp = [("gate_up_proj", h, 2 * i)] if self.act_gated else [("up_proj", h, i)]
            return [("qkv_proj", h, q + 2 * kv), ("o_proj", q, h), *mlp, ("down_proj", i, h)]
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


@dataclass(frozen=True)
class LayerMode:
    """How one layer takes part in a step.

    ``trained``: its own weights get gradients. ``lora_r``: LoRA adapters of this rank (base weights
    frozen) on the linear maps named in ``lora_targets`` (``LayerShape.linears`` names; None: every
    one). ``checkpoint``: off, full or selective."""

    trained: bool = True
    lora_r: int = 0
    checkpoint: str = "off"
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: bool = False  # dropout on the adapters' input (its mask and output are kept)


# --------------------------------------------------------------------------- symbolic autograd


@dataclass
class _T:
    numel: int
    itemsize: int
    grad: bool
    uid: int
    param: bool = False
    storage: int = 0  # a view's: the bytes of the storage it shares (saving it keeps all of it)

    @property
    def nbytes(self) -> int:
        return self.storage or self.numel * self.itemsize


@dataclass
class Trace:
    """The saved tensors of a (symbolic) forward: uid -> bytes, in the order they were saved, with
    the name of what saved them. ``matmul_outputs`` collects what selective checkpointing keeps."""

    amp: bool = False
    trained_bytes: int = 4  # bytes per element of a trained parameter (fp32 master; bf16 under bf16-true)
    frozen_bytes: int = 4  # of a frozen one (2: a 16-bit frozen base; a 4-bit base dequantizes to 2)
    saved: dict[int, int] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)
    matmul_outputs: dict[int, int] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _casts: dict[int, _T] = field(default_factory=dict)
    owner: str = ""

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())

    def tensor(self, numel: int, itemsize: int, grad: bool, param: bool = False) -> _T:
        return _T(numel, itemsize, grad, next(self._ids), param)

    def param(self, numel: int, trained: bool) -> _T:
        return self.tensor(numel, self.trained_bytes if trained else self.frozen_bytes, trained, param=True)

    def save(self, t: _T) -> None:
        if t.param or t.uid in self.saved:
            return
        self.saved[t.uid] = t.nbytes
        self.owners[t.uid] = self.owner

    # ---- ops (autograd's saving rules)
    def _compute(self, t: _T, cached: bool = False) -> _T:
        """The operand an autocast matmul uses: a bf16 cast of anything that is not bf16 already. A
        trained weight's cast is cached for the forward (autocast caches casts of leaves that require
        grad); every other cast is a new tensor."""
        if not self.amp or t.itemsize == 2:
            return t
        if cached and t.param and t.grad:
            if t.uid not in self._casts:
                self._casts[t.uid] = self.tensor(t.numel, 2, True)
            return self._casts[t.uid]
        return self.tensor(t.numel, 2, t.grad)

    def linear(self, x: _T, w: _T, out_features: int) -> _T:
        xc, wc = self._compute(x), self._compute(w, cached=True)
        if wc.grad:
            self.save(xc)
        if xc.grad:
            self.save(wc)
        rows = x.numel // (w.numel // out_features)
        out = self.tensor(rows * out_features, xc.itemsize, x.grad or w.grad)
        self.matmul_outputs[out.uid] = out.nbytes
        return out

    def mul(self, a: _T, b: _T) -> _T:
        if a.grad:
            self.save(b)
        if b.grad:
            self.save(a)
        return self.tensor(max(a.numel, b.numel), max(a.itemsize, b.itemsize), a.grad or b.grad)

    def add(self, a: _T, b: _T) -> _T:
        return self.tensor(max(a.numel, b.numel), max(a.itemsize, b.itemsize), a.grad or b.grad)

    def rms_norm(self, x: _T, w: _T, width: int) -> _T:
        """transformers' LlamaRMSNorm/Qwen3RMSNorm: fp32 math, then weight * normed.to(input dtype)."""
        x32 = x if x.itemsize == 4 else self.tensor(x.numel, 4, x.grad)
        if x32.grad:
            self.save(x32)  # pow(x, 2)
        r = self.tensor(x.numel // width, 4, x.grad)  # rsqrt(mean + eps): saves its output
        if r.grad:
            self.save(r)
        hs = self.mul(x32, r)
        hs = hs if x.itemsize == 4 else self.tensor(hs.numel, x.itemsize, hs.grad)
        return self.mul(w, hs)

    def view(self, base: _T, numel: int) -> _T:
        """A slice of ``base`` (same storage: saving it saves the whole of ``base``)."""
        return _T(numel, base.itemsize, base.grad, base.uid, storage=base.nbytes)

    def gemma_norm(self, x: _T, w: _T, width: int) -> _T:
        """Gemma's RMSNorm: fp32 math, ``normed * (1.0 + w.float())``, then cast to the input's dtype."""
        x32 = x if x.itemsize == 4 else self.tensor(x.numel, 4, x.grad)
        if x32.grad:
            self.save(x32)
        r = self.tensor(x.numel // width, 4, x.grad)
        if r.grad:
            self.save(r)
        hs = self.mul(x32, r)
        out = self.mul(hs, self.tensor(width, 4, w.grad))  # 1.0 + w: a new (width,) tensor
        return out if x.itemsize == 4 else self.tensor(out.numel, x.itemsize, out.grad)

    def layer_norm(self, x: _T, w: _T, width: int) -> _T:
        """LayerNorm (autocast runs it in fp32; without autocast in its input's dtype): saves its input,
        mean and rstd (fp32)."""
        x32 = x if x.itemsize == 4 or not self.amp else self.tensor(x.numel, 4, x.grad)
        grad = x.grad or w.grad
        if grad:
            self.save(x32)
            self.save(self.tensor(x.numel // width, 4, False))
            self.save(self.tensor(x.numel // width, 4, False))
        return self.tensor(x.numel, x32.itemsize, grad)

    def eager_attention(self, q: _T, k: _T, v: _T, heads: int, kv_heads: int, scores: int) -> _T:
        """transformers' eager attention with logit soft-capping (gemma2): repeat_kv, q @ k^T, tanh,
        softmax in fp32 (cast back), @ v; ``scores``: B x heads x T x T."""
        rep = heads // kv_heads

        def repeat(t: _T) -> _T:
            return self.tensor(t.numel * rep, t.itemsize, t.grad) if rep > 1 else t

        kr, vr = repeat(k), repeat(v)
        qc, kc = self._compute(q), self._compute(kr)
        grad = q.grad or k.grad or v.grad
        if grad:
            self.save(qc)
            self.save(kc)
        w = self.tensor(scores, qc.itemsize, grad)  # q @ k^T (* scaling, / softcap: nothing saved)
        t = self.tensor(scores, w.itemsize, grad)  # tanh saves its output
        if grad:
            self.save(t)
        sm = self.tensor(scores, 4, grad)  # softmax(dtype=float32) saves its output
        if grad:
            self.save(sm)
        a = sm if q.itemsize == 4 else self.tensor(scores, q.itemsize, grad)  # .to(query.dtype)
        ac, vc = self._compute(a), self._compute(vr)
        if grad:
            self.save(ac)
            self.save(vc)
        out = self.tensor(q.numel, ac.itemsize, grad)
        self.matmul_outputs[out.uid] = out.nbytes
        return out

    def silu(self, x: _T) -> _T:
        if x.grad:
            self.save(x)
        return self.tensor(x.numel, x.itemsize, x.grad)

    def attention(self, q: _T, k: _T, v: _T, lse_numel: int) -> _T:
        qc, kc, vc = self._compute(q), self._compute(k), self._compute(v)
        grad = q.grad or k.grad or v.grad
        out = self.tensor(q.numel, qc.itemsize, grad)
        lse = self.tensor(lse_numel, 4, grad)
        if grad:
            for t in (qc, kc, vc, out, lse):
                self.save(t)
        self.matmul_outputs[out.uid] = out.nbytes
        self.matmul_outputs[lse.uid] = lse.nbytes
        return out

    def rotary(self, x: _T, cos: _T, sin: _T, part: float = 1.0) -> _T:
        # x * cos + rotate_half(x) * sin; cos/sin are fp32 (cast to the residual stream's dtype). Partial
        # rotary (gpt_neox): the rotated slice, then cat with the rest (nothing saved).
        xr = x if part == 1.0 else self.view(x, int(x.numel * part))
        a = self.mul(xr, cos)
        rot = self.tensor(xr.numel, x.itemsize, x.grad)  # slices, neg, cat: nothing saved
        out = self.add(a, self.mul(rot, sin))
        return out if part == 1.0 else self.tensor(x.numel, out.itemsize, out.grad)


# --------------------------------------------------------------------------- one decoder layer


def _lora(tr: Trace, x: _T, out: _T, in_f: int, out_f: int, r: int, dropout: bool = False) -> _T:
    """PEFT's LoRA linear: base(x) + lora_B(lora_A(dropout(x))) * scaling. PEFT casts x to the adapters'
    dtype first (a new tensor when they differ: fp32 adapters on a bf16 stream); dropout 0 is the
    identity, a positive one keeps its bool mask and makes a new tensor (which lora_A keeps)."""
    xa = x if x.itemsize == tr.trained_bytes else tr.tensor(x.numel, tr.trained_bytes, x.grad)
    if dropout:
        if xa.grad:
            tr.save(tr.tensor(xa.numel, 1, False))  # the mask
        xa = tr.tensor(xa.numel, xa.itemsize, xa.grad)
    a = tr.linear(xa, tr.param(in_f * r, True), r)
    b = tr.linear(a, tr.param(r * out_f, True), out_f)
    return tr.add(out, b)  # the scaling is a Python number: nothing saved


def replay_layer(tr: Trace, shape: LayerShape, tokens: int, batch: int, x: _T, cos: _T, sin: _T,
                 mode: LayerMode) -> _T:
    """Replay one decoder layer's forward into ``tr``; returns the layer's output."""
    s = shape
    trained = mode.trained and not mode.lora_r

    def lin(inp: _T, name: str) -> _T:
        _, in_f, out_f = next(t for t in s.linears() if t[0] == name)
        out = tr.linear(inp, tr.param(in_f * out_f, trained), out_f)
        adapted = mode.lora_r and (mode.lora_targets is None or name in mode.lora_targets)
        return _lora(tr, inp, out, in_f, out_f, mode.lora_r, mode.lora_dropout) if adapted else out

    def norm(inp: _T, width: int) -> _T:
        f = {"rms": tr.rms_norm, "gemma": tr.gemma_norm, "layer": tr.layer_norm}[s.norm]
        return f(inp, tr.param(width, trained), width)

    def attention(h: _T) -> _T:
        q_n, kv_n = tokens * s.heads * s.head_dim, tokens * s.kv_heads * s.head_dim
        if s.fused:
            qkv = lin(h, "qkv_proj")
            q, k, v = tr.view(qkv, q_n), tr.view(qkv, kv_n), tr.view(qkv, kv_n)
        else:
            q, k, v = lin(h, "q_proj"), lin(h, "k_proj"), lin(h, "v_proj")
        if s.qk_norm:
            q, k = norm(q, s.head_dim), norm(k, s.head_dim)
        part = s.rotary_dim / s.head_dim if s.rotary_dim else 1.0
        q, k = tr.rotary(q, cos, sin, part), tr.rotary(k, cos, sin, part)
        if s.attn_softcap:
            o = tr.eager_attention(q, k, v, s.heads, s.kv_heads, batch * s.heads * (tokens // batch) ** 2)
        else:
            o = tr.attention(q, k, v, lse_numel=batch * s.heads * (tokens // batch))
        if s.fused:
            # q and k rotated from slices of one projection come out (B, heads, T, d)-contiguous, and so
            # does the attention's output: transpose(1, 2).contiguous() copies it for o_proj.
            o = tr.tensor(o.numel, o.itemsize, o.grad)
        return lin(o, "o_proj")

    def mlp(h: _T) -> _T:
        if not s.act_gated:
            return lin(tr.silu(lin(h, "up_proj")), "down_proj")  # gelu saves its input, like silu
        if s.fused:
            gu = lin(h, "gate_up_proj")
            gate, up = tr.view(gu, tokens * s.intermediate), tr.view(gu, tokens * s.intermediate)
        else:
            gate, up = lin(h, "gate_proj"), lin(h, "up_proj")
        return lin(tr.mul(tr.silu(gate), up), "down_proj")

    if s.parallel:  # gpt_neox: x + attn(ln1(x)) + mlp(ln2(x))
        a = attention(norm(x, s.hidden))
        m = mlp(norm(x, s.hidden))
        return tr.add(tr.add(m, a), x)
    a = attention(norm(x, s.hidden))
    x2 = tr.add(x, norm(a, s.hidden) if s.sandwich else a)
    m = mlp(norm(x2, s.hidden))
    return tr.add(x2, norm(m, s.hidden) if s.sandwich else m)


@dataclass
class LayerMemory:
    """One layer's activation memory. ``held``: bytes kept from its forward to its backward;
    ``visible``: the part the saved-tensor tracker sees; ``rebuilt``: bytes a checkpointed layer
    recomputes transiently in the backward (0 when not checkpointed)."""

    held: int
    visible: int
    rebuilt: int = 0


def layer_memory(tr: Trace, shape: LayerShape, tokens: int, batch: int, x: _T, cos: _T, sin: _T,
                 mode: LayerMode) -> tuple[_T, LayerMemory]:
    """Replay one layer into the phase trace ``tr`` (checkpointing applied); returns its output and
    its memory. The rotary tables are shared by all layers: their bytes go to whichever layer saves
    them first."""
    if mode.checkpoint not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_KINDS}, got {mode.checkpoint!r}")
    if mode.checkpoint == "off":
        before = tr.bytes
        out = replay_layer(tr, shape, tokens, batch, x, cos, sin, mode)
        return out, LayerMemory(held=tr.bytes - before, visible=tr.bytes - before)
    inner = Trace(amp=tr.amp, _ids=tr._ids)
    out = replay_layer(inner, shape, tokens, batch, x, cos, sin, mode)
    # The checkpoint saves its positional tensor input (the hidden states) whatever its grad flag.
    kept = 0 if x.uid in tr.saved else x.nbytes
    tr.saved[x.uid] = x.nbytes
    cache = sum(inner.matmul_outputs.values()) if mode.checkpoint == "selective" else 0
    return out, LayerMemory(held=kept + cache, visible=kept, rebuilt=inner.bytes)


# --------------------------------------------------------------------------- a phase of the step


@dataclass(frozen=True)
class PhaseSpec:
    """A stretch of the model whose forward and backward run together: the whole model for
    end-to-end training, one block under LoPT's blockwise schedule.

    ``embedding_trained``: the phase starts at a trained embedding (its output needs a gradient and
    its backward keeps the token ids); otherwise the phase's input needs no gradient (a frozen
    embedding or a detached boundary). ``top``: ``"ce"`` for the final norm and lopt's chunked
    cross-entropy, ``"recon"`` for a LoPT reconstruction head."""

    layers: tuple[LayerMode, ...]
    embedding_trained: bool = False
    top: str = "ce"
    final_norm_trained: bool = True
    head_trained: bool = True
    head_bias: bool = False
    # Storage: bytes per element of trained and frozen parameters and of the residual stream (the
    # embedding's dtype: a 16-bit embedding makes every hidden state 16-bit, also under autocast).
    trained_bytes: int = 4
    frozen_bytes: int = 4
    stream_bytes: int = 4


@dataclass
class PhaseMemory:
    """Activation bytes of one phase: per layer, below the layers (token ids, rotary tables) and on
    top (final norm and loss, or the local head). ``held``/``visible`` as in ``LayerMemory``."""

    layers: list[LayerMemory]
    base: int
    top: int
    held: int
    visible: int


def phase_memory(spec: PhaseSpec, shape: LayerShape, batch: int, seq: int, vocab: int,
                 *, amp: bool) -> PhaseMemory:
    """Replay a phase's forward; the bytes it keeps for its backward at the end of its forward."""
    tr = Trace(amp=amp, trained_bytes=spec.trained_bytes, frozen_bytes=spec.frozen_bytes)
    tokens = batch * seq
    base = 0
    if spec.embedding_trained:
        tr.save(tr.tensor(tokens, 8, False))  # embedding backward: the int64 token ids
        base = tr.bytes
    sb = spec.stream_bytes
    x = tr.tensor(tokens * shape.hidden, sb, spec.embedding_trained)
    if shape.embed_scale and x.grad:
        tr.save(tr.tensor(1, sb, False))  # gemma: embedding * normalizer, a 0-d tensor
    # Rotary tables: one row per position, shared by the batch (position ids are (1, T)), in the
    # hidden states' dtype.
    rot = shape.rotary_dim or shape.head_dim
    cos = tr.tensor(seq * rot, sb, False)
    sin = tr.tensor(seq * rot, sb, False)
    layers, cache = [], 0
    for mode in spec.layers:
        x, mem = layer_memory(tr, shape, tokens, batch, x, cos, sin, mode)
        layers.append(mem)
        cache += mem.held - mem.visible
    before = tr.bytes
    if spec.top == "ce":
        _ce_top(tr, spec, shape, batch, seq, vocab, x)
    elif spec.top == "recon":
        _recon_top(tr, shape, tokens, x)
    else:
        raise ValueError(f"top must be 'ce' or 'recon', got {spec.top!r}")
    top = tr.bytes - before
    return PhaseMemory(layers=layers, base=base, top=top, held=tr.bytes + cache, visible=tr.bytes)


def _ce_top(tr: Trace, spec: PhaseSpec, shape: LayerShape, batch: int, seq: int, vocab: int, x: _T) -> None:
    """Final RMSNorm and ``lopt.loss.chunked_cross_entropy`` (every position labelled): the index of
    the labelled rows, the gradient w.r.t. the hidden states and, for a trained head, the head's
    vocabulary-sized gradient, computed in the forward and kept for the backward."""
    tr.owner = "final"
    final = {"rms": tr.rms_norm, "gemma": tr.gemma_norm, "layer": tr.layer_norm}[shape.norm]
    h = final(x, tr.param(shape.hidden, spec.final_norm_trained), shape.hidden)
    n = batch * (seq - 1)
    if h.grad:
        tr.save(tr.tensor(n, 8, False))  # index_select's index
        tr.save(tr.tensor(n * shape.hidden, h.itemsize, False))  # grad_h, in the normed states' dtype
    if spec.head_trained:
        tr.save(tr.tensor(vocab * shape.hidden, spec.trained_bytes, False))  # grad_w, in the head's dtype
        if spec.head_bias:
            tr.save(tr.tensor(vocab, 4, False))


def _recon_top(tr: Trace, shape: LayerShape, tokens: int, h: _T) -> None:
    """``lopt.heads.ReconstructionHead`` and ``masked_mse``, in fp32 (autocast is off there, and under
    bf16-true the heads stay fp32: the head reads ``h.float()``)."""
    tr.owner, amp, tr.amp = "head", tr.amp, False
    trained, tr.trained_bytes = tr.trained_bytes, 4
    width = shape.hidden
    bottleneck = max(1, width // 4)
    h = h if h.itemsize == 4 else tr.tensor(h.numel, 4, h.grad)
    tr.save(h)  # layer_norm: input, mean, rstd
    tr.save(tr.tensor(tokens, 4, False))
    tr.save(tr.tensor(tokens, 4, False))
    ln = tr.tensor(tokens * width, 4, True)
    down = tr.linear(ln, tr.param(width * bottleneck, True), bottleneck)
    pred = tr.linear(tr.silu(down), tr.param(bottleneck * width, True), width)  # gelu saves its input, like silu
    diff = tr.tensor(pred.numel, 4, True)
    tr.save(diff)  # pow(2)
    tr.save(tr.tensor(tokens, 4, False))  # err * mask: the fp32 mask
    tr.save(tr.tensor(1, 4, False))  # / mask.sum(): the denominator
    tr.amp, tr.trained_bytes = amp, trained
