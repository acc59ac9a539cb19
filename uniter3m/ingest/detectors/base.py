"""The face-detector contract: an RGB frame in, scored boxes (and landmarks when the detector has them) out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass
class Detection:
    box: np.ndarray  # (4,) float32 x0, y0, x1, y1 in pixels
    score: float
    landmarks: np.ndarray | None = (
        None  # (K, 2) float32 x, y in pixels; K = 5 (mtcnn) or 468 (blazeface mesh)
    )


class Detector:
    """One registered face detector. `detect` returns every face found, most confident first."""

    name: ClassVar[str]
    landmark_names: ClassVar[tuple[str, ...]] = ()  # what each landmark row is, for meta.json

    def __init__(self, options: Any) -> None:
        self.options = options

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name}
