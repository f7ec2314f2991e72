"""Model anatomy: where a Hugging Face causal LM keeps its decoder layers, embeddings and LM head.
"""
from __future__ import annotations

from typing import Sequence
import torch
from torch import nn

from lopt.engine.config import LoPTError


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder layers of a causal LM.

    The layer list is the longest ``nn.ModuleList`` whose children all share one class; when the
    config states the depth, the list must have exactly that many layers.
    """
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    depth = None
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        depth = getattr(text_cfg, attr, None) if text_cfg is not None else None
        if isinstance(depth, int):
            break
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if isinstance(depth, int) and len(mod) != depth:
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise LoPTError(
            f"could not find the decoder layers of {type(model).__name__}: lopt needs one nn.ModuleList "
            f"of identical transformer blocks (like model.layers or transformer.h)"
            + (f" with {depth} entries (config depth)" if isinstance(depth, int) else "")
        )
    return best


def split_blocks(num_layers: int, num_blocks: int = 2, boundaries: Sequence[int] | None = None
                 ) -> list[tuple[int, int]]:
    """Half-open layer ranges of the blocks.

    ``boundaries`` are the first layer index of every block but the first (``[10, 20]`` on 30 layers
    gives 0-10, 10-20, 20-30). Otherwise layers are spread as evenly as possible, earlier blocks
    taking the remainder (30 layers, k=4 -> 8, 8, 7, 7).
    """
    if boundaries is not None:
        b = list(boundaries)
        if not b:
            raise LoPTError("boundaries is empty: give at least one layer index, e.g. --boundaries 12")
        if any(not isinstance(i, int) for i in b):
            raise LoPTError(f"boundaries must be integers, got {b}")
        if b != sorted(b) or len(set(b)) != len(b):
            raise LoPTError(f"boundaries must be strictly increasing, got {b}")
        if b[0] < 1 or b[-1] > num_layers - 1:
            raise LoPTError(f"boundaries {b} out of range: each must lie in 1..{num_layers - 1} "
                            f"(the model has {num_layers} layers)")
        edges = [0, *b, num_layers]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    if not isinstance(num_blocks, int) or num_blocks < 2 or num_blocks > num_layers:
        raise LoPTError(f"num_blocks must be between 2 and the number of layers ({num_layers}), "
                        f"got {num_blocks}")
    base, extra = divmod(num_layers, num_blocks)
    ranges, start = [], 0
    for i in range(num_blocks):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    raise LoPTError(f"cannot tell the hidden size of {type(model).__name__} from its config")


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def is_tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embedding's tensor."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and out is not None and out.weight is inp.weight


def untie_output_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own weight when it shares the input embedding's.

    Under LoPT the embedding belongs to the lowest block and the head to the highest; one tensor
    cannot be on both sides of a gradient boundary. Returns True when something was untied.
    """
    if not is_tied(model):
        return False
    out = model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    for cfg in {id(model.config): model.config,
                id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False
    return True


def find_loss_head(model: nn.Module):
    """(decoder stack, LM head, softcap) when the model's logits are exactly
    ``head(decoder(...).last_hidden_state)`` (optionally soft-capped); None otherwise, and the full
    logits path is used."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "logit_scale", None) not in (None, 1.0) or getattr(cfg, "logits_scaling", None) not in (None, 1.0):
        return None
    decoder, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return None
    return decoder, head, getattr(cfg, "final_logit_softcapping", None)


def is_embedding_name(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    return any(k in leaf for k in ("embed", "wte", "wpe"))
