"""Recipes: short programs that compose the components into a training run. ``sft`` (``lopt train``),
``grpo`` and ``dpo`` (through TRL, via ``trl_bridge``), ``experiment`` (the study behind
records/study-v2/RESULTS.md)."""
