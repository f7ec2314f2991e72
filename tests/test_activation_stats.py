"""The pure functions of the activation-statistics tool (lopt.recipes.study.activations, issue 29),
on hand-made tensors whose answers are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

from lopt.recipes.study.activations import (adam_step_ratio, boundary_stats, effective_rank, layer_drift,
                                            massive_dimensions, step_spread, weight_kind)


def test_effective_rank_counts_equally_weighted_directions():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0)
    # singular values 2 and 1: p = (2/3, 1/3), exp(entropy) = exp(log 3 - 2/3 log 2)
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 0.0]))) == pytest.approx(3 / 2 ** (2 / 3))


def test_layer_drift_separates_the_first_token():
    hb = torch.tensor([[[10.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding: never counted
    h = hb.clone()
    h[0, 0] = torch.tensor([0.0, 5.0])  # first token turned by 90 degrees and halved
    h[0, 1] = torch.tensor([0.0, 2.0])  # an ordinary token doubled, same direction
    h[0, 3] = torch.tensor([-5.0, 0.0])
    d = layer_drift(h, hb, mask)
    assert d["first_cos"] == pytest.approx(0.0, abs=1e-7)
    assert d["first_norm_ratio"] == pytest.approx(0.5)
    assert d["cos"] == pytest.approx(1.0)
    assert d["norm_ratio"] == pytest.approx((2.0 + 1.0) / 2)


def test_boundary_stats_find_the_massive_dimension_and_leave_it_out():
    g = torch.Generator().manual_seed(0)
    hb = torch.randn(2, 5, 8, generator=g)
    hb[:, 0, 3] = 100.0  # the first token's massive activation
    mask = torch.ones(2, 5, dtype=torch.long)
    assert massive_dimensions(hb, mask, top=1) == [3]
    h = hb.clone()
    h[:, 1:, 3] += 50.0  # only the massive dimension moves on the ordinary tokens
    s = boundary_stats(h, hb, mask, [3])
    assert s["cos"] < 0.5
    assert s["cos_without_massive"] == pytest.approx(1.0)
    assert s["first_norm"] == pytest.approx(float(hb[:, 0].norm(dim=-1).mean()))
    assert s["massive_rms_ordinary"][0] > 45.0


def test_adam_step_ratio_is_the_step_adamw_just_took_in_units_of_lr():
    betas, eps, lr = (0.9, 0.999), 1e-8, 1e-3
    for scale in (1e-6, 1.0):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            before = p.detach().clone()
            # two entries with a steady gradient (of any size), one noisy, one with none
            p.grad = torch.tensor([scale, -scale, scale * float(torch.randn(1, generator=g)), 0.0])
            opt.step()
        st = opt.state[p]
        r = adam_step_ratio(st["exp_avg"], st["exp_avg_sq"], int(st["step"]), betas, eps)
        torch.testing.assert_close(r, (p.detach() - before).abs() / lr, rtol=1e-4, atol=1e-7)
        assert r[:2].tolist() == pytest.approx([scale / (scale + eps)] * 2, rel=1e-5)  # full-size steps
        assert r[3] == 0.0
        spread = step_spread([("model.layers.0.mlp.up_proj.weight", p)], opt)
        assert spread["mlp"]["entries"] == 4
        assert spread["mlp"]["full_step_fraction"] == float((r >= 0.5).float().mean())


def test_weight_kind():
    assert [weight_kind(n) for n in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight",
                                     "model.layers.3.self_attn.o_proj.weight", "model.layers.3.input_layernorm.weight",
                                     "model.layers.3.mlp.down_proj.weight")] == ["embedding", "q", "o", "norm", "mlp"]
