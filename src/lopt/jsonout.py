"""``--json PATH`` as every command means it: write the JSON to PATH (``-``: standard output).

Memory in a JSON record is in bytes and the record says so in a top-level ``"units"`` mapping; the
printed tables show MiB.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MIB = 1 << 20


def json_help(what: str, default: str | None = None, *, memory: bool = True) -> str:
    """The ``--json`` help line, the same in every command (``memory``: the JSON holds sizes)."""
    notes = (["'-': standard output"] + (["memory in bytes"] if memory else [])
             + ([f"default: {default}"] if default else []))
    return f"write {what} as JSON to PATH ({'; '.join(notes)})"


def write_json(path: str | Path, obj: Any) -> str:
    """Write ``obj`` as indented JSON to ``path`` (``-``: standard output); the parent folder is made.
    Returns where it went, for a "written to" line."""
    text = json.dumps(obj, indent=2)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return "standard output"
    p = Path(path)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")
    return str(p)
