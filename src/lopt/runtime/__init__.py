"""What every trainer shares, so that recipes and parallel modes import it and never each other:
``loop`` (the optimizer step), ``checkpoints`` (checkpoint writing, stale temporaries, the save limit),
``resume`` (picking the checkpoint to resume and loading its state without running code), ``state``
(run state, summary, progress, Ctrl-C)."""
