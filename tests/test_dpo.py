"""`lopt dpo` on a tiny random model: a step per method, LoPT's gradient boundary inside TRL's step
(lower-block gradients independent of the preference labels), the synthetic GSM8K preference set,
checkpoints, resume, bad input."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainerCallback

from lopt.cli import main
from lopt.recipes.dpo import DPORunConfig, corrupt_final_answer, dpo, synthetic_gsm8k_pairs, wrong_answer

from conftest import make_tiny_model, make_tokenizer, save_tiny, write_jsonl

LAYERS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-dpo"), layers=LAYERS)


def gsm8k_rows(n: int = 24):
    return [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in zip(range(3, 3 + n), range(1, 1 + n))]


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "gsm8k.jsonl", gsm8k_rows())


def config(tiny_dir, dataset, out, **kw) -> DPORunConfig:
    opts = dict(model=str(tiny_dir), dataset=str(dataset), output_dir=str(out), batch_size=2, max_steps=2,
                lr=1e-3, progress=False)
    opts.setdefault("task_grad_every", 0)  # the paper's mechanism unless a test says otherwise
    opts.update(kw)
    return DPORunConfig(**opts)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the synthetic set


def test_synthetic_gsm8k_reads_the_data_folder_given_and_never_guesses(tmp_path, monkeypatch):
    from lopt.data import DataError
    from lopt.recipes.dpo import load_preferences

    folder = tmp_path / "data"
    (folder / "gsm8k").mkdir(parents=True)
    write_jsonl(folder / "gsm8k" / "train.jsonl", gsm8k_rows(4))
    tok = make_tokenizer()
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="give --data-dir DIR or set LOPT_DATA_DIR"):
        load_preferences("synthetic-gsm8k", tok)  # no folder given: an error, not a guess
    rows, stats = load_preferences("synthetic-gsm8k", tok, data_dir=folder)
    assert len(rows) == 4 and stats["source"] == f"synthetic-gsm8k:{folder / 'gsm8k' / 'train.jsonl'}"
    monkeypatch.setenv("LOPT_DATA_DIR", str(folder))
    assert load_preferences("synthetic-gsm8k", tok)[0] == rows
    with pytest.raises(DataError, match=r"test\.jsonl not found.*LOPT_DATA_DIR"):
        load_preferences("synthetic-gsm8k", tok, split="test")  # the folder lacks the split: no fall-back


def test_rl_summary_shows_only_the_rows_that_apply(capsys):
    from lopt.recipes.trl_bridge import print_summary

    s = {"method": "lopt", "block_ranges": [[0, 2], [2, 4]], "steps": 2, "total_steps": 2, "interrupted": False,
         "loss_first": 0.69, "loss_last": 0.6, "aux_first": None, "aux_last": None, "tokens_per_s": None,
         "peak_mem_mb": 300.0, "checkpoint": None, "output_dir": "runs/dpo"}
    print_summary(s, 3.0, {"loss": "loss"})
    out = capsys.readouterr().out
    assert "loss first -> last" in out and "300 MiB" in out and "runs/dpo" in out
    assert "aux loss" not in out and "tokens/s" not in out and "| - " not in out


def test_synthetic_pairs_are_deterministic_and_differ_only_in_the_answer(gsm8k_file):
    a = synthetic_gsm8k_pairs(gsm8k_file, seed=0)
    assert a == synthetic_gsm8k_pairs(gsm8k_file, seed=0)
    assert len(a) == 24
    other = synthetic_gsm8k_pairs(gsm8k_file, seed=1)
    assert any(x["rejected"] != y["rejected"] for x, y in zip(a, other))  # the seed matters
    for row, pair in zip(gsm8k_rows(), a):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["prompt"] == [{"role": "user", "content": row["question"]}]
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert "<<" not in chosen and "<<" not in rejected  # calculator annotations removed
        good = int(chosen.rsplit("####", 1)[1])
        bad = int(rejected.rsplit("####", 1)[1])
        assert good == int(row["answer"].rsplit("####", 1)[1]) and bad != good and bad >= 0
        # the reasoning ends in the wrong result too (its last mention of the answer); all else is the same
        head, _, rest = chosen.rsplit("####", 1)[0].rpartition(str(good))
        assert rejected == f"{head}{bad}{rest}#### {bad}"


def test_corrupt_final_answer_and_wrong_answer():
    text = "She pays 1,200 + 50 = $1,250.\n#### $1,250"
    assert corrupt_final_answer(text, 1260) == "She pays 1,200 + 50 = $1260.\n#### $1260"
    assert corrupt_final_answer("3 * 4 = 12 and 12 - 2 = 10\n#### 10", 7) == "3 * 4 = 12 and 12 - 2 = 7\n#### 7"
    import random
    rng = random.Random(0)
    for target in (0.0, 1.0, 7.0, 100.0, 2.5, -3.0):
        for _ in range(20):
            w = wrong_answer(target, rng)
            assert w != target and (target < 0 or w >= 0)
            if float(target).is_integer():
                assert float(w).is_integer()


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_dpo_step_and_plain_checkpoint(tiny_dir, gsm8k_file, tmp_path, method):
    out = tmp_path / method
    res = dpo(config(tiny_dir, f"synthetic-gsm8k:{gsm8k_file}", out, method=method))
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert {"loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "aux_loss", "tokens_per_s", "peak_mem_mb"} <= set(r)
    assert m[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy == reference
    assert (m[0]["aux_loss"] is not None) == (method == "lopt")
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["command"] == "dpo" and info["data"]["synthetic"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("heads" in k for k in f.keys())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    res.model.eval()
    with torch.no_grad():
        ref = res.model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, ref, atol=1e-4)


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("method", ["lopt", "e2e"])
def test_lower_gradients_do_not_depend_on_preferences(tiny_dir, tmp_path, method):
    """Swapping chosen and rejected (and changing beta) changes the DPO gradient's direction and size;
    the lower block must not notice (with per-block clipping the size change cannot leak either)."""
    pairs = synthetic_gsm8k_pairs(write_jsonl(tmp_path / "g.jsonl", gsm8k_rows(8)))
    swapped = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    grads = []
    for name, rows, beta in (("a", pairs, 0.1), ("b", swapped, 0.5)):
        cap = GradCapture()
        dpo(config(tiny_dir, write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / name, method=method,
                   max_steps=1, max_grad_norm=0.01, batch_size=4, beta=beta), callbacks=[cap])
        grads.append(cap.grads)
    a, b = grads
    lower = [n for n in a if (_layer(n) is not None and _layer(n) < LAYERS // 2) or "embed" in n]
    upper = [n for n in a if _layer(n) is not None and _layer(n) >= LAYERS // 2]
    assert lower and upper and all(a[n].abs().sum() > 0 for n in lower)
    assert any(not torch.allclose(a[n], b[n], atol=1e-8) for n in upper)
    # The batch holds the same sequences in the other order ([chosen; rejected]), so only the
    # summation order of the local loss differs.
    same = all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-9) for n in lower)
    assert same if method == "lopt" else not same


def test_open_step_gradients_are_end_to_end(tmp_path):
    """--task-grad-every: on an open step (step 0) the DPO loss reaches the lower block through TRL's
    step; without a local loss every gradient is end-to-end's (untied embeddings, no clipping), with
    one only the lower block's change."""
    model_dir = tmp_path / "untied"
    make_tiny_model("llama", layers=LAYERS, tie=False).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "g.jsonl", synthetic_gsm8k_pairs(write_jsonl(tmp_path / "raw.jsonl", gsm8k_rows(8))))
    grads = {}
    for name, kw in (("e2e", {"method": "e2e"}), ("open", {"task_grad_every": 2}),
                     ("open-local", {"task_grad_every": 2, "lambda_aux": 1.0})):
        cap = GradCapture()
        dpo(config(model_dir, data, tmp_path / name, max_steps=1, max_grad_norm=None, batch_size=4, **kw),
            callbacks=[cap])
        grads[name] = cap.grads
    e2e, opened, local = grads["e2e"], grads["open"], grads["open-local"]
    assert opened.keys() == e2e.keys() == local.keys()
    for n, g in e2e.items():
        torch.testing.assert_close(opened[n], g, rtol=1e-5, atol=1e-8, msg=n)
    lower = [n for n in e2e if (_layer(n) is not None and _layer(n) < LAYERS // 2) or "embed" in n]
    upper = [n for n in e2e if n not in lower]
    assert lower and all(torch.allclose(local[n], e2e[n], rtol=1e-5, atol=1e-8) for n in upper)
    assert any(not torch.allclose(local[n], e2e[n], rtol=1e-4, atol=1e-7) for n in lower)


@pytest.mark.parametrize("method", ["lisa", "badam"])
def test_layer_switching_methods_train_only_their_layers(tiny_dir, gsm8k_file, tmp_path, method):
    """LISA and BAdam switch their layers in TRL's step too (lopt's callback calls Method.begin_step)."""
    from lopt.methods import get_method

    cfg = config(tiny_dir, f"synthetic-gsm8k:{gsm8k_file}", tmp_path / method, method=method, max_steps=2,
                 lisa_interval=1, badam_switch_every=1, seed=5)
    dpo(cfg)
    impl = get_method(method)(cfg.lopt_config())
    active = {i for s in range(2) for i in impl.active_layers(s, LAYERS)}
    got = AutoModelForCausalLM.from_pretrained(tmp_path / method).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert {_layer(k) for k in changed} - {None} == active
    assert any(_layer(k) is None for k in changed) == (method == "lisa")  # LISA trains the embeddings too


@pytest.mark.parametrize("method", ["lopt", "lora"])
def test_sigint_and_resume_match_uninterrupted_run(tiny_dir, gsm8k_file, tmp_path, method):
    data = f"synthetic-gsm8k:{gsm8k_file}"
    full = tmp_path / "full"
    dpo(config(tiny_dir, data, full, max_steps=4, save_every=3, method=method))
    assert (full / "checkpoint-3").is_dir() and (full / "checkpoint-4").is_dir()  # the last step too

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    from lopt.recipes.dpo import cmd_dpo

    part = tmp_path / "part"
    assert cmd_dpo(config(tiny_dir, data, part, max_steps=4, method=method), callbacks=[Interrupt()]) == 130
    assert (part / "checkpoint-2" / "optimizer.pt").is_file()
    res = dpo(config(tiny_dir, data, part, max_steps=4, resume="latest", method=method))
    assert res.summary["steps"] == 4
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins") + (("aux_loss",) if method == "lopt" else ()):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-7), key
    wa = AutoModelForCausalLM.from_pretrained(full).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(part).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


def test_held_out_evaluation(tiny_dir, gsm8k_file, tmp_path):
    out = tmp_path / "ev"
    res = dpo(config(tiny_dir, f"synthetic-gsm8k:{gsm8k_file}", out, max_steps=3, eval_every=2,
                     eval_dataset=f"synthetic-gsm8k:{gsm8k_file}", eval_limit=4))
    lines = read_metrics(out)
    evals = [r for r in lines if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps and after the last one
    assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(evals[-1]["eval"])
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert res.summary["eval"] == evals[-1]["eval"] and res.summary["data"]["eval"]["rows"] == 4


def test_plain_text_and_chat_preference_files(tiny_dir, tmp_path):
    text_rows = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(6)]
    chat_rows = [{"chosen": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}],
                  "rejected": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": "no"}]}
                 for i in range(6)]
    for name, rows in (("text", text_rows), ("chat", chat_rows)):
        res = dpo(config(tiny_dir, write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / name, max_steps=2,
                         method="lora"))
        assert res.summary["steps"] == 2
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert not any("lora" in n for n, _ in model.named_parameters())
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        res.model.eval()
        with torch.no_grad():  # the merged LoRA weights give the trained model's logits
            torch.testing.assert_close(model(ids).logits, res.model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, match", [
    (["--dataset", "WRONG_COLUMNS"], "needs 'chosen' and 'rejected' columns"),
    (["--dataset", "synthetic-gsm8k:/nonexistent/gsm8k.jsonl"], "file not found"),
    (["--dataset", "synthetic-gsm8k:NOT_GSM8K"], "reference answer has no '#### N' line"),
    (["--dataset", "/nonexistent/prefs.jsonl"], "file not found"),
    (["--loss-type", "nonsense"], "unknown loss_type"),
    (["--resume"], "nothing to resume"),
    (["--eval-every", "2"], "eval_every needs --eval-dataset"),
])
def test_bad_input_is_one_clear_line(tiny_dir, gsm8k_file, tmp_path, capsys, extra, match):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "p", "good": "a", "bad": "b"}])
    not_gsm8k = write_jsonl(tmp_path / "not.jsonl", [{"question": "q", "answer": "no final line"}])
    extra = [str(wrong) if e == "WRONG_COLUMNS" else e.replace("NOT_GSM8K", str(not_gsm8k)) for e in extra]
    args = ["dpo", "--model", str(tiny_dir), "--output-dir", str(tmp_path / "bad"), "--max-steps", "1",
            "--dataset", f"synthetic-gsm8k:{gsm8k_file}", "--no-progress", *extra]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("lopt dpo: error:")]
    assert line and match in line[0], err
    assert "Traceback" not in err
