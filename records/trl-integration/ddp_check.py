"""Does a wrapped SFTTrainer keep data-parallel ranks equal? Run under torchrun with 2 CPU processes (gloo):
prints each rank's sums of a lower and an upper weight after 2 steps. Argument: plain, or a lopt method
(and for lopt, --task-grad-every)."""
import sys, os, torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from conftest import make_tiny_model, make_tokenizer
import datasets
from trl import SFTTrainer, SFTConfig
from lopt.integrations.trl import wrap_trainer
torch.set_num_threads(1)
method = sys.argv[1]; kw = {"task_grad_every": int(sys.argv[2])} if len(sys.argv) > 2 and method == "lopt" else {}
tok = make_tokenizer()
rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "completion": [{"role": "assistant", "content": f"{a+b}"}]} for a in range(1, 9) for b in range(1, 3)]
ds = datasets.Dataset.from_list(rows)
model = make_tiny_model("llama", layers=4, tie=True)
args = SFTConfig(output_dir=os.environ.get("OUT", "runs/ddp-check"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to="none",
                 use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, bf16=False, ddp_backend="gloo")
t = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
if method != "plain":
    if os.environ.get("UNCHECKED"):  # what wrap_trainer now refuses: hide the 2 processes from its check only
        import transformers
        real = transformers.TrainingArguments.world_size
        transformers.TrainingArguments.world_size = property(lambda self: 1)
        try:
            t = wrap_trainer(t, method=method, **kw)
        finally:
            transformers.TrainingArguments.world_size = real
    else:
        t = wrap_trainer(t, method=method, **kw)
t.train()
sd = t.model.state_dict()
line = " ".join(map(str, ["rank", os.environ.get("RANK"), method, kw, "sum lower", float(sd[next(k for k in sd if "layers.0.mlp.up_proj" in k)].double().sum()), "upper", float(sd[next(k for k in sd if "layers.3.mlp.up_proj" in k)].double().sum())]))
with open(os.path.join(args.output_dir, f"rank{os.environ.get('RANK')}.txt"), "w") as f:
    f.write(line + "\n")
