"""The lookup behind `--extractor NAME` and `--detector NAME`: a table of name -> "module:Class" (imported
only when chosen, so an uninstalled optional package breaks nothing else) or a class registered at run time."""

from __future__ import annotations

import importlib
from typing import Any

from uniter3m.errors import UserError


def lookup(table: dict[str, Any], name: str, what: str) -> Any:
    """The class `table` holds for `name`, imported now if it is a "module:Class" string; an unknown name is
    an error listing the known ones (`what` names the option's kind, e.g. "extractor")."""
    if name not in table:
        raise UserError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    target = table[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target
