"""CUDA checks of --precision, the 8-bit and paged optimizers and --method qlora (``make test-gpu``,
``pytest -m cuda``); skipped without a GPU. Training steps on a tiny model: the weights in the dtype the
precision stores them in, the loss falling, and the optimizer state where each optimizer keeps it."""
from __future__ import annotations

import pytest
import torch

from lopt.config import TrainConfig
from lopt.methods import wrap
from lopt.runtime.loop import Stepper
from lopt.runtime.precision import apply_precision

from conftest import make_tiny_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def batch(seed: int = 0, vocab: int = 320) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (4, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def stepper(method: str = "e2e", **kw) -> Stepper:
    cfg = TrainConfig(method=method, lr=1e-3, warmup_ratio=0.0, device="cuda", lora_r=4, **kw)
    cfg.validate()
    w = wrap(make_tiny_model("llama", layers=4, hidden=64).to(CUDA), config=cfg.lopt_config()).to(CUDA)
    apply_precision(w, cfg.precision, CUDA)
    w.train()
    return Stepper(w, cfg, CUDA, 8)


def losses(s: Stepper, n: int = 8) -> list[float]:
    b = batch()
    out = [s.step([b])["loss"] for _ in range(n)]
    assert all(torch.isfinite(torch.tensor(x)) for x in out), out
    return out


@pytest.mark.parametrize("method", ["e2e", "lopt", "lora", "badam"])
def test_bf16_true_trains_in_bf16(method):
    s = stepper(method, precision="bf16-true")
    head_ids = {id(p) for p in s.wrapped.heads.parameters()}
    assert {p.dtype for p in s.wrapped.parameters() if id(p) not in head_ids} == {torch.bfloat16}
    ls = losses(s)
    assert ls[-1] < ls[0]
    assert s.amp_dtype is None


def test_bf16_true_with_the_optimizer_in_backward():
    ls = losses(stepper("e2e", precision="bf16-true", optimizer_in_backward=True))
    assert ls[-1] < ls[0]


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw-8bit"])
def test_8bit_optimizers_train(optimizer):
    pytest.importorskip("bitsandbytes")
    s = stepper("e2e", precision="bf16-mixed", optimizer=optimizer)
    ls = losses(s)
    assert ls[-1] < ls[0]
    states = [st for st in s.optimizer.state.values() if st]
    assert states and any(v.dtype == torch.uint8 for st in states for v in st.values() if torch.is_tensor(v))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_qlora_trains_over_a_4bit_base(precision):
    bnb = pytest.importorskip("bitsandbytes")
    s = stepper("qlora", precision=precision)
    quantized = [m for m in s.wrapped.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" and m.weight.dtype == torch.uint8 for m in quantized)
    trainable = {p.dtype for p in s.wrapped.parameters() if p.requires_grad}
    assert trainable == {torch.bfloat16 if precision == "bf16-true" else torch.float32}
    ls = losses(s)
    assert ls[-1] < ls[0]
