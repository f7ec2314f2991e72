"""Which trainer options work under wrap_trainer: one SFTTrainer step on a tiny model per option, printing
whether the block above the boundary (layer 3) and below it (layer 0) got gradients."""
import os
import sys

import datasets
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from conftest import make_tiny_model, make_tokenizer  # noqa: E402

from lopt.integrations.trl import wrap_trainer  # noqa: E402

torch.set_num_threads(1)
tok = make_tokenizer()
rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
         "completion": [{"role": "assistant", "content": f"{a + b}"}]} for a in range(1, 9) for b in range(1, 3)]
ds = datasets.Dataset.from_list(rows)
PAPER = dict(method="lopt", task_grad_every=0)


class Grads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.g = {n: p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()}


def run(name, wrap_kw, after_wrap=None, **args_kw):
    try:
        args = SFTConfig(output_dir=os.environ.get("OUT", "runs/options-check"), max_steps=1, per_device_train_batch_size=4,
                         learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                         bf16=False, **args_kw)
        t = wrap_trainer(SFTTrainer(model=make_tiny_model("llama", layers=4), args=args, train_dataset=ds,
                                    processing_class=tok), **wrap_kw)
        if after_wrap:  # set after wrap_trainer, which would refuse it
            after_wrap(t.args)
        cap = Grads()
        t.add_callback(cap)
        t.train()
        print(f"{name}: trains; tensors with a gradient in layer 3: {sum(v for n, v in cap.g.items() if 'layers.3' in n)},"
              f" in layer 0: {sum(v for n, v in cap.g.items() if 'layers.0' in n)}")
    except Exception as e:  # noqa: BLE001  (the point is to see what fails)
        print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def reentrant(a):  # transformers >= 5.2x reads the new name; the old one is its alias at construction
    a.gradient_checkpointing_kwargs = a.activation_checkpointing_kwargs = {"use_reentrant": True}


run("method lopt, task_grad_every 0: TRL's default non-reentrant checkpointing", PAPER)
run("method lopt, task_grad_every 0: use_reentrant=True", PAPER, after_wrap=reentrant)
run("method lopt, task_grad_every 0: packing bfd (padding-free)", PAPER, packing=True, max_length=64)
run("method lopt, task_grad_every 0: packing wrapped", PAPER, packing=True, packing_strategy="wrapped", max_length=32)
run("method lopt, task_grad_every 0: torch_compile", PAPER, torch_compile=True)
run("method lopt, default: no checkpointing", dict(method="lopt"), gradient_checkpointing=False)
run("method lisa", dict(method="lisa"))
run("method lora", dict(method="lora"))
