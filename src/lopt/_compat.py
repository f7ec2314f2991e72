"""Old import paths (lopt 0.1's flat layout) keep working for one release, with a DeprecationWarning.

``import lopt.boundary`` gives the module ``lopt.engine.boundary`` itself, so code written against
0.1 sees the same objects. CHANGELOG.md lists every move; these aliases go away in 0.3.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "lopt.boundary": "lopt.engine.boundary",
    "lopt.heads": "lopt.engine.heads",
    "lopt.loss": "lopt.engine.loss",
    "lopt.memory": "lopt.engine.memory",
    "lopt.train": "lopt.recipes.sft",
    "lopt.rl": "lopt.recipes.trl_bridge",
    "lopt.grpo": "lopt.recipes.grpo",
    "lopt.dpo": "lopt.recipes.dpo",
    "lopt.experiment": "lopt.recipes.experiment",
    "lopt.distributed": "lopt.parallel",
    "lopt.evaluate": "lopt.eval",
    "lopt.distbench": "lopt.bench.distbench",
    # 0.3: the memory planner got its own package; engine.checkpointing says what it checkpoints.
    "lopt.bench.plan": "lopt.plan.planner",
    "lopt.bench.plan_activations": "lopt.plan.activations",
    "lopt.engine.checkpointing": "lopt.engine.activation_checkpointing",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in lopt 0.3",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the module is already executed under its new name


def install_moved_module_aliases() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
