"""lopt plan at the precisions and optimizers of issue 32 against torch.cuda.max_memory_allocated
(``make test-gpu``, marked cuda; every test here is skipped without a GPU).

For each row: the weights as stored (a 4-bit weight's quantization state included) exactly; the memory
allocated before a step against weights + the optimizer state in device memory (paged-adamw-8bit's is in
unified memory, outside it); the step's peak above that against ``peak - weights - device optimizer state``
within 15%; saved activations against the saved-tensor tracker within 10%.
"""
from __future__ import annotations

import pytest
import torch

from plan_measure import stored_bytes

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda") if torch.cuda.is_available() else None
CFG = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
           tie_word_embeddings=True)
ROWS, SEQ = 4, 256
# row -> (method for lopt train and the plan, lopt train's options, the plan's method options)
CASES = {
    "e2e bf16-true": ("e2e", {"precision": "bf16-true"}, {}),
    "e2e bf16-true --bf16-update kahan": ("e2e", {"precision": "bf16-true", "bf16_update": "kahan"}, {}),
    "e2e bf16-true --bf16-update plain": ("e2e", {"precision": "bf16-true", "bf16_update": "plain"}, {}),
    "e2e --optimizer adamw-8bit": ("e2e", {"precision": "bf16-mixed", "optimizer": "adamw-8bit"}, {}),
    "e2e --optimizer paged-adamw-8bit": ("e2e", {"precision": "bf16-mixed", "optimizer": "paged-adamw-8bit"}, {}),
    "e2e bf16-true --optimizer paged-adamw-8bit --optimizer-in-backward": (
        "e2e", {"precision": "bf16-true", "bf16_update": "plain", "optimizer": "paged-adamw-8bit",
                "optimizer_in_backward": True}, {}),
    "lopt-k2 bf16-true": ("lopt", {"precision": "bf16-true", "task_grad_every": 0}, {}),
    "freeze-lower bf16-mixed": ("freeze-lower", {"precision": "bf16-mixed"}, {}),
    "lora bf16-mixed --lora-dropout 0.1": ("lora", {"precision": "bf16-mixed"},
                                           {"lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"],
                                            "lora_dropout": 0.1}),
    "lora bf16-true": ("lora", {"precision": "bf16-true"}, {"lora_r": 8}),
    "qlora bf16-true": ("qlora", {"precision": "bf16-true"}, {"lora_r": 8}),
    "qlora bf16-mixed": ("qlora", {"precision": "bf16-mixed"}, {"lora_r": 8}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_against_max_memory_allocated(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lopt.engine.memory import SavedTensorTracker
    from lopt.methods import wrap
    from lopt.plan import plan
    from lopt.plan.planner import DEFAULT_BF16_UPDATE
    from lopt.recipes.sft import TrainConfig
    from lopt.runtime.loop import Stepper
    from lopt.runtime.precision import apply_precision

    method, opts, method_options = CASES[name]
    if method == "qlora" or "8bit" in opts.get("optimizer", ""):
        pytest.importorskip("bitsandbytes")
    update = opts.get("bf16_update", DEFAULT_BF16_UPDATE)
    if opts.get("precision") == "bf16-true" and update != "plain":
        pytest.importorskip({"kahan": "optimi", "stochastic-round": "torchao"}[update])
    plan_method = "lopt-k2" if method == "lopt" else method
    row = plan(dict(CFG), batch_size=ROWS, max_length=SEQ, precision=opts["precision"], methods=[plan_method],
               gradient_checkpointing="off", optimizer=opts.get("optimizer", "adamw"),
               optimizer_in_backward=opts.get("optimizer_in_backward", False), method_options=method_options,
               bf16_update=update)[0]
    data = dict(CFG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data),
                                             dtype=torch.float32).to(CUDA)
    cfg = TrainConfig(method=method, batch_size=ROWS, max_length=SEQ, progress=False, max_steps=8, warmup_ratio=0.0,
                      device="cuda", **opts, **method_options)
    cfg.validate()
    w = wrap(model, config=cfg.lopt_config()).to(CUDA)
    apply_precision(w, cfg.precision, CUDA)
    w.train()
    stepper = Stepper(w, cfg, CUDA, 8)
    ids = torch.randint(0, CFG["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(0)).to(CUDA)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    stepper.step([batch])  # warm-up: the optimizer state exists
    torch.cuda.synchronize()
    params = list({id(p): p for p in w.parameters()}.values())
    assert row.weights == stored_bytes(params)
    device_optimizer = row.optimizer - row.details["paged_optimizer"]
    base = torch.cuda.memory_allocated()
    assert base == pytest.approx(row.weights + device_optimizer, rel=0.02, abs=1 << 20)
    torch.cuda.reset_peak_memory_stats()
    with SavedTensorTracker(w.parameters()) as tracker:
        stepper.step([batch])
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    assert row.peak - row.weights - device_optimizer == pytest.approx(measured, rel=0.15)
    assert row.saved_visible == pytest.approx(tracker.peak_bytes, rel=0.10)
