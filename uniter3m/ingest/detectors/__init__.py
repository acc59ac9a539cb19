"""Face detectors by registry: `--detector NAME` looks NAME up here (one module + one line each)."""

from __future__ import annotations

import importlib
from typing import Any

from uniter3m.errors import UserError
from uniter3m.ingest.detectors.base import Detection, Detector

__all__ = ["DETECTORS", "Detection", "Detector", "get_detector", "register"]

DETECTORS: dict[str, Any] = {
    # name: "module:Class" (imported on use) or the class itself
    "haar": "uniter3m.ingest.detectors.haar:HaarDetector",
    "mtcnn": "uniter3m.ingest.detectors.mtcnn:MtcnnDetector",
    "blazeface": "uniter3m.ingest.detectors.blazeface:BlazeFaceDetector",
}


def register(name: str, cls: type[Detector]) -> None:
    DETECTORS[name] = cls


def get_detector(name: str, options: Any) -> Detector:
    if name not in DETECTORS:
        raise UserError(f"unknown face detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    target = DETECTORS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target(options)
