"""``e2e``: plain end-to-end fine-tuning of every parameter, the reference for every comparison."""
from __future__ import annotations

from lopt.methods.base import Method, register


@register
class EndToEnd(Method):
    name = "e2e"
