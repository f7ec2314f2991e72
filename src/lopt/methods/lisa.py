"""``lisa``: Layerwise Importance Sampled AdamW (Pan et al. 2024, arXiv:2403.17919).

The embeddings, final norm and LM head always train; of the decoder layers, ``lisa_layers`` drawn at
random train for ``lisa_interval`` optimizer steps, then are drawn again; the others are frozen and
hold neither gradients nor AdamW state. What stays trainable and the defaults (1 layer, 20 steps)
follow LMFlow's implementation (``src/lmflow/pipeline/utils/lisa_trainer.py``: only the body layers
are frozen, the other parameter groups keep their optimizer state across switches) and its published
script (``scripts/run_finetune_with_lisa.sh``: ``lisa_activated_layers=1``, ``lisa_interval_steps=20``).
The draw is a pure function of (seed, step // lisa_interval), so ``--resume`` draws the same layers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lopt.engine.config import LoPTError, option
from lopt.methods.base import Trains, register
from lopt.methods.switching import LayerSwitching

_GROUP = "method: lisa"


@dataclass
class LISAOptions:
    lisa_layers: int = option(1, "decoder layers trained at a time (embeddings, final norm and LM head always "
                                 "train; LMFlow's default 1)", group=_GROUP)
    lisa_interval: int = option(20, "steps before the trained layers are drawn again (LMFlow's default 20)",
                                group=_GROUP)


@register
class LISA(LayerSwitching):
    name = "lisa"
    train_outside_layers = True
    options = LISAOptions

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        return Trains(layers=tuple(range(min(config.lisa_layers, num_layers))))

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        for key in ("lisa_layers", "lisa_interval"):
            value = getattr(config, key)
            if not isinstance(value, int) or value < 1:
                raise LoPTError(f"{key} must be an integer >= 1, got {value!r}")

    @property
    def interval(self) -> int:
        return self.config.lisa_interval

    def setup(self, wrapped: Any) -> None:
        if self.config.lisa_layers > wrapped.num_layers:
            raise LoPTError(f"--lisa-layers {self.config.lisa_layers} is more than the model's {wrapped.num_layers} "
                            f"decoder layers")
        super().setup(wrapped)

    def active_layers(self, step: int, num_layers: int) -> list[int]:
        # A string seed is hashed with SHA-512 by random.seed: the same draw in every process and run.
        rng = random.Random(f"lopt-lisa/{self.config.seed}/{step // self.interval}")
        return sorted(rng.sample(range(num_layers), self.config.lisa_layers))

    def describe(self) -> dict[str, Any]:
        return {"lisa": {"layers": self.config.lisa_layers, "interval": self.config.lisa_interval,
                         "active_layers": getattr(self, "active", None)}}
