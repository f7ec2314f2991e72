"""lopt: Local-Learning Post-Training for Hugging Face causal language models.

    import lopt
    wrapped = lopt.wrap(model)              # gradient boundary at the midpoint
    out = wrapped(input_ids, attention_mask=mask, labels=labels)
    wrapped.backward(out)                   # lower half: local loss only; upper half: task loss
    optimizer.step()
    wrapped.save_pretrained("out")          # a plain transformers checkpoint
"""
from .boundary import (METHODS, SCHEDULES, LoPTConfig, LoPTError, LoPTModel, LoPTOutput,
                       find_layers, split_blocks, wrap)
from .heads import ReconstructionHead

__version__ = "0.1.0"

__all__ = ["wrap", "LoPTConfig", "LoPTModel", "LoPTOutput", "LoPTError", "ReconstructionHead",
           "find_layers", "split_blocks", "METHODS", "SCHEDULES", "__version__"]
