"""How bf16-true's update rules compare (issue 32's choice of --bf16-update's default), on the CPU:

    python records/precision/update_comparison.py quality 2e-5,1e-4 fp32,plain,kahan,sr
    python records/precision/update_comparison.py step-time fp32-adamw bf16-plain optimi-kahan torchao-sr

quality: a tiny llama (4 layers, hidden 128, vocabulary 64, untied) is "pretrained" in fp32 on one Markov
chain (150 AdamW steps at 1e-3, batch 32), then fine-tuned for 128 steps at batch 8 on another chain at
each learning rate: fp32 AdamW on fp32 weights, or on bf16 weights PyTorch's AdamW (plain), torch-optimi's
Kahan-summed AdamW (kahan) or torchao's stochastic-rounding AdamW (sr), all with betas (0.9, 0.999), eps
1e-8, no weight decay. Prints the held-out loss on 256 sequences of the new chain.

step-time: one optimizer step over SmolLM2-135M's parameters (random weights and gradients), the first
and the median of the next 4.

sr / torchao-sr need torchao (pip install --no-deps torchao), kahan / optimi-kahan torch-optimi.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

V, T = 64, 32
KW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def optimizer(kind: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if kind in ("fp32", "plain", "fp32-adamw", "bf16-plain"):
        return torch.optim.AdamW(params, lr=lr, fused=True, **KW)
    if kind in ("kahan", "optimi-kahan"):
        import optimi

        return optimi.AdamW(params, lr=lr, kahan_sum=True, **KW)
    if kind in ("sr", "torchao-sr"):
        from torchao.optim import _AdamW

        return _AdamW(params, lr=lr, bf16_stochastic_round=True, **KW)
    raise SystemExit(f"unknown kind {kind}")


def chain(seed: int):
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(V, V, generator=g) * 3, -1)

    def sample(n: int, s: int) -> torch.Tensor:
        gg = torch.Generator().manual_seed(s)
        x = torch.empty(n, T, dtype=torch.long)
        x[:, 0] = torch.randint(V, (n,), generator=gg)
        for t in range(1, T):
            x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=gg).squeeze(1)
        return x
    return sample


def quality(lrs: list[float], kinds: list[str]) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    pre, ft = chain(1), chain(2)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
    for i in range(150):
        x = pre(32, 1000 + i)
        base(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    held = ft(256, 7)

    def heldout(m) -> float:
        with torch.no_grad():
            return float(m(input_ids=held, labels=held).loss.float())
    print("base held-out", round(heldout(base), 4))
    for lr in lrs:
        res = {}
        for kind in kinds:
            m = copy.deepcopy(base)
            if kind != "fp32":
                m = m.to(torch.bfloat16)
            o = optimizer(kind, list(m.parameters()), lr)
            for i in range(128):
                x = ft(8, 5000 + i)
                m(input_ids=x, labels=x).loss.backward()
                o.step()
                o.zero_grad()
            res[kind] = heldout(m)
        print(f"lr {lr:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)


def step_time(kinds: list[str]) -> None:
    conf = json.loads((Path(__file__).resolve().parents[2] / "src/lopt/configs/smollm2-135m.json").read_text())
    cfg = LlamaConfig(**{k: v for k, v in conf.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    for kind in kinds:
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).to(torch.float32 if kind.startswith("fp32") else torch.bfloat16)
        ps = list(m.parameters())
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        o = optimizer(kind, ps, 2e-5)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            o.step()
            t.append(time.perf_counter() - t0)
        print(f"{kind}: first {t[0]:.2f} s, median of the next 4 {statistics.median(t[1:]):.3f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "quality":
        quality([float(a) for a in sys.argv[2].split(",")], sys.argv[3].split(","))
    else:
        step_time(sys.argv[2:])
