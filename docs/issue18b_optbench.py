"""Time one optimizer step over LoPT k=2 trainable parameters of the embedded model, random gradients:
    PYTHONPATH=src:BNB_SITE python docs/issue18b_optbench.py 5
fused AdamW vs bitsandbytes AdamW8bit, whole-model step vs one optimizer per parameter. Interleaved."""
import statistics, sys, time
import torch
from lopt.engine.boundary import wrap
from lopt.models import load_model
from lopt.runtime.loop import build_optimizer, make_optimizer

model, _ = load_model(None, device="cpu")
w = wrap(model, num_blocks=2)
params = [p for p in w.parameters() if p.requires_grad]
print(sum(p.numel() for p in params) / 1e6, "M trainable", torch.get_num_threads(), "threads", flush=True)
g = torch.Generator().manual_seed(0)
grads = {id(p): torch.randn(p.shape, generator=g) * 1e-3 for p in params}

def setup(kind, per_param):
    if per_param:
        opts = [make_optimizer([{"params": [p], "lr": 1e-5, "weight_decay": 0.0}], kind) for p in params]
    else:
        opts = [build_optimizer(w, 1e-5, kind=kind)]
    return opts

def run(opts, per_param):
    t0 = time.perf_counter()
    if per_param:
        for p, o in zip(params, opts):
            p.grad = grads[id(p)]
            o.step()
            p.grad = None
    else:
        for p in params:
            p.grad = grads[id(p)]
        opts[0].step()
        for p in params:
            p.grad = None
    return time.perf_counter() - t0

variants = [(k, pp) for k in ("adamw", "adamw-8bit") for pp in (False, True)]
opts = {v: setup(*v) for v in variants}
for v in variants:
    run(opts[v], v[1])  # state creation
times = {v: [] for v in variants}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for v in variants:
        times[v].append(run(opts[v], v[1]))
for v in variants:
    t = times[v]
    print(f"{v[0]:10s} {'per-parameter' if v[1] else 'whole model  '} median {statistics.median(t):.3f} s "
          f"(min {min(t):.3f}, max {max(t):.3f})", flush=True)
