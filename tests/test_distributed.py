"""LoPT on torch.distributed (gloo, CPU, 2 processes, tiny model): data parallel and FSDP give the
weights of one process with the global batch; the block-parallel pipeline trains and saves a plain
checkpoint of its blocks put together; ranks stop together; resume works.

Each group of runs is one ``torchrun`` launch of tests/dist_worker.py (process start-up dominates),
compared against single-process runs in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lopt.parallel.data_parallel import GradSync, shard_rows, token_counts
from lopt.recipes.sft import TrainConfig, train

from conftest import make_tiny_model, make_tokenizer

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny = root / "tiny"
    make_tiny_model("llama", layers=4, tie=True).save_pretrained(tiny)
    make_tokenizer().save_pretrained(tiny)
    # Unequal lengths (the filler makes prompts 0-2 sentences longer) so ranks hold different token
    # counts and padding: the exact token normalisation is exercised.
    rows = [{"question": f"What is {a} + {b}?" + " Please think." * (a % 3),
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(1, 9) for b in range(1, 5)]
    data = root / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, tiny, data


def base(setup, out: Path, **kw) -> dict:
    _, tiny, data = setup
    # task_grad_every 0, head untied: the cases test the paper's mechanism unless they say otherwise
    # ("lopt-default")
    cfg = dict(model=str(tiny), dataset=str(data), output_dir=str(out), lr=1e-2, warmup_ratio=0.0,
               progress=False, max_steps=3, max_grad_norm=None, seed=0, task_grad_every=0, tied_head=False)
    cfg.update(kw)
    return cfg


def launch(root: Path, name: str, jobs: list[dict], timeout: float = 600) -> None:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([*TORCHRUN, str(HERE / "dist_worker.py"), str(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {name} failed:\n{proc.stderr[-6000:]}")


def single(setup, out: Path, **kw) -> Path:
    torch.set_num_threads(1)
    train(TrainConfig(**base(setup, out, **kw)))
    return out


def assert_same_weights(a: Path, b: Path, rtol: float = 1e-4, atol: float = 5e-5) -> None:
    # atol: AdamW divides by the root of the squared-gradient average, so an element whose gradient is
    # ~0 moves by an amount that float summation order can change (seen: 1e-5 at lr 1e-2, once). A
    # wrong loss normalisation moves almost every element by ~2e-2 here (checked by breaking it).
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_ranks_agree(out: Path) -> None:
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- unit pieces


def test_shard_rows_slices_and_trims():
    ids = torch.arange(5 * 6).view(5, 6)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 3 + [0] * 3, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    s0, real0 = shard_rows(b, 0, 2)
    s1, real1 = shard_rows(b, 1, 2)
    assert real0 and real1
    assert s0["input_ids"].tolist() == ids[:3].tolist()  # contiguous, sizes 3 + 2
    assert s1["input_ids"].shape == (2, 4)  # rows 3-4: longest has 4 real tokens
    assert token_counts(s0)[1] + token_counts(s1)[1] == int(mask.sum())
    empty, real = shard_rows({k: v[:1] for k, v in b.items()}, 1, 2)
    assert not real and empty["input_ids"].shape[0] == 1


def test_gradsync_keeps_missing_gradients_missing():
    # One process group of size 1 is enough to check the bookkeeping of the flat buffer.
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
        a.grad = torch.arange(6.0).view(2, 3)
        sync = GradSync([[a, b]], world_size=1)
        sync.launch(0)
        assert a.grad is None  # moved into the buffer
        sync.reset()
        assert torch.equal(a.grad, torch.arange(6.0).view(2, 3)) and b.grad is None
    finally:
        dist.destroy_process_group()


def test_fsdp_and_pipeline_need_a_launcher(setup, tmp_path):
    from lopt import LoPTError

    for flag in ("fsdp", "pipeline"):
        with pytest.raises(LoPTError, match="torchrun"):
            train(TrainConfig(**base(setup, tmp_path / flag, **{flag: True})))


# ----------------------------------------------------------------------------- data parallel

DDP_CASES = {
    # name: options; per process batch 2 (global 4) against one process with batch 4
    "lopt": {},  # blockwise, per-block step (synchronous sync of each lower block) with per-block clipping
    "lopt-async": {"per_block_step": "off", "max_grad_norm": 1.0},  # async all_reduce per block, global clip
    "lopt-joint": {"schedule": "joint"},
    "lopt-accum": {"grad_accum": 2},
    "lopt-every2": {"lower_every": 2},  # the lower blocks skip steps 2: nothing of theirs is reduced then
    # steps 0 and 2 open the boundary (the task gradient reaches the lower blocks, reduced with the
    # rest at the end); step 1 is a closed LoPT step with the per-block step
    "lopt-tg2": {"task_grad_every": 2, "lambda_aux": 1.0},
    # lopt train's default: the boundary opens every 4th step, the tied LM head stays tied
    "lopt-default": {"task_grad_every": None, "tied_head": None},
    "e2e": {"method": "e2e"},
    "freeze-lower": {"method": "freeze-lower"},
    "lora": {"method": "lora", "lr": 5e-2},
    # the trainable layers change every step: every rank freezes the same ones and reduces the others
    "lisa": {"method": "lisa", "lisa_layers": 2, "lisa_interval": 1},
    "badam": {"method": "badam", "badam_switch_every": 1, "badam_order": "random"},
}


@pytest.fixture(scope="module")
def ddp_runs(setup):
    root = setup[0]
    jobs = []
    for name, opts in DDP_CASES.items():
        per_rank = 1 if name == "lopt-accum" else 2
        jobs.append({"config": base(setup, root / "ddp" / name, batch_size=per_rank,
                                    **{k: v for k, v in opts.items()})})
    # Only rank 1 asks to stop after step 2: both must stop there and rank 0 must save checkpoint-2.
    jobs.append({"config": base(setup, root / "ddp" / "stop", batch_size=2, max_steps=5),
                 "stop_on_rank": 1, "stop_at": 2})
    # Rank 1's Ctrl-C lands while the ranks agree on step 2: it is acted on after step 3, not lost.
    jobs.append({"config": base(setup, root / "ddp" / "ctrl-c", batch_size=2, max_steps=6),
                 "ctrl_c_in_reduce": [1, 2]})
    jobs.append({"config": base(setup, root / "ddp" / "full", batch_size=2, max_steps=4, save_every=2)})
    jobs.append({"config": base(setup, root / "ddp" / "resumed", batch_size=2, max_steps=4,
                                resume=str(root / "ddp" / "full" / "checkpoint-2"))})
    launch(root, "ddp", jobs)
    return root / "ddp"


@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp_matches_one_process(setup, ddp_runs, tmp_path, name):
    opts = dict(DDP_CASES[name])
    ref = single(setup, tmp_path / name, batch_size=2 if name == "lopt-accum" else 4, **opts)
    assert_same_weights(ddp_runs / name, ref)
    assert_ranks_agree(ddp_runs / name)
    # the logged (global) loss is the one-process loss of the same global batch
    got = [json.loads(x)["loss"] for x in (ddp_runs / name / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(want, rel=1e-4)


def test_ctrl_c_during_the_stop_reduce_is_not_lost(ddp_runs):
    out = ddp_runs / "ctrl-c"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "checkpoint-3" / "trainer_state.pt").is_file()
    assert [torch.load(out / f"rank{r}.pt")["summary"]["steps"] for r in (0, 1)] == [3, 3]


def test_ddp_ranks_stop_together(ddp_runs):
    out = ddp_runs / "stop"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()
    s0, s1 = torch.load(out / "rank0.pt")["summary"], torch.load(out / "rank1.pt")["summary"]
    assert s0["steps"] == s1["steps"] == 2 and s0["interrupted"] and s1["interrupted"]


def test_ddp_resume_reproduces_uninterrupted_run(ddp_runs):
    assert_same_weights(ddp_runs / "resumed", ddp_runs / "full", rtol=1e-5, atol=1e-7)


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launchers_run_the_cli(setup, tmp_path, launcher):
    # accelerate launch --multi_gpu starts its processes through torchrun; without a GPU they use gloo.
    # (--cpu would start one process only.)
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    _, tiny, data = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if launcher == "accelerate":
        env["MASTER_PORT"] = str(_free_port())
    out = tmp_path / "cli"
    prefix = TORCHRUN if launcher == "torchrun" else [*ACCELERATE, "--main_process_port", env.get("MASTER_PORT", "0")]
    proc = subprocess.run([*prefix, "-m", "lopt", "train", "--model", str(tiny), "--dataset", str(data),
                           "--output-dir", str(out), "--batch-size", "2", "--max-steps", "2", "--no-progress",
                           "--sample-prompt", "What is 1 + 1?"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (data parallel, global batch 4)" in proc.stderr
    assert proc.stdout.count("task loss first -> last") == 1  # rank 0 reports, once
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    AutoModelForCausalLM.from_pretrained(out)


# ----------------------------------------------------------------------------- FSDP

FSDP_CASES = {
    "lopt": {"per_block_step": "off"},  # blockwise: the local backward runs inside the forward
    "lopt-joint": {"schedule": "joint"},
    "lopt-accum": {"grad_accum": 2},
    "lopt-clip": {"per_block_step": "off", "max_grad_norm": 1.0},
    "lopt-tg2": {"task_grad_every": 2, "lambda_aux": 1.0},  # open steps: FSDP reduces the lower blocks too
    "e2e": {"method": "e2e"},
    "freeze-lower": {"method": "freeze-lower"},
}


@pytest.fixture(scope="module")
def fsdp_runs(setup):
    root = setup[0]
    jobs = [{"config": base(setup, root / "fsdp" / name, batch_size=1 if name == "lopt-accum" else 2,
                            fsdp=True, **opts)} for name, opts in FSDP_CASES.items()]
    jobs.append({"config": base(setup, root / "fsdp" / "full", batch_size=2, max_steps=4, save_every=2,
                                fsdp=True, per_block_step="off")})
    jobs.append({"config": base(setup, root / "fsdp" / "resumed", batch_size=2, max_steps=4, fsdp=True,
                                per_block_step="off", resume=str(root / "fsdp" / "full" / "checkpoint-2"))})
    launch(root, "fsdp", jobs)
    return root / "fsdp"


@pytest.mark.parametrize("name", list(FSDP_CASES))
def test_fsdp_matches_one_process(setup, fsdp_runs, tmp_path, name):
    ref = single(setup, tmp_path / name, batch_size=2 if name == "lopt-accum" else 4, **FSDP_CASES[name])
    assert_same_weights(fsdp_runs / name, ref)  # the checkpoint is the gathered full model
    assert_ranks_agree(fsdp_runs / name)


def test_fsdp_resume_reproduces_uninterrupted_run(fsdp_runs):
    assert_same_weights(fsdp_runs / "resumed", fsdp_runs / "full", rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipeline_run(setup):
    root = setup[0]
    out = root / "pipe" / "run"
    full, resumed = root / "pipe" / "full", root / "pipe" / "resumed"
    launch(root, "pipe", [
        {"config": base(setup, out, batch_size=8, max_steps=20, lr=3e-3, max_grad_norm=1.0, pipeline=True)},
        {"config": base(setup, full, batch_size=4, max_steps=6, save_every=3, pipeline=True)},
        {"config": base(setup, resumed, batch_size=4, max_steps=6, pipeline=True,
                        resume=str(full / "checkpoint-3"))},
        {"config": base(setup, root / "pipe" / "match", pipeline=True, **MATCH)}])
    return out


# lambda_aux 0: the lower block's update is zero, so the local heads' random starts (drawn
# differently in one process and in the pipeline) do not matter, and the upper block must match.
MATCH = dict(batch_size=2, grad_accum=2, max_steps=3, lambda_aux=0.0, gradient_checkpointing="lower-blocks",
             selective_checkpointing="last-block")


def test_pipeline_trains(pipeline_run):
    m = [json.loads(x) for x in (pipeline_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == list(range(1, 21))
    assert all(r["aux_loss"] is not None and r["grad_norm"] is not None for r in m)
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_pipeline_checkpoint_is_the_blocks_put_together(setup, pipeline_run):
    _, tiny, _ = setup
    own0 = torch.load(pipeline_run / "rank0.pt")["params"]
    own1 = torch.load(pipeline_run / "rank1.pt")["params"]
    # Each rank trained only its block: rank 0 the embeddings and layers 0-1, rank 1 layers 2-3, the
    # final norm and the (untied) LM head.
    assert any("embed_tokens" in k for k in own0) and not any("layers.2." in k for k in own0)
    assert "lm_head.weight" in own1 and not any("embed_tokens" in k for k in own1)
    assembled = AutoModelForCausalLM.from_pretrained(tiny)
    assembled.config.tie_word_embeddings = False
    assembled.lm_head.weight = torch.nn.Parameter(assembled.lm_head.weight.detach().clone())
    missing, unexpected = assembled.load_state_dict({**own0, **own1}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    saved = AutoModelForCausalLM.from_pretrained(pipeline_run)
    base_model = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        want, got, before = assembled(ids).logits, saved(ids).logits, base_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-3)  # it did train


def test_pipeline_upper_block_matches_one_process(setup, pipeline_run, tmp_path):
    """Micro-batches travel down the pipeline with the hidden states (rank 1 reads no data), the head's
    gradient accumulates in the forward, rank 0 has a sparse embedding gradient, and both ranks
    checkpoint (selectively on rank 1): the upper block still trains as in one process."""
    cfg = {**base(setup, tmp_path / "one", **MATCH), "gradient_checkpointing": "off",
           "selective_checkpointing": "off"}
    one = train(TrainConfig(**cfg)).model
    want = {n: p.detach() for n, p in one.plain_model().named_parameters()}
    got = torch.load(pipeline_run.parent / "match" / "rank1.pt")["params"]
    assert "lm_head.weight" in got and any("layers.3." in k for k in got)
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=1e-4, atol=1e-6, msg=n)
    base_model = AutoModelForCausalLM.from_pretrained(setup[1])
    assert not torch.allclose(got["model.layers.3.mlp.up_proj.weight"],
                              base_model.model.layers[3].mlp.up_proj.weight, atol=1e-4)  # it did train
    # The lower block stayed as it was (lambda 0), on both sides.
    low = torch.load(pipeline_run.parent / "match" / "rank0.pt")["params"]
    for n, p in low.items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0, msg=n)


def test_pipeline_resume_reproduces_uninterrupted_run(pipeline_run):
    root = pipeline_run.parent
    assert_same_weights(root / "resumed", root / "full", rtol=0, atol=0)  # nothing is reduced: bitwise
    steps = [json.loads(x)["step"] for x in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("mode", ["ddp", "pipeline"])
def test_ctrl_c_stops_every_rank_at_the_same_step(setup, tmp_path, mode):
    """A terminal's Ctrl-C reaches every process of the group (and torchrun forwards it once more):
    all ranks stop after the same step and rank 0 saves a resumable checkpoint there."""
    import signal
    import time

    _, tiny, data = setup
    out = tmp_path / mode
    cmd = [*TORCHRUN, "-m", "lopt", "train", "--model", str(tiny), "--dataset", str(data), "--output-dir",
           str(out), "--batch-size", "4" if mode == "pipeline" else "2", "--max-steps", "100000", "--no-progress"]
    if mode == "pipeline":
        cmd.append("--pipeline")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() - t0 < 120, "the run did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    ckpt = out / f"checkpoint-{steps[-1]}"
    assert (ckpt / "trainer_state.pt").is_file(), err[-3000:]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == steps[-1] == len(steps)
    if mode == "pipeline":
        assert len(state["ranks"]) == 2 and all(r["optimizer"]["state"] for r in state["ranks"])
    assert "stopped at step" in err


def test_processes_sharing_a_gpu_talk_through_gloo(monkeypatch):
    """NCCL refuses two ranks on one GPU: init_distributed picks gloo for them, and the pipeline's
    messages then go through host memory (gloo's send/recv take CPU tensors only)."""
    from lopt.parallel.context import DistContext, _rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for n_gpu, device, local_rank, local_world, want in [
            (1, "cuda:0", 1, 2, ("cuda:0", True)),   # a 2-stage pipeline tried out on one card
            (1, None, 1, 2, ("cuda:0", True)),       # more processes than GPUs: ranks wrap around
            (2, None, 1, 2, ("cuda:1", False)),      # one GPU each: NCCL
            (2, "cuda", 1, 2, ("cuda:1", False)),
            (1, None, 0, 1, ("cuda:0", False)),      # one process
            (0, "cpu", 1, 2, ("cpu", False))]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=n_gpu: n)
        dev, shared = _rank_device(device, local_rank, local_world)
        assert (str(dev), shared) == want, (n_gpu, device, local_rank, local_world)
    cuda0 = torch.device("cuda", 0)
    assert DistContext(0, 2, 0, cuda0, "gloo").comm_device == torch.device("cpu")
    assert DistContext(0, 2, 0, cuda0, "nccl").comm_device == cuda0
