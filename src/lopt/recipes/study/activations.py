"""Activation statistics of a local objective's drift (issue 29): what pure local learning does to the
hidden states the upper half reads, and which lower weights take full-size AdamW steps.

Trains the model through lopt's engine exactly as ``lopt train --task-grad-every 0`` does (the study's
data in the study's order, AdamW, warmup and cosine schedule), and every ``--every`` steps measures, on
the first GSM8K test questions:

* per layer (``hidden_states[i]``, the input of layer i): the mean cosine of each ordinary token's state
  to the base model's, and the ratio of their norms; the first token separately;
* at the boundary: the massive-activation dimensions (largest RMS over ordinary tokens and the first
  token), the first token's norm, the cosine with those dimensions left out, the median per-dimension
  RMS of the rest, and the effective rank of the ordinary tokens' states;
* from AdamW's state: per kind of lower weight, the fraction of entries whose next step is at least half
  the learning rate (AdamW normalises a small, steady gradient into such full-size steps).

    python -m lopt.recipes.study.activations --objective recon --lr-lower 1e-4 --steps 64
    python -m lopt.recipes.study.activations --figure records/local-objectives/activations

Records go to ``records/local-objectives/activations/OBJECTIVE-lrLR.json`` (each holds its command);
``--figure`` draws every record of a folder into ``activations.png`` there.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

OUT = Path("records/local-objectives/activations")
PROBE_ROWS = 16
TOP_DIMS = 5
FULL_STEP = 0.5  # an AdamW step of at least half the learning rate counts as full-size


# ---------------------------------------------------------------- pure functions

def effective_rank(states: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of the (N, H) ``states`` (Roy & Vetterli's
    effective rank): H for H orthogonal directions of equal weight, 1 for states along one line."""
    s = torch.linalg.svdvals(states.double())
    s = s[s > s.max() * 1e-12] if s.numel() else s
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def ordinary_tokens(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (N, H) states of the real tokens of right-padded (B, T, H) ``h``, the first token of each
    row left out (it carries the massive activations)."""
    keep = mask.bool().clone()
    keep[:, 0] = False
    return h[keep]


def layer_drift(h: torch.Tensor, hb: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Tuned ``h`` against base ``hb`` (both (B, T, H)): mean cosine and mean norm ratio over the
    ordinary tokens, and the first token's cosine and norm ratio (means over rows)."""
    a, b = ordinary_tokens(h, mask).float(), ordinary_tokens(hb, mask).float()
    f, fb = h[:, 0].float(), hb[:, 0].float()
    return {"cos": float(F.cosine_similarity(a, b, dim=-1).mean()),
            "norm_ratio": float((a.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).mean()),
            "first_cos": float(F.cosine_similarity(f, fb, dim=-1).mean()),
            "first_norm_ratio": float((f.norm(dim=-1) / fb.norm(dim=-1).clamp_min(1e-12)).mean())}


def massive_dimensions(h: torch.Tensor, mask: torch.Tensor, top: int = TOP_DIMS) -> list[int]:
    """The ``top`` dimensions of largest RMS over all real tokens (first tokens included), largest first."""
    rows = h[mask.bool()].float()
    return [int(i) for i in rows.pow(2).mean(0).sqrt().argsort(descending=True)[:top]]


def boundary_stats(h: torch.Tensor, hb: torch.Tensor, mask: torch.Tensor, dims: list[int]) -> dict[str, Any]:
    """The boundary state's statistics, tuned ``h`` against base ``hb``; ``dims``: the base's massive
    dimensions (the same for both, so that they are compared dimension by dimension)."""
    a, b = ordinary_tokens(h, mask).float(), ordinary_tokens(hb, mask).float()
    rest = [i for i in range(h.shape[-1]) if i not in dims]
    rms = lambda t: t.pow(2).mean(0).sqrt()  # noqa: E731  per-dimension RMS over tokens
    first = h[:, 0].float()
    return {"massive_dims": dims,
            "massive_rms_first": [float(x) for x in rms(first)[dims]],
            "massive_rms_ordinary": [float(x) for x in rms(a)[dims]],
            "first_norm": float(first.norm(dim=-1).mean()),
            "ordinary_norm_median": float(a.norm(dim=-1).median()),
            "cos": float(F.cosine_similarity(a, b, dim=-1).mean()),
            "cos_without_massive": float(F.cosine_similarity(a[:, rest], b[:, rest], dim=-1).mean()),
            "rest_rms_median": float(rms(a[:, rest]).median()),
            "effective_rank": effective_rank(a)}


def adam_step_ratio(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, betas: tuple[float, float],
                    eps: float) -> torch.Tensor:
    """|AdamW's next step| / lr per entry (weight decay aside): |m_hat| / (sqrt(v_hat) + eps). 1 for a
    gradient that has kept its sign and size, whatever that size."""
    m_hat = exp_avg.float() / (1 - betas[0] ** step)
    v_hat = exp_avg_sq.float() / (1 - betas[1] ** step)
    return m_hat.abs() / (v_hat.sqrt() + eps)


def weight_kind(name: str) -> str:
    """The kind of a decoder weight from its parameter name: embedding, q/k/v/o projections, MLP, norm."""
    for pattern, kind in ((r"embed|wte|wpe", "embedding"), (r"norm|ln_", "norm"), (r"q_proj", "q"),
                          (r"k_proj", "k"), (r"v_proj", "v"), (r"o_proj|attn\.c_proj|dense$", "o"),
                          (r"gate_proj|up_proj|down_proj|mlp", "mlp")):
        if re.search(pattern, name):
            return kind
    return "other"


def step_spread(named: Iterable[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                threshold: float = FULL_STEP) -> dict[str, dict[str, float]]:
    """Per kind of weight: entries, the fraction whose AdamW step is at least ``threshold`` x lr, and
    the median step in units of lr. Parameters without optimizer state (not stepped yet) are skipped."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    acc: dict[str, list[torch.Tensor]] = {}
    for name, p in named:
        st = optimizer.state.get(p)
        if not st or "exp_avg" not in st:
            continue
        g = group_of[id(p)]
        r = adam_step_ratio(st["exp_avg"], st["exp_avg_sq"], int(st["step"]), g["betas"], g["eps"])
        acc.setdefault(weight_kind(name), []).append(r.flatten())
    out = {}
    for kind, rs in sorted(acc.items()):
        r = torch.cat(rs)
        sample = r if r.numel() <= 1_000_000 else r[torch.randperm(r.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        out[kind] = {"entries": int(r.numel()), "full_step_fraction": float((r >= threshold).float().mean()),
                     "median_step": float(sample.median())}
    return out


# ---------------------------------------------------------------- measuring a model

@torch.no_grad()
def measure(model: nn.Module, base: nn.Module, probe: list[dict[str, torch.Tensor]], boundary: int
            ) -> dict[str, Any]:
    """Per-layer drift and the boundary's statistics of ``model`` against ``base`` on ``probe``."""
    hs, hbs, masks = [], [], []
    for b in probe:
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                  use_cache=False)
        hs.append(model.model(**kw).hidden_states)
        hbs.append(base.model(**kw).hidden_states)
        masks.append(b["attention_mask"])
    layers = []
    for i in range(len(hs[0])):
        # rows of the probe's batches have different widths: measure batch by batch, weight by tokens
        parts = [(layer_drift(h[i], hb[i], m), int(m.sum())) for h, hb, m in zip(hs, hbs, masks)]
        n = sum(w for _, w in parts)
        layers.append({k: sum(d[k] * w for d, w in parts) / n for k in parts[0][0]})
    width = max(m.shape[1] for m in masks)
    pad = lambda t: F.pad(t, (0, 0, 0, width - t.shape[1])) if t.dim() == 3 else F.pad(t, (0, width - t.shape[1]))  # noqa: E731
    h = torch.cat([pad(x[boundary]) for x in hs])
    hb = torch.cat([pad(x[boundary]) for x in hbs])
    mask = torch.cat([pad(m) for m in masks])
    dims = massive_dimensions(hb, mask)
    return {"layers": layers, "boundary": boundary_stats(h, hb, mask, dims),
            "base_boundary": boundary_stats(hb, hb, mask, dims)}


# ---------------------------------------------------------------- the run

def run(objective: str, lr_lower: float, steps: int, *, lr: float = 1e-4, every: int = 16,
        anchor_weight: float | None = None, data_dir: str | None = None, model_name: str | None = None,
        out_dir: Path = OUT, seed: int = 0) -> dict[str, Any]:
    """Train ``steps`` steps of the study's pure local learning with ``objective`` and trace the
    statistics every ``every`` steps; writes ``out_dir/OBJECTIVE-lrLR_LOWER.json``."""
    from lopt.data import Batches, build_sft_dataset, collate
    from lopt.eval.tasks import resolve_data
    from lopt.methods import wrap
    from lopt.models import load_model
    from lopt.recipes.study.plan import V2, train_config
    from lopt.recipes.study.records import machine, write_json
    from lopt.runtime.loop import Stepper

    torch.manual_seed(seed)
    model, tok = load_model(model_name, device="cpu")
    base = copy.deepcopy(model).eval().requires_grad_(False)
    gsm8k = resolve_data("gsm8k", None, data_dir).parent
    options = {"method": "lopt", "num_blocks": 2, "lambda_aux": 10.0, "lr_lower_ratio": lr_lower / lr,
               "local_objective": objective}
    if anchor_weight is not None:
        options["anchor_weight"] = anchor_weight
    cfg = train_config(options, seed, V2, lr=lr, model=model_name, dataset=str(gsm8k / "train.jsonl"),
                       run_dir=Path("runs/local-objectives/activations"))
    wrapped = wrap(model, config=cfg.lopt_config())
    boundary = wrapped.boundaries[0]
    examples, _ = build_sft_dataset(str(gsm8k / "train.jsonl"), tok, max_length=V2.max_length, limit=V2.train_rows)
    held_out, _ = build_sft_dataset(str(gsm8k / "test.jsonl"), tok, max_length=V2.max_length, limit=PROBE_ROWS)
    probe = [collate(held_out[i:i + 8], tok.pad_token_id) for i in range(0, len(held_out), 8)]
    stepper = Stepper(wrapped, cfg, torch.device("cpu"), total_steps=V2.steps)
    batches = iter(Batches(examples, V2.batch_size, tok.pad_token_id, seed=seed))
    lower = [(n, p) for n, p in wrapped.model.named_parameters() if id(p) in {id(q) for q in wrapped.lower_parameters()}]
    trace, losses, t0 = [], [], time.time()
    for step in range(1, steps + 1):
        wrapped.train()
        losses.append(stepper.step([next(batches)]).get("aux_loss"))
        if step % every and step != steps:
            continue
        wrapped.eval()
        row = {"step": step, "aux_loss": sum(losses) / len(losses), **measure(wrapped.model, base, probe, boundary),
               "adam_steps": step_spread(lower, stepper.optimizer)}
        losses.clear()
        trace.append(row)
        print(f"{objective} lr_lower {lr_lower:g}: step {step} local loss {row['aux_loss']:.5f} boundary cos "
              f"{row['boundary']['cos']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    name = f"{objective}-lr{lr_lower:g}"
    command = (f"python -m lopt.recipes.study.activations --objective {objective} --lr-lower {lr_lower:g} "
               f"--steps {steps} --every {every}" + (f" --anchor-weight {anchor_weight:g}" if anchor_weight is not None else ""))
    record = {"name": name, "objective": objective, "lr": lr, "lr_lower": lr_lower, "steps": steps,
              "boundary": boundary, "probe_rows": PROBE_ROWS, "seconds": round(time.time() - t0, 1),
              "command": command, "machine": machine(), "trace": trace}
    write_json(out_dir / f"{name}.json", record)
    return record


def load_records(folder: Path) -> list[dict[str, Any]]:
    """Every activation record in ``folder``, by file name (none: an empty list)."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def figure(folder: Path) -> Path:
    """One PNG of every record in ``folder``: per-layer cosine and norm ratio at the last step, the
    boundary cosine over the steps, and the fraction of full-size AdamW steps per kind of weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(folder)
    if not records:
        raise SystemExit(f"no activation records in {folder}")
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    kinds = sorted({k for r in records for k in r["trace"][-1]["adam_steps"]})
    width = 0.8 / len(records)
    for j, r in enumerate(records):
        last = r["trace"][-1]
        label = f"{r['objective']} (lr_lower {r['lr_lower']:g}, step {last['step']})"
        ax[0, 0].plot([x["cos"] for x in last["layers"]], marker=".", label=label)
        ax[0, 1].plot([x["norm_ratio"] for x in last["layers"]], marker=".", label=label)
        ax[1, 0].plot([0] + [x["step"] for x in r["trace"]], [1.0] + [x["boundary"]["cos"] for x in r["trace"]],
                      marker=".", label=label)
        ax[1, 1].bar([i + j * width for i in range(len(kinds))],
                     [last["adam_steps"].get(k, {}).get("full_step_fraction", 0.0) for k in kinds], width, label=label)
    for a in (ax[0, 0], ax[0, 1]):
        a.axvline(records[0]["boundary"], color="grey", ls=":")
        a.set_xlabel("hidden_states index (input of layer i)")
    ax[0, 0].set_ylabel("mean cosine to the base (ordinary tokens)")
    ax[0, 1].set_ylabel("mean norm ratio to the base (ordinary tokens)")
    ax[1, 0].set_xlabel("step")
    ax[1, 0].set_ylabel("boundary cosine to the base")
    ax[1, 1].set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
    ax[1, 1].set_ylabel(f"fraction of lower weights with an AdamW step >= {FULL_STEP:g} lr")
    ax[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(folder) / "activations.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    from lopt.engine.config import LOCAL_OBJECTIVES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", choices=LOCAL_OBJECTIVES)
    p.add_argument("--lr-lower", type=float)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--anchor-weight", type=float)
    p.add_argument("--data-dir", help="the folder holding gsm8k/ (default: $LOPT_DATA_DIR)")
    p.add_argument("--figure", type=Path, metavar="FOLDER", help="draw the records of FOLDER instead of running")
    a = p.parse_args(argv)
    if a.figure:
        print(figure(a.figure))
        return
    if a.objective is None or a.lr_lower is None:
        p.error("give --objective and --lr-lower (or --figure FOLDER)")
    run(a.objective, a.lr_lower, a.steps, every=a.every, anchor_weight=a.anchor_weight, data_dir=a.data_dir)


if __name__ == "__main__":
    main()
