"""CUDA checks (``make test-gpu``, ``pytest -m cuda``); every test here is skipped without a GPU.

bf16 autocast training for every method, SDPA attention, the per-block optimizer step and the
optimizer in backward, the chunked loss against full logits, ``lopt bench`` memory (max allocated),
and torchrun launches on one GPU: data parallel over NCCL (one process) and a 2-stage pipeline whose
two processes share the GPU (NCCL refuses two ranks on one device, so they talk through gloo).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lopt.methods import wrap
from lopt.engine.loss import causal_lm_loss, chunked_cross_entropy
from lopt.methods import METHODS
from lopt.recipes.sft import TrainConfig, train
from lopt.runtime.loop import Stepper

from conftest import addition_rows, make_tiny_model, save_tiny, write_jsonl

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HERE = Path(__file__).resolve().parent
CUDA = torch.device("cuda")


def batch(seed: int = 0, vocab: int = 320, rows: int = 4, length: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 5:] = 0  # padding on one row
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def stepper(method: str, total: int = 8, **kw) -> Stepper:
    cfg = TrainConfig(method=method, lr=1e-2, warmup_ratio=0.0, device="cuda", lora_r=4, **kw)
    cfg.validate()
    w = wrap(make_tiny_model("llama", layers=4, hidden=64), config=cfg.lopt_config()).to(CUDA)
    w.train()
    return Stepper(w, cfg, CUDA, total)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return save_tiny(root / "tiny"), write_jsonl(root / "qa.jsonl", addition_rows())


# ----------------------------------------------------------------------------- training on the GPU


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])  # qlora: tests/test_cuda_precision.py
def test_bf16_autocast_trains_every_method(method):
    s = stepper(method, precision="bf16")
    assert s.amp_dtype == torch.bfloat16 and s.scaler is None
    b = batch()
    recs = [s.step([b]) for _ in range(8)]  # one batch, eight steps: the loss must fall
    losses = [r["loss"] for r in recs]
    assert all(torch.isfinite(torch.tensor(x)) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in recs)
    if method == "lopt":
        assert all(r["aux_loss"] is not None and torch.isfinite(torch.tensor(r["aux_loss"])) for r in recs)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in s.wrapped.parameters())


def _with_attention(model, impl: str):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers read the config at each forward
        model.config._attn_implementation = impl
    assert model.config._attn_implementation == impl
    return model


def test_sdpa_attention_matches_eager_in_training():
    base = make_tiny_model("llama", layers=4, hidden=64)
    outs = {}
    for impl in ("sdpa", "eager"):
        m = _with_attention(copy.deepcopy(base), impl).to(CUDA)
        torch.manual_seed(0)  # the same local head for both
        w = wrap(m, num_blocks=2)
        w.train()
        b = {k: v.to(CUDA) for k, v in batch().items()}
        out = w(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        w.backward(out)
        outs[impl] = (out.loss.item(), out.aux_loss.item(),
                      {n: p.grad.detach().clone() for n, p in w.named_parameters() if p.grad is not None})
    (ls, as_, gs), (le, ae, ge) = outs["sdpa"], outs["eager"]
    assert ls == pytest.approx(le, rel=1e-4) and as_ == pytest.approx(ae, rel=1e-4)
    assert gs.keys() == ge.keys() and len(gs) > 10
    for n in gs:
        torch.testing.assert_close(gs[n], ge[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("variant", [{"per_block_step": "on"}, {"optimizer_in_backward": True}])
def test_early_optimizer_steps_are_exact_on_cuda(variant):
    """The per-block step (lower blocks) and the optimizer in backward (last block) give the weights
    of one fused-AdamW step at the end (fp32, no clipping)."""
    common = dict(precision="fp32", max_grad_norm=None, weight_decay=0.01)
    a = stepper("lopt", per_block_step="off", **common)
    b = stepper("lopt", **{"per_block_step": "auto", **variant}, **common)
    assert b.per_block and not a.per_block  # blockwise LoPT steps its lower block early by default
    assert a.optimizer.defaults.get("fused") and b.optimizer.defaults.get("fused")
    for s in range(2):
        bb = batch(seed=s)
        ra, rb = a.step([bb]), b.step([bb])
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert all(p.grad is None for p in b.wrapped.parameters())
    for (n, pa), pb in zip(a.wrapped.named_parameters(), b.wrapped.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_loss_matches_full_logits_on_cuda(dtype, softcap):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3, 41, 64, device=CUDA, generator=g).to(dtype).requires_grad_()
    weight = (0.1 * torch.randn(1000, 64, device=CUDA, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 41), device=CUDA, generator=g)
    labels[:, :7] = -100
    labels[2, 30:] = -100

    got = chunked_cross_entropy(hidden, weight, labels, chunk_size=16, softcap=softcap)
    got.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    # The reference in fp32 from the same (rounded) inputs.
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logits = h32 @ w32.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = causal_lm_loss(logits, labels)
    want.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got.float(), want.detach(), **tol)
    torch.testing.assert_close(gh.float(), h32.grad, **tol)
    torch.testing.assert_close(gw.float(), w32.grad, **tol)
    assert gh.dtype == dtype and gw.dtype == dtype


# ----------------------------------------------------------------------------- lopt bench on the GPU


def test_bench_reports_max_allocated_on_gpu(files, tmp_path):
    from lopt.bench.runner import load_bench_json
    from lopt.cli import main

    tiny, _ = files
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny), "--configs", "e2e", "lopt-k2", "lopt-k2+oib", "--device", "cuda",
                 "--seq-len", "64", "--batch-sizes", "4", "--steps", "2", "--repeats", "1", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in load_bench_json(out)["rows"]}  # the file is in bytes; read back in MiB
    for name, r in rows.items():
        # max_memory_allocated minus what the loaded model held: AdamW's two fp32 states are made
        # inside the measured steps, so the step's peak holds at least them.
        adam_mb = 2 * 4 * r["trainable_params"] / 2**20
        assert r["peak_step_mb"] >= adam_mb, (name, r["peak_step_mb"], adam_mb)
        assert r["peak_total_mb"] > r["peak_step_mb"]
    assert rows["lopt-k2"]["saved_activation_mb"] < rows["e2e"]["saved_activation_mb"]
    assert rows["lopt-k2+oib"]["peak_step_mb"] <= rows["lopt-k2"]["peak_step_mb"] + 1.0
    # bf16 autocast (the CUDA default), the same function before any update: the same first loss
    assert rows["lopt-k2+oib"]["first_loss"] == pytest.approx(rows["e2e"]["first_loss"], rel=1e-3)


# lopt plan against torch.cuda.max_memory_allocated (issue 27): lopt train's configurations, bf16 autocast
PLAN_CFG = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
                tie_word_embeddings=True)
PLAN_ROWS = {  # row name -> (lopt train method, options, steps measured after one warm-up step)
    "lopt": ("lopt", {}, 4),  # --task-grad-every 4: the rest of the cycle, three closed steps and an open one
    "lopt --optimizer-in-backward": ("lopt", {"optimizer_in_backward": True}, 4),
    "lopt --optimizer adamw-8bit": ("lopt", {"optimizer": "adamw-8bit"}, 4),
    "lopt-k2": ("lopt", {"task_grad_every": 0}, 1),
    "e2e": ("e2e", {}, 1),
    "e2e --optimizer adamw-8bit": ("e2e", {"optimizer": "adamw-8bit"}, 1),
    "e2e --optimizer-in-backward": ("e2e", {"optimizer_in_backward": True}, 1),
    "freeze-lower": ("freeze-lower", {}, 1),
}


@pytest.mark.parametrize("name", list(PLAN_ROWS))
def test_plan_agrees_with_max_memory_allocated(name):
    """The plan's step peak above weights and optimizer state (``peak - weights - optimizer``, bf16)
    against ``max_memory_allocated`` over the measured steps minus the allocation at their start: within
    15%; saved activations against the tracker within 10%."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lopt.engine.memory import SavedTensorTracker
    from lopt.plan import plan

    method, opts, steps = PLAN_ROWS[name]
    if opts.get("optimizer") == "adamw-8bit":
        pytest.importorskip("bitsandbytes")
    rows_, seq = 4, 256
    plan_method = "lopt-k2" if name == "lopt-k2" else method
    row = plan(dict(PLAN_CFG), batch_size=rows_, max_length=seq, precision="bf16", methods=[plan_method],
               gradient_checkpointing="off", optimizer=opts.get("optimizer", "adamw"),
               optimizer_in_backward=opts.get("optimizer_in_backward", False))[0]
    assert row.method == name
    data = dict(PLAN_CFG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data),
                                             dtype=torch.float32).to(CUDA)
    cfg = TrainConfig(method=method, batch_size=rows_, max_length=seq, precision="bf16", progress=False, max_steps=8,
                      warmup_ratio=0.0, **opts)
    cfg.validate()
    w = wrap(model, config=cfg.lopt_config())
    w.train()
    stepper = Stepper(w, cfg, CUDA, 8)
    ids = torch.randint(0, PLAN_CFG["vocab_size"], (rows_, seq), generator=torch.Generator().manual_seed(0)).to(CUDA)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    stepper.step([b])  # warm-up: the optimizer state exists
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with SavedTensorTracker(w.parameters()) as tracker:
        for _ in range(steps):
            stepper.step([b])
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    assert row.peak - row.weights - row.optimizer == pytest.approx(measured, rel=0.15)
    assert row.saved_visible == pytest.approx(tracker.peak_bytes, rel=0.10)


# ----------------------------------------------------------------------------- torchrun on one GPU


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", **extra,
                PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))


def _torchrun(nproc: int, args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stderr[-6000:]}")
    return proc


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(d).state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_data_parallel_over_nccl_on_one_gpu(files, tmp_path):
    """torchrun with one process and an NCCL group: the data-parallel step (token-count all_reduce,
    gradient all_reduce per block, weight broadcast) runs over NCCL and gives one process's weights."""
    tiny, data = files
    cfg = dict(model=str(tiny), dataset=str(data), batch_size=4, max_steps=3, lr=1e-2, warmup_ratio=0.0,
               max_grad_norm=None, progress=False, device="cuda", precision="fp32", per_block_step="off")
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([{"config": {**cfg, "output_dir": str(tmp_path / "dp")}}]))
    _torchrun(1, [str(HERE / "dist_worker.py"), str(spec)], _env(LOPT_TEST_BACKEND="nccl"))
    summary = torch.load(tmp_path / "dp" / "rank0.pt", map_location="cpu")["summary"]
    assert summary["world_size"] == 1  # the distributed path ran, not the single-process one
    train(TrainConfig(**{**cfg, "output_dir": str(tmp_path / "one")}))
    _assert_same(_weights(tmp_path / "dp"), _weights(tmp_path / "one"), rtol=1e-5, atol=1e-6)


def test_two_stage_pipeline_on_one_gpu(files, tmp_path):
    """Both pipeline ranks on cuda:0 (gloo carries the hidden states through host memory). With
    lambda_aux 0 the lower block does not move, so the checkpoint equals one process's run."""
    tiny, data = files
    opts = ["--model", str(tiny), "--dataset", str(data), "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2",
            "--warmup-ratio", "0", "--max-grad-norm", "none", "--lambda-aux", "0", "--precision", "fp32",
            "--device", "cuda:0", "--no-progress"]
    proc = _torchrun(2, ["-m", "lopt", "train", "--pipeline", "--output-dir", str(tmp_path / "pipe"), *opts], _env())
    assert "communicate through gloo" in proc.stderr
    metrics = [json.loads(x) for x in (tmp_path / "pipe" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    cfg = TrainConfig(model=str(tiny), dataset=str(data), batch_size=4, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                      max_grad_norm=None, lambda_aux=0.0, precision="fp32", device="cuda:0", progress=False,
                      output_dir=str(tmp_path / "one"))
    train(cfg)
    _assert_same(_weights(tmp_path / "pipe"), _weights(tmp_path / "one"), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- lopt plan grpo / dpo on CUDA


@pytest.mark.parametrize("recipe,method", [("grpo", "e2e"), ("grpo", "lopt-k2"), ("dpo", "e2e"), ("dpo", "lopt")])
def test_plan_rl_against_max_memory_allocated(tmp_path, monkeypatch, recipe, method):
    """One GRPO / DPO step (TRL's trainer, bf16 autocast): ``torch.cuda.max_memory_allocated`` above the
    step's start plus the resident policy, reference and AdamW state, against ``lopt plan grpo|dpo`` with
    device cuda (TRL's Triton kernel scores the labelled positions only): within 15%."""
    from test_plan_rl import TOLERANCE, run_case, table, tiny_model_dir

    r = run_case(tiny_model_dir(tmp_path / "tiny"), tmp_path, monkeypatch, recipe, method, {}, device="cuda")
    print(table([r]))
    assert r["resident_pred"] == r["resident_meas"]
    assert abs(r["peak_pred"] / r["peak_meas"] - 1) <= TOLERANCE, table([r])


# --------------------------------------------------------------------------- lopt plan --nproc 2 over NCCL

# Two sizes with tensors large enough that the caching allocator's 512-byte rounding is noise.
PARALLEL_SIZES = {"tied": dict(PLAN_CFG),
                  "untied": dict(PLAN_CFG, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                 head_dim=48, tie_word_embeddings=False)}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="per-rank figures need 2 GPUs (NCCL: one rank per GPU)")
def test_plan_parallel_against_max_memory_allocated(tmp_path):
    """lopt plan --nproc 2 --parallel ddp|fsdp per rank against real steps on 2 GPUs over NCCL
    (tests/plan_dist_worker.py with LOPT_PLAN_DEVICE=cuda, bf16 autocast): e2e, lopt's default recipe
    (its whole --task-grad-every cycle) and freeze-lower at two sizes; resident state within 1%, saved
    activations within 10%, the whole-step peak (resident + max_memory_allocated above the step's
    start) within 15% on each rank."""
    from lopt.plan import plan_parallel
    from test_plan_distributed import CONFIGS

    rows, seq = 4, 256
    jobs = [{"name": f"{s}/{c}/{par}", "model": cfg, "train": dict(opts, fsdp=par == "fsdp", precision="bf16"),
             "batch": rows, "seq": seq}
            for s, cfg in PARALLEL_SIZES.items() for c, opts in CONFIGS.items() for par in ("ddp", "fsdp")]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    _torchrun(2, [str(HERE / "plan_dist_worker.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
              _env(LOPT_PLAN_DEVICE="cuda"))
    out = json.loads((tmp_path / "out.json").read_text())
    for job in jobs:
        s, c, par = job["name"].split("/")
        row = plan_parallel(dict(job["model"]), nproc=2, parallel=par, batch_size=rows, max_length=seq,
                            precision="bf16", methods=[c], gradient_checkpointing="off")[0]
        for rank, m in enumerate(out):
            m = m[job["name"]]
            where = f"{job['name']} rank {rank}: plan {row.peak} / measured {m['resident'] + m['live']}"
            assert m["resident"] == pytest.approx(row.weights + row.optimizer, rel=0.01), where
            assert row.saved_visible == pytest.approx(m["saved"], rel=0.10), where
            assert row.peak == pytest.approx(m["resident"] + m["live"], rel=0.15), where
