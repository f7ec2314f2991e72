"""lopt e2e and TRL SFTTrainer stepped alternately in one process on the same batches (paired timing
that machine drift hits alike). Not yet run to the end (the session closed first):

    PYTHONPATH=src python docs/issue18b_pair.py gc 13      (or no-gc; the number of steps)
"""
import json, statistics, sys, tempfile, time
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from lopt.bench.runner import BenchSpec, bench_batches
from lopt.engine.boundary import wrap
from lopt.models import load_model
from lopt.recipes.sft import TrainConfig
from lopt.runtime.loop import Stepper, set_seed

gc = sys.argv[1] == "gc"
n = int(sys.argv[2])
set_seed(0)
ma, tok = load_model(None, device="cpu")
mb, _ = load_model(None, device="cpu")
spec = BenchSpec(name="pair", overrides={}, batch_size=4, seq_len=256, warmup=1, steps=n - 1,
                 dataset="/work/shared/data/gsm8k/train.jsonl", limit=1000)
batches = bench_batches(spec, tok, ma.get_input_embeddings().weight.shape[0])[:n]
cfg = TrainConfig(method="e2e", batch_size=4, max_length=256, max_steps=n, lr=1e-5, warmup_ratio=0.0, progress=False)
w = wrap(ma, config=cfg.lopt_config()); w.train()
stepper = Stepper(w, cfg, torch.device("cpu"), n)
rows = {"input_ids": [], "labels": []}
for b in batches:
    for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
        k = int(m.sum()); rows["input_ids"].append(ids[:k].tolist()); rows["labels"].append(lab[:k].tolist())
rec = {"lopt": [], "trl": [], "lopt_loss": [], "tokens": [int(b["attention_mask"].sum()) for b in batches]}
state = {"i": 0, "t": None}

class Alternate(TrainerCallback):
    def on_step_begin(self, args, st, control, **kw):
        state["t"] = time.perf_counter()
    def on_step_end(self, args, st, control, **kw):
        rec["trl"].append(time.perf_counter() - state["t"])
        t0 = time.perf_counter(); r = stepper.step([batches[state["i"]]]); rec["lopt"].append(time.perf_counter() - t0)
        rec["lopt_loss"].append(r["loss"]); state["i"] += 1
        print(state["i"], f"trl {rec['trl'][-1]:.2f}s lopt {rec['lopt'][-1]:.2f}s", flush=True)

with tempfile.TemporaryDirectory() as out:
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=n, learning_rate=1e-5, max_length=256,
                     bf16=False, optim="adamw_torch_fused", train_sampling_strategy="sequential", save_strategy="no",
                     report_to="none", disable_tqdm=True, use_cpu=True, gradient_checkpointing=gc)
    SFTTrainer(model=mb, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok,
               callbacks=[Alternate()]).train()
t_l, t_t = rec["lopt"][1:], rec["trl"][1:]
tok_mean = statistics.fmean(rec["tokens"][1:])
res = {"gc": gc, "lopt_median_s": statistics.median(t_l), "trl_median_s": statistics.median(t_t),
       "ratio_trl_over_lopt": [b / a for a, b in zip(t_l, t_t)], "tokens_per_step": tok_mean, **rec}
res["lopt_tokens_per_s"] = tok_mean / res["lopt_median_s"]; res["trl_tokens_per_s"] = tok_mean / res["trl_median_s"]
print(json.dumps({k: v for k, v in res.items() if k not in ("lopt", "trl", "lopt_loss", "tokens")}))
json.dump(res, open(f"pair-{sys.argv[1]}.json", "w"), indent=1)
