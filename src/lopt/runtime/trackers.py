"""Experiment trackers for ``--report-to`` (``tensorboard``, ``wandb``, ``mlflow``, ``all``, ``none``), with
the meaning of transformers' ``report_to``: the run's series go to each named tracker; ``all`` is every one
installed; ``none`` (or nothing) logs to ``metrics.jsonl`` only.

``check_trackers(names)`` resolves the names and fails in one line, before any model loads, when a
tracker's package is missing (naming the extra to install) or a name is unknown. ``Trackers(names,
out_dir)`` then takes ``log({"train/loss": ..., "retention/kl": ...}, step)`` and ``close()``; lopt's own
loops call it through ``lopt.runtime.state.RunLog``, and a TRL / transformers run can use it the same way.

Where each tracker writes: TensorBoard to ``OUT/tensorboard``; W&B to ``$WANDB_DIR`` (else ``OUT``), its
project ``$WANDB_PROJECT`` (else ``lopt``), offline with ``WANDB_MODE=offline``; MLflow to
``$MLFLOW_TRACKING_URI`` (MLflow's default otherwise), experiment ``$MLFLOW_EXPERIMENT_NAME`` (else
``lopt``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from lopt.config import TRACKERS
from lopt.engine.config import LoPTError

__all__ = ["TRACKERS", "check_trackers", "Trackers", "INSTALL"]

# The package each tracker imports, and how to install it.
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = {"tensorboard": "pip install 'lopt[tensorboard]' (or: pip install tensorboard)",
           "wandb": "pip install 'lopt[wandb]' (or: pip install wandb)",
           "mlflow": "pip install 'lopt[mlflow]' (or: pip install mlflow-skinny)"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGE[name]) is not None


def check_trackers(names: Sequence[str] | str | None, tensorboard: bool = False) -> list[str]:
    """The trackers ``names`` (``--report-to``) stand for, in order, without repeats: ``all`` is every
    installed one, ``none`` or nothing is none; ``tensorboard=True`` (the old ``--tensorboard`` flag)
    adds TensorBoard. A one-line LoPTError for an unknown name or a tracker whose package is missing."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    out: list[str] = []
    for name in list(names or []) + (["tensorboard"] if tensorboard else []):
        if name == "none":
            continue
        if name == "all":
            out += [t for t in TRACKERS if _installed(t)]
            continue
        if name not in TRACKERS:
            raise LoPTError(f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}, all, none")
        if not _installed(name):
            raise LoPTError(f"--report-to {name} needs the {_PACKAGE[name]} package: {INSTALL[name]}")
        out.append(name)
    return list(dict.fromkeys(out))


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Options as tracker parameters: nested keys joined by '.', values as (at most 250-character) text."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out


class Trackers:
    """The open trackers of one run (main process only). ``log`` drops None values; every tracker
    gets the same names and steps."""

    def __init__(self, names: Sequence[str], out_dir: str | Path, *, run_name: str | None = None,
                 config: Mapping[str, Any] | None = None):
        self.names = check_trackers(names)
        self.out_dir = Path(out_dir)
        self._tb = self._wandb = self._mlflow = None
        run_name = run_name or self.out_dir.name
        try:
            if "tensorboard" in self.names:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            if "wandb" in self.names:
                import wandb

                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "lopt"), name=run_name,
                                         dir=os.environ.get("WANDB_DIR") or str(self.out_dir),
                                         config=dict(config or {}), reinit="create_new")
            if "mlflow" in self.names:
                from mlflow.tracking import MlflowClient

                client = MlflowClient()
                exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lopt")
                exp = client.get_experiment_by_name(exp_name)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
                run = client.create_run(exp_id, run_name=run_name)
                self._mlflow = (client, run.info.run_id)
                if config:
                    from mlflow.entities import Param

                    params = [Param(k, v) for k, v in _flat(config).items()]
                    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                        client.log_batch(run.info.run_id, params=params[i: i + 100])
        except Exception:
            self.close()
            raise

    @property
    def mlflow_run_id(self) -> str | None:
        return None if self._mlflow is None else self._mlflow[1]

    def log(self, metrics: Mapping[str, float | int | None], step: int) -> None:
        """The numbers ``metrics`` (name -> value; None is left out) at training step ``step``."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if not values:
            return
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            import time

            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        """Flush and finish every tracker (idempotent)."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id)
        self._tb = self._wandb = self._mlflow = None
