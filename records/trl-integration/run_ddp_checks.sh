#!/usr/bin/env bash
# Each case: 2 CPU processes (gloo) train a wrapped SFTTrainer for 2 steps; each rank writes the sums of a
# lower and an upper weight. Equal lines: the ranks stayed in sync. UNCHECKED=1: past wrap_trainer's refusal.
set -u
OUT_ROOT=${OUT_ROOT:-runs/ddp-check}
run() {  # name, env, args...
  local name=$1 env=$2; shift 2
  local out="$OUT_ROOT/$name"; mkdir -p "$out"; rm -f "$out"/rank*.txt
  echo "== $name"
  env OUT="$out" OMP_NUM_THREADS=1 $env python -m torch.distributed.run --standalone --nproc_per_node 2 \
    "$(dirname "$0")/ddp_check.py" "$@" > "$out/log.txt" 2>&1 || echo "exit $?: $(grep -m1 -o 'LoPTError: .*\|RuntimeError: Expected[^.]*' "$out/log.txt")"
  cat "$out"/rank*.txt 2>/dev/null
}
run plain "" plain
run e2e "" e2e
run freeze-lower "" freeze-lower
run lisa "" lisa
run lopt-paper UNCHECKED=1 lopt 0
run lopt-default UNCHECKED=1 lopt 4
run lopt-default-checked "" lopt 4
