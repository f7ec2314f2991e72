"""What every trainer shares, so that recipes and parallel modes import it and never each other:
``loop`` (the optimizer step), ``checkpoints`` (checkpoint I/O and resume), ``state`` (run state,
summary, progress, Ctrl-C)."""
