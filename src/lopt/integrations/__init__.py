"""lopt inside other training libraries' scripts.

``lopt.integrations.trl``: any lopt method in a TRL or transformers ``Trainer`` script,
``trainer = wrap_trainer(SFTTrainer(...), method="lopt")`` (docs/trl.md). TRL itself is imported only
when a trainer is wrapped.
"""
from lopt.integrations.trl import LoPTTrainerMixin, StepStats, lopt_trainer_class, trainer_config, wrap_trainer

__all__ = ["wrap_trainer", "LoPTTrainerMixin", "lopt_trainer_class", "trainer_config", "StepStats"]
