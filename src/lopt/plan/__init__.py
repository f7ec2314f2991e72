"""``lopt plan``: the memory of a training step, predicted from the model's config before any weight
is loaded. ``planner`` walks the step (weights, gradients, optimizer state, the peak); ``activations``
replays each decoder layer's forward op by op and counts what autograd saves. Each method says what
it trains (``lopt.methods.Method.trains``); the planner costs it."""
from lopt.plan.planner import (DEFAULT_METHODS, PlanError, PlanRow, add_plan_arguments, aliases, count_parameters,
                               format_table, load_config, method_setup, method_trains, parse_size, plan,
                               run_plan_cli)
# ``lopt plan``'s CLI with --nproc/--parallel (per-rank memory under DDP, FSDP2, the pipeline)
from lopt.plan.distributed import PARALLEL_MODES, add_plan_arguments, plan_parallel, run_plan_cli  # noqa: F811
# ``lopt plan grpo|dpo``: a TRL step (policy, reference, generation, log-probs); wraps the CLI above
from lopt.plan.rl import TRL_VERSION, add_plan_arguments, format_rl_table, plan_rl, run_plan_cli  # noqa: F811

__all__ = ["DEFAULT_METHODS", "PlanError", "PlanRow", "add_plan_arguments", "aliases", "count_parameters",
           "format_table", "load_config", "method_setup", "method_trains", "parse_size", "plan", "run_plan_cli", "PARALLEL_MODES", "plan_parallel",
           "TRL_VERSION", "format_rl_table", "plan_rl"]
