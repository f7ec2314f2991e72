"""CPU seconds (process_time, one thread) of retention against lopt demo's training steps, on the embedded
model: robust to the shared machine's load, unlike wall time."""
import json, sys, time
import torch
torch.set_num_threads(1)
from lopt.models import load_model
from lopt.eval.retention import RetentionProbe
from lopt.recipes.sft import TrainConfig, train

model, tok = load_model(None, device=torch.device("cpu"))
out = {}
for prompts, new in [(4, 16), (8, 32)]:
    c = time.process_time(); probe = RetentionProbe.record(model, tok, prompts=prompts, max_new_tokens=new)
    rec = time.process_time() - c
    c = time.process_time(); probe.measure(model, tok); mea = time.process_time() - c
    out[f"{prompts}x{new}"] = {"record_cpu_s": rec, "measure_cpu_s": mea, "tokens": probe.tokens}
    print(prompts, new, out[f"{prompts}x{new}"], flush=True)
del model
stamps = []
cfg = TrainConfig(dataset="arithmetic", method="lopt", max_steps=4, batch_size=8, lr=1e-4, max_length=256,
                  output_dir="/tmp/cpu_meas/run", warmup_ratio=0.1, progress=False)
train(cfg, callbacks=[lambda rec, st: stamps.append(time.process_time())])
steps = [b - a for a, b in zip(stamps, stamps[1:])]
out["demo_step_cpu_s"] = steps
print("steps", steps, flush=True)
step = sorted(steps)[len(steps) // 2]
for k in ("4x16", "8x32"):
    r = out[k]["record_cpu_s"] + out[k]["measure_cpu_s"]
    out[k]["share_of_24_step_demo"] = r / (r + 24 * step)
    out[k]["share_of_200_steps"] = r / (r + 200 * step)
print(json.dumps(out, indent=1))
json.dump(out, open("/tmp/cpu_meas/result.json", "w"), indent=1)
