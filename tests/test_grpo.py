"""`lopt grpo` on a tiny random model: a step per method, LoPT's gradient boundary inside TRL's step
(lower-block gradients independent of the rewards), checkpoints, resume, Ctrl-C, bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import signal

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainerCallback

from lopt.cli import main
from lopt.recipes.grpo import GRPORunConfig, grpo, load_task

from conftest import addition_rows, save_tiny, write_jsonl

LAYERS = 4  # boundary at layer 2 under LoPT k=2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-grpo"), layers=LAYERS, eos_token_id=3)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("grpo-data") / "qa.jsonl", addition_rows())


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    """Two custom rewards that rank the same completions differently (and a non-callable)."""
    p = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    p.write_text(
        "from lopt.rewards import completion_text\n"
        "def by_length(completions, **kw):\n"
        "    return [float(len(completion_text(c))) for c in completions]\n"
        "def by_checksum(completions, **kw):\n"
        "    return [float(sum(map(ord, completion_text(c))) % 7) for c in completions]\n"
        "NOT_A_FUNCTION = 3\n")
    return p


def config(tiny_dir, qa_file, out, **kw) -> GRPORunConfig:
    opts = dict(model=str(tiny_dir), task=str(qa_file), output_dir=str(out), batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=2, lr=1e-3, progress=False, beta=0.04)
    opts.setdefault("task_grad_every", 0)  # the paper's mechanism unless a test says otherwise
    opts.update(kw)
    return GRPORunConfig(**opts)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class GradCapture(TrainerCallback):
    """The gradients right before the first optimizer step (after clipping)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def split_by_layer(grads: dict[str, torch.Tensor], boundary: int):
    def layer(name):
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1]) if "layers" in parts else None
    lower = {n: g for n, g in grads.items() if (layer(n) is not None and layer(n) < boundary) or "embed" in n}
    upper = {n: g for n, g in grads.items() if layer(n) is not None and layer(n) >= boundary}
    return lower, upper


@pytest.mark.parametrize("method", ["lopt", "lopt-default", "e2e", "freeze-lower", "lora"])
def test_grpo_step_and_plain_checkpoint(tiny_dir, qa_file, reward_file, tmp_path, method):
    out = tmp_path / method
    # lopt-default: grpo's default under --method lopt (the boundary opens every 4th step, no local loss)
    extra = {"task_grad_every": None} if method == "lopt-default" else {}
    method = method.split("-default")[0]
    # The built-in rewards are 0 for every completion of a random model (no advantage, no policy
    # gradient); a length reward gives one, and the format reward rides along.
    res = grpo(config(tiny_dir, qa_file, out, method=method, reward=[f"{reward_file}:by_length", "format"], **extra))
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert {"reward", "reward_std", "kl", "loss", "aux_loss", "tokens_per_s", "peak_mem_mb", "lr",
                "grad_norm"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
    assert (m[0]["aux_loss"] is not None) == (method == "lopt" and not extra)
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["command"] == "grpo" and info["method"] == method and info["versions"]["trl"]
    assert res.summary["steps"] == 2 and not res.summary["interrupted"]
    # plain transformers checkpoint: no lopt heads inside, same logits as the trained model
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("heads" in k or "lora" in k for k in f.keys())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    res.model.eval()
    with torch.no_grad():
        ref = res.model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, ref, atol=1e-4)  # it did train


@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_lower_gradients_do_not_depend_on_rewards(tiny_dir, qa_file, reward_file, tmp_path, method):
    grads = []
    for fn in ("by_length", "by_checksum"):
        cap = GradCapture()
        # A small clip norm so that clipping acts: under LoPT it is per block and must not couple
        # the lower block's gradient to the policy gradient.
        grpo(config(tiny_dir, qa_file, tmp_path / fn, method=method, max_steps=1, max_grad_norm=0.01,
                    reward=[f"{reward_file}:{fn}"], beta=0.0), callbacks=[cap])
        grads.append(split_by_layer(cap.grads, LAYERS // 2))
    (lower_a, upper_a), (lower_b, upper_b) = grads
    assert lower_a and upper_a and lower_a.keys() == lower_b.keys()
    assert all(g.abs().sum() > 0 for g in lower_a.values())  # the lower block did learn something
    upper_differs = any(not torch.allclose(upper_a[n], upper_b[n]) for n in upper_a)
    lower_same = all(torch.equal(lower_a[n], lower_b[n]) for n in lower_a)
    assert upper_differs, "the two rewards should give different policy gradients"
    if method == "lopt":
        assert lower_same, "under LoPT the lower block must learn from its local loss only"
    else:
        assert not lower_same  # the same check is sensitive: end to end, the rewards reach the lower block


def test_sigint_checkpoint_and_resume_match_uninterrupted_run(tiny_dir, qa_file, tmp_path):
    full = tmp_path / "full"
    grpo(config(tiny_dir, qa_file, full, max_steps=3))

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    part = tmp_path / "part"
    args = ["grpo", "--model", str(tiny_dir), "--task", str(qa_file), "--output-dir", str(part),
            "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "8", "--max-steps", "3",
            "--lr", "1e-3", "--no-progress", "--beta", "0.04", "--task-grad-every", "0"]
    from lopt.recipes.grpo import GRPORunConfig as Cfg, cmd_grpo
    from lopt.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(args), Cfg, command="grpo")
    assert cmd_grpo(cfg, callbacks=[Interrupt()]) == 130
    ckpt = part / "checkpoint-1"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "lopt_state.pt").is_file()
    assert not (part / "model.safetensors").exists()  # no final model for an interrupted run
    AutoModelForCausalLM.from_pretrained(ckpt)  # a plain checkpoint
    assert main(args + ["--resume"]) == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("reward", "loss", "kl", "aux_loss"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-7), key
    wa = AutoModelForCausalLM.from_pretrained(full).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(part).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


def test_joint_schedule_and_grad_accum(tiny_dir, qa_file, tmp_path):
    """The joint schedule and gradient accumulation run inside TRL's step and give the blockwise
    schedule's numbers (same local loss scale, same lower update)."""
    a = tmp_path / "blockwise"
    b = tmp_path / "joint"
    grpo(config(tiny_dir, qa_file, a, batch_size=4, grad_accum=2, max_steps=2))
    grpo(config(tiny_dir, qa_file, b, batch_size=4, grad_accum=2, max_steps=2, schedule="joint"))
    ma, mb = read_metrics(a), read_metrics(b)
    for key in ("reward", "aux_loss", "loss", "grad_norm"):
        assert [r[key] for r in mb] == pytest.approx([r[key] for r in ma], rel=1e-4, abs=1e-7), key


def test_grad_accum_scales_the_local_loss(tiny_dir, qa_file, tmp_path):
    """With the same completions, 2 micro-batches of 4 must give the lower blocks the gradient of one
    batch of 8 (the local loss is averaged like TRL's loss), not twice it."""
    caps = []
    for bs, ga in ((8, 1), (4, 2)):
        cap = GradCapture()
        grpo(config(tiny_dir, qa_file, tmp_path / f"b{bs}", batch_size=bs, grad_accum=ga,
                    steps_per_generation=8 // bs, num_generations=8, max_steps=1, max_grad_norm=None),
             callbacks=[cap])
        caps.append(split_by_layer(cap.grads, LAYERS // 2)[0])
    one, two = caps
    # The same 8 completions of one prompt either way (one generation round). The local loss is a
    # per-token mean per micro-batch, so the two halves' average differs from the whole batch's mean
    # only through unequal completion lengths; a missing 1/2 scale would double the gradient.
    n1 = torch.sqrt(sum(g.pow(2).sum() for g in one.values()))
    n2 = torch.sqrt(sum(g.pow(2).sum() for g in two.values()))
    assert float(n2 / n1) == pytest.approx(1.0, rel=0.2)


def test_gsm8k_preset_reads_the_local_file(shared_data):
    rows, fmt, stats = load_task("gsm8k", "train", limit=5, data_dir=shared_data)
    assert fmt == "gsm8k" and len(rows) == 5 and stats["source"] == str(shared_data / "gsm8k" / "train.jsonl")
    assert rows[0]["answer"] == "72"  # Natalia's clips
    assert not any("####" in r["answer"] for r in rows)


def test_gsm8k_preset_in_a_data_folder_without_it_is_an_error(tmp_path, monkeypatch):
    from lopt.data import DataError

    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="gsm8k/train.jsonl not found.*give --data-dir DIR or set LOPT_DATA_DIR"):
        load_task("gsm8k", "train", data_dir=tmp_path)  # no fall-back to the hub or a guessed folder
    monkeypatch.setenv("LOPT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="LOPT_DATA_DIR .*nowhere: no such folder"):
        load_task("gsm8k", "train")


def test_gsm8k_task_runs_on_the_local_file(tiny_dir, shared_data, tmp_path):
    out = tmp_path / "gsm8k"
    # The tiny byte-level tokenizer makes GSM8K questions long; the short ones fit the tiny model.
    res = grpo(config(tiny_dir, None, out, task="gsm8k", limit=60, instruction="", max_prompt_length=200,
                      max_steps=1, data_dir=str(shared_data)))
    assert res.summary["data"]["dropped_too_long"] > 0 and res.summary["data"]["prompts"] > 0
    assert read_metrics(out)[0]["reward"] is not None


def test_boxed_task_from_a_file(tiny_dir, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"Compute {a}/2.", "solution": f"It is \\boxed{{\\frac{{{a}}}{{2}}}}."})
                              for a in range(1, 9)) + "\n")
    rows, fmt, _ = load_task(str(data))
    assert fmt == "boxed" and rows[0]["answer"] == "\\frac{1}{2}"
    res = grpo(config(tiny_dir, data, tmp_path / "out", max_steps=1))
    assert res.summary["steps"] == 1


@pytest.mark.parametrize("extra, match", [
    (["--reward", "no_such_module_xyz:fn"], "cannot import 'no_such_module_xyz'"),
    (["--reward", "lopt.rewards:no_such_reward"], "has no attribute 'no_such_reward'"),
    (["--reward", "REWARD_FILE:NOT_A_FUNCTION"], "not a function"),
    (["--reward", "/nonexistent/r.py:fn"], "file not found"),
    (["--num-generations", "3"], "must be a multiple of num_generations"),
    (["--reward", "accuracy", "--reward-weights", "1", "2"], "2 reward weights for 1 rewards"),
    (["--task", "WRONG_COLUMNS"], "needs a question column"),
    (["--task", "/nonexistent/data.jsonl"], "file not found"),
    (["--resume"], "nothing to resume"),
    (["--max-prompt-length", "3"], "longer than max_prompt_length=3"),
    (["--use-vllm"], "vllm"),
])
def test_bad_input_is_one_clear_line(tiny_dir, qa_file, reward_file, tmp_path, capsys, extra, match):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    extra = [str(wrong) if e == "WRONG_COLUMNS" else e.replace("REWARD_FILE", str(reward_file)) for e in extra]
    if "--use-vllm" in extra and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here, so --use-vllm is not an error")
    rc = main(["grpo", "--model", str(tiny_dir), "--task", str(qa_file), "--output-dir", str(tmp_path / "bad"),
               "--max-steps", "1", "--batch-size", "4", "--num-generations", "4", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("lopt grpo: error:")]
    assert line and match in line[0], err
    assert "Traceback" not in err
