"""--optimizer-in-backward: the last block's parameters step inside the backward, one by one.

Same weights as the ordinary step when clipping is off (fp32, tiny model, an LR that changes between
steps), gradients freed as they are used, per-parameter clipping with the whole gradient's norm
reported, the ordinary checkpoint format, resume, and the combinations it refuses."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from lopt.methods import wrap
from lopt.engine.config import LoPTError
from lopt.recipes.sft import TrainConfig, train
from lopt.runtime.loop import Stepper
from lopt.runtime.optim_in_backward import OptimizerInBackward

from conftest import addition_rows, make_tiny_model, save_tiny, write_jsonl


def batches(n: int, vocab: int = 320, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # some padding
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:, :3] = -100  # a prompt
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def stepper(method: str, oib: bool, total_steps: int = 4, **kw) -> Stepper:
    opts = dict(method=method, lr=1e-2, warmup_ratio=0.5, max_grad_norm=None, optimizer_in_backward=oib,
                weight_decay=0.01)
    opts.update(kw)
    cfg = TrainConfig(**opts)
    cfg.validate()
    w = wrap(make_tiny_model("llama", layers=4, tie=method != "lopt"), config=cfg.lopt_config())
    w.train()
    return Stepper(w, cfg, torch.device("cpu"), total_steps)


@pytest.mark.parametrize("method", ["lopt", "e2e", "lopt-per-block-off"])
def test_same_weights_as_the_ordinary_step(method):
    extra = {"per_block_step": "off"} if method == "lopt-per-block-off" else {}
    method = method.split("-per")[0]
    a, b = stepper(method, False, **extra), stepper(method, True, **extra)
    lrs = []
    for batch in batches(2):
        ra, rb = a.step([batch]), b.step([batch])
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["lr"] == ra["lr"]
        lrs.append(ra["lr"])
    assert lrs[0] != lrs[1]  # warm-up: the schedule changes the LR between the two steps
    for (n, pa), pb in zip(a.wrapped.named_parameters(), b.wrapped.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    # The checkpointed optimizer state has the ordinary format and the same contents.
    sa, sb = a.optimizer_state_dict(), b.optimizer_state_dict()
    assert sorted(sa["state"]) == sorted(sb["state"])
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    for i, st in sa["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(sb["state"][i][k], v, rtol=1e-5, atol=1e-8)


def test_gradients_are_freed_one_by_one():
    s = stepper("lopt", True)
    w, oib = s.wrapped, s.in_backward
    last = w.block_parameters(len(w.block_ranges) - 1)
    assert {id(p) for p in oib.params} == {id(p) for p in last} and len(last) > 4
    live, stepped = [], []
    hook = oib._hook

    def counting(p):
        live.append(sum(q.grad is not None for q in last))  # gradients alive when this one is ready
        hook(p)
        stepped.append(p.grad is None)
    oib.remove()  # re-register the hooks with the counting wrapper
    oib._handles = [p.register_post_accumulate_grad_hook(counting) for p in last]
    before = [p.detach().clone() for p in last]
    oib.active = True
    b = batches(1)[0]
    out = w(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    w.backward(out)
    oib.active = False
    assert len(live) == len(last) and max(live) == 1 and all(stepped)
    assert all(p.grad is None for p in w.parameters())  # per-block step below, in-backward above
    assert all(not torch.equal(p, q) for p, q in zip(last, before))  # every one was stepped


def test_per_parameter_clipping_and_the_reported_norm():
    # SGD with lr 1 makes each update the (clipped) gradient itself.
    p1 = torch.nn.Parameter(torch.zeros(3))
    p2 = torch.nn.Parameter(torch.zeros(2))
    main = torch.optim.SGD([{"params": [p1, p2], "lr": 1.0}])
    oib = OptimizerInBackward([p1, p2], main, lambda groups: torch.optim.SGD(groups), max_grad_norm=1.0)
    oib.active = True
    (p1 * torch.tensor([3.0, 0.0, 4.0])).sum().backward()  # |g1| = 5: clipped to norm 1
    (p2 * torch.tensor([0.3, 0.4])).sum().backward()  # |g2| = 0.5: left alone
    torch.testing.assert_close(p1.detach(), -torch.tensor([0.6, 0.0, 0.8]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p2.detach(), -torch.tensor([0.3, 0.4]))
    assert oib.pop_norm_sq() == pytest.approx(25.25)  # before clipping: 5^2 + 0.5^2
    assert oib.pop_norm_sq() is None
    assert p1.grad is None and p2.grad is None and not main.state


def test_reported_grad_norm_matches_the_ordinary_step():
    a, b = stepper("lopt", False, max_grad_norm=0.5), stepper("lopt", True, max_grad_norm=0.5)
    batch = batches(1)[0]
    assert b.step([batch])["grad_norm"] == pytest.approx(a.step([batch])["grad_norm"], rel=1e-5)


def test_hooks_are_idle_outside_the_step():
    s = stepper("e2e", True)
    b = batches(1)[0]
    out = s.wrapped(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    s.wrapped.backward(out)  # not through the stepper: nothing steps, gradients stay
    assert all(p.grad is not None for p in s.wrapped.parameters() if p.requires_grad)


@pytest.mark.parametrize("extra, match", [({"grad_accum": 2}, "grad-accum 1"),
                                          ({"precision": "fp16"}, "fp16"),
                                          ({"fsdp": True}, "one process")])
def test_refused_combinations(extra, match):
    with pytest.raises(LoPTError, match=match):
        TrainConfig(optimizer_in_backward=True, **extra).validate()


def test_unknown_optimizer_and_missing_bitsandbytes(monkeypatch):
    with pytest.raises(LoPTError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd").validate()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(LoPTError, match="pip install bitsandbytes"):
        stepper("lopt", False, optimizer="adamw-8bit")


def test_8bit_adamw_in_backward_matches_its_ordinary_step():
    pytest.importorskip("bitsandbytes")
    a, b = stepper("lopt", False, optimizer="adamw-8bit"), stepper("lopt", True, optimizer="adamw-8bit")
    assert any(p.numel() >= 4096 for p in b.in_backward.params)  # some states are really 8-bit
    data = batches(3)
    for batch in data[:2]:
        a.step([batch])
        b.step([batch])
    for (n, pa), pb in zip(a.wrapped.named_parameters(), b.wrapped.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    # The merged state dict of the 8-bit states resumes: a fresh stepper loaded from it steps alike.
    c = stepper("lopt", True, optimizer="adamw-8bit")
    c.wrapped.load_state_dict(b.wrapped.state_dict())
    c.load_optimizer_state_dict(b.optimizer_state_dict())
    c.scheduler.load_state_dict(b.scheduler.state_dict())
    b.step([data[2]])
    c.step([data[2]])
    for pb, pc in zip(b.wrapped.parameters(), c.wrapped.parameters()):
        torch.testing.assert_close(pc, pb, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("oib")
    return save_tiny(root / "tiny"), write_jsonl(root / "qa.jsonl", addition_rows())


@pytest.mark.parametrize("first, second", [(True, True), (False, True), (True, False)])
def test_resume(run_files, tmp_path, first, second):
    """A run with the optimizer in backward resumes into the same losses as one uninterrupted run;
    the checkpoint's format is the ordinary one, so a run may switch the option at a resume."""
    tiny, data = run_files
    common = dict(model=str(tiny), dataset=str(data), batch_size=4, lr=2e-3, max_steps=5, progress=False,
                  max_grad_norm=None)
    train(TrainConfig(output_dir=str(tmp_path / "full"), optimizer_in_backward=first, **common))

    def stop_at_2(rec, state):
        if state.step == 2:
            state.stop_requested = True
    part = tmp_path / "part"
    train(TrainConfig(output_dir=str(part), optimizer_in_backward=first, **common), callbacks=[stop_at_2])
    train(TrainConfig(output_dir=str(part), optimizer_in_backward=second, resume="latest", **common))

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    a, b = losses(tmp_path / "full"), losses(part)
    assert len(a) == len(b) == 5
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
