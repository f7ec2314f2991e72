"""Time the retention suite on the embedded model and print its table:

    python scripts/retention_timing.py [--limit N] [--batch-size B] [--threads T] [--json OUT]
        [--data-dir DATA_DIR]

Runs the five tasks in the suite's order (as run_retention does), printing each one's time as it
finishes, then the markdown table and the wall time; --json writes the run_retention-shaped
result with every per-item score."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lopt.eval import suite
from lopt.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--data-dir", default=None, help="the retention files' folder (default: $LOPT_DATA_DIR)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    print(f"threads={torch.get_num_threads()} batch_size={args.batch_size} "
          f"loadavg={os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    tasks = {}
    for kind in suite.RETENTION_KINDS:
        tasks[kind] = suite.run_benchmark(kind, model, tok, suite.resolve_path(kind, data_dir=args.data_dir),
                                          limit=args.limit, batch_size=args.batch_size)
        print(f"{kind}: n={tasks[kind]['n']} {tasks[kind]['seconds']:.1f}s "
              f"loadavg={os.getloadavg()[0]:.1f}", flush=True)
    wall = time.perf_counter() - t0
    res = {"tasks": tasks, "macro": suite._macro(tasks), "seconds": round(wall, 2)}
    print(suite.format_retention_table(res))
    print(f"wall {wall:.1f}s loadavg={os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh)


if __name__ == "__main__":
    main()
