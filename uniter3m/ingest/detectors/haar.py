"""`haar` (the default detector): OpenCV's frontal-face Haar cascade; boxes, no landmarks.

The weights ship inside the `opencv-python-headless` wheel (`cv2.data.haarcascades`, extra
`uniter3m[media]`), so nothing is downloaded. A detection counts when `min_neighbors` overlapping
windows agree (OpenCV's own rule); its score is that number of windows. Faces smaller than
`min_face` of the frame's shorter side are not searched for.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.detectors.base import Detection, Detector

CASCADE = "haarcascade_frontalface_default.xml"


def cv2_module() -> Any:
    try:
        import cv2
    except ImportError as err:
        raise UserError("face detection needs OpenCV: pip install 'uniter3m[media]'") from err
    return cv2


@lru_cache(maxsize=1)
def _cascade() -> Any:
    cv2 = cv2_module()
    cv2.setNumThreads(1)  # one process per worker does the parallel work
    path = cv2.data.haarcascades + CASCADE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"OpenCV could not load its face detector {path}; reinstall opencv-python-headless<5")
    return cascade


class HaarDetector(Detector):
    """`options`: a `uniter3m.ingest.faces.FaceOptions` (min_face, min_neighbors)."""

    name = "haar"

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        cv2 = cv2_module()
        grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        side = max(int(min(grey.shape) * self.options.min_face), 16)
        boxes, neighbours = _cascade().detectMultiScale2(
            grey, scaleFactor=1.1, minNeighbors=self.options.min_neighbors, minSize=(side, side)
        )
        found = [
            Detection(np.array([x, y, x + w, y + h], np.float32), float(n))
            for (x, y, w, h), n in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(neighbours).reshape(-1))
        ]
        return sorted(found, key=lambda d: -d.score)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "cascade": f"opencv {cv2_module().__version__} {CASCADE}"}
