"""The project's own study of LoPT against its baselines (``make experiment``).

``plan`` says what runs (budget, configurations, commands), ``run`` runs it in resumable pieces,
``records`` keeps one JSON record per finished piece, ``report`` writes docs/RESULTS.md and the plots
from the records. ``short`` is study v1, the 20-step budget kept as an appendix.
"""
