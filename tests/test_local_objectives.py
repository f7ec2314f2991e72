"""The local objectives of ``--local-objective`` (issue 29), checked against hand-written references.

Each test wraps a tiny fp32 Llama, runs one training forward and backward through lopt's engine, and
compares the lower half's gradients (and the local head's) with ``torch.autograd`` on the objective
written out here in plain torch: LayerNorm, GELU, RMSNorm, cosine and log-softmax by hand, the
lower half run as the model's own layers cut at the boundary. Nothing below calls lopt's loss code.
The paper's ``recon`` is also pinned to numbers, so that any change to it (head, init, loss) fails.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lopt
from lopt.engine.config import LoPTError

from conftest import make_tiny_model

VOCAB, LAMBDA = 320, 10.0


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lower_half(model: nn.Module, boundary: int, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(block input = embedding output, boundary state): the model's own layers, cut by hand."""
    out = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                      use_cache=False)
    return out.hidden_states[0], out.hidden_states[boundary]


def mean_real(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (v * m).sum() / m.sum()


def head_by_hand(p: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear."""
    mu = h.mean(-1, keepdim=True)
    var = (h - mu).pow(2).mean(-1, keepdim=True)
    z = (h - mu) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]
    a = z @ p["down.weight"].T + p["down.bias"]
    a = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    return a @ p["up.weight"].T + p["up.bias"]


def recon_by_hand(p, h, x, mask):
    return mean_real((head_by_hand(p, h) - x.detach()).pow(2).mean(-1), mask)


def moments_by_hand(t, mask):
    t = t.detach()
    rows = t[mask.bool()]  # (N, H) real tokens
    mean = rows.mean(0)
    return mean, torch.sqrt(((rows - mean) ** 2).mean(0) + 1e-6)


def recon_std_by_hand(p, h, x, mask):
    mh, sh = moments_by_hand(h, mask)
    mx, sx = moments_by_hand(x, mask)
    return mean_real((head_by_hand(p, (h - mh) / sh) - (x.detach() - mx) / sx).pow(2).mean(-1), mask)


def early_exit_by_hand(norm_w, eps, lm_w, h, labels):
    z = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w  # Llama's RMSNorm
    logits = (z @ lm_w.T)[:, :-1]
    y = labels[:, 1:]
    keep = y != -100
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    return -logp[keep].gather(-1, y[keep][:, None]).mean()


def setup(objective: str, perturb: bool, **options):
    """The wrapped model after one training step's forward and backward, and what the reference needs:
    the model before wrapping (the base), the lower half's weights as they were in that step, the head."""
    model = make_tiny_model("llama", layers=4, hidden=32, tie=False)
    base = copy.deepcopy(model).eval()
    torch.manual_seed(0)
    w = lopt.wrap(model, local_objective=objective, task_grad_every=0, lambda_aux=LAMBDA, **options)
    if perturb:  # the lower half (embedding included) has moved away from the base: the anchors now pull
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in w.lower_parameters():
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    current = copy.deepcopy(w.model).train()  # the lower half as it is for the step, for the reference
    head = {k: v.detach().clone().requires_grad_(True) for k, v in w.heads[0].state_dict().items()} if len(w.heads) else {}
    w.train()
    b = batch()
    out = w(**b)
    w.backward(out)
    w.last_aux = float(out.aux_loss)  # the engine's local loss of that step (before lambda)
    return w, base, current, head, b


def reference_grads(objective: str, w, base, current, head, b, anchor_weight: float = 1.0):
    boundary = w.boundaries[0]
    current.requires_grad_(True)
    x, h = lower_half(current, boundary, b)
    mask = b["attention_mask"]
    if objective in ("recon", "recon+anchor", "recon+cos"):
        loss = recon_by_hand(head, h, x, mask)
        if objective != "recon":
            with torch.no_grad():
                ref = lower_half(base, boundary, b)[1]  # the base model's own boundary state
            if objective == "recon+anchor":
                extra = mean_real((h - ref).pow(2).mean(-1), mask) / mean_real(ref.pow(2).mean(-1), mask)
            else:
                cos = (h * ref).sum(-1) / (h.norm(dim=-1) * ref.norm(dim=-1))
                extra = mean_real(1 - cos + (h.norm(dim=-1).log() - ref.norm(dim=-1).log()) ** 2, mask)
            loss = loss + anchor_weight * extra
    elif objective == "recon-std":
        loss = recon_std_by_hand(head, h, x, mask)
    elif objective == "early-exit":
        norm = base.model.norm  # frozen copies of the base's final norm and LM head
        loss = early_exit_by_hand(norm.weight.detach(), norm.variance_epsilon, base.lm_head.weight.detach(), h,
                                  b["labels"])
    else:
        raise AssertionError(objective)
    lower = [p for n, p in current.named_parameters() if n.startswith("model.embed_tokens")
             or any(n.startswith(f"model.layers.{i}.") for i in range(boundary))]
    grads = torch.autograd.grad(LAMBDA * loss, lower + list(head.values()))
    return loss.detach(), grads[:len(lower)], dict(zip(head, grads[len(lower):]))


def assert_same_grads(w, ref_lower, ref_head):
    got = w.lower_parameters()
    assert len(got) == len(ref_lower)
    assert any(float(g.abs().max()) > 0 for g in ref_lower)  # the objective does move the lower half
    # fp32 summation order differs between the two: each element to 1e-5 of its tensor's largest entry.
    for p, g in zip(got, ref_lower):
        torch.testing.assert_close(p.grad, g, rtol=2e-4, atol=1e-5 * float(g.abs().max()))
    for name, p in w.heads[0].named_parameters() if len(w.heads) else []:
        g = ref_head[name]
        torch.testing.assert_close(p.grad, g, rtol=2e-4, atol=1e-5 * float(g.abs().max()))


# Computed once by recon_by_hand above on make_tiny_model("llama", layers=4, hidden=32, tie=False) with
# the head drawn after torch.manual_seed(0), batch() (torch 2.13 CPU): the loss, the lower half's
# gradient norm and the head's gradient norm, all of lambda 10 x loss.
PINNED_RECON = {"loss": 0.00039277251926250756, "lower_grad_norm": 0.003933577586403089,
                "head_grad_norm": 0.015587534593010694}


def test_recon_is_pinned_and_equals_the_hand_written_reference():
    w, base, current, head, b = setup("recon", perturb=False)
    loss, ref_lower, ref_head = reference_grads("recon", w, base, current, head, b)
    assert_same_grads(w, ref_lower, ref_head)
    assert w.last_aux == pytest.approx(float(loss), rel=1e-6)
    got_loss = w.last_aux
    lower_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in w.lower_parameters()))
    head_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in w.heads[0].parameters()))
    assert got_loss == pytest.approx(PINNED_RECON["loss"], rel=1e-5)
    assert lower_norm == pytest.approx(PINNED_RECON["lower_grad_norm"], rel=1e-4)
    assert head_norm == pytest.approx(PINNED_RECON["head_grad_norm"], rel=1e-4)


@pytest.mark.parametrize("objective", ["recon+anchor", "recon-std", "recon+cos", "early-exit"])
def test_candidate_gradient_equals_the_hand_written_reference(objective):
    w, base, current, head, b = setup(objective, perturb=True)
    _, ref_lower, ref_head = reference_grads(objective, w, base, current, head, b)
    assert_same_grads(w, ref_lower, ref_head)


@pytest.mark.parametrize("objective", ["recon+anchor", "recon+cos"])
def test_anchor_weight_scales_the_anchor_term(objective):
    w, base, current, head, b = setup(objective, perturb=True, anchor_weight=3.0)
    _, ref_lower, ref_head = reference_grads(objective, w, base, current, head, b, anchor_weight=3.0)
    assert_same_grads(w, ref_lower, ref_head)


def test_bad_local_objective_options_fail_clearly():
    with pytest.raises(LoPTError, match="--anchor-weight has no effect with --local-objective recon"):
        lopt.wrap(make_tiny_model("llama", layers=4), local_objective="recon", anchor_weight=2.0)
    with pytest.raises(LoPTError, match="anchor_weight must be >= 0"):
        lopt.wrap(make_tiny_model("llama", layers=4), local_objective="recon+cos", anchor_weight=-1.0)
    # GPT-2 adds position embeddings before its first layer: the base-state chain cannot start there.
    w = lopt.wrap(make_tiny_model("gpt2", layers=4, tie=False), local_objective="recon+anchor", task_grad_every=0)
    w.train()
    b = batch()
    with pytest.raises(LoPTError, match="first layer reads the input embedding"):
        w(**b)
    w = lopt.wrap(make_tiny_model("llama", layers=4, tie=False), local_objective="early-exit", task_grad_every=0)
    w.train()
    with pytest.raises(LoPTError, match="early-exit scores the lower block on the forward's labels"):
        w(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


@pytest.mark.parametrize("objective", ["early-exit", "recon+cos"])
def test_frozen_base_copies_travel_with_the_trainer_state(objective):
    """A resumed run rebuilds the wrapper from its checkpoint's *trained* weights: the frozen copies of
    the base (LM head and final norm; input embedding) must come back from the trainer state instead."""
    from lopt.runtime.checkpoints import method_extra_state

    w = lopt.wrap(make_tiny_model("llama", layers=4, tie=False), local_objective=objective, task_grad_every=0)
    frozen = w.exit_head if objective == "early-exit" else w.anchor_embedding
    expected = {k: v.clone() for k, v in frozen.state_dict().items()}
    state = method_extra_state(w)
    with torch.no_grad():  # training moved the real head, norm and embedding
        for p in w.model.parameters():
            p.add_(1.0)
    resumed = lopt.wrap(copy.deepcopy(w.model), local_objective=objective, task_grad_every=0)
    again = resumed.exit_head if objective == "early-exit" else resumed.anchor_embedding
    assert not torch.equal(next(iter(again.state_dict().values())), next(iter(expected.values())))
    resumed.load_state_dict(state, strict=False)  # what lopt train's --resume does with extra_state
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, expected[k])
