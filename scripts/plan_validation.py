"""Validate ``lopt plan`` against ``lopt bench`` on random-initialised Llama-shaped models (CPU, fp32).

    python scripts/plan_validation.py --sizes 20m 135m 400m --out docs/plan-validation.json

For each size a random model (SmolLM2's vocabulary size, tied embeddings) is saved once under
``--models`` and benchmarked by ``lopt.bench`` (each configuration in a fresh process: warm-up
steps, a timed step, one step under the saved-tensor tracker); ``lopt.planner.plan`` predicts the
same configurations from the saved config.json alone. Prints a markdown table of predicted vs
measured saved activations and whole-step peak (peak minus the process's baseline after loading).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# name -> (hidden, layers, heads, kv heads, intermediate); vocabulary 49152 (SmolLM2's), tied.
SIZES = {
    "20m": (256, 8, 4, 2, 768),
    "135m": (576, 30, 9, 3, 1536),  # SmolLM2-135M's shape
    "400m": (960, 36, 15, 5, 2560),  # SmolLM2-360M's width, 36 layers
}
VOCAB = 49152
BENCH_TO_PLAN = {"e2e": "e2e", "lopt-k2": "lopt-k2", "freeze-lower": "freeze-lower", "lora": "lora",
                 "e2e+gc": "e2e", "e2e+sel": "e2e", "lopt-k2+gc-last": "lopt-k2"}


def make_model(size: str, root: Path) -> Path:
    """Save a random-initialised model of ``size`` (and a stub tokenizer: bench feeds random ids)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    out = root / f"llama-{size}"
    if (out / "config.json").is_file():
        return out
    h, n, heads, kv, inter = SIZES[size]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=VOCAB, tie_word_embeddings=True,
                      max_position_embeddings=2048, bos_token_id=None, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(tmp)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from lopt.bench import CONFIGS, run_bench
    from lopt.planner import plan

    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--configs", nargs="+", default=["e2e", "lopt-k2", "freeze-lower", "lora"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[4], help="one per size, or one for all")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--models", default="/tmp/lopt-plan-models")
    p.add_argument("--out", default=None, help="append the results (JSON lines) here")
    p.add_argument("--malloc", choices=["default", "fixed"], default="default",
                   help="fixed: run the bench processes with MALLOC_MMAP_THRESHOLD_=65536, so that glibc returns "
                        "every freed tensor to the OS and peak RSS follows live memory (default: glibc's own "
                        "dynamic threshold, which keeps freed blocks of up to 32 MiB in the heap)")
    ns = p.parse_args(argv)
    if ns.malloc == "fixed":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the bench's child processes
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    batches = ns.batch_size * len(ns.sizes) if len(ns.batch_size) == 1 else ns.batch_size
    print(f"malloc: {ns.malloc}")
    print("| model | params | batch | config | saved act. MiB pred / meas | x | step peak MiB pred / meas | x |")
    print("|---|---|---|---|---|---|---|---|")
    for size, batch in zip(ns.sizes, batches):
        path = make_model(size, Path(ns.models))
        result = run_bench(ns.configs, [batch], model=str(path), seq_len=ns.seq_len, warmup=1, steps=1,
                           repeats=1, progress=True)
        params = plan(str(path), batch_size=1, max_length=2, precision="fp32", methods=["e2e"],
                      gradient_checkpointing="off")[0].trainable_params
        for row in result["rows"]:
            over = CONFIGS[row["name"]]
            pr = plan(str(path), batch_size=batch, max_length=ns.seq_len, precision="fp32",
                      methods=[BENCH_TO_PLAN[row["name"]]], num_blocks=over.get("num_blocks", 2),
                      gradient_checkpointing=over.get("gradient_checkpointing", "off"),
                      selective_checkpointing=over.get("selective_checkpointing", "off"))[0]
            rec = {"size": size, "batch": batch, "seq_len": ns.seq_len, "config": row["name"], "malloc": ns.malloc,
                   "params": params, "trainable_pred": pr.trainable_params,
                   "trainable_meas": row["trainable_params"],
                   "saved_pred_mb": pr.saved_visible / 2**20, "saved_meas_mb": row["saved_activation_mb"],
                   "step_pred_mb": pr.step_peak / 2**20, "step_meas_mb": row["peak_step_mb"],
                   "activations_pred_mb": pr.activations / 2**20, "step_time_s": row["step_time_s"]}
            print(f"| {size} | {rec['params'] / 1e6:.1f}M | {batch}x{ns.seq_len} | {row['name']} | "
                  f"{rec['saved_pred_mb']:.1f} / {rec['saved_meas_mb']:.1f} | "
                  f"{rec['saved_pred_mb'] / rec['saved_meas_mb']:.3f} | {rec['step_pred_mb']:.0f} / "
                  f"{rec['step_meas_mb']:.0f} | {rec['step_pred_mb'] / rec['step_meas_mb']:.3f} |", flush=True)
            if ns.out:
                with open(ns.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
