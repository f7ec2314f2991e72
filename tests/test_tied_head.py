"""``--tied-head``: LoPT and freeze-lower keep a tied LM head tied to the input embedding instead of
untying it. The shared matrix trains with the last block, from the task loss only; on an open boundary
(``--task-grad-every``) the task gradient also reaches it through the lookup, as in e2e (fp32, tiny
models)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lopt
from lopt import LoPTError
from lopt.cli import main
from lopt.recipes.sft import TrainConfig

from conftest import addition_rows, make_tiny_model, save_tiny, write_jsonl
from test_task_grad import _peak_saved, batch, step_grads, wrapped_of


def _shared(grads: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return next(g for k, g in grads.items() if k.endswith(name))


def _rest(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: g for k, g in grads.items() if not k.endswith(("embed_tokens.weight", "lm_head.weight"))}


def test_one_matrix_trained_with_the_last_block():
    model = make_tiny_model("llama", layers=4, hidden=32, tie=True)
    untied, tied = wrapped_of(model), wrapped_of(model, tied_head=True)
    emb = tied.model.get_input_embeddings().weight
    assert tied.model.get_output_embeddings().weight is emb
    assert untied.model.get_output_embeddings().weight is not untied.model.get_input_embeddings().weight
    assert tied.describe()["tied_lm_head"] and not tied.describe()["untied_lm_head"]
    trainable = [sum(p.numel() for p in w.parameters() if p.requires_grad) for w in (untied, tied)]
    assert trainable[0] - trainable[1] == emb.numel()  # the head's copy is gone
    assert all(p is not emb for p in tied.lower_parameters())
    assert any(p is emb for p in tied.block_parameters(1))
    upper = next(g for g in tied.param_groups(lr=1.0, lr_lower=0.1) if g["name"] == "upper")
    assert any(p is emb for p in upper["params"]) and upper["lr"] == 1.0


@pytest.mark.parametrize("schedule", ["blockwise", "joint"])
def test_closed_step_the_shared_matrix_gets_the_task_gradient_only(schedule):
    model = make_tiny_model("llama", layers=6, hidden=64, tie=True)
    ids, mask, labels = batch()
    untied = step_grads(wrapped_of(model, schedule=schedule, lambda_aux=10.0), ids, mask, labels)
    tied = step_grads(wrapped_of(model, schedule=schedule, lambda_aux=10.0, tied_head=True), ids, mask, labels)
    # untied: the head's copy gets the task gradient, the embedding the local one; tied: only the former
    torch.testing.assert_close(_shared(tied, "embed_tokens.weight"), _shared(untied, "lm_head.weight"),
                               rtol=1e-5, atol=1e-7)
    assert not torch.allclose(_shared(untied, "embed_tokens.weight"), torch.zeros(()))
    rest_u, rest_t = _rest(untied), _rest(tied)
    assert rest_t.keys() == rest_u.keys()
    for k, g in rest_u.items():  # the layers (and local heads) get what they get untied
        torch.testing.assert_close(rest_t[k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_open_step_gradients_are_end_to_ends():
    model = make_tiny_model("llama", layers=6, hidden=64, tie=True)
    ids, mask, labels = batch()
    e2e = step_grads(wrapped_of(model, method="e2e"), ids, mask, labels)
    tied = step_grads(wrapped_of(model, task_grad_every=2, tied_head=True), ids, mask, labels, open_boundary=True)
    assert tied.keys() == e2e.keys()
    for k, g in e2e.items():  # the lookup's gradient included: the tied matrix gets e2e's sum
        torch.testing.assert_close(tied[k], g, rtol=1e-5, atol=1e-6, msg=k)


def test_freeze_lower_trains_the_matrix_from_the_head_and_keeps_no_lower_activations():
    model = make_tiny_model("llama", layers=8, hidden=64, tie=True)
    ids, mask, labels = batch(b=4, t=48)
    untied_w, tied_w = wrapped_of(model, method="freeze-lower"), wrapped_of(model, method="freeze-lower", tied_head=True)
    untied, tied = step_grads(untied_w, ids, mask, labels), step_grads(tied_w, ids, mask, labels)
    torch.testing.assert_close(_shared(tied, "embed_tokens.weight"), _shared(untied, "lm_head.weight"),
                               rtol=1e-5, atol=1e-7)
    assert not any(".layers.0." in k or ".layers.3." in k for k in tied)  # the lower layers stay frozen
    # the trainable matrix under the frozen layers does not make them record a graph
    assert _peak_saved(tied_w, ids, mask, labels) <= _peak_saved(untied_w, ids, mask, labels)


def test_bad_tied_head(tmp_path):
    with pytest.raises(LoPTError, match="has no boundary"):
        lopt.wrap(make_tiny_model("llama"), method="e2e", tied_head=True)
    with pytest.raises(LoPTError, match="not tied to its input embedding"):
        lopt.wrap(make_tiny_model("llama", tie=False), tied_head=True)
    common = dict(dataset=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path), progress=False)
    with pytest.raises(LoPTError, match="has no boundary"):
        TrainConfig(method="lora", tied_head=True, **common).validate()
    for mode in ("pipeline", "fsdp"):
        with pytest.raises(LoPTError, match=f"--tied-head is not supported with --{mode}"):
            TrainConfig(tied_head=True, **{mode: True}, **common).validate()


def test_trained_checkpoint_stays_tied_and_loads_anywhere(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    common = ["train", "--model", str(model_dir), "--dataset", str(data), "--batch-size", "4", "--lr", "1e-3",
              "--max-steps", "3", "--warmup-ratio", "0", "--max-grad-norm", "0", "--no-progress",
              "--task-grad-every", "2", "--tied-head"]
    assert main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "b"), "--optimizer-in-backward"]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" not in a and a.keys() == base.keys()  # saved tied, like the base
    for k in a:  # the optimizer in backward steps the shared matrix once, with both of its gradients
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    assert not torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert plain.config.tie_word_embeddings and plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(plain.model.embed_tokens.weight.detach(), a["model.embed_tokens.weight"])
    info = json.loads((tmp_path / "a" / "lopt_run.json").read_text())
    assert info["lopt_config"]["tied_head"] is True
