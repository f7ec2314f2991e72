"""``--task-grad-every N``: LoPT's boundary opens on steps 0, N, 2N, ... and the lower blocks get the
true task gradient (plus their local loss when lambda_aux > 0), recomputed in the backward from each
layer's input (fp32, tiny models, untied embeddings, clipping off)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import lopt
from lopt import LoPTError
from lopt.cli import main
from lopt.engine.memory import SavedTensorTracker
from lopt.recipes.sft import TrainConfig, train
from lopt.runtime.loop import Stepper

from conftest import addition_rows, make_tiny_model, make_tokenizer, write_jsonl

VOCAB = 320


def batch(seed: int = 0, b: int = 3, t: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :3] = -100
    return ids, mask, labels


def wrapped_of(model, **kw):
    torch.manual_seed(1)  # the local heads are drawn at random: the same draw for every wrapper
    w = lopt.wrap(copy.deepcopy(model), **kw)
    w.train()
    return w


def step_grads(w, ids, mask, labels, open_boundary=False):
    w.zero_grad(set_to_none=True)
    w.open_boundary = open_boundary
    try:
        out = w(ids, attention_mask=mask, labels=labels)
        w.backward(out)
    finally:
        w.open_boundary = False
    return {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_open_step_gradients_are_end_to_end_plus_local(arch):
    model = make_tiny_model(arch, layers=6, hidden=64, tie=False)
    ids, mask, labels = batch()
    e2e = step_grads(wrapped_of(model, method="e2e"), ids, mask, labels)
    # lambda 0: every gradient is end-to-end's
    open0 = step_grads(wrapped_of(model, task_grad_every=2), ids, mask, labels, open_boundary=True)
    assert open0.keys() == e2e.keys()
    for n, g in e2e.items():
        torch.testing.assert_close(open0[n], g, rtol=1e-5, atol=1e-7, msg=n)
    # lambda 10: below the boundary, the task gradient plus the closed step's (local-only) gradient
    w = wrapped_of(model, task_grad_every=2, lambda_aux=10.0)
    lower = {id(p) for p in w.lower_parameters()} | {id(p) for p in w.heads.parameters()}
    lower_names = {n for n, p in w.named_parameters() if id(p) in lower}
    opened = step_grads(w, ids, mask, labels, open_boundary=True)
    local = step_grads(wrapped_of(model, task_grad_every=2, lambda_aux=10.0, schedule="joint"), ids, mask, labels)
    local = {n: g for n, g in local.items() if n in lower_names}
    assert lower_names and set(opened) == set(e2e) | lower_names
    for n, g in opened.items():
        want = e2e.get(n, 0) + local[n] if n in lower_names else e2e[n]
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=n)
    assert any(not torch.allclose(opened[n], e2e[n]) for n in lower_names if n in e2e)  # the local part counts


def _layer_saved_bytes(model, ids, mask, labels, layer: int) -> int:
    """Bytes autograd saves for one decoder layer in an end-to-end forward."""
    w = wrapped_of(model, method="e2e")
    layers = w.model.get_submodule(w.layers_name)
    marks = []
    with SavedTensorTracker(w.parameters()) as tr:
        h1 = layers[layer].register_forward_pre_hook(lambda *a: marks.append(tr.current_bytes))
        h2 = layers[layer].register_forward_hook(lambda *a: marks.append(tr.current_bytes))
        try:
            w(ids, attention_mask=mask, labels=labels)
        finally:
            h1.remove()
            h2.remove()
    return marks[1] - marks[0]


def _peak_saved(w, ids, mask, labels, open_boundary=False) -> int:
    with SavedTensorTracker(w.parameters()) as tr:
        step_grads(w, ids, mask, labels, open_boundary)
    return tr.peak_bytes


def test_open_step_saves_at_most_lopts_activations_plus_one_layer():
    model = make_tiny_model("llama", layers=8, hidden=64, tie=False)
    ids, mask, labels = batch(b=4, t=48)
    one_layer = _layer_saved_bytes(model, ids, mask, labels, layer=3)
    lopt_peak = _peak_saved(wrapped_of(model), ids, mask, labels)
    e2e_peak = _peak_saved(wrapped_of(model, method="e2e"), ids, mask, labels)
    for lam in (0.0, 10.0):
        w = wrapped_of(model, task_grad_every=4, lambda_aux=lam)
        open_peak = _peak_saved(w, ids, mask, labels, open_boundary=True)
        assert open_peak <= lopt_peak + one_layer, (lam, open_peak, lopt_peak, one_layer)
        assert open_peak < e2e_peak - 2 * one_layer  # the lower layers' activations were not all held
        # the lower layers' own checkpointing setting is back after the open step
        layers = w.model.get_submodule(w.layers_name)
        assert not any(layer.gradient_checkpointing for layer in layers)


def test_the_boundary_opens_on_steps_0_n_2n_and_the_closed_steps_skip_the_lower_backward():
    model = make_tiny_model("llama", layers=4, hidden=32, tie=False)
    cfg = TrainConfig(method="lopt", task_grad_every=3, lr=1e-3, warmup_ratio=0.0, max_grad_norm=None)
    assert cfg.lambda_aux == 0.0  # the default under task_grad_every
    w = lopt.wrap(model, config=cfg.lopt_config())
    w.train()
    stepper = Stepper(w, cfg, torch.device("cpu"), total_steps=7)
    assert {g["name"]: g["lr"] for g in stepper.optimizer.param_groups}["lower"] == pytest.approx(1e-3)  # the lower half at lr
    ids, mask, labels = batch()
    lower = w.lower_parameters()
    moved = []
    for _ in range(7):
        before = [p.detach().clone() for p in lower]
        rec = stepper.step([{"input_ids": ids, "attention_mask": mask, "labels": labels}])
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, lower)))
        assert rec["aux_loss"] is None  # lambda 0: no local loss, no lower graph on closed steps
        assert not w.open_boundary  # reset after the step
    assert moved == [True, False, False, True, False, False, True]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-untied")
    make_tiny_model("llama", layers=4, tie=False).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", addition_rows())


def test_task_grad_every_1_without_local_loss_trains_exactly_as_end_to_end(untied_dir, qa_file, tmp_path):
    common = ["train", "--model", str(untied_dir), "--dataset", str(qa_file), "--batch-size", "4",
              "--lr", "1e-3", "--max-steps", "3", "--warmup-ratio", "0", "--max-grad-norm", "0", "--no-progress"]
    assert main([*common, "--output-dir", str(tmp_path / "e2e"), "--method", "e2e"]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "tg1"), "--method", "lopt", "--task-grad-every", "1",
                 "--lambda-aux", "0", "--lr-lower", "1e-3"]) == 0
    a, b = load_file(tmp_path / "e2e" / "model.safetensors"), load_file(tmp_path / "tg1" / "model.safetensors")
    base = load_file(untied_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(a["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_resume_reproduces_the_open_steps(untied_dir, qa_file, tmp_path):
    common = dict(model=str(untied_dir), dataset=str(qa_file), batch_size=4, lr=2e-3, max_steps=4,
                  progress=False, task_grad_every=2, lambda_aux=1.0)
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), **common)).summary

    def stop_at_1(rec, state):
        state.stop_requested = state.step == 1  # resume at step 1: a closed step after the open step 0

    train(TrainConfig(output_dir=str(tmp_path / "part"), **common), callbacks=[stop_at_1])
    part = train(TrainConfig(output_dir=str(tmp_path / "part"), resume="latest", **common)).summary
    assert part["loss_last"] == pytest.approx(full["loss_last"], rel=1e-6)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    import json

    info = json.loads((tmp_path / "full" / "lopt_run.json").read_text())
    assert info["lopt_config"]["task_grad_every"] == 2 and info["options"]["task_grad_every"] == 2


def test_bad_task_grad_every(untied_dir, qa_file, tmp_path):
    common = dict(model=str(untied_dir), dataset=str(qa_file), output_dir=str(tmp_path), progress=False)
    with pytest.raises(LoPTError, match="needs --method lopt"):
        TrainConfig(method="e2e", task_grad_every=2, **common).validate()
    with pytest.raises(LoPTError, match="task_grad_every must be an integer >= 0"):
        TrainConfig(task_grad_every=-1, **common).validate()
    with pytest.raises(LoPTError, match="--pipeline .* drop --task-grad-every"):
        TrainConfig(task_grad_every=2, pipeline=True, **common).validate()
    with pytest.raises(LoPTError, match="max_grad_norm must be >= 0"):
        TrainConfig(max_grad_norm=-1.0, **common).validate()
    with pytest.raises(LoPTError, match="needs --method lopt"):
        lopt.wrap(make_tiny_model("llama"), method="freeze-lower", task_grad_every=2)
