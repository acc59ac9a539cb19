"""Extractors by registry: `--extractor NAME[:ARG]` looks NAME up here.

A new extractor is one module (an `Extractor` subclass, see `base.py`) plus one line in `EXTRACTORS`
(name -> "module:Class", imported only when chosen, so an uninstalled optional package breaks nothing
else). `register(name, cls)` adds one at run time (tests, plugins).
"""

from __future__ import annotations

from typing import Any

from uniter3m.errors import UserError
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames
from uniter3m.ingest.registry import lookup

__all__ = ["EXTRACTORS", "Extractor", "ExtractorOptions", "FaceTrack", "Frames", "get_extractor", "register"]

EXTRACTORS: dict[str, Any] = {
    # name: "module:Class" (imported on use) or the class itself (registered at run time)
    "compare": "uniter3m.ingest.extractors.opensmile:Compare",
    "egemaps": "uniter3m.ingest.extractors.opensmile:Egemaps",
    "functionals": "uniter3m.ingest.extractors.opensmile:Functionals",
    "hf": "uniter3m.ingest.extractors.hf:HfExtractor",
    "geometric": "uniter3m.ingest.extractors.geometric:Geometric",
    "pixels": "uniter3m.ingest.extractors.pixels:Pixels",
    "resemblyzer": "uniter3m.ingest.extractors.resemblyzer:Resemblyzer",
    "resemblyzer-utt": "uniter3m.ingest.extractors.resemblyzer:ResemblyzerUtterance",
    "whisper-ct2": "uniter3m.ingest.extractors.whisper_ct2:WhisperCt2",
    "fer": "uniter3m.ingest.extractors.fer:FerExtractor",
    "landmarks": "uniter3m.ingest.extractors.landmarks:Landmarks",
}


def register(name: str, cls: type[Extractor]) -> None:
    """Make `--extractor name` resolve to `cls` (overrides a built-in of the same name)."""
    EXTRACTORS[name] = cls


def extractor_class(name: str) -> type[Extractor]:
    return lookup(EXTRACTORS, name, "extractor")


def extractors_for(modality: str) -> list[str]:
    """The names that extract `modality` ("speech" | "face"), for error messages; unimportable ones are left out."""
    names = []
    for name in sorted(EXTRACTORS):
        try:
            cls = extractor_class(name)
        except ImportError:
            continue
        if cls.modality in (modality, "any"):
            names.append(name)
    return names


def get_extractor(spec: str, options: ExtractorOptions | None = None) -> Extractor:
    """Build the extractor named by `spec` ("compare", "hf:DIR", "whisper-ct2:DIR", ...) for `options.modality`."""
    options = options or ExtractorOptions()
    name, sep, arg = spec.partition(":")
    cls = extractor_class(name)
    if cls.modality not in (options.modality, "any"):
        raise UserError(
            f"--extractor {name} gives {cls.modality} features, not {options.modality}; the {options.modality} "
            f"extractors are: {' | '.join(extractors_for(options.modality))}"
        )
    return cls(arg if sep else None, options)
