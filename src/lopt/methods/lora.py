"""``lora``: PEFT LoRA adapters over the whole depth (``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``). Checkpoints hold the adapters merged into plain weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lopt.engine.config import LoPTError, option
from lopt.methods.base import Method, Trains, register, set_saved_dtype

_GROUP = "method: lora"


@dataclass
class LoRAOptions:
    lora_r: int = option(16, "LoRA rank", group=_GROUP)
    lora_alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r)", group=_GROUP)
    lora_dropout: float = option(0.0, "dropout on the adapters' input", group=_GROUP)
    lora_target_modules: list[str] | str = option(
        "all-linear", "modules that get adapters, PEFT's names (all-linear: every linear map but the LM head)",
        nargs="+", metavar="MODULE", group=_GROUP)


@register
class LoRA(Method):
    name = "lora"
    resume_from_base = True
    options = LoRAOptions

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        return Trains(layers=(), embedding=False, head=False, final_norm=False, lora_r=config.lora_r)

    def prepare(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        c = self.config
        targets = lora_target_names(model, c.lora_target_modules) or "all-linear"
        lcfg = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)

    def plain_model(self, model: nn.Module) -> nn.Module:
        return model.get_base_model()  # adapters unmerged

    def save_pretrained(self, model: nn.Module, directory: Path, **kwargs: Any) -> None:
        if any(base_weight_dtype(m) != torch.float32 for m in lora_layers(model)):
            # A bf16 (or 4-bit) base: merging in place would round each adapter's update into the base's
            # dtype and unmerging would not restore the base; the merged weights are computed aside, in
            # the adapters' dtype (fp32 under bf16-mixed, bf16 under bf16-true and for qlora).
            dtype = adapter_dtype(model)
            base = model.get_base_model()
            base.save_pretrained(directory, state_dict=merged_state_dict(model, dtype), **kwargs)
            set_saved_dtype(directory, dtype)
            return
        model.merge_adapter()
        try:
            base = model.get_base_model()
            base.save_pretrained(directory, state_dict=strip_peft_state(base.state_dict()), **kwargs)
        finally:
            model.unmerge_adapter()

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def lora_target_names(model: nn.Module, targets: list[str] | str) -> list[str] | None:
    """``--lora-target-modules`` as PEFT takes it: None for ``all-linear`` (every linear map but the LM
    head), else the names, each of which must name a module of ``model`` (PEFT matches a name against
    the end of a module's dotted path); a one-line LoPTError names one that matches nothing."""
    if isinstance(targets, str):
        targets = [targets]
    if list(targets) == ["all-linear"]:  # the flag's nargs makes a list of one
        return None
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    paths = {name for name, _ in model.named_modules()}
    for t in targets:
        if t not in leaves and not any(path == t or path.endswith("." + t) for path in paths):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise LoPTError(f"--lora-target-modules {t}: {type(model).__name__} has no module of that name; its "
                            f"linear maps are {' '.join(linear)} (or all-linear)")
    return list(targets)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the adapters (what trains, so the dtype a checkpoint is saved in)."""
    return next(p.dtype for n, p in model.named_parameters() if "lora_" in n)


def base_weight_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a LoRA layer's base weight is stored in (``torch.uint8`` for a 4-bit base)."""
    return layer.get_base_layer().weight.dtype


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear module's weight as a dense tensor: bitsandbytes' 4-bit weights dequantized."""
    w = module.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return w.data


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain model's state dict (on the CPU, in ``dtype``) with every adapter merged into its base
    weight in fp32 and 4-bit weights dequantized; ``model`` itself is left untouched."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}  # module name -> its merged / dequantized weight
    for name, m in base.named_modules():
        if isinstance(m, LoraLayer):
            w = dense_weight(m.get_base_layer()).float()
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    w = w + m.get_delta_weight(adapter).float()
            dense[name] = w
        elif not name.endswith(".base_layer") and getattr(getattr(m, "weight", None), "quant_state", None) is not None:
            dense[name] = dense_weight(m)  # a 4-bit layer without adapters
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        key = k.replace(".base_layer.", ".")
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in dense), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if rest == "weight":
                v = dense[owner]
            elif rest != "bias":
                continue  # a 4-bit weight's quantisation state (absmax, quant_map, ...)
        out[key] = v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
    return out


def strip_peft_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a LoRA-wrapped (merged) state dict back into the plain model's key names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
