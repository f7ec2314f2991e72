"""``drift`` (needs ``--base``): linear CKA and mean cosine similarity between base and tuned hidden
states at every layer, on the retention-kl text, with the LoPT block boundaries marked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence
import torch
import torch.nn.functional as F

from lopt.eval.common import EvalError, chunks_of, model_device, pad_id_of, right_pad
from lopt.eval.kl import pair_sequences
from lopt.runtime.checkpoints import RUN_FILE
from lopt.eval.kl import base_answers
from lopt.eval.tasks import Task, register
from lopt.eval.common import progress_bar


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between representations ``x`` (n, d1) and ``y`` (n, d2) of
    the same n examples: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred.
    1 for identical (or rotated, or isotropically scaled) representations; in float64."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    xc = x.double() - x.double().mean(0, keepdim=True)
    yc = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    denom = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(cross / denom) if denom > 0 else float("nan")


class _CKAStats:
    """Running sums for linear CKA over many batches, in the feature space (d x d), so the token
    count never has to fit in memory: with S = sum x x^T and m the mean, Xc^T Xc = S - n m m^T."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.xx = self.yy = self.yx = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.xx, self.yy, self.yx = x.T @ x, y.T @ y, y.T @ x
        else:
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.xx += x.T @ x
            self.yy += y.T @ y
            self.yx += y.T @ x
        self.n += x.shape[0]

    def value(self) -> float:
        mx, my = self.sx / self.n, self.sy / self.n
        xx = self.xx - self.n * torch.outer(mx, mx)
        yy = self.yy - self.n * torch.outer(my, my)
        yx = self.yx - self.n * torch.outer(my, mx)
        denom = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
        return float(torch.linalg.matrix_norm(yx) ** 2 / denom) if denom > 0 else float("nan")


def read_boundaries(model_or_path: Any) -> list[int] | None:
    """Block boundaries (layer indices where a block starts, the first block excluded) from the
    ``lopt_run.json`` the trainer writes into its checkpoints; None when there is none. Accepts a
    directory or a model whose config remembers the directory it was loaded from."""
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
    else:
        name = getattr(model_or_path, "name_or_path", None) or getattr(
            getattr(model_or_path, "config", None), "_name_or_path", None)
        if not name:
            return None
        path = Path(name)
    run_file = path / RUN_FILE if path.is_dir() else None
    if run_file is None or not run_file.is_file():
        return None
    try:
        ranges = json.loads(run_file.read_text()).get("block_ranges")
        return [int(r[0]) for r in ranges[1:]] if ranges else None
    except (json.JSONDecodeError, TypeError, ValueError, IndexError, AttributeError):
        return None


@torch.inference_mode()
def drift(model, base, tokenizer, *, sequences: Sequence[tuple[list[int], list[int]]] | None = None,
          prompts: Sequence[str] | None = None, boundaries: Sequence[int] | None = None,
          max_new_tokens: int = 48, batch_size: int = 8, limit: int | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Per-layer similarity of the tuned model's hidden states to the base model's on the same text
    (default: the retention-kl text, prompts plus base answers), over non-pad tokens.

    ``layers[i]`` describes ``hidden_states[i]``: the input of decoder layer i, so index 0 is the
    embeddings and index L the final output (after the final norm, as transformers returns it).
    A boundary b (a block starting at layer b) marks index b: the representation the lower block
    hands over, where LoPT's local loss applies. Reports linear CKA and the mean cosine similarity
    of matching token vectors at each index, and their means.
    """
    sequences = pair_sequences(model, base, tokenizer, sequences, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, limit=limit, progress=progress)
    device = model_device(model)
    stats: list[_CKAStats] = []
    cos_sum: list[float] = []
    count = 0
    batches = list(chunks_of(list(range(len(sequences))), batch_size))
    for batch in progress_bar(batches, total=len(batches), desc="drift", enabled=progress):
        ids, mask = right_pad([sequences[i][0] + sequences[i][1] for i in batch], pad_id_of(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        hs_base = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hs_model = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if len(hs_base) != len(hs_model):
            raise EvalError(f"drift: the models have different depths ({len(hs_model) - 1} vs "
                            f"{len(hs_base) - 1} layers)")
        if not stats:
            stats = [_CKAStats() for _ in hs_base]
            cos_sum = [0.0] * len(hs_base)
        real = mask.bool()
        for i, (hb, hm) in enumerate(zip(hs_base, hs_model)):
            xb, xm = hb[real].float(), hm[real].float()
            stats[i].update(xb, xm)
            cos_sum[i] += float(F.cosine_similarity(xb, xm, dim=-1).sum())
        count += int(real.sum())
    marks = sorted({int(b) for b in boundaries}) if boundaries else []
    layers = [{"index": i, "cka": s.value(), "cos": c / count, "boundary": i in marks}
              for i, (s, c) in enumerate(zip(stats, cos_sum))]
    ckas = [entry["cka"] for entry in layers]
    return {"mean_cka": sum(ckas) / len(ckas), "min_cka": min(ckas),
            "mean_cos": sum(e["cos"] for e in layers) / len(layers), "final_cka": ckas[-1],
            "boundaries": marks, "layers": layers, "tokens": count, "prompts": len(sequences)}


register(Task("drift", "drift per-layer CKA and cosine to the base model (needs --base)", arg="none",
              needs_base=True, run=lambda r, arg: drift(
                  r.model, r.base, r.base_tokenizer, sequences=base_answers(r), boundaries=r.boundaries,
                  batch_size=r.batch_size, progress=r.progress)))
