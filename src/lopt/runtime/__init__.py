"""What every trainer shares, so that recipes and parallel modes import it and never each other:
``loop`` (the optimizer step), ``checkpoints`` (checkpoint writing, stale temporaries, the save limit),
``resume`` (picking the checkpoint to resume and loading its state without running code), ``state``
(run state, and ``RunLog``: the metrics log, progress bar, callbacks, Ctrl-C and summary of a training
loop, one for ``lopt train`` and ``--pipeline``)."""
from lopt.runtime.state import (SIGINT_DUPLICATE_S, Callback, RunLog, TrainResult, TrainState, close_run,
                                count_steps, install_sigint, mean_records, trim_log)

__all__ = ["Callback", "RunLog", "SIGINT_DUPLICATE_S", "TrainResult", "TrainState", "close_run",
           "count_steps", "install_sigint", "mean_records", "trim_log"]
