"""The core engine: the boundary, the two schedules, the baselines, saving, bad input (fp32, tiny models)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import lopt
from lopt import LoPTError, find_layers, split_blocks
from lopt.engine.loss import causal_lm_loss
from lopt.engine.memory import SavedTensorTracker

from conftest import ARCHS, make_tiny_model

VOCAB = 320


def batch(seed: int = 0, b: int = 3, t: int = 12, pad_last: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - pad_last:] = 0  # right padding on the last row
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :3] = -100  # a masked prompt
    return ids, mask, labels


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def layer_param_names(wrapped, lo: int, hi: int) -> list[str]:
    prefix = "model." + wrapped.layers_name
    return [n for n, _ in wrapped.named_parameters()
            if n.startswith(prefix + ".") and lo <= int(n[len(prefix) + 1:].split(".")[0]) < hi]


def run_step(wrapped, ids, mask, labels):
    wrapped.zero_grad(set_to_none=True)
    out = wrapped(ids, attention_mask=mask, labels=labels)
    wrapped.backward(out)
    return out, grads(wrapped)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_bare_model(arch):
    model = make_tiny_model(arch)
    bare = copy.deepcopy(model)
    wrapped = lopt.wrap(model)
    ids, mask, labels = batch()
    for train in (True, False):
        wrapped.train(train)
        bare.train(train)
        with torch.no_grad():
            ref = bare(input_ids=ids, attention_mask=mask).logits
        out = wrapped(ids, attention_mask=mask)
        torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
        out = wrapped(ids, attention_mask=mask, labels=labels)
        # training with labels takes the chunked loss path (no logits); the loss is the bare model's
        torch.testing.assert_close(out.loss, causal_lm_loss(ref, labels), atol=1e-5, rtol=1e-5)
        if train:
            assert out.logits is None
            assert out.aux_loss is not None and out.aux_loss.item() > 0
        else:
            torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
            assert out.aux_loss is None  # eval: nothing local happens
    wrapped.zero_grad(set_to_none=True)
    with torch.no_grad():
        wrapped.train()
        out = wrapped(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in wrapped.parameters())  # no_grad: nothing was backpropagated


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_reach(arch):
    wrapped = lopt.wrap(make_tiny_model(arch))
    wrapped.train()
    ids, mask, labels = batch()
    _, g1 = run_step(wrapped, ids, mask, labels)
    labels2 = labels.clone()
    labels2[labels2 >= 0] = (labels2[labels2 >= 0] + 7) % VOCAB
    _, g2 = run_step(wrapped, ids, mask, labels2)

    (s0, e0), (s1, e1) = wrapped.block_ranges
    lower = layer_param_names(wrapped, s0, e0)
    emb = [n for n, p in wrapped.named_parameters() if any(p is q for q in wrapped.lower_parameters())
           and n not in lower]
    heads = [n for n, _ in wrapped.named_parameters() if n.startswith("heads.")]
    upper = layer_param_names(wrapped, s1, e1)
    assert lower and emb and heads and upper
    for n in lower + emb + heads:
        torch.testing.assert_close(g1[n], g2[n], rtol=0, atol=0, msg=f"{n} depends on the labels")
    assert any(g1[n].abs().sum() > 0 for n in lower), "lower block got no gradient"
    assert all(g1[n].abs().sum() > 0 for n in heads)
    assert any(g1[n].abs().sum() > 0 for n in emb), "embedding got no gradient"
    changed = [n for n in upper if not torch.equal(g1[n], g2[n])]
    assert len(changed) > len(upper) // 2, "last block's gradients did not follow the labels"


@pytest.mark.parametrize("arch", ARCHS)
def test_last_block_matches_end_to_end(arch):
    model = make_tiny_model(arch)
    bare = copy.deepcopy(model)
    wrapped = lopt.wrap(model)
    wrapped.train()
    bare.train()
    ids, mask, labels = batch()
    _, g = run_step(wrapped, ids, mask, labels)
    logits = bare(input_ids=ids, attention_mask=mask, use_cache=False).logits
    causal_lm_loss(logits, labels).backward()
    ref = grads(bare)
    s1, e1 = wrapped.block_ranges[-1]
    names = layer_param_names(wrapped, s1, e1)
    assert names
    for n in names:
        torch.testing.assert_close(g[n], ref[n[len("model."):]], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [2, 4])
def test_joint_equals_blockwise(arch, k):
    model = make_tiny_model(arch, layers=8)
    a = lopt.wrap(copy.deepcopy(model), num_blocks=k, schedule="joint")
    b = lopt.wrap(copy.deepcopy(model), num_blocks=k, schedule="blockwise")
    b.heads.load_state_dict(a.heads.state_dict())
    ids, mask, labels = batch()
    a.train(), b.train()
    a.loss_scale = b.loss_scale = 0.5  # gradient accumulation scales both alike
    oa, ga = run_step(a, ids, mask, labels)
    ob, gb = run_step(b, ids, mask, labels)
    torch.testing.assert_close(oa.loss, ob.loss)
    torch.testing.assert_close(oa.aux_loss.detach(), ob.aux_loss)
    assert ga.keys() == gb.keys() and len(ga) == sum(1 for p in a.parameters() if p.requires_grad)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-8, msg=n)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_chunked_loss_is_exact(arch, method):
    model = make_tiny_model(arch)
    a = lopt.wrap(copy.deepcopy(model), method=method, chunked_ce=False)
    b = lopt.wrap(copy.deepcopy(model), method=method, chunked_ce=True, ce_chunk_size=7)
    assert b._loss_head is not None
    b.heads.load_state_dict(a.heads.state_dict())
    a.train(), b.train()
    ids, mask, labels = batch()
    oa, ga = run_step(a, ids, mask, labels)
    ob, gb = run_step(b, ids, mask, labels)
    assert oa.logits is not None and ob.logits is None
    torch.testing.assert_close(oa.loss, ob.loss, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("softcap, bias", [(None, False), (None, True), (30.0, True)])
def test_chunked_cross_entropy_function(softcap, bias):
    from lopt.engine.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (2, 9), generator=g)
    y[0, :4] = -100
    raw = F.linear(h, w, b) * 5
    logits = softcap * torch.tanh(raw / softcap) if softcap else raw
    ref = causal_lm_loss(logits, y)
    ref.backward()
    ref_grads = [t.grad.clone() for t in (h, w, b) if t is not None]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    h5 = h * 5  # the same scaling as above, through autograd
    got = chunked_cross_entropy(h5, w, y, bias=b * 5 if b is not None else None, chunk_size=4, softcap=softcap)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for r, t in zip(ref_grads, [t for t in (h, w, b) if t is not None]):
        torch.testing.assert_close(t.grad, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scope, selective, flags", [
    ("last-block", None, [False] * 3 + [True] * 3),
    ("lower-blocks", None, [True] * 3 + [False] * 3),
    (None, "all", [True] * 6),
    ("lower-blocks", "last-block", [True] * 6),
])
def test_checkpointing_scopes_and_selective_are_exact(scope, selective, flags):
    w = lopt.wrap(make_tiny_model("llama", layers=6))
    w.gradient_checkpointing_enable(scope, selective=selective)
    layers = w.model.get_submodule(w.layers_name)
    assert [bool(layer.gradient_checkpointing) for layer in layers] == flags
    # Selective layers use their own checkpoint function (the policy), full ones the plain one.
    funcs = {id(layer._gradient_checkpointing_func) for layer, f in zip(layers, flags) if f}
    assert len(funcs) == (2 if scope and selective else 1)
    ref = lopt.wrap(make_tiny_model("llama", layers=6))
    ref.heads.load_state_dict(w.heads.state_dict())
    w.train(), ref.train()
    ids, mask, labels = batch()
    _, g = run_step(w, ids, mask, labels)
    _, gr = run_step(ref, ids, mask, labels)
    assert g.keys() == gr.keys()
    for n in gr:
        torch.testing.assert_close(g[n], gr[n], rtol=1e-5, atol=1e-7, msg=n)


def test_selective_checkpointing_recomputes_no_matmul():
    """Full checkpointing re-runs every layer's matrix multiplications in the backward; selective
    checkpointing serves them from what it kept and recomputes only the element-wise work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in matmuls
            return func(*args, **(kwargs or {}))

    def matmuls_in_backward(scope, selective):
        w = lopt.wrap(make_tiny_model("llama", layers=4), method="e2e", chunked_ce=False)
        w.gradient_checkpointing_enable(scope, selective=selective)
        w.train()
        ids, mask, labels = batch()
        out = w(ids, attention_mask=mask, labels=labels)
        with Count() as c:
            out.loss.backward()
        return c.n
    plain, full, selective = (matmuls_in_backward(None, None), matmuls_in_backward("all", None),
                              matmuls_in_backward(None, "all"))
    assert full > plain
    assert selective == plain


def test_checkpointing_scope_errors():
    w = lopt.wrap(make_tiny_model("llama", layers=4), method="e2e")
    with pytest.raises(lopt.LoPTError, match="needs a model with a boundary"):
        w.gradient_checkpointing_enable("lower-blocks")
    with pytest.raises(lopt.LoPTError, match="must be one of"):
        w.gradient_checkpointing_enable("upper")


def test_head_gradient_added_in_the_forward_under_accumulation():
    """Micro-batches after the first add the LM head's gradient to .grad inside the forward (no
    second head-sized buffer); the gradients are those of the usual backward."""
    model = make_tiny_model("llama", layers=4)
    a, b = lopt.wrap(copy.deepcopy(model)), lopt.wrap(copy.deepcopy(model))
    b.heads.load_state_dict(a.heads.state_dict())
    b.head_grad_in_forward = True
    head = b.model.get_output_embeddings().weight
    before = None
    for w in (a, b):
        w.train()
        w.loss_scale = 0.5
        for seed in (0, 1):
            ids, mask, labels = batch(seed)
            out = w(ids, attention_mask=mask, labels=labels)
            if w is b and seed == 1:  # already in .grad before the backward
                assert head.grad is not None and not torch.equal(head.grad, before)
            w.backward(out)
            if w is b and seed == 0:
                before = head.grad.clone()
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-7, msg=n)


def test_head_gradient_in_the_forward_refuses_another_scale():
    from lopt.engine.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (2, 9), generator=g)
    w.grad = torch.zeros_like(w)
    with pytest.raises(RuntimeError, match="backward brought"):
        (chunked_cross_entropy(h, w, y, grad_scale=0.5) * 2.0).backward()
    w.grad = torch.zeros_like(w)
    (chunked_cross_entropy(h, w, y, grad_scale=0.5) * 0.5).backward()
    ref = w.grad.clone()
    w.grad = None  # no .grad yet: the usual path
    (chunked_cross_entropy(h, w, y, grad_scale=0.5) * 0.5).backward()
    torch.testing.assert_close(w.grad, ref, rtol=1e-6, atol=1e-8)


def test_block_split_rules():
    assert split_blocks(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_blocks(30, 2) == [(0, 15), (15, 30)]
    assert split_blocks(30, boundaries=[10, 20]) == [(0, 10), (10, 20), (20, 30)]
    w = lopt.wrap(make_tiny_model("llama", layers=6), boundaries=[2])
    assert w.block_ranges == [(0, 2), (2, 6)] and w.boundaries == [2]


# ----------------------------------------------------------------------------- baselines


def test_baselines_share_the_code_path():
    model = make_tiny_model("llama")
    ids, mask, labels = batch()
    e2e = lopt.wrap(copy.deepcopy(model), method="e2e")
    e2e.train()
    _, g = run_step(e2e, ids, mask, labels)
    assert len(e2e.heads) == 0 and e2e.block_ranges == [(0, 4)]
    assert all(v.abs().sum() > 0 for k, v in g.items() if "layers" in k)

    fl = lopt.wrap(copy.deepcopy(model), method="freeze-lower")
    fl.train()
    out, g = run_step(fl, ids, mask, labels)
    assert out.aux_loss is None and len(fl.heads) == 0
    assert not any(p.requires_grad for p in fl.lower_parameters())
    assert set(g) == {n for n, p in fl.named_parameters() if p.requires_grad}
    assert not any(".layers.0." in n or ".layers.1." in n or "embed_tokens" in n for n in g)

    lo = lopt.wrap(copy.deepcopy(model), method="lora", lora_r=4)
    lo.train()
    _, g = run_step(lo, ids, mask, labels)
    assert g and all("lora_" in n for n in g)


def test_param_groups_learning_rates():
    w = lopt.wrap(make_tiny_model("llama"))
    groups = w.param_groups(lr=1e-4, lr_lower=1e-5, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == sum(1 for p in w.parameters() if p.requires_grad)
    layers = w.model.get_submodule(w.layers_name)
    assert by_param[id(layers[0].self_attn.q_proj.weight)]["lr"] == 1e-5
    assert by_param[id(w.model.get_input_embeddings().weight)]["lr"] == 1e-5
    assert by_param[id(w.heads[0].up.weight)]["lr"] == 1e-5
    assert by_param[id(layers[3].self_attn.q_proj.weight)]["lr"] == 1e-4
    assert by_param[id(w.model.lm_head.weight)]["lr"] == 1e-4
    assert by_param[id(layers[3].input_layernorm.weight)]["weight_decay"] == 0.0
    assert by_param[id(layers[3].self_attn.q_proj.weight)]["weight_decay"] == 0.1


def test_default_lower_learning_rate_is_a_tenth_under_lopt_only():
    model = make_tiny_model("llama")
    w = lopt.wrap(copy.deepcopy(model))
    lrs = {g["name"]: g["lr"] for g in w.param_groups(lr=1e-4)}
    assert math.isclose(lrs["lower"], 1e-4 * lopt.engine.config.LR_LOWER_RATIO) and lrs["upper"] == 1e-4
    # end-to-end keeps one rate for everything, embeddings included
    e2e = lopt.wrap(copy.deepcopy(model), method="e2e")
    assert {g["lr"] for g in e2e.param_groups(lr=1e-4)} == {1e-4}


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("method", ["lopt", "lora"])
def test_checkpoint_loads_with_plain_transformers(tmp_path, method):
    model = make_tiny_model("llama", tie=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    w = lopt.wrap(model, method=method, **({"lora_r": 4} if method == "lora" else {}))
    if method == "lopt":
        assert w.untied and w.config.tie_word_embeddings is False
        assert w.model.lm_head.weight is not w.model.get_input_embeddings().weight
    w.train()
    opt = torch.optim.SGD(w.param_groups(lr=0.5), lr=0.5)
    for _ in range(2):
        ids, mask, labels = batch()
        w.backward(w(ids, attention_mask=mask, labels=labels))
        opt.step()
        opt.zero_grad()
    w.eval()
    ids, mask, _ = batch(seed=1)
    with torch.no_grad():
        ref = w(ids, attention_mask=mask).logits
    w.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("heads." in k or "lora" in k or "base_layer" in k for k in keys)
    if method == "lopt":
        assert "lm_head.weight" in keys
    re = AutoModelForCausalLM.from_pretrained(tmp_path)
    re.eval()
    with torch.no_grad():
        got = re(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- memory


def saved_activation_bytes(wrapped, ids, mask, labels, what: str = "peak_bytes") -> int:
    with SavedTensorTracker(wrapped.parameters()) as tr:
        out = wrapped(ids, attention_mask=mask, labels=labels)
        wrapped.backward(out)
    assert tr.current_bytes == 0  # everything was released by the backward
    return getattr(tr, what)


def test_blockwise_frees_lower_activations():
    model = make_tiny_model("llama", layers=8, hidden=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (4, 64), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    res = {}
    for name, kw in {"e2e": dict(method="e2e"), "blockwise": dict(schedule="blockwise"),
                     "joint": dict(schedule="joint")}.items():
        w = lopt.wrap(copy.deepcopy(model), **kw)
        w.train()
        res[name] = saved_activation_bytes(w, ids, mask, labels)
    ratio_bw = res["blockwise"] / res["e2e"]
    ratio_joint = res["joint"] / res["e2e"]
    print(f"saved-activation ratio vs e2e: blockwise {ratio_bw:.3f}, joint {ratio_joint:.3f}")
    assert ratio_bw <= 0.6
    assert ratio_joint > 0.9  # the one-backward schedule keeps the lower block alive


# ----------------------------------------------------------------------------- bad input


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = make_tiny_model("llama").config
        self.emb = nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return None


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_blocks=1), "num_blocks must be between 2"),
    (dict(num_blocks=5), "num_blocks must be between 2"),
    (dict(boundaries=[0]), "out of range"),
    (dict(boundaries=[4]), "out of range"),
    (dict(boundaries=[3, 2]), "strictly increasing"),
    (dict(boundaries=[2, 2]), "strictly increasing"),
    (dict(schedule="fast"), "unknown schedule"),
    (dict(method="magic"), "unknown method"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(LoPTError, match=match):
        lopt.wrap(make_tiny_model("llama", layers=4), **kwargs)


def test_model_without_layer_list():
    with pytest.raises(LoPTError, match="could not find the decoder layers"):
        lopt.wrap(NoLayers())
    with pytest.raises(LoPTError, match="transformers causal LM"):
        lopt.wrap(nn.Linear(2, 2))
    with pytest.raises(LoPTError, match="already wrapped"):
        lopt.wrap(lopt.wrap(make_tiny_model("llama")))


def test_find_layers_names():
    assert find_layers(make_tiny_model("gpt2"))[0] == "transformer.h"
    assert find_layers(make_tiny_model("gpt_neox"))[0] == "gpt_neox.layers"
    assert find_layers(make_tiny_model("qwen3"))[0] == "model.layers"


@pytest.mark.parametrize("k", [2, 3])
def test_per_block_optimizer_step_is_exact(k):
    """Stepping each lower block right after its local backward gives the same weights as one step
    at the end (no clipping), while its gradients are gone before the upper block runs."""
    model = make_tiny_model("llama", layers=6)
    a = lopt.wrap(copy.deepcopy(model), num_blocks=k)
    b = lopt.wrap(copy.deepcopy(model), num_blocks=k)
    b.heads.load_state_dict(a.heads.state_dict())
    opt_a = torch.optim.AdamW(a.param_groups(1e-2, 1e-3, 0.1))
    opt_b = torch.optim.AdamW(b.param_groups(1e-2, 1e-3, 0.1))
    seen = []

    def step_block(i, params):
        assert all(p.grad is None for p in b.block_parameters(k - 1))  # upper not reached yet
        seen.append(i)
        opt_b.step()
        for p in params:
            p.grad = None

    b.after_local_backward = step_block
    a.train(), b.train()
    for s in range(2):
        ids, mask, labels = batch(seed=s)
        for w, opt in ((a, opt_a), (b, opt_b)):
            w.backward(w(ids, attention_mask=mask, labels=labels))
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert seen == list(range(k - 1)) * 2
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=n)
    covered = [id(p) for i in range(k) for p in b.block_parameters(i)]
    assert sorted(covered) == sorted(id(p) for p in b.parameters() if p.requires_grad)


def test_anchor_objective():
    """anchor: zero loss and zero lower gradient while the lower block equals the pretrained one; after
    the block drifts, the loss is positive and its gradient points back; labels never reach it."""
    model = make_tiny_model("llama", layers=4)
    w = lopt.wrap(model, local_objective="anchor")
    assert len(w.heads) == 0 and len(w.anchors) == 1 and len(w.anchors[0]) == 2
    assert not any(p.requires_grad for p in w.anchors.parameters())
    w.train()
    ids, mask, labels = batch()
    out, g = run_step(w, ids, mask, labels)
    assert out.aux_loss.item() == 0.0
    lower = layer_param_names(w, 0, 2)
    assert all(g[n].abs().max() == 0 for n in lower)
    layers = w.model.get_submodule(w.layers_name)
    with torch.no_grad():
        layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn_like(layers[1].mlp.down_proj.weight))
    out, g1 = run_step(w, ids, mask, labels)
    assert out.aux_loss.item() > 0
    assert g1["model.model.layers.1.mlp.down_proj.weight"].abs().sum() > 0
    labels2 = labels.clone()
    labels2[labels2 >= 0] = (labels2[labels2 >= 0] + 5) % VOCAB
    _, g2 = run_step(w, ids, mask, labels2)
    for n in lower:
        torch.testing.assert_close(g1[n], g2[n], rtol=0, atol=0)
    # a plain SGD step along the anchor gradient brings the block back towards the pretrained one
    before = out.aux_loss.item()
    with torch.no_grad():
        for n, p in w.named_parameters():
            if n in lower:
                p -= 0.5 * g1[n]
    assert run_step(w, ids, mask, labels)[0].aux_loss.item() < before
    # joint and blockwise agree for this objective too
    j = lopt.wrap(make_tiny_model("llama", layers=4), local_objective="anchor", schedule="joint")
    j.model.load_state_dict(w.model.state_dict())
    j.train()
    _, gj = run_step(j, ids, mask, labels)
    _, gb = run_step(w, ids, mask, labels)
    for n in gb:
        torch.testing.assert_close(gj[n], gb[n], rtol=1e-4, atol=1e-8, msg=n)


def test_lower_every_skips_the_lower_update():
    model = make_tiny_model("llama", layers=4)
    w = lopt.wrap(model)
    w.train()
    ids, mask, labels = batch()
    out_on, g_on = run_step(w, ids, mask, labels)
    on_bytes = saved_activation_bytes(w, ids, mask, labels, "total_bytes")
    w.update_lower = False
    out_off, g_off = run_step(w, ids, mask, labels)
    off_bytes = saved_activation_bytes(w, ids, mask, labels, "total_bytes")
    assert torch.is_grad_enabled()
    assert out_off.aux_loss is None
    lower = {id(p) for p in w.lower_parameters()} | {id(p) for p in w.heads.parameters()}
    names = {n for n, p in w.named_parameters() if id(p) in lower}
    assert names and not (names & set(g_off))  # no lower gradient at all on a skipped step
    assert set(g_off) == set(g_on) - names
    for n in g_off:  # the upper block's gradient is the same either way
        torch.testing.assert_close(g_off[n], g_on[n], rtol=1e-5, atol=1e-8, msg=n)
    torch.testing.assert_close(out_off.loss, out_on.loss)
    assert off_bytes < 0.7 * on_bytes  # the lower block built no graph


@pytest.mark.parametrize("schedule", ["blockwise", "joint"])
def test_route_forward_trains_the_plain_model_like_the_wrapper(schedule):
    """A trainer that calls the plain model (TRL) gets LoPT's gradients once the decoder stack is
    routed: the same gradients as the wrapper's own forward/backward, loss scale included."""
    ids, mask, labels = batch()
    torch.manual_seed(0)
    ref = lopt.wrap(make_tiny_model("llama", layers=4), schedule=schedule, chunked_ce=False)
    torch.manual_seed(0)
    routed = lopt.wrap(make_tiny_model("llama", layers=4), schedule=schedule, chunked_ce=False)
    routed.route_forward()
    assert routed.route_forward() is routed.decoder_stack()  # routing twice is a no-op
    for w in (ref, routed):
        w.train()
        w.loss_scale = 0.5
    out = ref(ids, attention_mask=mask, labels=labels)
    ref.backward(out)
    logits = routed.model(input_ids=ids, attention_mask=mask).logits  # the plain model's forward
    assert len(routed.routed_aux_losses) == 1
    aux = routed.routed_aux_losses.pop()
    torch.testing.assert_close(aux.detach(), out.aux_loss.detach())
    total = causal_lm_loss(logits, labels)
    if schedule == "joint":  # the caller backpropagates the local loss, as the recipes do
        assert aux.requires_grad
        total = total + routed.lopt_config.lambda_aux * aux
    else:
        assert not aux.requires_grad  # already backpropagated inside the forward
    (total * routed.loss_scale).backward()
    g_ref, g_routed = grads(ref), grads(routed)
    assert set(g_ref) == set(g_routed) and any(n.startswith("heads.") for n in g_routed)
    for n in g_ref:
        torch.testing.assert_close(g_routed[n], g_ref[n], rtol=1e-5, atol=1e-8, msg=n)


def test_routed_model_is_the_bare_model_without_grad_or_in_eval():
    model = make_tiny_model("llama", layers=4)
    bare = copy.deepcopy(model)
    w = lopt.wrap(model)
    w.route_forward()
    ids, mask, _ = batch()
    w.train()
    with torch.no_grad():  # generation and reference passes: the hooks stay off
        torch.testing.assert_close(w.model(input_ids=ids, attention_mask=mask).logits,
                                   bare(input_ids=ids, attention_mask=mask).logits)
    assert w.routed_aux_losses == []
    w.eval()
    out = w.model(input_ids=ids, attention_mask=mask)  # eval mode, gradients on: no LoPT step either
    assert w.routed_aux_losses == [] and w._step is None and out.logits.requires_grad
    lw = w
    with lw.step_scope(mask):
        with pytest.raises(LoPTError, match="cannot nest"):
            with lw.step_scope(mask):
                pass
    assert lw._step is None
