"""Face detectors by registry: `--detector NAME` looks NAME up here (one module + one line each)."""

from __future__ import annotations

from typing import Any

from uniter3m.ingest.detectors.base import Detection, Detector
from uniter3m.ingest.registry import lookup

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
    return lookup(DETECTORS, name, "face detector")(options)
