"""lopt plan: exact parameter and optimizer-state counts, activations against the saved-tensor tracker,
the shipped aliases, and one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from lopt import wrap
from lopt.memory import SavedTensorTracker
from lopt.plan.planner import PlanError, add_plan_arguments, aliases, load_config, main, parse_size, plan, run_plan_cli
from lopt.train import Stepper, TrainConfig

B, T, VOCAB = 2, 24, 300


def tiny_config(arch: str = "llama", tie: bool = False, layers: int = 4) -> dict:
    """Sizes chosen so that every term differs (head_dim * heads != hidden, kv heads < heads)."""
    cfg = dict(model_type=arch, vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=256,
               tie_word_embeddings=tie)
    return cfg


def build(cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data), dtype=torch.float32)


def run_step(cfg: dict, method: str, precision: str = "fp32", gc: str = "off", sel: str = "off"):
    """One real lopt training step (Stepper, as lopt train and lopt bench run it) of ``method``;
    LISA and BAdam are emulated by freezing what they freeze (layer 0 active). Returns the wrapped
    model, the stepper and the tracker's peak of saved activations."""
    model = build(cfg)
    base, k = ("lopt", int(method[6:])) if method.startswith("lopt-k") else ({"lisa": "e2e", "badam": "e2e"}.get(method, method), 2)
    # lopt-kN: the paper's mechanism (task_grad_every 0), which lopt plan models
    tc = TrainConfig(method=base, num_blocks=k, batch_size=B, max_length=T, precision=precision, progress=False, task_grad_every=0,
                     max_steps=3, warmup_ratio=0.0, gradient_checkpointing=gc, selective_checkpointing=sel)
    wrapped = wrap(model, config=tc.lopt_config())
    if method in ("lisa", "badam"):
        for i, layer in enumerate(model.model.layers):
            layer.requires_grad_(i == 0)
        if method == "badam":
            for m in (model.model.embed_tokens, model.model.norm, model.lm_head):
                m.requires_grad_(False)
    wrapped.gradient_checkpointing_enable(gc, sel)
    wrapped.train()
    stepper = Stepper(wrapped, tc, torch.device("cpu"), 3)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with SavedTensorTracker(wrapped.parameters()) as tracker:
        stepper.step([batch])
    return wrapped, stepper, tracker.peak_bytes


METHODS = ["e2e", "lopt-k2", "lopt-k4", "freeze-lower", "lora", "lisa", "badam"]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_exact_counts_and_saved_activations(method, tie):
    """Parameters, trainable parameters and AdamW state exactly; saved activations (fp32) against the
    tracker's peak over a real step."""
    cfg = tiny_config(tie=tie)
    row = plan(cfg, batch_size=B, max_length=T, precision="fp32", methods=[method], gradient_checkpointing="off")[0]
    wrapped, stepper, measured = run_step(cfg, method)
    params = {id(p): p for p in wrapped.parameters()}.values()  # unique: a tied head once
    assert row.weights == sum(p.numel() * p.element_size() for p in params)
    assert row.trainable_params == sum(p.numel() for p in params if p.requires_grad)
    state = [t for s in stepper.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert row.optimizer == sum(t.numel() * t.element_size() for t in state)
    # Byte-exact when written (torch 2.13, transformers 5.2); 2% leaves room for library drift
    # while one missing hidden-sized tensor per layer would still fail.
    assert row.saved_visible == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_saved_activations_under_bf16_autocast(method):
    cfg = tiny_config()
    row = plan(cfg, batch_size=B, max_length=T, precision="bf16", methods=[method], gradient_checkpointing="off")[0]
    _, _, measured = run_step(cfg, method, "bf16")
    assert row.saved_visible == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("arch,method", [("qwen3", m) for m in ("e2e", "lopt-k2", "lora", "badam")]
                         + [("qwen2", "e2e"), ("mistral", "e2e")])
def test_saved_activations_other_architectures(arch, method):
    cfg = tiny_config(arch, tie=True)
    row = plan(cfg, batch_size=B, max_length=T, precision="bf16", methods=[method], gradient_checkpointing="off")[0]
    _, _, measured = run_step(cfg, method, "bf16")
    assert row.saved_visible == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("method,gc,sel", [
    ("e2e", "all", "off"), ("e2e", "off", "all"), ("lopt-k2", "last-block", "off"), ("lopt-k2", "all", "off"),
    ("lopt-k2", "off", "last-block"), ("lopt-k2", "lower-blocks", "off"), ("freeze-lower", "all", "off"),
    ("lora", "all", "off"), ("lisa", "all", "off"), ("badam", "all", "off")])
def test_saved_activations_with_checkpointing(method, gc, sel):
    cfg = tiny_config()
    row = plan(cfg, batch_size=B, max_length=T, precision="fp32", methods=[method], gradient_checkpointing=gc,
               selective_checkpointing=sel)[0]
    _, _, measured = run_step(cfg, method, "fp32", gc, sel)
    # Selective checkpointing keeps its matmul outputs in the checkpoint's cache, which the tracker
    # does not see: the tracker's share is compared, and the held total must be larger.
    assert row.saved_visible == pytest.approx(measured, rel=0.02)
    if sel != "off":
        assert any(ph["activations"] > ph["saved_visible"] for ph in row.details["phases"])


def test_plan_orders_methods_as_their_schedules_say():
    rows = {(r.method, r.checkpointing): r for r in plan(tiny_config(layers=8), batch_size=4, max_length=64,
                                                           precision="bf16", gpu_memory="2GB")}
    e2e, k2, k4 = rows[("e2e", "-")], rows[("lopt-k2", "-")], rows[("lopt-k4", "-")]
    # Blockwise: the peak of activations is the largest block's, not the sum.
    assert k4.activations < k2.activations < e2e.activations
    assert k2.grads < e2e.grads  # lower blocks are stepped and their gradients freed before the upper block
    assert rows[("e2e", "full all")].activations < rows[("e2e", "selective all")].activations < e2e.activations
    assert rows[("badam", "-")].optimizer < rows[("lisa", "-")].optimizer < e2e.optimizer
    assert all(r.fits for r in rows.values())
    for r in rows.values():
        assert r.peak >= r.weights + r.optimizer + max(r.activations, r.grads)


def test_fits_column_uses_gpu_memory_and_headroom():
    cfg = tiny_config()
    row = plan(cfg, batch_size=B, max_length=T, precision="fp32", methods=["e2e"], gradient_checkpointing="off")[0]
    just = plan(cfg, batch_size=B, max_length=T, precision="fp32", methods=["e2e"], gradient_checkpointing="off",
                gpu_memory=row.peak, headroom=0)[0]
    short = plan(cfg, batch_size=B, max_length=T, precision="fp32", methods=["e2e"], gradient_checkpointing="off",
                 gpu_memory=row.peak, headroom=1)[0]
    assert just.fits and not short.fits and just.free_at_peak == 0


@pytest.mark.parametrize("alias,params", [("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768),
                                          ("qwen2.5-7b", 7_615_616_512), ("llama-3.1-8b", 8_030_261_248)])
def test_shipped_aliases_have_the_published_parameter_counts(alias, params):
    row = plan(alias, batch_size=1, max_length=16, methods=["e2e"], gradient_checkpointing="off")[0]
    assert row.trainable_params == params


def test_alias_spellings_and_sources(tmp_path):
    assert "qwen2.5-7b" in aliases() and len(aliases()) >= 20
    for name in ("Qwen/Qwen2.5-7B-Instruct", "llama3.1-8b", "meta-llama/Llama-3.1-8B", "SmolLM2-135M-Instruct"):
        assert load_config(name).model_type in ("qwen2", "llama")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    assert load_config(tmp_path).hidden_size == 48
    assert load_config(tmp_path / "config.json").num_hidden_layers == 4


@pytest.mark.parametrize("source,match", [
    ("qwen9-1t", "unknown model 'qwen9-1t'.*aliases"),
    ("./nowhere/config.json", "no such file"),
])
def test_bad_model_is_one_line_error(source, match):
    with pytest.raises(PlanError, match=match) as e:
        plan(source, batch_size=1, max_length=8)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(PlanError, match="has no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match="cannot read .* as JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(PlanError, match="models the activations of"):
        plan(tmp_path, batch_size=1, max_length=8)
    with pytest.raises(PlanError, match="cannot read GPU memory"):
        parse_size("eighty gigs")
    with pytest.raises(PlanError, match="unknown method"):
        plan(tiny_config(), batch_size=1, max_length=8, methods=["galore"])
    with pytest.raises(PlanError, match="num_blocks must be"):
        plan(tiny_config(), batch_size=1, max_length=8, methods=["lopt-k9"])
    with pytest.raises(PlanError, match="sliding-window attention"):
        plan(tiny_config("mistral") | {"sliding_window": 16}, batch_size=1, max_length=32)
    with pytest.raises(PlanError, match="need a method with a boundary"):
        plan(tiny_config(), batch_size=1, max_length=8, methods=["e2e"], gradient_checkpointing="last-block")
    assert main(["--model", "nope-7b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lopt plan: error: unknown model 'nope-7b'") and "\n" not in err


def test_parse_size():
    assert parse_size("80GB") == parse_size("80 GiB") == 80 * 2**30
    assert parse_size("81920MiB") == 80 * 2**30
    assert parse_size(12345) == 12345


def test_cli_table_and_json(tmp_path, capsys):
    import argparse

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    assert run_plan_cli(parser.parse_args(["--model", str(tmp_path), "--batch-size", "2", "--max-length", "24",
                                           "--gpu-memory", "2GB"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method | checkpointing |") and "| lopt-k4 | full last-block |" in out
    assert "GiB" not in out.split("\n\n")[0] and " MiB |" in out  # tables in MiB
    assert run_plan_cli(parser.parse_args(["--model", str(tmp_path), "--method", "lopt", "--num-blocks", "3",
                                           "--gradient-checkpointing", "last-block", "--json", "-"])) == 0
    data = json.loads(capsys.readouterr().out)  # `--json -`: standard output holds the JSON only
    assert data["units"]["memory"] == "bytes"
    assert [(r["method"], r["checkpointing"]) for r in data["rows"]] == [("lopt-k3", "full last-block")]
    assert data["rows"][0]["step_peak"] == data["rows"][0]["peak"] - data["rows"][0]["weights"]
    # --json PATH writes the same JSON to a file and still prints the table
    out_file = tmp_path / "sub" / "plan.json"
    assert run_plan_cli(parser.parse_args(["--model", str(tmp_path), "--method", "lopt", "--num-blocks", "3",
                                           "--gradient-checkpointing", "last-block", "--json", str(out_file)])) == 0
    assert capsys.readouterr().out.startswith("| method |")
    assert json.loads(out_file.read_text()) == data
