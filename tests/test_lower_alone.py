"""The study's diagnosis of lopt's lower-half drift (lopt.recipes.study.lower_alone) rests on one
claim: under LoPT without --task-grad-every the lower half's weights after N steps of ``lopt train``
are what the reconstruction loss alone, written out without the engine, gives. Checked in fp32 on a
tiny model over several steps (warmup, clipping and the per-block optimizer step included)."""
from __future__ import annotations

import copy

import pytest
import torch

import lopt
from lopt.recipes.sft import TrainConfig
from lopt.recipes.study.lower_alone import boundary_cosine, cut_at, relative_change, train_lower
from lopt.runtime.loop import Stepper

from conftest import make_tiny_model

VOCAB = 320


def batches(n: int, b: int = 3, t: int = 20) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(4, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, t - 5:] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_cut_stack_returns_the_hidden_state_at_the_boundary():
    model = make_tiny_model("llama", layers=4, hidden=32, tie=False).eval()
    b = batches(1)[0]
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        out = cut_at(model, 2)(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    torch.testing.assert_close(out.last_hidden_state, full.hidden_states[2])


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_lopt_trains_the_lower_half_exactly_as_the_reconstruction_loss_alone(max_grad_norm):
    model = make_tiny_model("llama", layers=4, hidden=32, tie=False)
    data = batches(6)
    cfg = TrainConfig(method="lopt", task_grad_every=0, lr=3e-3, warmup_ratio=0.34, max_grad_norm=max_grad_norm)
    torch.manual_seed(0)
    w = lopt.wrap(copy.deepcopy(model), config=cfg.lopt_config())
    w.train()
    head = copy.deepcopy(w.heads[0])  # the same starting head for the hand-written loop
    stepper = Stepper(w, cfg, torch.device("cpu"), total_steps=8)
    for b in data:
        stepper.step([b])

    stack = cut_at(model, w.boundaries[0]).train()
    train_lower(stack, head, iter(data), len(data), lr_lower=cfg.lr / 10, lr_head=cfg.lr / 10, total_steps=8,
                warmup_steps=int(0.34 * 8), lambda_aux=10.0, max_grad_norm=max_grad_norm)
    engine = cut_at(w.model, w.boundaries[0])
    assert relative_change(engine, cut_at(model, 2)) > 1e-4  # the lower half did move
    for (name, a), b in zip(engine.named_parameters(), stack.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(w.heads[0].parameters(), head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_boundary_cosine_is_one_for_the_base_and_falls_when_the_stack_moves():
    model = make_tiny_model("llama", layers=4, hidden=32, tie=False)
    base, stack = cut_at(model, 2).eval(), cut_at(model, 2).eval()
    probe = batches(2)
    assert boundary_cosine(stack, base, probe) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for p in stack.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert boundary_cosine(stack, base, probe) < 0.99
