"""Validate ``lopt plan`` against ``lopt bench`` on random-initialised Llama-shaped models (CPU, fp32).

    python scripts/plan_validation.py --sizes 20m 135m 400m --out results.jsonl [--malloc fixed] [--bench-as-is]

For each size a random model (SmolLM2's vocabulary size, tied embeddings) is saved once under
``--models``; each configuration runs in a fresh process through ``lopt.bench.run_one`` (warm-up
step, timed step, one step under the saved-tensor tracker) and ``lopt.bench.plan.plan`` predicts it
from the saved config.json alone. Prints predicted vs measured saved activations and whole-step
peak (peak RSS minus the baseline after loading).

transformers maps safetensors weights from the file: after loading, most weight pages are not yet
resident, and the first forward pages them in, after ``lopt bench`` took its baseline. By default
the worker here reads every weight once right after loading (so the baseline holds the weights);
``--bench-as-is`` runs ``lopt bench``'s own worker instead, to show the difference.
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


def _paged_worker(spec_json: str) -> int:
    """``lopt.bench.run_one`` with every weight read once right after loading."""
    import torch

    import lopt.models as models
    from lopt.bench import BenchSpec, run_one

    original = models.load_model

    def load_and_page_in(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.sum()  # reads every page of the file-backed weight
        return model, tokenizer

    models.load_model = load_and_page_in  # run_one imports it at call time
    print("LOPT_BENCH_RESULT " + json.dumps(run_one(BenchSpec(**json.loads(spec_json)))), flush=True)
    return 0


def _measure(name: str, model: str, batch: int, seq: int, as_is: bool) -> dict:
    import subprocess

    from lopt.bench import CONFIGS, BenchSpec, _child

    spec = BenchSpec(name=name, overrides=CONFIGS[name], model=model, batch_size=batch, seq_len=seq,
                     warmup=1, steps=1, measure_saved=True)
    if as_is:
        return _child(spec, None)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec.__dict__)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("LOPT_BENCH_RESULT "):
            return json.loads(line[len("LOPT_BENCH_RESULT "):])
    raise RuntimeError(f"{name} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def main(argv: list[str] | None = None) -> int:
    from lopt.bench import CONFIGS
    from lopt.bench.plan import plan

    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return _paged_worker(sys.argv[2])
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--configs", nargs="+", default=["e2e", "lopt-k2", "freeze-lower", "lora"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[4], help="one per size, or one for all")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--models", default="/tmp/lopt-plan-models")
    p.add_argument("--out", default=None, help="append the results (JSON lines) here")
    p.add_argument("--malloc", choices=["default", "fixed"], default="default",
                   help="fixed: run the measuring processes with MALLOC_MMAP_THRESHOLD_=65536, so that glibc "
                        "returns every freed tensor to the OS and peak RSS follows live memory (default: glibc's "
                        "own dynamic threshold, which keeps freed blocks of up to 32 MiB in the heap)")
    p.add_argument("--bench-as-is", action="store_true",
                   help="lopt bench's own worker: the weights page in during the first step, after the baseline")
    ns = p.parse_args(argv)
    if ns.malloc == "fixed":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the measuring processes
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    batches = ns.batch_size * len(ns.sizes) if len(ns.batch_size) == 1 else ns.batch_size
    mode = "bench as is" if ns.bench_as_is else "weights paged in before the baseline"
    print(f"malloc: {ns.malloc}; {mode}")
    print("| model | params | batch | config | saved act. MiB pred / meas | x | step peak MiB pred / meas | x |")
    print("|---|---|---|---|---|---|---|---|")
    for size, batch in zip(ns.sizes, batches):
        path = make_model(size, Path(ns.models))
        params = plan(str(path), batch_size=1, max_length=2, precision="fp32", methods=["e2e"],
                      gradient_checkpointing="off")[0].trainable_params
        for name in ns.configs:
            print(f"[{size} {name}]", file=sys.stderr, flush=True)
            row = _measure(name, str(path), batch, ns.seq_len, ns.bench_as_is)
            over = CONFIGS[name]
            pr = plan(str(path), batch_size=batch, max_length=ns.seq_len, precision="fp32",
                      methods=[BENCH_TO_PLAN[name]], num_blocks=over.get("num_blocks", 2),
                      gradient_checkpointing=over.get("gradient_checkpointing", "off"),
                      selective_checkpointing=over.get("selective_checkpointing", "off"))[0]
            rec = {"size": size, "batch": batch, "seq_len": ns.seq_len, "config": name, "malloc": ns.malloc,
                   "mode": mode, "params": params, "trainable_pred": pr.trainable_params,
                   "trainable_meas": row["trainable_params"], "saved_pred_mb": pr.saved_visible / 2**20,
                   "saved_meas_mb": row["saved_activation_mb"], "step_pred_mb": pr.step_peak / 2**20,
                   "step_meas_mb": row["peak_step_mb"], "activations_pred_mb": pr.activations / 2**20,
                   "base_mb": row["base_mb"], "step_time_s": row["step_times"][0]}
            print(f"| {size} | {params / 1e6:.1f}M | {batch}x{ns.seq_len} | {name} | "
                  f"{rec['saved_pred_mb']:.1f} / {rec['saved_meas_mb']:.1f} | "
                  f"{rec['saved_pred_mb'] / rec['saved_meas_mb']:.3f} | {rec['step_pred_mb']:.0f} / "
                  f"{rec['step_meas_mb']:.0f} | {rec['step_pred_mb'] / rec['step_meas_mb']:.3f} |", flush=True)
            if ns.out:
                with open(ns.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
