"""LoPT on several processes, on PyTorch's own distributed engine.

``context`` joins the process group a launcher (torchrun, accelerate launch) set up; ``data_parallel``
synchronises gradients per LoPT block; ``fsdp`` shards the model with FSDP2; ``pipeline`` runs one
block per process, all at once (its training loop is ``lopt.recipes.pipeline``). A new parallel mode
is one new module here, chosen in ``lopt.recipes.sft.train``.
"""
from lopt.parallel.context import DistContext, init_distributed, launched_distributed
from lopt.parallel.data_parallel import DataParallel, GradSync, shard_rows, token_counts
from lopt.parallel.fsdp import GatheredModel, full_state_dict, shard_model
from lopt.parallel.pipeline import PipelineStage, PipelineStepper, StatsRelay, build_stage

__all__ = ["DistContext", "init_distributed", "launched_distributed", "DataParallel", "GradSync",
           "shard_rows", "token_counts", "GatheredModel", "full_state_dict", "shard_model",
           "PipelineStage", "PipelineStepper", "StatsRelay", "build_stage"]
