"""One batch's gradient of the embedded SmolLM2-135M-Instruct in fp32, under bf16 autocast and in pure bf16.

    LOPT_DATA_DIR=../shared/data python records/precision/grad_cosine.py

Prints the loss of each, and the cosine and norm ratio of the whole gradient (all parameters as one
vector) against fp32's; the first 4 GSM8K train examples, plain text, truncated to 256 tokens.
"""
import copy
import os

import torch

from lopt.data import load_records
from lopt.models import load_model

torch.manual_seed(0)
model, tok = load_model(None)
recs = load_records(os.path.join(os.environ["LOPT_DATA_DIR"], "gsm8k", "train.jsonl"), "train", 4)
enc = tok([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in recs], return_tensors="pt", padding=True,
          truncation=True, max_length=256)
labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)


def grads(m, autocast=False):
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = m(**enc).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters()}


def cos(a, b):
    dot = sum((a[k] * b[k]).sum() for k in a)
    na, nb = (sum((x[k] ** 2).sum() for k in x).sqrt() for x in (a, b))
    return (dot / na / nb).item(), (nb / na).item()


l32, g32 = grads(model)
lac, gac = grads(model, autocast=True)
l16, g16 = grads(copy.deepcopy(model).to(torch.bfloat16))
print(f"loss: fp32 {l32:.4f}, bf16 autocast {lac:.4f}, pure bf16 {l16:.4f}")
print("gradient vs fp32 (cosine, norm ratio): autocast %.4f, %.4f; pure bf16 %.4f, %.4f" % (*cos(g32, gac), *cos(g32, g16)))
