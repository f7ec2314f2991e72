"""Training methods, one file each. ``METHODS`` lists the names ``--method`` accepts.

To add one: a new file here with a ``Method`` subclass decorated with ``@register``, imported below.
"""
from lopt.methods import lopt, e2e, freeze_lower, lora, lisa, badam  # noqa: F401,I001  (each registers itself; this order is --help's)
from lopt.methods.base import Method, get_method, method_names, register

METHODS = method_names()

__all__ = ["METHODS", "Method", "get_method", "method_names", "register"]
