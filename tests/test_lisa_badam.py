"""``--method lisa`` and ``--method badam`` on tiny models: which layers train, their optimizer state,
the saved activations below BAdam's active block, reproducible choices and exact resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lopt
from lopt import LoPTError
from lopt import LoPTConfig
from lopt.engine.memory import SavedTensorTracker
from lopt.methods.badam import BAdam
from lopt.methods.lisa import LISA
from lopt.recipes.sft import TrainConfig, train
from lopt.runtime.loop import Stepper

from conftest import addition_rows, make_tiny_model, save_tiny, write_jsonl

LAYERS = 6


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 320, (3, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def stepper_for(method: str, **kw):
    cfg = TrainConfig(method=method, lr=1e-3, warmup_ratio=0.0, max_grad_norm=None, **kw)
    w = lopt.wrap(make_tiny_model("llama", layers=LAYERS, tie=True), config=cfg.lopt_config())
    w.train()
    return w, Stepper(w, cfg, torch.device("cpu"), total_steps=10)


def test_lisa_trains_only_its_sampled_layers_and_frees_the_others_state():
    w, stepper = stepper_for("lisa", lisa_layers=2, lisa_interval=2)
    names = {id(p): n for n, p in w.named_parameters()}
    outside = {n for n, _ in w.named_parameters() if layer_of(n) is None}
    assert any("embed" in n for n in outside) and any("norm" in n for n in outside)
    seen = []
    for step in range(6):
        before = {n: p.detach().clone() for n, p in w.named_parameters()}
        got_grad = set()
        hook = stepper.optimizer.register_step_pre_hook(lambda opt, *a: got_grad.update(
            names[id(p)] for g in opt.param_groups for p in g["params"] if p.grad is not None))
        stepper.step([batch(step)])
        hook.remove()
        active = w.method_impl.active
        assert active == LISA(w.lopt_config).active_layers(step, LAYERS) and len(active) == 2
        seen.append(tuple(active))
        want = outside | {n for n, _ in w.named_parameters() if layer_of(n) in active}
        assert got_grad == want  # gradients for the sampled layers and the always-trained parameters only
        moved = {n for n, p in w.named_parameters() if not torch.equal(before[n], p)}
        assert moved <= want and {n for n in want if "proj" in n or "embed" in n} <= moved
        # AdamW holds state for exactly those (a layer's state is freed when it stops training)
        assert {names[id(p)] for p in stepper.optimizer.state} == want
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[4] == seen[5]  # drawn every 2 steps
    assert len(set(seen)) > 1


def test_lisa_choice_is_a_function_of_seed_and_period():
    a = LISA(LoPTConfig(method="lisa", lisa_layers=2, lisa_interval=5, seed=0))
    b = LISA(LoPTConfig(method="lisa", lisa_layers=2, lisa_interval=5, seed=0))
    c = LISA(LoPTConfig(method="lisa", lisa_layers=2, lisa_interval=5, seed=1))
    draws = [a.active_layers(s, 30) for s in range(0, 100)]
    assert draws == [b.active_layers(s, 30) for s in range(0, 100)]
    assert all(draws[s] == draws[s - s % 5] for s in range(100))
    assert draws != [c.active_layers(s, 30) for s in range(0, 100)]
    assert len({tuple(d) for d in draws}) > 10


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_badam_visits_every_block_once_per_pass(order):
    m = BAdam(LoPTConfig(method="badam", badam_order=order, badam_switch_every=3, badam_block_size=2, seed=4))
    blocks = [m.active_block(s, 5) for s in range(0, 60, 3)]  # 20 periods, 4 passes over 5 blocks
    for p in range(4):
        assert sorted(blocks[5 * p:5 * p + 5]) == [0, 1, 2, 3, 4]
    if order == "ascending":
        assert blocks[:5] == [0, 1, 2, 3, 4]
    elif order == "descending":
        assert blocks[:5] == [4, 3, 2, 1, 0]
    assert m.blocks(5) == [[0, 1], [2, 3], [4]]


def test_badam_inactive_layers_get_no_gradient_state_or_saved_activations():
    w, stepper = stepper_for("badam", badam_order="descending", badam_switch_every=1)
    names = {id(p): n for n, p in w.named_parameters()}
    layers = w.model.get_submodule(w.layers_name)
    for step in range(LAYERS):
        active = LAYERS - 1 - step
        marks: dict[str, int] = {}
        grad_mode: dict[int, bool] = {}
        got_grad = set()
        with SavedTensorTracker(w.parameters()) as tr:
            def mark(key):  # hooks return None: the layer's input and output stay as they are
                def hook(*args):
                    marks.setdefault(key, tr.current_bytes)
                return hook

            def record(i):
                def hook(*args):
                    grad_mode.setdefault(i, torch.is_grad_enabled())
                return hook

            hooks = [layers[0].register_forward_pre_hook(mark("first")),
                     layers[active].register_forward_pre_hook(mark("active"))]
            hooks += [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
            hooks.append(stepper.optimizer.register_step_pre_hook(lambda opt, *a: got_grad.update(
                names[id(p)] for g in opt.param_groups for p in g["params"] if p.grad is not None)))
            stepper.step([batch(step)])
            for h in hooks:
                h.remove()
        assert w.method_impl.active == [active]
        assert {layer_of(n) for n in got_grad} == {active}  # no gradient outside the active block
        assert {layer_of(names[id(p)]) for p in stepper.optimizer.state} == {active}  # no other state
        assert marks["active"] == marks["first"]  # nothing saved for the backward below the active block
        assert tr.peak_bytes > 0
        # below the boundary the layers ran without autograd; from the active block up, with it
        assert [grad_mode[i] for i in range(LAYERS)] == [i >= active for i in range(LAYERS)]
    assert all(not p.requires_grad for n, p in w.named_parameters() if layer_of(n) is None)  # embeddings, head


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-switch"), layers=LAYERS)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", addition_rows())


@pytest.mark.parametrize("method,opts", [("lisa", {"lisa_interval": 2}),
                                         ("badam", {"badam_switch_every": 2, "badam_order": "random"})])
def test_resume_reproduces_the_uninterrupted_run(tiny_dir, qa_file, tmp_path, method, opts):
    common = dict(model=str(tiny_dir), dataset=str(qa_file), batch_size=4, lr=2e-3, max_steps=4,
                  progress=False, method=method, seed=3, **opts)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **common))

    def stop_at_2(rec, state):
        state.stop_requested = state.step == 2  # a switch happens at step 2, right after the resume

    train(TrainConfig(output_dir=str(tmp_path / "part"), **common), callbacks=[stop_at_2])
    train(TrainConfig(output_dir=str(tmp_path / "part"), resume="latest", **common))
    full, part = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    assert full.keys() == part.keys()
    for k in full:
        torch.testing.assert_close(part[k], full[k], rtol=0, atol=0, msg=k)
    changed = {layer_of(k) for k in full if not torch.equal(full[k], base[k])} - {None}
    m = (LISA if method == "lisa" else BAdam)(TrainConfig(**common).lopt_config())
    assert changed == {i for s in range(4) for i in m.active_layers(s, LAYERS)}
    info = json.loads((tmp_path / "full" / "lopt_run.json").read_text())
    assert info["method"] == method and info[method]["active_layers"] == m.active_layers(3, LAYERS)
    assert info["lopt_config"]["seed"] == 3


def test_bad_lisa_and_badam_options(tiny_dir, qa_file, tmp_path):
    common = dict(model=str(tiny_dir), dataset=str(qa_file), output_dir=str(tmp_path), progress=False)
    with pytest.raises(LoPTError, match="lisa_interval must be an integer >= 1"):
        TrainConfig(method="lisa", lisa_interval=0, **common).validate()
    with pytest.raises(LoPTError, match="unknown badam_order 'sideways'"):
        TrainConfig(method="badam", badam_order="sideways", **common).validate()
    with pytest.raises(LoPTError, match="--fsdp does not support --method badam"):
        TrainConfig(method="badam", fsdp=True, **common).validate()
    with pytest.raises(LoPTError, match="needs --method lopt"):
        TrainConfig(method="lisa", task_grad_every=2, **common).validate()
    with pytest.raises(LoPTError, match="more than the model's 4 decoder layers"):
        lopt.wrap(make_tiny_model("llama", layers=4), method="lisa", lisa_layers=5)
