"""lopt: Local-Learning Post-Training for Hugging Face causal language models.

    import lopt
    wrapped = lopt.wrap(model)              # gradient boundary at the midpoint
    wrapped.begin_step(step)                # before each optimizer step
    out = wrapped(input_ids, attention_mask=mask, labels=labels)
    wrapped.backward(out)                   # lower half: local loss only; upper half: task loss
    optimizer.step()
    wrapped.save_pretrained("out")          # a plain transformers checkpoint

The package in layers (each folder's ``__init__`` says more):
``engine/`` the gradient boundary and what it is built from; ``methods/`` one file per training
method; ``runtime/`` the step loop, checkpoints and run state; ``recipes/`` sft, grpo, dpo and the
study; ``parallel/`` data parallel, FSDP and the pipeline; ``eval/`` one module per task family;
``bench/`` measured cost. ``data``, ``models``, ``rewards`` and ``cli`` are thin layers on top.
"""
from lopt._compat import install_moved_module_aliases
from lopt.version import __version__
from lopt.engine.anatomy import find_layers, split_blocks
from lopt.engine.boundary import LoPTModel, LoPTOutput
from lopt.engine.config import SCHEDULES, LoPTError
from lopt.engine.heads import ReconstructionHead
from lopt.methods import METHODS, LoPTConfig, Method, get_method, register, wrap


__all__ = ["wrap", "LoPTConfig", "LoPTModel", "LoPTOutput", "LoPTError", "ReconstructionHead", "Method",
           "get_method", "register", "find_layers", "split_blocks", "METHODS", "SCHEDULES", "__version__"]


install_moved_module_aliases()
