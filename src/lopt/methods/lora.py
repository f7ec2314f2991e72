"""``lora``: PEFT LoRA adapters over the whole depth (``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``). Checkpoints hold the adapters merged into plain weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lopt.engine.config import option
from lopt.methods.base import Method, Trains, register

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
        targets = c.lora_target_modules
        if isinstance(targets, list) and targets == ["all-linear"]:  # the flag's nargs makes a list of one
            targets = "all-linear"
        lcfg = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)

    def plain_model(self, model: nn.Module) -> nn.Module:
        return model.get_base_model()  # adapters unmerged

    def save_pretrained(self, model: nn.Module, directory: Path, **kwargs: Any) -> None:
        model.merge_adapter()
        try:
            base = model.get_base_model()
            base.save_pretrained(directory, state_dict=strip_peft_state(base.state_dict()), **kwargs)
        finally:
            model.unmerge_adapter()

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def strip_peft_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a LoRA-wrapped (merged) state dict back into the plain model's key names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
