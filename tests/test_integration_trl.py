"""lopt.integrations.trl: any lopt method in a user's own TRL / transformers Trainer script.

On a tiny model, fp32, a few steps: at method e2e the wrapped SFTTrainer is the plain SFTTrainer; at
lopt's default and the paper's setting it trains the weights ``lopt train`` trains from the same data
order and options; a user-built GRPOTrainer / DPOTrainer wrapped this way trains the weights ``lopt
grpo`` / ``lopt dpo`` train (those commands run through the same code); checkpoints are plain; options
lopt cannot honour are one-line errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.engine.config import LoPTError
from lopt.integrations.trl import LoPTTrainerMixin, wrap_trainer

from conftest import addition_rows, save_tiny, write_jsonl

LR = 1e-3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-trl"), layers=4, eos_token_id=3)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("trl-data") / "qa.jsonl", addition_rows()[:16])


def sft_args(out, **kw):
    from trl import SFTConfig

    # fp32 on the CPU (SFTConfig's default is bf16), no progress bar, nothing reported.
    opts = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=LR, bf16=False,
                use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    return SFTConfig(**{**opts, **kw})


def lopt_ordered_dataset(tiny_dir, qa_file):
    """lopt train's tokenised examples in the order its first epoch visits them (lopt.data.Batches)."""
    import datasets

    from lopt.data import build_sft_dataset

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    examples, _ = build_sft_dataset(str(qa_file), tok, max_length=512)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    return datasets.Dataset.from_list([examples[i] for i in order]), tok


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_same_weights(got, ref, atol=0.0):
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=atol, msg=k)


# ----------------------------------------------------------------------------- SFT


def test_e2e_is_the_plain_sft_trainer(tiny_dir, qa_file, tmp_path):
    from trl import SFTTrainer

    ds, tok = lopt_ordered_dataset(tiny_dir, qa_file)
    runs = {}
    for name in ("plain", "e2e"):
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=sft_args(tmp_path / name),
                             train_dataset=ds, processing_class=tok)
        if name == "e2e":
            trainer = wrap_trainer(trainer, method="e2e")
            assert isinstance(trainer, SFTTrainer) and isinstance(trainer, LoPTTrainerMixin)
        trainer.train()
        runs[name] = losses(trainer), weights(trainer.model)
    assert len(runs["e2e"][0]) == 3
    torch.testing.assert_close(runs["e2e"][0], runs["plain"][0], rtol=1e-5, atol=0)
    assert_same_weights(runs["e2e"][1], runs["plain"][1])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert not torch.allclose(base["model.layers.0.mlp.up_proj.weight"], runs["e2e"][1]["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("setting", ["default", "paper"])
def test_lopt_in_sft_trainer_is_lopt_train(tiny_dir, qa_file, tmp_path, setting):
    """The same data order, loss normalisation (a micro-batch's mean over its labelled tokens), LR
    schedule (cosine without warm-up: lopt's and transformers' agree), clipping (per block on closed
    steps) and optimizer as ``lopt train``: the same weights. The default: the boundary opens every 4th
    step (step 0 here), a tied head kept tied; the paper's: --task-grad-every 0 (local loss, lower lr)."""
    from trl import SFTTrainer

    from lopt.recipes.sft import TrainConfig, train

    options = {} if setting == "default" else {"task_grad_every": 0}
    res = train(TrainConfig(model=str(tiny_dir), dataset=str(qa_file), output_dir=str(tmp_path / "cli"), lr=LR,
                            batch_size=4, max_steps=3, warmup_ratio=0.0, precision="fp32", device="cpu",
                            progress=False, seed=0, **options))
    ds, tok = lopt_ordered_dataset(tiny_dir, qa_file)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir),
                         args=sft_args(tmp_path / "trl", train_sampling_strategy="sequential", lr_scheduler_type="cosine",
                                       max_grad_norm=1.0, save_strategy="steps", save_steps=3),
                         train_dataset=ds, processing_class=tok)
    trainer = wrap_trainer(trainer, method="lopt", **options)
    trainer.train()
    cli = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(losses(trainer), [r["loss"] for r in cli if "loss" in r], rtol=1e-5, atol=0)
    assert (trainer.state.log_history[0].get("aux_loss") is not None) == (setting == "paper")
    assert trainer.lopt_model.tied == (setting == "default")
    # Adam's first step moves a weight by lr * g / (|g| + eps): for the few weights whose gradient is
    # near eps, float rounding in g (lopt's chunked loss against TRL's fused head) shows up as a few
    # percent of one step, hence the absolute tolerance of 0.05 lr.
    assert_same_weights(weights(trainer.model), weights(res.model.plain_model()), atol=0.05 * LR)
    # The checkpoint is a plain transformers one (no local heads), with lopt's run record.
    ckpt = tmp_path / "trl" / "checkpoint-3"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not any("heads" in k for k in f.keys())
    assert json.loads((ckpt / "lopt_run.json").read_text())["method"] == "lopt"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(ckpt)(ids).logits,
                                   trainer.model(ids).logits, rtol=1e-5, atol=1e-6)


def test_resume_from_a_checkpoint_is_the_uninterrupted_run(tiny_dir, qa_file, tmp_path):
    """save_steps + trainer.train(resume_from_checkpoint=...) under the paper's LoPT (local heads in
    lopt_state.pt, the optimizer, schedule and data position in the trainer's files): the same weights."""
    from trl import SFTTrainer

    ds, tok = lopt_ordered_dataset(tiny_dir, qa_file)

    def run(out, steps, resume=None):
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir),
                             args=sft_args(out, max_steps=steps, save_strategy="steps", save_steps=2),
                             train_dataset=ds, processing_class=tok)
        wrap_trainer(trainer, method="lopt", task_grad_every=0).train(resume_from_checkpoint=resume)
        return weights(trainer.model), weights(trainer.lopt_model.heads)

    full = run(tmp_path / "full", 4)  # its checkpoint-2 stands for a run stopped after step 2
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    for got, want in zip(resumed, full):
        assert_same_weights(got, want)


def test_plain_transformers_trainer_with_grad_accumulation(tiny_dir, qa_file, tmp_path):
    """transformers.Trainer (the model computes its own loss) under LoPT with gradient accumulation:
    trains, logs the local loss, and writes a plain model with trainer.save_model."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    ds, tok = lopt_ordered_dataset(tiny_dir, qa_file)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=LR, use_cpu=True, report_to="none",
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok), processing_class=tok)
    trainer = wrap_trainer(trainer, method="lopt", task_grad_every=0, num_blocks=2)
    before = weights(trainer.model)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["aux_loss"] > 0 for h in logged)
    after = weights(trainer.model)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    trainer.save_model(str(tmp_path / "final"))
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert not any("heads" in k for k in f.keys())
    assert (tmp_path / "final" / "lopt_run.json").is_file()


# ----------------------------------------------------------------------------- GRPO and DPO against the commands


def test_grpo_trainer_is_lopt_grpo(tiny_dir, qa_file, tmp_path):
    """A GRPOTrainer the user builds (its reference loaded from the model's path, TRL's cosine schedule,
    AdamW) and wraps equals ``lopt grpo`` with the same options (which builds its own through the same
    integration)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from lopt.recipes.grpo import GRPORunConfig, build_prompts, grpo, load_task
    from lopt.rewards import resolve_rewards

    reward = str(tmp_path / "r.py:by_length")
    (tmp_path / "r.py").write_text("from lopt.rewards import completion_text\n"
                                   "def by_length(completions, **kw):\n"
                                   "    return [float(len(completion_text(c))) for c in completions]\n")
    cfg = GRPORunConfig(model=str(tiny_dir), task=str(qa_file), output_dir=str(tmp_path / "cli"), batch_size=4,
                        num_generations=4, max_completion_length=8, max_steps=2, lr=LR, progress=False, beta=0.04,
                        reward=[reward], task_grad_every=0, device="cpu", precision="fp32")
    cli = grpo(cfg)
    rows, fmt, _ = load_task(str(qa_file))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts, _ = build_prompts(rows, tok, cli.summary["data"]["instruction"], 512)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, learning_rate=LR, beta=0.04, loss_type="dapo",
                      lr_scheduler_type="cosine", optim="adamw_torch", use_cpu=True, bf16=False, report_to="none",
                      disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0, disable_dropout=True,
                      activation_checkpointing=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), reward_funcs=resolve_rewards([reward], fmt),
                          args=args, train_dataset=datasets.Dataset.from_list(prompts), processing_class=tok)
    trainer = wrap_trainer(trainer, method="lopt", task_grad_every=0)
    trainer.train()
    assert_same_weights(weights(trainer.model), weights(cli.model.plain_model()))


def test_dpo_trainer_is_lopt_dpo(tiny_dir, tmp_path):
    import datasets
    from trl import DPOConfig, DPOTrainer

    from lopt.recipes.dpo import DPORunConfig, dpo, synthetic_gsm8k_pairs

    from test_dpo import gsm8k_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_gsm8k_pairs(write_jsonl(tmp_path / "g.jsonl", gsm8k_rows(8))))
    cli = dpo(DPORunConfig(model=str(tiny_dir), dataset=str(pairs), output_dir=str(tmp_path / "cli"), batch_size=2,
                           max_steps=2, lr=LR, progress=False, device="cpu", precision="fp32", retention="kl"))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=2, learning_rate=LR,
                     beta=0.1, max_length=1024, lr_scheduler_type="cosine", optim="adamw_torch", use_cpu=True,
                     bf16=False, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0,
                     activation_checkpointing=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer = wrap_trainer(trainer, method="lopt")
    trainer.train()
    assert trainer.lopt_model.lopt_config.task_grad_every == 4
    assert_same_weights(weights(trainer.model), weights(cli.model.plain_model()))
    # lopt dpo measured retention (--retention kl) through the integration: the last step's record and the summary.
    last = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and last["retention"]["kl"] > 0
    assert cli.summary["retention"]["kl"] == last["retention"]["kl"]


# ----------------------------------------------------------------------------- what lopt cannot honour


def test_options_lopt_cannot_honour_are_one_line_errors(tiny_dir, qa_file, tmp_path):
    from trl import SFTTrainer

    ds, tok = lopt_ordered_dataset(tiny_dir, qa_file)

    def trainer(**kw):
        return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=sft_args(tmp_path, **kw),
                          train_dataset=ds, processing_class=tok)

    cases = [
        (dict(gradient_checkpointing_kwargs={"use_reentrant": True}), {}, r"use_reentrant"),
        ({}, {"lambda_auxx": 1.0}, r"unknown option 'lambda_auxx'"),
        ({}, {"method": "e2e", "task_grad_every": 4}, r"--task-grad-every .* needs --method lopt"),
        ({}, {"retention": "kll"}, r"wrap_trainer\(retention=\.\.\.\) must be none, kl or suite"),
    ]
    for args_kw, wrap_kw, match in cases:
        with pytest.raises(LoPTError, match=match) as e:
            wrap_trainer(trainer(**args_kw), **wrap_kw)
        assert "\n" not in str(e.value)
    import transformers

    with pytest.MonkeyPatch.context() as mp:  # as under torchrun --nproc_per_node 2
        mp.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
        with pytest.raises(LoPTError, match=r"2 processes: method lopt's local losses"):
            wrap_trainer(trainer())
    t = wrap_trainer(trainer())
    with pytest.raises(LoPTError, match="already wrapped"):
        wrap_trainer(t)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LoPTError, match=r"optimizers=\(\.\.\.\)"):
        wrap_trainer(SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=ds, processing_class=tok,
                                optimizers=(opt, None)))
    from peft import LoraConfig

    with pytest.raises(LoPTError, match=r"peft_config=: .* use method='lora'"):
        wrap_trainer(SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=sft_args(tmp_path),
                                train_dataset=ds, processing_class=tok, peft_config=LoraConfig(r=4)), method="e2e")


# ----------------------------------------------------------------------------- the guide's example


def test_the_guides_example_runs(tiny_dir, tmp_path, monkeypatch):
    """docs/trl.md's script, as written but for the model, the data and the length of the run (and fp32
    on this CPU): an unmodified SFTTrainer script plus the two added lines."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'retention="kl"' in code
    assert "wrap_trainer(trainer" in code and "SFTTrainer(" in code
    subs = {r'MODEL = ".*"': f'MODEL = {str(tiny_dir)!r}',
            r'dataset = load_dataset\(.*\)': 'dataset = _tiny_dataset',
            r'max_steps=\d+': 'max_steps=2, bf16=False, use_cpu=True, disable_tqdm=True',
            r'save_steps=\d+': 'save_steps=1'}
    for pattern, new in subs.items():
        code, n = re.subn(pattern, new, code)
        assert n == 1, pattern
    import datasets

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
             "completion": [{"role": "assistant", "content": str(a + b)}]} for a in range(1, 5) for b in range(1, 3)]
    monkeypatch.chdir(tmp_path)
    scope = {"_tiny_dataset": datasets.Dataset.from_list(rows)}
    exec(compile(code, "docs/trl.md", "exec"), scope)
    out = tmp_path / "runs" / "sft-lopt"
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    # retention="kl": the base recorded before the first step, its KL logged at the last.
    kl = [h["retention/kl"] for h in trainer.state.log_history if "retention/kl" in h]
    assert len(kl) == 1 and kl[0] > 0
    assert json.loads((out / "lopt_run.json").read_text())["method"] == "lopt"
    assert (out / "checkpoint-2" / "lopt_state.pt").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
