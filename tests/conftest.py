"""Shared fixtures: a tiny byte-level BPE tokenizer with a chat template, and tiny random models.

Everything here is built in-process from configs, so the fast tests need no download and no cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# lopt never guesses a data folder: the test harness names the workspace's shared one explicitly, as a
# user would with --data-dir or LOPT_DATA_DIR (a test that wants none deletes the variable).
if SHARED_DATA.is_dir():
    os.environ["LOPT_DATA_DIR"] = str(SHARED_DATA)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Answer: 3 + 4 = 7 #### 7",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 + - * / = $ , .",
    "user assistant system instruction input output response query problem solution prompt completion",
]


def make_tokenizer(vocab_size: int = 320):
    """A small byte-level BPE tokenizer (any text encodes) with ChatML-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(arch: str = "llama", vocab_size: int = 320, layers: int = 4, hidden: int = 32,
                    tie: bool = True, seed: int = 0):
    """A tiny random causal LM of the given architecture, fp32, no dropout, built from a config."""
    from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig,
                              Qwen3Config)

    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, bos_token_id=None,
                  eos_token_id=3, pad_token_id=1)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          **common)
    elif arch == "qwen3":
        cfg = Qwen3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                          max_position_embeddings=256, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, hidden_dropout=0.0,
                            attention_dropout=0.0, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.float()


ARCHS = ["llama", "qwen3", "gpt2", "gpt_neox"]


def save_tiny(d: Path, layers: int = 4, eos_token_id: int | None = None) -> Path:
    """A tiny Llama with tied embeddings and its tokenizer, saved in ``d``: a local checkpoint for
    the recipes (train, grpo, dpo)."""
    model = make_tiny_model("llama", layers=layers, tie=True)
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def addition_rows() -> list[dict]:
    """32 GSM8K-style questions ("What is a + b?", the answer ending in "#### a+b")."""
    return [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a in range(1, 9) for b in range(1, 5)]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_tiny_model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_THREADS = torch.get_num_threads()
_OMP = os.environ.get("OMP_NUM_THREADS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    # Tiny models gain nothing from threads, and on a busy 2-core machine the threads' spin-waiting
    # makes them many times slower; the slow tests (real model) keep every core. Set here, before any
    # fixture: a module-scoped fixture that trains (test_plan_rl's measurements) is set up before
    # the test's own fixtures, and ran 5x slower with every thread.
    # The same for the processes a test starts (lopt bench's children, lopt train, torchrun's workers).
    slow = item.get_closest_marker("slow") is not None
    torch.set_num_threads(_THREADS if slow else 1)
    if slow and _OMP is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = _OMP if slow else "1"
    yield


def pytest_collection_modifyitems(config, items):
    # The full fault-injection suite takes minutes: only `-m faults` (make test-faults) runs it.
    if "faults" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the full fault-injection suite: make test-faults (pytest -m faults)")
    for item in items:
        if item.get_closest_marker("faults") is not None:
            item.add_marker(skip)
