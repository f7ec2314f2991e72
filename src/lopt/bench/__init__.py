"""Measured cost: ``lopt bench`` (training configurations side by side, each in a fresh process) and
``python -m lopt.bench.distbench`` (the parallel modes)."""
from lopt.bench.runner import BenchSpec, format_table, run_bench, run_one

__all__ = ["BenchSpec", "format_table", "run_bench", "run_one"]
