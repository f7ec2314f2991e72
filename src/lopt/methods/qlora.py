"""``qlora``: LoRA adapters over a 4-bit NF4 base (Dettmers et al. 2023, arXiv:2305.14314).

Every linear map of the decoder layers is quantized to NF4 with bitsandbytes (blocks of 64, the
quantization constants quantized again: QLoRA's "double quantization"), computing in bf16; PEFT's
LoRA adapters (the ``lora`` method's options: ``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``) train in bf16 on top. The embeddings, norms and LM head stay unquantized and
frozen, stored in bf16. Checkpoints hold the adapters merged into dequantized bf16 weights: a plain
transformers model.

It runs where bitsandbytes runs 4-bit on the device: CUDA, and the CPU with bitsandbytes >= 0.48 (its
CPU backend; slow, for checks).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lopt.engine.anatomy import find_layers
from lopt.engine.config import LoPTError
from lopt.methods.base import Trains, register
from lopt.methods.lora import LoRA, lora_target_names

COMPUTE_DTYPE = torch.bfloat16


def import_bitsandbytes() -> Any:
    """bitsandbytes, or a one-line LoPTError saying what to install."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise LoPTError("--method qlora needs bitsandbytes for its 4-bit base: pip install bitsandbytes "
                        "(or lopt[quant])") from e
    return bnb


def check_4bit_device(device: torch.device | str) -> None:
    """A one-line LoPTError where bitsandbytes has no 4-bit kernels for ``device``."""
    bnb = import_bitsandbytes()
    device = torch.device(device)
    from importlib.metadata import version

    if device.type == "cpu":
        major, minor = (int(x) for x in version("bitsandbytes").split(".")[:2])
        if (major, minor) < (0, 48):
            raise LoPTError(f"--method qlora on the CPU needs bitsandbytes >= 0.48 (its CPU 4-bit backend); "
                            f"{bnb.__version__} is installed: pip install -U bitsandbytes, or train on a GPU")
    elif device.type != "cuda":
        raise LoPTError(f"--method qlora: bitsandbytes has no 4-bit kernels for {device.type} here; train on "
                        f"cuda or cpu")


def quantize_linears(model: nn.Module, names: set[str] | None = None) -> int:
    """Replace the ``nn.Linear`` modules of ``model``'s decoder layers (those named in ``names``, when
    given: the last part of the module name) by bitsandbytes NF4 ``Linear4bit`` modules computing in
    bf16, on the device the weight is on. Returns how many were replaced."""
    bnb = import_bitsandbytes()
    layers_name, _ = find_layers(model)
    count = 0
    for name, module in list(model.get_submodule(layers_name).named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or (names is not None and child_name not in names):
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=COMPUTE_DTYPE, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            weight = bnb.nn.Params4bit(child.weight.data.to(COMPUTE_DTYPE), requires_grad=False,
                                       compress_statistics=True, quant_type="nf4")
            q.weight = weight._quantize(device)  # packs to uint8 on the device (CUDA, or bitsandbytes' CPU backend)
            # bitsandbytes repacks a CPU weight for its AVX512-bf16 kernel at the first no-grad eval forward,
            # which fails for widths that are not a multiple of its block and rewrites the quantisation state
            # between training steps: lopt's evaluations keep the training layout.
            q.support_avx512bf16_for_cpu = False
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(COMPUTE_DTYPE), requires_grad=False)
            setattr(module, child_name, q)
            count += 1
    return count


@register
class QLoRA(LoRA):
    name = "qlora"
    options = None  # the lora method's options (lora_r, lora_alpha, lora_dropout, lora_target_modules)
    bf16_only = True  # the 4-bit base computes in bf16: --precision bf16-true (bf16 adapters) or bf16-mixed

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        import_bitsandbytes()  # before any model loads

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        return Trains(layers=(), embedding=False, head=False, final_norm=False, lora_r=config.lora_r,
                      base_bits=4, label="qlora")

    def prepare(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        check_4bit_device(device)
        lora_target_names(model, self.config.lora_target_modules)  # a name that matches nothing fails first
        quantize_linears(model)  # the whole base is 4-bit, whichever maps get adapters
        # The rest of the base (embeddings, norms, LM head) is frozen and computes in bf16: stored so. The
        # adapters follow --precision (lopt.runtime.precision): bf16 under bf16-true, fp32 masters under bf16-mixed.
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(COMPUTE_DTYPE)
        return super().prepare(model)

    def describe(self) -> dict[str, Any]:
        return {"qlora": {"base": "nf4 (bitsandbytes, double quantization)", "compute_dtype": "bfloat16"}}
