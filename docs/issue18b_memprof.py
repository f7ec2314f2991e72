"""Live CPU tensor bytes over one training step (torch.profiler memory timeline), by category.

    PYTHONPATH=src python docs/issue18b_memprof.py e2e lopt-k2 lopt-k2+oib    (lopt bench config names)
"""
import json, sys, time
import numpy as np
import torch
from torch.profiler import profile, ProfilerActivity
from torch.profiler._memory_profiler import MemoryProfileTimeline
from lopt.bench.runner import CONFIGS, BenchSpec, bench_batches
from lopt.engine.boundary import wrap
from lopt.models import load_model
from lopt.recipes.sft import TrainConfig
from lopt.runtime.loop import Stepper, set_seed

COLS = ["param", "opt_state", "input", "temporary", "activation", "gradient", "autograd_detail", "unknown"]
out = {}
for name in sys.argv[1:]:
    set_seed(0)
    cfg = TrainConfig(batch_size=4, max_length=256, max_steps=4, lr=1e-5, warmup_ratio=0.0, progress=False,
                      **CONFIGS[name])
    model, tok = load_model(None, device="cpu")
    spec = BenchSpec(name=name, overrides=CONFIGS[name], warmup=1, steps=1)
    batches = bench_batches(spec, tok, model.get_input_embeddings().weight.shape[0])
    w = wrap(model, config=cfg.lopt_config()); w.gradient_checkpointing_enable(cfg.gradient_checkpointing, cfg.selective_checkpointing); w.train()
    s = Stepper(w, cfg, torch.device("cpu"), 4)
    s.step([batches[0]])
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        s.step([batches[1]])
    mt = MemoryProfileTimeline(prof._memory_profile())
    times, sizes = mt._coalesce_timeline("cpu")
    sz = np.array(sizes)[:, 1:] / 2**20
    tot = sz.sum(1)
    i = int(tot.argmax())
    rec = {"peak_mib": float(tot[i]), "at_peak": dict(zip(COLS, map(float, sz[i]))),
           "peak_position": i / len(tot), "max_per_category": dict(zip(COLS, map(float, sz.max(0)))),
           "start_mib": float(tot[0])}
    out[name] = rec
    print(name, f"{time.time()-t0:.0f}s", json.dumps(rec), flush=True)
    del s, w, model, prof, mt
json.dump(out, open("live-bytes.json", "w"), indent=1)  # in the working directory
