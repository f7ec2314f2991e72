"""--precision (fp32, bf16-mixed / bf16, bf16-true, fp16), --bf16-update, --optimizer, --method qlora.

Tiny models on the CPU: what each precision stores in which dtype (frozen parts bf16, trainable
masters fp32 under bf16-mixed, everything bf16 under bf16-true, LISA/BAdam moving layers between the
two at a switch), that fp32 is unchanged, that bf16-true trains and its compensated update keeps
updates that plain bf16 rounding loses, that checkpoints load with plain transformers in one dtype, and
the one-line errors before training."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from lopt.config import TrainConfig
from lopt.engine.config import LoPTError
from lopt.methods import wrap
from lopt.recipes.sft import train
from lopt.runtime.loop import Stepper, autocast_dtype, make_optimizer
from lopt.runtime.precision import apply_precision, check_device_options, resolve_precision

from conftest import addition_rows, make_tiny_model, save_tiny, write_jsonl

CPU = torch.device("cpu")


def batch(seed: int = 0, vocab: int = 320) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def stepper(method: str = "e2e", total_steps: int = 8, **kw) -> Stepper:
    cfg = TrainConfig(method=method, lr=1e-3, warmup_ratio=0.0, max_grad_norm=None, **kw)
    cfg.validate()
    w = wrap(make_tiny_model("llama", layers=4, tie=method not in ("lopt", "freeze-lower")),
             config=cfg.lopt_config())
    apply_precision(w, cfg.precision, CPU)
    w.train()
    return Stepper(w, cfg, CPU, total_steps)


def dtypes(params) -> set[torch.dtype]:
    return {p.dtype for p in params}


def test_precision_names_resolve():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16-mixed"
    assert resolve_precision("bf16", "cpu") == "bf16-mixed"  # the old name
    assert autocast_dtype("bf16", CPU) == autocast_dtype("bf16-mixed", CPU) == torch.bfloat16
    assert autocast_dtype("bf16-true", CPU) is None and autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("fp16", CPU) == torch.float16


def test_fp32_steps_exactly_as_before():
    """--precision fp32 (and auto on CPU) leaves every weight fp32 and the step unchanged."""
    a, b = stepper(precision="fp32"), stepper(precision="auto")
    for i in range(2):
        ra, rb = a.step([batch(i)]), b.step([batch(i)])
        assert ra["loss"] == rb["loss"]
    assert dtypes(a.wrapped.parameters()) == {torch.float32}
    for pa, pb in zip(a.wrapped.parameters(), b.wrapped.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["lora", "freeze-lower"])
def test_bf16_mixed_frozen_bf16_trainable_fp32(method):
    s = stepper(method, precision="bf16-mixed")
    w = s.wrapped
    frozen = [p for p in w.parameters() if not p.requires_grad]
    trainable = [p for p in w.parameters() if p.requires_grad]
    assert frozen and trainable
    assert dtypes(frozen) == {torch.bfloat16}
    assert dtypes(trainable) == {torch.float32}
    before = [p.detach().clone() for p in trainable]
    s.step([batch()])
    assert dtypes(trainable) == {torch.float32}
    assert any(not torch.equal(p, q) for p, q in zip(trainable, before))


@pytest.mark.parametrize("method, opts", [("badam", {"badam_switch_every": 1}), ("lisa", {"lisa_interval": 1})])
def test_switching_layers_get_an_fp32_master_while_active(method, opts):
    s = stepper(method, precision="bf16-mixed", **opts)
    w = s.wrapped
    layers = w.model.get_submodule(w.layers_name)
    for step in range(3):
        s.step([batch(step)])
        active = set(w.method_impl.active)
        for i, layer in enumerate(layers):
            want = torch.float32 if i in active else torch.bfloat16
            assert dtypes(layer.parameters()) == {want}, (step, i, active)
        # (BAdam's next block, LISA's next draw: the switch happens at the next step's begin_step)


@pytest.mark.parametrize("method", ["e2e", "lopt"])
def test_bf16_true_stores_everything_in_bf16_and_trains(method):
    s = stepper(method, precision="bf16-true", total_steps=12)
    w = s.wrapped
    head_ids = {id(p) for p in w.heads.parameters()}
    assert dtypes(p for p in w.parameters() if id(p) not in head_ids) == {torch.bfloat16}
    assert dtypes(w.heads.parameters()) <= {torch.float32}  # the local heads' loss is fp32
    assert type(s.optimizer).__module__.startswith("torchao")  # the stochastically rounded update by default
    ref = stepper(method, precision="fp32", total_steps=12)
    fixed = batch(0)
    losses = [s.step([fixed])["loss"] for _ in range(12)]
    ref_losses = [ref.step([fixed])["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 0.3
    # bf16-true follows fp32's descent (bf16 forward rounding aside)
    assert losses[-1] - ref_losses[-1] == pytest.approx(0, abs=0.05 * (ref_losses[0] - ref_losses[-1]) + 0.02)
    for st in s.optimizer.state.values():  # AdamW state in bf16 too (the heads' aside)
        if st and st["exp_avg"].dtype != torch.float32:
            assert st["exp_avg"].dtype == torch.bfloat16


def test_compensated_update_keeps_what_plain_bf16_loses():
    """Steps far below half a bf16 step of the weight: round-to-nearest drops every one; stochastic
    rounding (the default) moves each weight by a whole bf16 step now and then, the mean change tracking
    fp32's; Kahan summation accumulates them like fp32 does."""
    assert TrainConfig().bf16_update == "stochastic-round"
    torch.manual_seed(0)
    out, moved = {}, {}
    for update in ("fp32", "plain", "kahan", "stochastic-round"):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.float32 if update == "fp32" else torch.bfloat16))
        opt = make_optimizer([{"params": [p], "lr": 1e-4, "weight_decay": 0.0}],
                             bf16_update=None if update == "fp32" else update)
        for _ in range(50):
            p.grad = torch.ones_like(p)  # Adam's step is then lr in size: 50 x 1e-4 in all
            opt.step()
        out[update] = float(p.detach().float().mean())
        moved[update] = float((p.detach() != 1).float().mean())
    assert type(opt).__module__.startswith("torchao")
    assert out["plain"] == 1.0  # 1e-4 is under half of bf16's step at 1.0 (2**-8): every update lost
    assert out["fp32"] == pytest.approx(1 - 50e-4, abs=1e-5)
    assert out["kahan"] == pytest.approx(out["fp32"], abs=2e-3)  # within the bf16 weight's own resolution
    # each weight is 1 or a bf16 step or more below it (not 1 - 50e-4, which bf16 cannot hold), yet the mean
    # follows fp32: a 50e-4 change is about 1.3 steps of 2**-8, the mean's noise over 4096 weights ~1e-4
    assert 0.5 < moved["stochastic-round"] < 1
    assert out["stochastic-round"] == pytest.approx(out["fp32"], abs=5e-4)


def test_torchao_is_imported_only_for_its_optimizer_and_quietly(tmp_path):
    """lopt and its CLI start without torchao (on a CPU-only torch its import logs a "Failed to load" line
    per CUDA kernel); loading a model (transformers' quantizers import torchao when it is installed) and
    building the default bf16-true optimizer import it, with nothing on stderr."""
    import subprocess

    save_tiny(tmp_path / "tiny", layers=2)
    code = ("import sys, lopt, lopt.cli\n"
            "assert 'torchao' not in sys.modules, 'torchao imported at start'\n"
            "from lopt.models import load_model\n"
            f"load_model({str(tmp_path / 'tiny')!r}, device='cpu')\n"
            "assert 'torchao' in sys.modules, 'the model loaded without importing torchao'\n"
            "from lopt.runtime.loop import stochastic_round_adamw\n"
            "assert stochastic_round_adamw().__module__.startswith('torchao.optim')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert not any(w in out.stderr for w in ("Failed to load", "torchao", "_pytree", "Enum")), out.stderr


def test_optimizer_in_backward_under_bf16_true():
    a = stepper("e2e", precision="bf16-true")
    b = stepper("e2e", precision="bf16-true", optimizer_in_backward=True)
    for i in range(2):
        ra, rb = a.step([batch(i)]), b.step([batch(i)])
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-2)
    assert dtypes(b.wrapped.parameters()) == {torch.bfloat16}
    for pa, pb in zip(a.wrapped.parameters(), b.wrapped.parameters()):
        torch.testing.assert_close(pb.float(), pa.float(), rtol=0.02, atol=2e-3)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_makes_no_fp32_copy_of_a_bf16_head(autocast):
    """bf16-true (a trained bf16 head, bf16 hidden states) and bf16-mixed (a frozen bf16 head under
    autocast, fp32 hidden states): no tensor of the head's size is created in fp32 in the loss's forward
    and backward (the trained head's gradient is its only head-sized tensor, in bf16), and the loss and
    gradients are the fp32 computation's within bf16's resolution."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lopt.engine.loss import chunked_cross_entropy

    vocab, hidden = 512, 32
    made: list[tuple[int, torch.dtype]] = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
            made.extend((t.numel(), t.dtype) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen)  # not a view
            return out

    g = torch.Generator().manual_seed(0)
    h32, w32 = torch.randn(2, 17, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.2
    y = torch.randint(0, vocab, (2, 17), generator=g)
    w32 = w32.bfloat16().float()  # the same head in both computations
    h32 = h32 if autocast else h32.bfloat16().float()
    h = h32.clone().requires_grad_() if autocast else h32.bfloat16().requires_grad_()
    w = w32.bfloat16().requires_grad_(not autocast)
    with Sizes(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = chunked_cross_entropy(h, w, y, chunk_size=8)  # 4 chunks
        loss.backward()
    big = {dtype for n, dtype in made if n >= vocab * hidden}
    assert big == (set() if autocast else {torch.bfloat16})  # the trained head's gradient, seen

    hr, wr = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref = chunked_cross_entropy(hr, wr, y, chunk_size=8)
    ref.backward()
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(h.grad.float(), hr.grad, rtol=0, atol=2e-2 * hr.grad.abs().max().item())
    if not autocast:
        torch.testing.assert_close(w.grad.float(), wr.grad, rtol=0, atol=2e-2 * wr.grad.abs().max().item())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return save_tiny(root / "tiny"), write_jsonl(root / "qa.jsonl", addition_rows())


@pytest.mark.parametrize("method, precision, saved", [("lora", "bf16-mixed", torch.float32),
                                                      ("freeze-lower", "bf16-mixed", torch.float32),
                                                      ("e2e", "bf16-true", torch.bfloat16)])
def test_checkpoint_loads_with_plain_transformers(files, tmp_path, method, precision, saved):
    from transformers import AutoModelForCausalLM

    tiny, data = files
    res = train(TrainConfig(model=str(tiny), dataset=str(data), method=method, precision=precision, batch_size=4,
                            max_steps=2, lr=1e-3, output_dir=str(tmp_path), progress=False))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert dtypes(plain.parameters()) == {saved}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(saved).removeprefix("torch.")
    ids = batch()["input_ids"]
    model = res.model.plain_model() if method != "lora" else res.model.model
    with torch.no_grad():  # the saved weights are the trained ones (LoRA: merged in fp32)
        want = model(ids).logits.float()
        got = plain(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    for precision in ("bf16-true", "bf16", "auto"):
        with pytest.raises(LoPTError, match="Tesla T4 has no bf16 support; use --precision fp16"):
            check_device_options(TrainConfig(precision=precision), torch.device("cuda"))
    check_device_options(TrainConfig(precision="fp16"), torch.device("cuda"))


def test_bad_combinations_are_one_line(files, tmp_path, monkeypatch):
    tiny, data = files
    with pytest.raises(LoPTError, match="paged-adamw-8bit .* needs a CUDA device"):
        train(TrainConfig(model=str(tiny), dataset=str(data), optimizer="paged-adamw-8bit", device="cpu",
                          output_dir=str(tmp_path / "o"), progress=False))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    with pytest.raises(LoPTError, match="--bf16-update plain"):
        TrainConfig(optimizer="adamw-8bit", precision="bf16-true").validate()
    TrainConfig(optimizer="adamw-8bit", precision="bf16-true", bf16_update="plain").validate()
    with pytest.raises(LoPTError, match="not supported with --pipeline"):
        TrainConfig(precision="bf16-true", pipeline=True, num_blocks=2).validate()
    monkeypatch.setitem(sys.modules, "optimi", None)
    with pytest.raises(LoPTError, match="pip install torch-optimi"):
        stepper(precision="bf16-true", bf16_update="kahan")
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(LoPTError, match="needs torchao: pip install torchao"):
        stepper(precision="bf16-true")  # the default update


def test_lora_target_modules_that_match_nothing_is_one_line():
    cfg = TrainConfig(method="lora", lora_target_modules=["q_proj", "qkv_proj"])
    cfg.validate()
    with pytest.raises(LoPTError, match="--lora-target-modules qkv_proj: LlamaForCausalLM has no module of that "
                                        "name; its linear maps are .*q_proj"):
        wrap(make_tiny_model("llama", layers=2), config=cfg.lopt_config())


def test_qlora_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the import fails
    with pytest.raises(LoPTError, match="--method qlora needs bitsandbytes .*pip install bitsandbytes"):
        TrainConfig(method="qlora", precision="bf16-true").validate()


def test_qlora_trains_adapters_over_a_4bit_base_and_saves_a_plain_model(files, tmp_path):
    """bitsandbytes' CPU backend runs NF4: the base's linear maps are packed 4-bit, the adapters bf16
    (bf16-true), the loss drops, and the checkpoint is a plain bf16 model with the adapters merged into
    the dequantized weights."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    with pytest.raises(LoPTError, match="--method qlora computes in bf16 .* not fp32"):
        TrainConfig(method="qlora", precision="fp32").validate()

    tiny, data = files
    res = train(TrainConfig(model=str(tiny), dataset=str(data), method="qlora", precision="bf16-true", lr=3e-3,
                            lora_target_modules=["q_proj", "v_proj"], batch_size=4, max_steps=6, warmup_ratio=0.0,
                            output_dir=str(tmp_path), progress=False))
    w = res.model
    quantized = [m for m in w.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * 4  # every linear map of the 4 layers, adapters on q_proj and v_proj
    assert all(m.weight.dtype == torch.uint8 for m in quantized)
    assert dtypes(p for p in w.parameters() if p.requires_grad) == {torch.bfloat16}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in w.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert dtypes(plain.parameters()) == {torch.bfloat16}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    ids = batch()["input_ids"]
    with torch.no_grad():
        want, got = w.model(ids).logits.float(), plain(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.1)  # NF4 dequantized then rounded to bf16


@pytest.mark.parametrize("precision, policy, reference", [("bf16-mixed", {torch.float32, torch.bfloat16}, torch.bfloat16),
                                                          ("bf16-true", {torch.bfloat16}, torch.bfloat16),
                                                          ("fp32", {torch.float32}, torch.float32)])
def test_dpo_reference_and_policy_dtypes(files, precision, policy, reference):
    """lopt dpo / grpo store the policy as lopt train does and the frozen reference in bf16 under the bf16
    precisions; bf16-true's TRL optimizer is the compensated one."""
    from types import SimpleNamespace

    from lopt.integrations.trl import build_trainer_optimizer
    from lopt.recipes.dpo import DPORunConfig
    from lopt.recipes.trl_bridge import load_and_wrap

    tiny, _ = files
    cfg = DPORunConfig(model=str(tiny), method="freeze-lower", precision=precision, task_grad_every=0)
    cfg.validate()
    wrapped, _, ref = load_and_wrap(cfg, CPU, with_reference=True)
    assert dtypes(wrapped.parameters()) == policy and dtypes(ref.parameters()) == {reference}
    trainer = SimpleNamespace(args=SimpleNamespace(learning_rate=1e-3, weight_decay=0.0, optim="adamw_torch"),
                              lopt_model=wrapped, model=wrapped.model,
                              lopt_lr_lower=None, optimizer_cls_and_kwargs=None,
                              get_optimizer_cls_and_kwargs=lambda args, model: (torch.optim.AdamW, {}))
    opt = build_trainer_optimizer(trainer)
    assert type(opt).__module__.startswith("torchao" if precision == "bf16-true" else "torch.")


def test_which_runs_load_the_model_in_bf16():
    """The model loads in bf16 where no loaded weight stays fp32: bf16-true, and a frozen base (LoRA,
    qlora) under bf16-mixed; never under fp32, for what bf16-mixed trains, or under --fsdp."""
    from lopt.recipes.sft import loads_in_bf16

    def loads(method, precision, **kw):
        return loads_in_bf16(TrainConfig(method=method, precision=precision, **kw), CPU)
    assert loads("e2e", "bf16-true") and loads("lopt", "bf16-true")
    assert loads("lora", "bf16-mixed") and loads("lora", "bf16")
    assert not loads("lora", "fp32") and not loads("lora", "auto")  # auto is fp32 on the CPU
    assert not any(loads(m, "bf16-mixed") for m in ("e2e", "lopt", "freeze-lower", "lisa", "badam"))
    assert not loads("e2e", "bf16-true", fsdp=True)
