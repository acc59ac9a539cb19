"""Extractors by registry: `--extractor NAME[:ARG]` looks NAME up here.

A new extractor is one module (an `Extractor` subclass, see `base.py`) plus one line in `EXTRACTORS`
(name -> "module:Class", imported only when chosen, so an uninstalled optional package breaks nothing
else). `register(name, cls)` adds one at run time (tests, plugins).
"""

from __future__ import annotations

import importlib
from typing import Any

from uniter3m.errors import UserError
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames

__all__ = ["EXTRACTORS", "Extractor", "ExtractorOptions", "FaceTrack", "Frames", "get_extractor", "register"]

EXTRACTORS: dict[str, Any] = {
    # name: "module:Class" (imported on use) or the class itself (registered at run time)
}


def register(name: str, cls: type[Extractor]) -> None:
    """Make `--extractor name` resolve to `cls` (overrides a built-in of the same name)."""
    EXTRACTORS[name] = cls


def extractor_class(name: str) -> type[Extractor]:
    if name not in EXTRACTORS:
        raise UserError(f"unknown extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    target = EXTRACTORS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def get_extractor(spec: str, options: ExtractorOptions | None = None) -> Extractor:
    """Build the extractor named by `spec` ("compare", "hf:DIR", "whisper-ct2:DIR", ...)."""
    name, sep, arg = spec.partition(":")
    return extractor_class(name)(arg if sep else None, options or ExtractorOptions())
