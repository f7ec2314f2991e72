"""Training methods, one file each, and ``wrap``. ``METHODS`` lists the names ``--method`` accepts.

To add one: a new file here with a ``Method`` subclass (and its options) decorated with ``@register``,
imported below; or, from another package, an entry point in the group ``lopt.methods``.
"""
from lopt.methods import lopt, e2e, freeze_lower, lora, qlora, lisa, badam  # noqa: F401,I001  (each registers itself; this order is --help's)
from lopt.methods.base import Method, Trains, get_method, load_plugins, method_names, register

load_plugins()

from lopt.methods.wrapping import LoPTConfig, check_checkpointing, compose_config, wrap  # noqa: E402  (after every method registered)

METHODS = method_names()

__all__ = ["METHODS", "LoPTConfig", "Method", "Trains", "check_checkpointing", "compose_config", "get_method",
           "load_plugins", "method_names", "register", "wrap"]
