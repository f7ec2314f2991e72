"""The embedded default model, for real: two LoPT steps on GSM8K from ../shared, then a plain reload."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.cli import main


@pytest.mark.slow
def test_two_steps_on_gsm8k_and_reload(shared_data, tmp_path, capsys):
    out = tmp_path / "gsm8k"
    rc = main(["train", "--dataset", str(shared_data / "gsm8k" / "train.jsonl"), "--limit", "8",
               "--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--lr", "1e-5",
               "--output-dir", str(out), "--no-progress", "--sample-prompt", "What is the capital of France?"])
    assert rc == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # lopt's default: the task gradient through the boundary every 4th step, no local loss
    assert all(0 < m["loss"] < 10 and m["aux_loss"] is None for m in metrics)
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["block_ranges"] == [[0, 15], [15, 30]]  # SmolLM2-135M has 30 layers
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    # the default keeps SmolLM2's tied LM head tied, so the checkpoint is shaped like the base
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert tok.chat_template
    # the reloaded model is the trained one, and it still answers
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # the same greedy answer the run printed for the model it had in memory (two full-rate steps can
    # change it: e2e's answer changes the same way)
    printed = capsys.readouterr().out
    assert answer.strip() and answer.strip() in printed.split("model answer:")[1]
