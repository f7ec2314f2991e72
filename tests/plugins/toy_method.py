"""``toy``: a method written the way a user would add one, kept in the tests (not in the package).

It trains the top ``toy_layers`` decoder layers with the final norm and LM head, and freezes the rest:
one file, its options beside it, no edit anywhere else in lopt. tests/test_method_plugin.py installs it
as a plugin (the entry-point group ``lopt.methods``); a built-in method would instead be imported in
``lopt/methods/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lopt.engine.config import LoPTError, option
from lopt.methods import Method, Trains, register


@dataclass
class ToyOptions:
    toy_layers: int = option(1, "decoder layers that train, counted from the top", group="method: toy")


@register
class Toy(Method):
    name = "toy"
    options = ToyOptions

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        if config.toy_layers < 1:
            raise LoPTError(f"--toy-layers must be >= 1, got {config.toy_layers}")

    @classmethod
    def trains(cls, num_layers: int, config: Any) -> Trains:
        return Trains(layers=tuple(range(max(0, num_layers - config.toy_layers), num_layers)), embedding=False)

    def setup(self, wrapped: Any) -> None:
        layers = wrapped.model.get_submodule(wrapped.layers_name)
        keep = set(self.trains(len(layers), self.config).layers)
        for i, layer in enumerate(layers):
            layer.requires_grad_(i in keep)
        wrapped.model.get_input_embeddings().requires_grad_(False)
