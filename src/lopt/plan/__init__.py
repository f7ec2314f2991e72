"""``lopt plan``: the memory of a training step, predicted from the model's config before any weight
is loaded. ``planner`` walks the step (weights, gradients, optimizer state, the peak); ``activations``
replays each decoder layer's forward op by op and counts what autograd saves. Each method says what
it trains (``lopt.methods.Method.trains``); the planner costs it."""
from lopt.plan.planner import (DEFAULT_METHODS, PlanError, PlanRow, add_plan_arguments, aliases, count_parameters,
                               format_table, load_config, method_setup, method_trains, parse_size, plan,
                               run_plan_cli)

__all__ = ["DEFAULT_METHODS", "PlanError", "PlanRow", "add_plan_arguments", "aliases", "count_parameters",
           "format_table", "load_config", "method_setup", "method_trains", "parse_size", "plan", "run_plan_cli"]
